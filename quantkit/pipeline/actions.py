"""The actions of the steps that follow every format: evaluation (with its gate) and publishing."""

from __future__ import annotations

from typing import Any

from quantkit import console
from quantkit.steps import StepResult, StepRun


def format_artifacts(run: StepRun) -> list[str]:
    """The artifact keys the step's inputs made, in plan order."""
    keys: list[str] = []
    for key in run.step.inputs:
        rec = run.inputs.get(key)
        if rec is not None:
            keys += [k for k in rec.artifacts if k not in keys]
    return keys


def evaluate_action(run: StepRun) -> StepResult:
    """Score the format's artifacts against the bf16 reference on the eval text, and gate them."""
    from quantkit.quality.evaluate import evaluate_artifacts

    s = run.ctx.settings
    ws = run.ctx.workspace
    keys = format_artifacts(run)
    report, updates = evaluate_artifacts(ws, only=[ws.abs(k) for k in keys], eval_spec=s.eval, n_ctx=s.ctx,
                                         chunks=s.chunks, max_ppl_increase=s.max_ppl_increase, max_kld=s.max_kld,
                                         drift=drift_settings(s.drift, s.max_drift), checkpoint=run.ctx.checkpoint)
    return StepResult(info={"report": report}, updates=updates)


def drift_settings(enabled: bool, max_drift: float) -> Any:
    """The drift check's settings (built-in prompts and defaults), or None when it is off."""
    if not enabled:
        return None
    from quantkit.quality.generate import DriftSettings

    return DriftSettings(max_drift=max_drift)


def publish_action(run: StepRun) -> StepResult:
    """Publish the format's artifacts (those that passed the gate, unless forced) to the Hub repo."""
    from quantkit.backends.base import gate_failed
    from quantkit.publish import publish_format

    s = run.ctx.settings
    ws = run.ctx.workspace
    fmt = str(run.step.format)
    mine = {k: e for k, e in ws.artifacts.items() if e.get("format") == fmt}
    if not s.force and mine and all(gate_failed(e) for e in mine.values()):
        console.warn(f"{fmt}: every artifact failed the quality gate; nothing is published")
        return StepResult(info={"published": False, "reason": "every artifact failed the quality gate"})
    repo = dict(run.step.extra).get("repo_name")
    result = publish_format(ws, fmt, repo=repo, private=s.private, force=s.force)
    for ref in result.get("refused", []):
        console.warn(f"not published: {ref.get('quant')} failed the quality gate "
                     f"({', '.join(ref.get('reasons') or []) or 'see the eval table'})")
    info = {k: result.get(k) for k in ("repo", "url", "private", "uploaded_size")}
    info["refused"] = list(result.get("refused", []))
    info["published"] = True
    return StepResult(info=info)
