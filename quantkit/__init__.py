"""quantkit: quantize Russian-language LLMs to GGUF, EXL2 and GPTQ, check them on Russian text, publish them."""

__version__ = "0.1.0"
