"""`quantkit gptq MODEL --bits 4 --group-size 128`: GPTQ through GPTQModel. The flags are generated from
`GPTQOptions`, the same model that validates a recipe's ``gptq:`` section."""

from __future__ import annotations

from quantkit.backends.gptq.options import GPTQOptions
from quantkit.cli.generated import format_command

command = format_command(
    "gptq", GPTQOptions,
    "Quantize a model to GPTQ (GPTQModel), calibrated on Russian text; loads in transformers, vLLM and TGI.")
