"""`quantkit exl2 MODEL --bits 4.0,5.0,6.5`: EXL2 through exllamav2, several bitrates from one measurement. The flags
are generated from `EXL2Options`, the same model that validates a recipe's ``exl2:`` section."""

from __future__ import annotations

from quantkit.backends.exl2.options import EXL2Options
from quantkit.cli.generated import format_command

command = format_command(
    "exl2", EXL2Options,
    "Quantize to EXL2 (exllamav2) at one or more bitrates, calibrated on Russian text; needs an NVIDIA GPU.")
