"""One pipeline for every command: a `Job` (one model, its formats, every setting) is planned into `Step`s, which
an executor runs: the local one here, in order; the Ray one on a cluster, independent steps side by side.
`quantkit gguf MODEL ...` is a one-job run; `quantkit run RECIPE` is many.

::

    Job ─▶ plan_job / plan_model ─▶ [Step: resolve, calibrate, convert, imatrix, quantize × N, verify, evaluate,
                                     publish]   (each backend declares its own with `Backend.steps`)
        ─▶ executor ─▶ execute: per step, done? (the workspace decides) else action → staging → commit → record
"""

from quantkit.pipeline.executor import Executor, LocalExecutor, failure, get_executor, summarize
from quantkit.pipeline.job import FormatJob, FormatResult, Job, JobResult, Settings
from quantkit.pipeline.plan import ESTIMATED, Plan, default_name, plan_job, plan_model
from quantkit.pipeline.run import Made, make, plan_for, run_job
from quantkit.steps import CALIBRATE, RESOLVE, Resources, Step, StepResult, StepRun, step_key

__all__ = ["CALIBRATE", "ESTIMATED", "RESOLVE", "Executor", "FormatJob", "FormatResult", "Job", "JobResult",
           "LocalExecutor", "Made", "Plan", "Resources", "Settings", "Step", "StepResult", "StepRun", "default_name",
           "failure", "get_executor", "make", "plan_for", "plan_job", "plan_model", "run_job", "step_key", "summarize"]
