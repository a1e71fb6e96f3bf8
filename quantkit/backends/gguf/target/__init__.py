"""Size-targeted GGUF files: measure each tensor's damage per type, allocate the best mix under a budget."""
