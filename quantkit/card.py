"""The model card (README.md) of a published format: Hub metadata, a table of files with their measured quality,
usage for the format's runtimes, how the files were made, and the original model card below.

`render_card(ws, fmt)` returns the card as text; `write_card` writes it into the format folder
(``<ws>/<fmt>/README.md``), which is what `quantkit push` uploads as the repo's README.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from quantkit.errors import QuantkitError
from quantkit.hubname import hub_safe_name
from quantkit.scan import public_command_text
from quantkit.workspace import Workspace, human_size, write_text_atomic

HUB = "https://huggingface.co"
CARD_NAME = "README.md"


# format → (library_name, tag, repo suffix, human name)
FORMATS: dict[str, tuple[str, str, str, str]] = {
    "gguf": ("gguf", "gguf", "GGUF", "GGUF"),
    "exl2": ("exllamav2", "exl2", "EXL2", "EXL2"),
    "gptq": ("transformers", "gptq", "GPTQ", "GPTQ"),
}

RECOMMENDED = "✓ рекомендуется"

# GGUF type → plain advice, most specific prefix first
_GGUF_ADVICE: tuple[tuple[str, str], ...] = (
    ("F32", "full precision: a reference, or to make other quants from"),
    ("F16", "full precision: a reference, or to make other quants from"),
    ("BF16", "full precision: a reference, or to make other quants from"),
    ("Q8_0", "highest quality, nearly indistinguishable from bf16"),
    ("Q6_K", "very high quality"),
    ("Q5_K_M", f"{RECOMMENDED}: best balance, quality first"),
    ("Q5_K_S", "high quality, a little smaller than Q5_K_M"),
    ("Q5_", "high quality (legacy type; Q5_K_M is better for its size)"),
    ("Q4_K_M", f"{RECOMMENDED}: best balance of size and quality"),
    ("Q4_K_S", "good quality, a little smaller than Q4_K_M"),
    ("IQ4", "good quality, smaller than Q4_K_M"),
    ("Q4_", "fast on ARM CPUs; elsewhere Q4_K_M is better for its size"),
    ("Q3_K_L", "small, some quality loss"),
    ("Q3_K_M", "small, some quality loss"),
    ("Q3_", "small, noticeable quality loss"),
    ("IQ3", "small, noticeable quality loss"),
    ("Q2_K", "smallest, noticeable quality loss"),
    ("IQ2", "smallest, noticeable quality loss"),
    ("IQ1", "tiny, heavy quality loss: for experiments"),
)

_BUILTIN_CALIBRATION = {
    "builtin:ru-mix": "quantkit's built-in Russian calibration mix (news, encyclopedic, science, prose, dialogue, "
                      "instructions, business and code)",
}
_BUILTIN_EVAL = {
    "builtin:ru-eval": "quantkit's held-out Russian evaluation text (kept apart from the calibration mix)",
}


# -- what the workspace holds -----------------------------------------------------------------------------------
def format_info(fmt: str) -> tuple[str, str, str, str]:
    """(library_name, tag, repo suffix, human name) of a format; third-party formats get sensible defaults."""
    return FORMATS.get(fmt, (fmt, fmt, fmt.upper(), fmt.upper()))


def default_repo_name(ws: Workspace, fmt: str) -> str:
    """``<Model>-GGUF`` (without a namespace), made of the characters a Hub repo name may hold."""
    return f"{hub_safe_name(model_name(ws))}-{format_info(fmt)[2]}"


def model_name(ws: Workspace) -> str:
    return str(ws.model.get("name") or ws.root.name)


def artifacts_for(ws: Workspace, fmt: str) -> list[tuple[str, dict[str, Any]]]:
    """The workspace's artifacts of one format, best quality first (bits per weight, then size)."""
    found = [(key, entry) for key, entry in ws.artifacts.items()
             if entry.get("format", key.split("/", 1)[0]) == fmt]
    return sorted(found, key=lambda kv: (-(kv[1].get("bpw") or 0), -(kv[1].get("size") or 0), kv[0]))


def formats_in(ws: Workspace) -> list[str]:
    """Formats with at least one artifact in the workspace."""
    return sorted({entry.get("format", key.split("/", 1)[0]) for key, entry in ws.artifacts.items()})


def gate_failed(entry: dict[str, Any]) -> bool:
    gate = entry.get("gate")
    return isinstance(gate, dict) and gate.get("passed") is False


