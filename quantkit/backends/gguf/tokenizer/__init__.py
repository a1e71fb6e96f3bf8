"""The GGUF tokenizer: reading the tokenizer files, finding llama.cpp's pre-tokenizer (hash, structure,
trial), writing the vocabulary keys."""
