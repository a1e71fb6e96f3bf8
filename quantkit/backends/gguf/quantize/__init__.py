"""Quantizing GGUF files through llama.cpp: file types and options, the one-pass quantizer, size bounds,
the importance matrix, and the writers under them."""
