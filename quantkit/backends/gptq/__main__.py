"""``python -m quantkit.backends.gptq JOB.json``: the GPTQModel child process."""

import sys

from quantkit.interrupts import die_with_parent

die_with_parent()  # before anything slow: a worker whose run died stops

from quantkit.backends.gptq.worker import main  # noqa: E402

main(sys.argv)