def branches(fmt: str, arts: list[tuple[str, dict[str, Any]]]) -> dict[str, str]:
    """Artifact key → the repo branch it goes to.

    GGUF files all live on ``main``. Each EXL2 bitrate gets its own branch (``4.0bpw``), ``main`` keeps the card
    and ``measurement.json``. GPTQ puts the recommended variant on ``main`` (so ``from_pretrained(repo)`` works)
    and any other variant on a branch named after its folder (``8bit-g128``).
    """
    if fmt == "exl2":
        return {k: PurePosixPath(k).name for k, _ in arts}
    if fmt == "gptq" and arts:
        main = pick(fmt, arts)[0]
        return {k: "main" if k == main else PurePosixPath(k).name for k, _ in arts}
    return {k: "main" for k, _ in arts}


def advice(fmt: str, quant: str, bpw: float | None) -> str:
    """A plain one-line recommendation for a quant type."""
    q = quant.upper()
    if fmt == "gguf":
        for prefix, text in _GGUF_ADVICE:
            if q.startswith(prefix):
                return text
        return ""
    bits = bpw
    if bits is None:
        m = re.match(r"(\d+(?:\.\d+)?)", quant)
        bits = float(m.group(1)) if m else None
    if bits is None:
        return ""
    if fmt == "gptq":
        if bits >= 8:
            return "highest quality"
        if bits >= 4:
            return f"{RECOMMENDED}: best balance, fast kernels in vLLM and transformers"
        return "smallest, noticeable quality loss"
    if bits >= 8:
        return "near-lossless"
    if bits >= 6:
        return "highest quality"
    if bits >= 4:
        if bits > 5.0:
            return "high quality"
        balance = "best balance, quality first" if bits > 4.5 else "best balance of size and quality"
        return f"{RECOMMENDED}: {balance}"
    if bits >= 3.5:
        return "small, some quality loss"
    return "smallest, noticeable quality loss"


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
    repo = repo or _known_repo(ws, fmt) or f"YOUR-USERNAME/{default_repo_name(ws, fmt)}"
    source = _read_source_card(ws)
    source_meta = _front_matter(source)
    data = _metadata(ws, fmt, arts, source_meta)
    body = _body(ws, fmt, repo, arts, source)
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
    return path


def _known_repo(ws: Workspace, fmt: str) -> str | None:
    rec = ws.data.get("published", {}).get(fmt)
    return rec.get("repo") if isinstance(rec, dict) else None


def _read_source_card(ws: Workspace) -> str | None:
    rel = ws.model.get("readme")
    path = ws.root / (rel or "source-README.md")
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8", errors="replace")


