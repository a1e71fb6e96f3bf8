"""``python -m quantkit.backends.gptq JOB.json``: the GPTQModel child process."""

import sys

from quantkit.backends.gptq.worker import main

main(sys.argv)
