"""Checking a GGUF: it loads in llama.cpp, tokenizes Russian like the original, and (unquantized) matches
transformers."""
