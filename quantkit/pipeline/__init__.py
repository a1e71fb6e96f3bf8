"""One pipeline for every command: a `Job` (one model, its formats, every setting) is planned into typed `Step`s
and run by an `Executor`. `quantkit gguf MODEL ...` is a one-job run; `quantkit run RECIPE` is many.

::

    Job ─▶ plan_job ─▶ [Step: resolve, calibrate, convert, imatrix, quantize × N, verify, evaluate, publish]
        ─▶ executor.run ─▶ run_job: check → resolve → calibrate → backend steps → evaluate → card → publish
"""

from quantkit.pipeline.executor import Executor, LocalExecutor, failure, get_executor, summarize
from quantkit.pipeline.job import FormatJob, FormatResult, Job, JobResult, Resources, Settings, Step
from quantkit.pipeline.plan import ESTIMATED, default_name, plan_job
from quantkit.pipeline.run import run_job

__all__ = ["ESTIMATED", "Executor", "FormatJob", "FormatResult", "Job", "JobResult", "LocalExecutor", "Resources",
           "Settings", "Step", "default_name", "failure", "get_executor", "plan_job", "run_job", "summarize"]
