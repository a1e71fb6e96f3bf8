"""AWQ through GPTQModel (see `quantkit.backends.awq.backend`): GPTQ's machinery with AWQ's options, packing and
card words."""

from quantkit.backends.awq.backend import AWQBackend
from quantkit.backends.awq.options import AWQOptions, is_awq_folder

__all__ = ["AWQBackend", "AWQOptions", "is_awq_folder"]