def _front_matter(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    _, meta = _split_front_matter(text)
    return meta


def _split_front_matter(text: str) -> tuple[str, dict[str, Any]]:
    """(the card without its YAML block, the parsed block or {})."""
    text = text.lstrip("\ufeff")
    m = re.match(r"\A\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", text, re.S)
    if not m:
        return text, {}
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        meta = None
    return text[m.end():], meta if isinstance(meta, dict) else {}


def _base_model(ws: Workspace) -> str:
    return str(ws.model.get("hub_id") or ws.model.get("name") or ws.model.get("source") or ws.root.name)


def _uses_imatrix(ws: Workspace, fmt: str, arts: list[tuple[str, dict[str, Any]]]) -> bool:
    if fmt != "gguf":
        return False
    flagged = [e.get("imatrix") for _, e in arts if "imatrix" in e]
    if flagged:
        return any(flagged)
    return (ws.root / "gguf" / "imatrix.gguf").is_file() and any(e.get("calibration") for _, e in arts)


def _metadata(ws: Workspace, fmt: str, arts: list[tuple[str, dict[str, Any]]],
              source_meta: dict[str, Any]) -> ModelCardData:
    library, tag, _, _ = format_info(fmt)
    tags = [tag]
    if _uses_imatrix(ws, fmt, arts):
        tags.append("imatrix")
    tags += ["quantkit", "russian"]
    if ws.model.get("instruct"):
        tags.append("conversational")
    license_ = ws.model.get("license") or source_meta.get("license")
    extra: dict[str, Any] = {}
    if license_ == "other":
        for key in ("license_name", "license_link"):
            if source_meta.get(key):
                extra[key] = source_meta[key]
    return ModelCardData(
        base_model=_base_model(ws),
        language=["ru"],
        license=str(license_) if license_ else None,
        library_name=library,
        pipeline_tag="text-generation",
        tags=tags,
        base_model_relation="quantized",
        quantized_by="quantkit",
        **extra,
    )


def _validate(text: str, expected: dict[str, Any]) -> None:
    """Parse the card back; its metadata must be a YAML mapping equal to what we meant to write."""
    try:
        parsed = ModelCard(text)
        meta = parsed.data.to_dict()
        _, raw = _split_front_matter(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise QuantkitError(f"the rendered model card has invalid metadata: {exc}") from exc
    if meta != expected or raw != expected:
        raise QuantkitError("the rendered model card's metadata does not read back as written",
                            "report this as a quantkit bug")


# -- body ---------------------------------------------------------------------------------------------------------
def _body(ws: Workspace, fmt: str, repo: str, arts: list[tuple[str, dict[str, Any]]], source: str | None) -> str:
    name = model_name(ws)
    human = format_info(fmt)[3]
    parts = [
        f"# {name} — {human}",
        _intro(ws, fmt),
        "## Files",
        _choose(fmt, arts),
        _table(ws, fmt, repo, arts),
        _table_notes(arts),
        "## Usage",
        _usage(ws, fmt, repo, arts),
        "## How these files were made",
        _provenance(ws, fmt, arts),
        "## Original model card",
        _original(ws, source),
    ]
    return "\n\n".join(p.strip("\n") for p in parts if p) + "\n"


def _base_link(ws: Workspace) -> str:
    hub_id = ws.model.get("hub_id")
    return f"[{hub_id}]({HUB}/{hub_id})" if hub_id else f"`{model_name(ws)}`"


def _intro(ws: Workspace, fmt: str) -> str:
    runtimes = {
        "gguf": "llama.cpp and everything built on it (llama-cpp-python, Ollama, LM Studio)",
        "exl2": "ExLlamaV2 and TabbyAPI (NVIDIA GPUs)",
        "gptq": "transformers and vLLM",
    }.get(fmt, "its runtimes")
    human = format_info(fmt)[3]
    calibrated = {
        "gguf": "The importance matrix that guides the low-bit types was computed on Russian text",
        "exl2": "The EXL2 measurement and quantization were calibrated on Russian text",
        "gptq": "GPTQ was calibrated on Russian text",
    }.get(fmt, "Calibration used Russian text")
    kind = "instruct (chat)" if ws.model.get("instruct") else "base"
    en = (
        f"{human} quantizations of {_base_link(ws)}, a Russian-language {kind} model, for {runtimes}. "
        f"{calibrated}, so the smaller files keep more of the model's Russian than a generic, mostly English "
        "calibration set would. Every file was scored against the bf16 original on held-out Russian text."
    )
    ru = (
        f"> **По-русски.** Квантованные версии модели {model_name(ws)} в формате {human}. Калибровка выполнена на "
        "русских текстах; качество каждого файла измерено на отдельной русской выборке (перплексия и "
        "KL-дивергенция относительно bf16). Если не знаете, что выбрать, берите файл с пометкой «рекомендуется»."
    )
    return f"{en}\n\n{ru}"


def _cell(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, int | float) and not isinstance(value, bool) else "—"


def _item_label(fmt: str, repo: str, key: str, entry: dict[str, Any], branch: str) -> str:
    if fmt == "gguf":
        files = [f for f in entry.get("files") or [key] if not f.endswith("/")]
        names = [PurePosixPath(f).name for f in files] or [PurePosixPath(key).name]
        first = sorted(names)[0]
        more = f" ({len(names)} parts)" if len(names) > 1 else ""
        return f"[{first}]({HUB}/{repo}/blob/main/{first}){more}"
    label = branch if branch != "main" else f"main ({PurePosixPath(key).name})"
    return f"[{label}]({HUB}/{repo}/tree/{branch})"


def _table(ws: Workspace, fmt: str, repo: str, arts: list[tuple[str, dict[str, Any]]]) -> str:
    first = "File" if fmt == "gguf" else "Branch"
    kept = _has_drift(arts)
    head = f"| {first} | Type | Size | Bits/weight | PPL | ΔPPL | KLD | Top-1 |{' Russian kept |' if kept else ''}" \
        " Recommendation |"
    rows = [head, "|---|---|--:|--:|--:|--:|--:|--:|" + ("--:|" if kept else "") + "---|"]
    where = branches(fmt, arts)
    for key, entry in arts:
        ev = entry.get("eval") or {}
        delta = ev.get("delta_ppl")
        rec = advice(fmt, str(entry.get("quant", "")), entry.get("bpw"))
        if gate_failed(entry):
            reasons = "; ".join(str(r) for r in (entry.get("gate") or {}).get("reasons") or [])
            rec = "✗ failed the quality gate" + (f" ({reasons})" if reasons else "")
        size = entry.get("size")
        rows.append("| " + " | ".join([
            _item_label(fmt, repo, key, entry, where[key]),
            f"{entry.get('quant', '')}",
            human_size(size) if isinstance(size, int | float) and size else "—",
            _cell(entry.get("bpw"), "{:.2f}"),
            _cell(ev.get("ppl"), "{:.3f}"),
            _cell(delta * 100 if isinstance(delta, int | float) else None, "{:+.2f}%"),
            _cell(ev.get("kld_mean"), "{:.4f}"),
            _cell(ev.get("top1") * 100 if isinstance(ev.get("top1"), int | float) else None, "{:.1f}%"),
            *([_kept_cell(entry)] if kept else []),
            rec,
        ]) + " |")
    return "\n".join(rows)


def _has_drift(arts: list[tuple[str, dict[str, Any]]]) -> bool:
    return any(isinstance(e.get("drift"), dict) for _, e in arts)


def _kept_cell(entry: dict[str, Any]) -> str:
    d = entry.get("drift")
    if not isinstance(d, dict) or not isinstance(d.get("kept"), int | float):
        return "—"
    return f"{d['kept'] * 100:.0f}% ({d['prompts'] - d['left_russian']}/{d['prompts']})"


def _drift_note(arts: list[tuple[str, dict[str, Any]]]) -> str | None:
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


def _evals(arts: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [e["eval"] for _, e in arts if isinstance(e.get("eval"), dict)]


def _choose(fmt: str, arts: list[tuple[str, dict[str, Any]]]) -> str:
    _, entry = pick(fmt, arts)
    quant = entry.get("quant")
    more = {"gguf": " With memory to spare, take a larger type; below Q4 the quality loss grows quickly.",
            "exl2": " Higher bitrates need more VRAM and lose less.",
            "gptq": ""}.get(fmt, "")
    return f"Not sure which one? Start with **{quant}**.{more}"


def _table_notes(arts: list[tuple[str, dict[str, Any]]]) -> str:
    evals = _evals(arts)
    if not evals:
        return ("These files have not been evaluated yet: run `quantkit eval` on the workspace to add perplexity "
                "and KL-divergence to this table.")
    ev = evals[0]
    where = f"held-out Russian text (`{_public_spec(str(ev['eval_set']))}`" if ev.get("eval_set") else \
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
        "KL-divergence of each file's next-token distribution from bf16's, and **Top-1** how often both pick the "
        "same most likely next token. For PPL, ΔPPL and KLD lower is better; they say how close a file stays to "
        "the original, not how good the original is.",
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
    return f"held-out Russian text `{_public_spec(spec)}`"


def _public_spec(spec: str) -> str:
    """A calibration/eval spec fit for a public card: local paths lose their folders."""
    if spec.startswith(("builtin:", "hf:")):
        return spec
    return PurePosixPath(spec.replace("\\", "/")).name


# -- usage --------------------------------------------------------------------------------------------------------
def pick(fmt: str, arts: list[tuple[str, dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """The artifact usage snippets show: the smallest recommended one that passed the gate, else the middle one."""
    good = [(k, e) for k, e in arts if not gate_failed(e)] or arts
    recommended = [(k, e) for k, e in good
                   if advice(fmt, str(e.get("quant", "")), e.get("bpw")).startswith(RECOMMENDED)]
    return recommended[-1] if recommended else good[len(good) // 2]


def _usage(ws: Workspace, fmt: str, repo: str, arts: list[tuple[str, dict[str, Any]]]) -> str:
    key, entry = pick(fmt, arts)
    instruct = bool(ws.model.get("instruct"))
    if fmt == "gguf":
        return _usage_gguf(repo, str(entry.get("quant", "Q4_K_M")), instruct)
    branch = branches(fmt, arts)[key]
    if fmt == "exl2":
        return _usage_exl2(ws, repo, branch, instruct)
    if fmt == "gptq":
        others = sorted(b for b in branches(fmt, arts).values() if b != branch)
        text = _usage_gptq(repo, branch, instruct, others)
        return _moe_gptq_note(repo, branch) + text if _routed_experts(ws) else text
    return f"Download with `hf download {repo}` and load it with a runtime that reads {fmt}."


def _routed_experts(ws: Workspace) -> bool:
    from quantkit.arch import lookup

    cls = lookup(str(ws.model.get("architecture") or ""))
    return bool(cls and cls.routed_experts)


def _moe_gptq_note(repo: str, branch: str) -> str:
    """transformers 5 fuses a mixture of experts' weights and cannot load per-expert GPTQ weights into them."""
    rev = f', revision="{branch}"' if branch != "main" else ""
    return f"""**GPTQModel** (a mixture of experts: transformers 5 fuses the experts and would leave the quantized ones
unloaded; GPTQModel keeps one module per expert, and so do vLLM and SGLang):

```python
from gptqmodel import GPTQModel

model = GPTQModel.load("{repo}"{rev})
```

"""


_PROMPT = "Расскажи в двух предложениях, чем знаменит Байкал."
_COMPLETION = "Байкал — самое глубокое озеро на планете. Его вода"


def _usage_gguf(repo: str, quant: str, instruct: bool) -> str:
    if instruct:
        cli = f"llama-cli -hf {repo}:{quant}"
        py = (
            "from llama_cpp import Llama\n\n"
            f'llm = Llama.from_pretrained(repo_id="{repo}", filename="*{quant}.gguf", n_ctx=4096)\n'
            f'out = llm.create_chat_completion(messages=[{{"role": "user", "content": "{_PROMPT}"}}])\n'
            'print(out["choices"][0]["message"]["content"])'
        )
    else:
        cli = f'llama-cli -hf {repo}:{quant} -no-cnv -n 128 -p "{_COMPLETION}"'
        py = (
            "from llama_cpp import Llama\n\n"
            f'llm = Llama.from_pretrained(repo_id="{repo}", filename="*{quant}.gguf", n_ctx=4096)\n'
            f'print(llm("{_COMPLETION}", max_tokens=128)["choices"][0]["text"])'
        )
    return f"""Replace `{quant}` with the type you picked from the table.

**llama.cpp** (downloads the file and {"starts a chat" if instruct else "continues the text"}):

```bash
{cli}
# an OpenAI-compatible server on http://localhost:8080
llama-server -hf {repo}:{quant} -c 4096
```

**llama-cpp-python**:

```python
{py}
```

**Ollama**:

```bash
ollama run hf.co/{repo}:{quant}
```

**LM Studio**: search for `{repo}` in the Discover tab and pick the file.

On Intel CPUs with AMX (Sapphire Rapids and newer) some llama.cpp builds crash on the first token with K-quants or \
Q8_0: add `--no-repack` (`-nr`) to the llama.cpp command if that happens."""


def _usage_exl2(ws: Workspace, repo: str, branch: str, instruct: bool) -> str:
    folder = f"{model_name(ws)}-{branch}"
    if instruct:
        call = (
            "# format the chat with the model's own template (shipped with the files)\n"
            f'chat = AutoTokenizer.from_pretrained("{folder}")\n'
            f'prompt = chat.apply_chat_template([{{"role": "user", "content": "{_PROMPT}"}}],\n'
            "                                   tokenize=False, add_generation_prompt=True)\n"
            "print(generator.generate(prompt=prompt, max_new_tokens=256, add_bos=False, encode_special_tokens=True,\n"
            "                         stop_conditions=[tokenizer.eos_token_id], completion_only=True))"
        )
        imports = "from transformers import AutoTokenizer\n"
    else:
        call = f'print(generator.generate(prompt="{_COMPLETION}", max_new_tokens=128))'
        imports = ""
    return f"""Each bitrate lives in its own branch; `main` holds this card and `measurement.json`.
Download one bitrate:

```bash
hf download {repo} --revision {branch} --local-dir {folder}
# or, with an older huggingface_hub: huggingface-cli download {repo} --revision {branch} --local-dir {folder}
```

**ExLlamaV2**:

```python
from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
from exllamav2.generator import ExLlamaV2DynamicGenerator
{imports}
config = ExLlamaV2Config("{folder}")
model = ExLlamaV2(config)
cache = ExLlamaV2Cache(model, max_seq_len=4096, lazy=True)
model.load_autosplit(cache)
tokenizer = ExLlamaV2Tokenizer(config)
generator = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer)
{call}
```

**TabbyAPI**: put the `{folder}` folder into TabbyAPI's `models/` directory and set
`model_name: {folder}` in `config.yml` (or load it through the API); it serves an OpenAI-compatible endpoint."""


def _usage_gptq(repo: str, branch: str, instruct: bool, others: list[str]) -> str:
    rev = f', revision="{branch}"' if branch != "main" else ""
    rev_cli = f" --revision {branch}" if branch != "main" else ""
    if instruct:
        gen = (
            f'messages = [{{"role": "user", "content": "{_PROMPT}"}}]\n'
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",\n"
            "                                       return_dict=True).to(model.device)\n"
            "out = model.generate(**inputs, max_new_tokens=256)\n"
            "print(tokenizer.decode(out[0][inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))"
        )
        vllm = (
            "from vllm import LLM, SamplingParams\n\n"
            f'llm = LLM(model="{repo}"{rev})\n'
            f'out = llm.chat([{{"role": "user", "content": "{_PROMPT}"}}], SamplingParams(max_tokens=256))\n'
            "print(out[0].outputs[0].text)"
        )
    else:
        gen = (
            f'inputs = tokenizer("{_COMPLETION}", return_tensors="pt").to(model.device)\n'
            "out = model.generate(**inputs, max_new_tokens=128)\n"
            "print(tokenizer.decode(out[0], skip_special_tokens=True))"
        )
        vllm = (
            "from vllm import LLM, SamplingParams\n\n"
            f'llm = LLM(model="{repo}"{rev})\n'
            f'out = llm.generate(["{_COMPLETION}"], SamplingParams(max_tokens=128))\n'
            "print(out[0].outputs[0].text)"
        )
    return f"""**transformers** (needs `pip install gptqmodel` for the GPTQ kernels):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo}"{rev})
model = AutoModelForCausalLM.from_pretrained("{repo}"{rev}, device_map="auto")
{gen}
```

**vLLM** (reads the GPTQ settings from `config.json`):

```bash
vllm serve {repo}{rev_cli}
```

```python
{vllm}
```""" + (f"""

The other variants live in branches ({", ".join(f"`{b}`" for b in others)}): pass `revision="{others[0]}"` to
`from_pretrained` and `LLM`, or `--revision {others[0]}` to `vllm serve`.""" if others else "")


# -- provenance ---------------------------------------------------------------------------------------------------
def _params(n: Any) -> str:
    if not isinstance(n, int | float) or not n:
        return ""
    return f"{n / 1e9:.1f}B parameters" if n >= 1e9 else f"{n / 1e6:.0f}M parameters"


def _mix_lines(arts: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Size-targeted files: which type each group of tensors got (the full list ships as .tensor-types.txt)."""
    out: list[str] = []
    for key, e in arts:
        mix = e.get("mix")
        if not isinstance(mix, dict) or not mix:
            continue
        name = Path(key).name
        out.append(f"- **`{name}`** was built for a target of {e.get('target')}: one type per tensor, chosen to "
                   "minimise the importance-weighted error on the Russian calibration text under that size "
                   f"(`{Path(key).stem}.tensor-types.txt` holds it for `llama-quantize --tensor-type-file`).")
        out.append("")
        out.append("  | tensors | types |")
        out.append("  |---|---|")
        for group in sorted(mix):
            types = ", ".join(f"{t} × {n}" for t, n in sorted(mix[group].items()))
            out.append(f"  | `{group}` | {types} |")
        out.append("")
    return out


def _expert_coverage_lines(cals: list[dict[str, Any]]) -> list[str]:
    """A mixture of experts: how well the calibration text reached every expert (said when some fell short)."""
    cov = next((c["expert_coverage"] for c in cals if isinstance(c.get("expert_coverage"), dict)), None)
    if not cov:
        return []
    line = (f"- **Experts:** the calibration text was routed to all {cov['experts']} experts (the fewest got "
            f"{cov['fewest']} tokens, the median {cov['median']:g}).")
    if cov.get("below"):
        line = (f"- **Experts:** {cov['below']} of {cov['experts']} experts were routed fewer than "
                f"{cov['min_tokens']} calibration tokens ({cov['unreached']} none); their importance estimates are "
                "weak, so those experts are quantized closer to plain rounding. More calibration text "
                "(`--calib-samples`) covers them.")
    return [line]


def _describe_calibration(cal: dict[str, Any]) -> str:
    spec = str(cal.get("spec") or "")
    if spec.startswith("file:"):
        return f"an importance matrix supplied by the user (`{_public_spec(spec[5:])}`)"
    if spec in _BUILTIN_CALIBRATION:
        what = f"{_BUILTIN_CALIBRATION[spec]}, `{spec}`"
    elif spec.startswith("hf:"):
        dataset = spec[3:].split(":", 1)[0]
        what = f"the dataset [{dataset}]({HUB}/datasets/{dataset}), `{spec}`"
    else:
        what = f"`{_public_spec(spec)}`" if spec else "Russian text"
    size = []
    samples, length = cal.get("samples") or cal.get("rows"), cal.get("seq_len") or cal.get("length")
    if samples and length:
        size.append(f"{samples} samples × {length} tokens")
    if cal.get("tokens"):
        size.append(f"{int(cal['tokens']):,} tokens")
    chat = " (dialogues rendered with the model's chat template)" if cal.get("chat") or cal.get("chat_template") \
        else ""
    return what + (f": {' = '.join(size)}" if size else "") + chat


def _provenance(ws: Workspace, fmt: str, arts: list[tuple[str, dict[str, Any]]]) -> str:
    model = ws.model
    about = ", ".join(x for x in (model.get("architecture"), _params(model.get("params")),
                                  model.get("dtype")) if x and x != "?")
    lic = (f", licence `{model['license']}`; these files are under the same licence" if model.get("license")
           else "")
    lines = [f"- **Base model:** {_base_link(ws)}" + (f" ({about})" if about else "") + lic + "."]
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
    if _uses_imatrix(ws, fmt, arts):
        extra = " It is published here as `imatrix.gguf`, to reuse for other types." if (
            ws.root / "gguf" / "imatrix.gguf").is_file() else ""
        lines.append("- **Importance matrix:** computed by quantkit on the calibration text above and applied to "
                     f"every quantized type.{extra}")
        lines += _expert_coverage_lines(cals)
    lines += _mix_lines(arts)
    if fmt == "exl2" and (ws.root / "exl2" / "measurement.json").is_file():
        lines.append("- **Measurement:** `measurement.json` on `main`; pass it to ExLlamaV2's `convert.py -m` to "
                     "make other bitrates without measuring again.")
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


# -- the original card --------------------------------------------------------------------------------------------
def _original(ws: Workspace, source: str | None) -> str:
    hub_id = ws.model.get("hub_id")
    if not source or not source.strip():
        where = f" at {_base_link(ws)}" if hub_id else ""
        return f"The original model card was not available when these files were made; see it{where}."
    body, _ = _split_front_matter(source)
    body = _demote_headings(body.strip("\n"))
    if hub_id:
        body = _absolute_links(body, f"{HUB}/{hub_id}")
    intro = f"Below is the card of {_base_link(ws)} as its authors published it." if hub_id else \
        "Below is the card that came with the original model."
    return f"{intro}\n\n---\n\n{body}"


def _demote_headings(text: str, by: int = 2) -> str:
    """Push Markdown headings down `by` levels (outside code fences), so the original card nests under ours."""
    out = []
    fence: str | None = None
    for line in text.splitlines():
        stripped = line.lstrip()
        m = re.match(r"(`{3,}|~{3,})", stripped)
        if m:
            if fence is None:
                fence = m.group(1)[0] * len(m.group(1))
            elif stripped.startswith(fence):
                fence = None
        elif fence is None:
            h = re.match(r"(#{1,6})(\s.*|$)", line)
            if h:
                line = "#" * min(6, len(h.group(1)) + by) + h.group(2)
        out.append(line)
    return "\n".join(out)


def _absolute_links(text: str, base: str) -> str:
    """Relative links and images in the original card point at the base model's repo instead of ours."""
    def fix(url: str, kind: str) -> str:
        if re.match(r"^([a-z][a-z0-9+.-]*:|#|/|//)", url, re.I):
            return url
        return f"{base}/{kind}/main/{url.removeprefix('./')}"

    text = re.sub(r"(!?)\[([^\]]*)\]\(([^)\s]+)",
                  lambda m: f"{m.group(1)}[{m.group(2)}]({fix(m.group(3), 'resolve' if m.group(1) else 'blob')}",
                  text)
    return re.sub(r'(<img\s[^>]*?src=")([^"]+)(")', lambda m: m.group(1) + fix(m.group(2), "resolve") + m.group(3),
                  text)
