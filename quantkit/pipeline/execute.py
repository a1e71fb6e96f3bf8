"""The executor loop: one model's planned steps, in order. For each step the workspace says whether it is done
(fingerprint and intact outputs); otherwise its action runs into a staging folder and the workspace commits the
outputs and records the step. Nothing else reads or writes step records.

A step whose input failed (or was not run) is not run; a failure stops the model's remaining steps unless
``keep_going``, and with ``strict`` (a one-model command) it is raised as it is.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit import console
from quantkit.errors import QuantkitError
from quantkit.files import DiskFull
from quantkit.steps import Step, StepResult, StepRun

SKIPPED = ("skip", "fails", "fails: required", "not needed")  # steps this run leaves alone


@dataclass
class Outcome:
    """What became of one step in this run: ``done`` (skipped: finished earlier), ``ran``, ``failed`` or
    ``not run``; its recorded info, and the error that stopped it."""

    key: str
    state: str
    info: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "ran")


def runnable(plan: Any) -> list[Step]:
    """The steps of `plan` that this run may run or skip (those of formats that cannot run here, and those nothing
    needs, are left out)."""
    return [s for s in plan.steps if s.status not in SKIPPED]


def fusable(step: Step, by_key: dict[str, Step], pending: set[str], finished: set[str]) -> tuple[Step, ...]:
    """The later steps `step` can make in its pass: pending, and with every other input finished."""
    out = []
    for key in step.fuses:
        other = by_key.get(key)
        if other is None or key not in pending:
            continue
        if all(i == step.key or i in finished for i in other.inputs):
            out.append(other)
    return tuple(out)


def inputs_of(ws: Any, steps: tuple[Step, ...]) -> dict[str, Any]:
    """The finished input steps' records that `steps` read."""
    out = {}
    for st in steps:
        for key in st.inputs:
            rec = ws.recorded(key)
            if rec is not None:
                out[key] = rec
    return out


def execute(plan: Any, *, keep_going: bool = False, strict: bool = False,
            only: Collection[str] | None = None) -> dict[str, Outcome]:
    """Run the plan's steps that are not done (of `only`, when given: the rest are left alone); returns every
    step's outcome by key."""
    ctx = plan.ctx
    ws = ctx.workspace
    steps = [s for s in runnable(plan) if only is None or s.key in only]
    by_key = {s.key: s for s in steps}
    outcomes: dict[str, Outcome] = {}
    pending = {s.key for s in steps if not s.done}
    stopped = False
    shared: dict[str, Any] = {}
    with console.progress() as bar, _closing(shared):
        for st in steps:
            if st.key in outcomes:  # made in an earlier step's pass
                continue
            if st.done:
                rec = ws.recorded(st.key)
                outcomes[st.key] = Outcome(st.key, "done", rec.info if rec else {})
                continue
            blocked = [k for k in st.inputs if k in outcomes and not outcomes[k].finished]
            if stopped or blocked:
                outcomes[st.key] = Outcome(st.key, "not run")
                continue
            finished = {k for k, o in outcomes.items() if o.finished}
            fused = fusable(st, by_key, pending, finished)
            run = StepRun(step=st, ctx=ctx, staging=ws.staging(st.key), fused=fused, pending=frozenset(pending),
                          shared=shared, bar=bar, inputs=inputs_of(ws, (st, *fused)))
            try:
                result = run_action(run)
                ws.commit(st, result, run.staging, fused)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - a step's failure is reported; the run decides what follows
                for key, fields in getattr(exc, "updates", {}).items():
                    ws.update_artifact(key, **fields)
                if strict:
                    raise
                outcomes[st.key] = Outcome(st.key, "failed", error=exc)
                stopped = not keep_going
                continue
            for done in (st, *fused):
                res = result if done is st else result.fused.get(done.key, StepResult())
                rec = ws.recorded(done.key)
                outcomes[done.key] = Outcome(done.key, "ran", rec.info if rec else dict(res.info))
                pending.discard(done.key)
    return outcomes


def run_action(run: StepRun) -> StepResult:
    """Run a step's action into its staging folder; on any failure or interrupt the folder is removed."""
    from quantkit.interrupts import removing_on_kill

    if run.step.action is None:
        raise QuantkitError(f"{run.step.key} cannot run here", "see the plan (--dry-run)")
    try:
        with removing_on_kill(run.staging):
            return run.step.action(run)
    except DiskFull as exc:  # said of the folder the user knows, not of the step's staging folder
        _clean(run)
        folder = Path(exc.folder)
        if folder.is_relative_to(run.staging):
            raise DiskFull(run.final(folder.relative_to(run.staging).as_posix()), exc.need, exc.written) from exc
        raise
    except BaseException:
        _clean(run)
        raise


def _clean(run: StepRun) -> None:
    shutil.rmtree(run.staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        run.staging.parent.rmdir()


@contextlib.contextmanager
def _closing(shared: dict[str, Any]) -> Iterator[None]:
    """Close what the steps of a run shared (a verification worker) when the run ends, however it ends."""
    try:
        yield
    finally:
        for value in reversed(list(shared.values())):
            close = getattr(value, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()
