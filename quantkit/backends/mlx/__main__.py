"""``python -m quantkit.backends.mlx JOB.json``: the mlx_lm.convert child process."""

import sys

from quantkit.interrupts import die_with_parent

die_with_parent()  # before anything slow: a worker whose run died stops

from quantkit.backends.mlx.worker import main  # noqa: E402

main(sys.argv)
