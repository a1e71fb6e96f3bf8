"""The format-neutral parts of a card's text: notes under the files table (what PPL, KLD, Russian kept and the gate
mean) and "How these files were made"."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from quantkit.backends.base import HUB, BackendBase, Entries, gate_failed
from quantkit.card.original import base_link
from quantkit.scan import public_command_text
from quantkit.workspace import Workspace

_BUILTIN_CALIBRATION = {
    "builtin:ru-mix": "quantkit's built-in Russian calibration mix (news, encyclopedic, science, prose, dialogue, "
                      "instructions, business and code)",
}
_BUILTIN_EVAL = {
    "builtin:ru-eval": "quantkit's held-out Russian evaluation text (kept apart from the calibration mix)",
}


def has_drift(arts: Entries) -> bool:
    return any(isinstance(e.get("drift"), dict) for _, e in arts)


def kept_cell(entry: dict[str, Any]) -> str:
    d = entry.get("drift")
    if not isinstance(d, dict) or not isinstance(d.get("kept"), int | float):
        return "—"
    return f"{d['kept'] * 100:.0f}% ({d['prompts'] - d['left_russian']}/{d['prompts']})"


def _drift_note(arts: Entries) -> str | None:
    """What "Russian kept" means, from the first drift result (`quantkit eval --drift`)."""
    d = next((e["drift"] for _, e in arts if isinstance(e.get("drift"), dict)), None)
    if d is None:
        return None
    prompts = "quantkit's built-in Russian prompts" if str(d.get("prompt_set", "")).startswith("builtin:") \
        else "the publisher's own Russian prompts"
    return (f"**Russian kept** is the share of {d['prompts']} answers to {prompts} (greedy, {d.get('new_tokens')} "
            "new tokens) that stayed in Russian: an answer counts as having left Russian when it switches to another "
            "script or language (three or more non-Cyrillic words in a row, or Chinese characters) beyond code, "
            "numbers and terms the bf16 original's answer to the same prompt also used (a prompt the original "
            "itself answered in another language does not count against a file).")


def _evals(arts: Entries) -> list[dict[str, Any]]:
    return [e["eval"] for _, e in arts if isinstance(e.get("eval"), dict)]


def table_notes(arts: Entries) -> str:
    evals = _evals(arts)
    if not evals:
        return ("These files have not been evaluated yet: run `quantkit eval` on the workspace to add perplexity "
                "and KL-divergence to this table.")
    ev = evals[0]
    where = f"held-out Russian text (`{public_spec(str(ev['eval_set']))}`" if ev.get("eval_set") else \
        "held-out Russian text ("
    bits = []
    if ev.get("tokens"):
        bits.append(f"{int(ev['tokens']):,} tokens")
    if ev.get("ctx"):
        bits.append(f"context {ev['ctx']}")
    measured = where + "".join(f", {b}" for b in bits) + ")"
    measured = measured.replace("(, ", "(").replace(" ()", "")
    ref = f" The bf16 original scores {ev['ppl_ref']:.3f}." if isinstance(ev.get("ppl_ref"), int | float) else ""
    lines = [
        f"**PPL** is perplexity on {measured}.{ref} **ΔPPL** is the change against bf16. **KLD** is the mean "
        "KL-divergence of each file's next-token distribution from bf16's"
        + (", **KLD 99.9%** its 99.9th percentile over the tokens (the worst tokens, where a damaged file shows "
           "first)," if any("kld_p999" in e for e in evals) else ",")
        + " and **Top-1** how often both pick the "
        "same most likely next token. For PPL, ΔPPL and KLD lower is better; they say how close a file stays to "
        "the original, not how good the original is.",
        *(["`quality.csv` in this repo lists the same measurements per file."] if evals else []),
    ]
    note = _drift_note(arts)
    if note:
        lines.append(note)
    gates = [e.get("gate") for _, e in arts if isinstance(e.get("gate"), dict)]
    bound = next((g for g in gates if g.get("max_ppl_increase") is not None or g.get("max_kld") is not None), None)
    if bound:
        limits = []
        if bound.get("max_ppl_increase") is not None:
            limits.append(f"ΔPPL ≤ {bound['max_ppl_increase'] * 100:+.0f}%")
        if bound.get("max_kld") is not None:
            limits.append(f"KLD ≤ {bound['max_kld']:g}")
        if bound.get("max_drift") is not None:
            limits.append(f"at most {bound['max_drift'] * 100:.0f}% of answers leaving Russian")
        lines.append(f"Quality gate: {' and '.join(limits)}. "
                     + ("Files marked ✗ did not pass it: use them only when nothing larger fits."
                        if any(gate_failed(e) for _, e in arts) else "Every file here passed it."))
    return "\n\n".join(lines)


def _describe_eval_set(spec: Any) -> str:
    if not spec:
        return "held-out Russian text"
    spec = str(spec)
    if spec in _BUILTIN_EVAL:
        return f"{_BUILTIN_EVAL[spec]}, `{spec}`"
    return f"held-out Russian text `{public_spec(spec)}`"


def public_spec(spec: str) -> str:
    """A calibration/eval spec fit for a public card: local paths lose their folders."""
    if spec.startswith(("builtin:", "hf:")):
        return spec
    return PurePosixPath(spec.replace("\\", "/")).name


def _params(n: Any) -> str:
    if not isinstance(n, int | float) or not n:
        return ""
    return f"{n / 1e9:.1f}B parameters" if n >= 1e9 else f"{n / 1e6:.0f}M parameters"


def _describe_calibration(cal: dict[str, Any]) -> str:
    spec = str(cal.get("spec") or "")
    if spec.startswith("file:"):
        return f"an importance matrix supplied by the user (`{public_spec(spec[5:])}`)"
    if spec in _BUILTIN_CALIBRATION:
        what = f"{_BUILTIN_CALIBRATION[spec]}, `{spec}`"
    elif spec.startswith("hf:"):
        dataset = spec[3:].split(":", 1)[0]
        what = f"the dataset [{dataset}]({HUB}/datasets/{dataset}), `{spec}`"
    else:
        what = f"`{public_spec(spec)}`" if spec else "Russian text"
    size = []
    samples, length = cal.get("samples") or cal.get("rows"), cal.get("seq_len") or cal.get("length")
    if samples and length:
        size.append(f"{samples} samples × {length} tokens")
    if cal.get("tokens"):
        size.append(f"{int(cal['tokens']):,} tokens")
    chat = " (dialogues rendered with the model's chat template)" if cal.get("chat") or cal.get("chat_template") \
        else ""
    return what + (f": {' = '.join(size)}" if size else "") + chat


def provenance(ws: Workspace, backend: BackendBase, arts: Entries) -> str:
    """"How these files were made": base model, calibration, the format's own lines, evaluation, tools, commands."""
    model = ws.model
    about = ", ".join(x for x in (model.get("architecture"), _params(model.get("params")),
                                  model.get("dtype")) if x and x != "?")
    lic = (f", licence `{model['license']}`; these files are under the same licence" if model.get("license")
           else "")
    lines = [f"- **Base model:** {base_link(ws)}" + (f" ({about})" if about else "") + lic + "."]
    if model.get("license_note"):
        lines.append(f"- **Licence terms:** {model['license_note']}.")
    cals: list[dict[str, Any]] = []
    for _, e in arts:
        cal = e.get("calibration")
        if isinstance(cal, dict) and cal not in cals:
            cals.append(cal)
    for cal in cals:
        lines.append(f"- **Calibration:** {_describe_calibration(cal)}.")
    if not cals:
        lines.append("- **Calibration:** none recorded (these types need none, or the files predate quantkit's "
                     "records).")
    lines += backend.card_provenance(ws, arts)
    evals = _evals(arts)
    if evals:
        ev = evals[0]
        kld = str(ev.get("kld_mode") or "")
        over = "the full vocabulary" if kld == "full" else (
            f"the bf16 model's top {kld[3:]} tokens plus the remaining probability mass" if kld.startswith("top")
            else kld)
        mode = f", KL-divergence over {over}" if kld else ""
        size = ", ".join(x for x in (f"{int(ev['tokens']):,} tokens" if ev.get("tokens") else "",
                                     f"context {ev['ctx']}" if ev.get("ctx") else "") if x)
        lines.append(f"- **Evaluation:** {_describe_eval_set(ev.get('eval_set'))}"
                     + (f" ({size})" if size else "") + f"; every file compared with the bf16 original{mode}.")
    steps = _steps(ws, backend.name)
    if steps:
        lines.append(f"- **Steps:** {steps}.")
    tools: dict[str, list[str]] = {}
    for _, e in arts:
        for name, version in (e.get("tools") or {}).items():
            tools.setdefault(str(name), [])
            if str(version) not in tools[name]:
                tools[name].append(str(version))
    if tools:
        lines.append("- **Tools:** " + ", ".join(f"{n} {' / '.join(v)}" for n, v in sorted(tools.items())) + ".")
    commands: list[str] = []
    for _, e in arts:
        cmd = public_command_text(str(e.get("command") or ""))  # no machine paths, even from older manifests
        if cmd and cmd not in commands:
            commands.append(cmd)
    text = "\n".join(lines)
    if commands:
        plural = "s" if len(commands) > 1 else ""
        text += f"\n\nThe command{plural} that made these files:\n\n```bash\n" + "\n".join(commands) + "\n```"
    return text



def _steps(ws: Workspace, fmt: str) -> str:
    """The recorded steps, kinds in order with their counts: ``calibrate → imatrix → convert → quantize ×2``."""
    kinds: list[list[Any]] = []
    for kind, _ in ws.history(fmt):
        if kind in ("resolve", "publish"):
            continue
        if kinds and kinds[-1][0] == kind:
            kinds[-1][1] += 1
        else:
            kinds.append([kind, 1])
    return " → ".join(f"{k} ×{n}" if n > 1 else str(k) for k, n in kinds)
