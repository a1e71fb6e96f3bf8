"""GGUF through llama.cpp: our own HF → GGUF converter, importance matrix, quantization and scorer."""
