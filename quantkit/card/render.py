"""The model card (README.md) of a published format: Hub metadata, a table of files with their measured quality,
usage for the format's runtimes, how the files were made, and the original model card below.

Rendering is format-neutral: what differs per format (names, advice, branches, usage, extra provenance lines) comes
from the format's backend (`quantkit.backends.base.BackendBase` hooks, through `sections_for`).

`render_card(ws, fmt)` returns the card as text; `write_card` writes it into the format folder
(``<ws>/<fmt>/README.md``), which is what `quantkit push` uploads as the repo's README.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from quantkit.backends.base import BackendBase, CardContext, Entries, gate_failed, sections_for
from quantkit.card.notes import has_drift, kept_cell, provenance, table_notes
from quantkit.card.original import base_link, front_matter, model_name, original, read_source_card, split_front_matter
from quantkit.card.quality_csv import QUALITY_CSV, quality_csv
from quantkit.errors import QuantkitError
from quantkit.hubname import hub_safe_name
from quantkit.workspace import Workspace, human_size, write_text_atomic

if TYPE_CHECKING:  # huggingface_hub costs ~0.4 s to import: only when a card is rendered
    from huggingface_hub import ModelCardData

CARD_NAME = "README.md"


# -- what the workspace holds -----------------------------------------------------------------------------------
def format_info(fmt: str) -> tuple[str, str, str, str]:
    """(library_name, tag, repo suffix, human name) of a format, from its backend (generic for unknown ones)."""
    info = sections_for(fmt).format_info()
    return info.library, info.tag, info.repo_suffix, info.title


def default_repo_name(ws: Workspace, fmt: str) -> str:
    """``<Model>-GGUF`` (without a namespace), made of the characters a Hub repo name may hold."""
    return f"{hub_safe_name(model_name(ws))}-{format_info(fmt)[2]}"


def artifacts_for(ws: Workspace, fmt: str) -> list[tuple[str, dict[str, Any]]]:
    """The workspace's artifacts of one format, best quality first (bits per weight, then size)."""
    found = [(key, entry) for key, entry in ws.artifacts.items()
             if entry.get("format", key.split("/", 1)[0]) == fmt]
    return sorted(found, key=lambda kv: (-(kv[1].get("bpw") or 0), -(kv[1].get("size") or 0), kv[0]))


def formats_in(ws: Workspace) -> list[str]:
    """Formats with at least one artifact in the workspace."""
    return sorted({entry.get("format", key.split("/", 1)[0]) for key, entry in ws.artifacts.items()})


def branches(fmt: str, arts: Entries) -> dict[str, str]:
    """Artifact key → the repo branch it goes to (the format's backend decides)."""
    return sections_for(fmt).branches(arts)


def advice(fmt: str, quant: str, bpw: float | None) -> str:
    """A plain one-line recommendation for a quant type (the format's backend decides)."""
    return sections_for(fmt).advice(quant, bpw)


def pick(fmt: str, arts: Entries) -> tuple[str, dict[str, Any]]:
    """The artifact usage snippets show: the smallest recommended one that passed the gate, else the middle one."""
    return sections_for(fmt).recommended(arts)


# -- the card ----------------------------------------------------------------------------------------------------
def render_card(ws: Workspace, fmt: str, *, repo: str | None = None, include: list[str] | None = None) -> str:
    """The model card for `fmt` as Markdown with YAML metadata, validated by parsing it back.

    `repo` is the Hub repo the files go to (for links and usage snippets; a placeholder when unknown);
    `include` limits the table to these artifact keys (what is being published).
    """
    arts = artifacts_for(ws, fmt)
    if include is not None:
        arts = [(k, e) for k, e in arts if k in include]
    if not arts:
        raise QuantkitError(f"no {fmt} artifacts in the workspace {ws.root}",
                            f"run `quantkit {fmt} ...` first, or pick another --format")
    backend = sections_for(fmt)
    repo = repo or _known_repo(ws, fmt) or f"YOUR-USERNAME/{default_repo_name(ws, fmt)}"
    source = read_source_card(ws)
    data = _metadata(ws, backend, arts, front_matter(source))
    body = _body(ws, backend, repo, arts, source)
    from huggingface_hub import ModelCard

    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    text = str(card)
    _validate(text, data.to_dict())
    return text


def write_card(ws: Workspace, fmt: str, *, repo: str | None = None, include: list[str] | None = None,
               output: str | Path | None = None) -> Path:
    """Render the card and write it (default ``<ws>/<fmt>/README.md``); returns the path."""
    text = render_card(ws, fmt, repo=repo, include=include)
    path = Path(output) if output else ws.root / fmt / CARD_NAME
    if path.is_dir():  # `--output some/folder`: the card goes into it
        path = path / CARD_NAME
    write_text_atomic(path, text)
    arts = [(k, e) for k, e in artifacts_for(ws, fmt) if include is None or k in include]
    table = quality_csv(arts)
    csv_path = path.parent / QUALITY_CSV
    if table is not None:
        write_text_atomic(csv_path, table)
    elif output is None:
        csv_path.unlink(missing_ok=True)  # a stale table of files no longer published
    return path


def _known_repo(ws: Workspace, fmt: str) -> str | None:
    rec = ws.data.get("published", {}).get(fmt)
    return rec.get("repo") if isinstance(rec, dict) else None


def _base_model(ws: Workspace) -> str:
    return str(ws.model.get("hub_id") or ws.model.get("name") or ws.model.get("source") or ws.root.name)


def _metadata(ws: Workspace, backend: BackendBase, arts: Entries, source_meta: dict[str, Any]) -> ModelCardData:
    info = backend.format_info()
    tags = [info.tag, *backend.card_tags(ws, arts), "quantkit", "russian"]
    if ws.model.get("instruct"):
        tags.append("conversational")
    license_ = ws.model.get("license") or source_meta.get("license")
    extra: dict[str, Any] = {}
    if license_ == "other":
        for key in ("license_name", "license_link"):
            if source_meta.get(key):
                extra[key] = source_meta[key]
    from huggingface_hub import ModelCardData

    return ModelCardData(
        base_model=_base_model(ws),
        language=["ru"],
        license=str(license_) if license_ else None,
        library_name=info.library,
        pipeline_tag="text-generation",
        tags=tags,
        base_model_relation="quantized",
        quantized_by="quantkit",
        **extra,
    )


def _validate(text: str, expected: dict[str, Any]) -> None:
    """Parse the card back; its metadata must be a YAML mapping equal to what we meant to write."""
    try:
        from huggingface_hub import ModelCard

        parsed = ModelCard(text)
        meta = parsed.data.to_dict()
        _, raw = split_front_matter(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise QuantkitError(f"the rendered model card has invalid metadata: {exc}") from exc
    if meta != expected or raw != expected:
        raise QuantkitError("the rendered model card's metadata does not read back as written",
                            "report this as a quantkit bug")


# -- body ---------------------------------------------------------------------------------------------------------
def _body(ws: Workspace, backend: BackendBase, repo: str, arts: Entries, source: str | None) -> str:
    where = backend.branches(arts)
    key, entry = backend.recommended(arts)
    usage = backend.card_usage(CardContext(ws=ws, repo=repo, arts=arts, branches=where, key=key, entry=entry))
    more = backend.format_info().choose_hint
    parts = [
        f"# {model_name(ws)} — {backend.format_info().title}",
        _intro(ws, backend, arts),
        "## Files",
        f"Not sure which one? Start with **{entry.get('quant')}**.{more}",
        _table(backend, repo, arts, where),
        table_notes(arts),
        "## Usage",
        usage,
        "## How these files were made",
        provenance(ws, backend, arts),
        "## Original model card",
        original(ws, source),
    ]
    return "\n\n".join(p.strip("\n") for p in parts if p) + "\n"


def _intro(ws: Workspace, backend: BackendBase, arts: Entries | None = None) -> str:
    """The opening lines; they say the files were scored only when every one of them was."""
    info = backend.format_info()
    human = info.title
    kind = "instruct (chat)" if ws.model.get("instruct") else "base"
    scored = bool(arts) and all(isinstance(e.get("eval"), dict) for _, e in arts or [])
    why = (", so the smaller files keep more of the model's Russian than a generic, mostly English calibration set "
           "would.") if info.uses_calibration else "."
    en = (
        f"{human} quantizations of {base_link(ws)}, a Russian-language {kind} model, for {info.runtimes}. "
        f"{info.calibrated}{why}"
        + (" Every file was scored against the bf16 original on held-out Russian text." if scored else "")
    )
    measured = ("качество каждого файла измерено на отдельной русской выборке (перплексия и KL-дивергенция "
                "относительно bf16)") if scored else ""
    if info.uses_calibration:
        how = "Калибровка выполнена на русских текстах" + (f"; {measured}" if measured else "")
    else:
        how = "Калибровочные тексты этому формату не нужны" + (f"; {measured}" if measured else "")
    ru = (
        f"> **По-русски.** Квантованные версии модели {model_name(ws)} в формате {human}. {how}. "
        "Если не знаете, что выбрать, берите файл с пометкой «рекомендуется»."
    )
    return f"{en}\n\n{ru}"


def _cell(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, int | float) and not isinstance(value, bool) else "—"


def _table(backend: BackendBase, repo: str, arts: Entries, where: dict[str, str]) -> str:
    first = backend.format_info().item_column
    kept = has_drift(arts)
    tail = any("kld_p999" in (e.get("eval") or {}) for _, e in arts)  # the 99.9th percentile, where it was measured
    head = f"| {first} | Type | Size | Bits/weight | PPL | ΔPPL | KLD |{' KLD 99.9% |' if tail else ''} Top-1 |" \
        f"{' Russian kept |' if kept else ''} Recommendation |"
    rows = [head, "|---|---|--:|--:|--:|--:|--:|" + ("--:|" if tail else "") + "--:|" + ("--:|" if kept else "")
            + "---|"]
    for key, entry in arts:
        ev = entry.get("eval") or {}
        delta = ev.get("delta_ppl")
        rec = backend.advice(str(entry.get("quant", "")), entry.get("bpw"))
        if gate_failed(entry):
            reasons = "; ".join(str(r) for r in (entry.get("gate") or {}).get("reasons") or [])
            rec = "✗ failed the quality gate" + (f" ({reasons})" if reasons else "")
        size = entry.get("size")
        rows.append("| " + " | ".join([
            backend.card_label(repo, key, entry, where[key]),
            f"{entry.get('quant', '')}",
            human_size(size) if isinstance(size, int | float) and size else "—",
            _cell(entry.get("bpw"), "{:.2f}"),
            _cell(ev.get("ppl"), "{:.3f}"),
            _cell(delta * 100 if isinstance(delta, int | float) else None, "{:+.2f}%"),
            _cell(ev.get("kld_mean"), "{:.4f}"),
            *([_cell(ev.get("kld_p999"), "{:.3f}")] if tail else []),
            _cell(ev.get("top1") * 100 if isinstance(ev.get("top1"), int | float) else None, "{:.1f}%"),
            *([kept_cell(entry)] if kept else []),
            rec,
        ]) + " |")
    return "\n".join(rows)
