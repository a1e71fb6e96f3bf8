"""What the card and the publish layout say about GGUF: llama.cpp advice per type, one ``main`` branch with every
file (and ``imatrix.gguf``) at the top, llama.cpp / Ollama / LM Studio usage, the importance matrix and size-targeted
mixes in the provenance."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from quantkit.backends.base import COMPLETION, HUB, PROMPT, RECOMMENDED, BackendBase, CardContext, Entries, FormatInfo
from quantkit.workspace import Workspace

# GGUF type → plain advice, most specific prefix first
ADVICE: tuple[tuple[str, str], ...] = (
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


class GGUFSections(BackendBase):
    """GGUF's format knowledge (`GGUFBackend` subclasses it)."""

    name = "gguf"

    def format_info(self) -> FormatInfo:
        return FormatInfo(
            title="GGUF", library="gguf", tag="gguf", repo_suffix="GGUF",
            runtimes="llama.cpp and everything built on it (llama-cpp-python, Ollama, LM Studio)",
            calibrated="The importance matrix that guides the low-bit types was computed on Russian text",
            choose_hint=" With memory to spare, take a larger type; below Q4 the quality loss grows quickly.",
            item_column="File",
            too_big_hint="convert again with --split-max-size 48G: llama.cpp split files (…-00001-of-0000N.gguf) "
                         "load as one model",
        )

    def advice(self, quant: str, bpw: float | None) -> str:
        q = quant.upper()
        return next((text for prefix, text in ADVICE if q.startswith(prefix)), "")

    def card_tags(self, ws: Workspace, arts: Entries) -> list[str]:
        return ["imatrix"] if uses_imatrix(ws, arts) else []

    def card_label(self, repo: str, key: str, entry: dict[str, Any], branch: str) -> str:
        files = [f for f in entry.get("files") or [key] if not f.endswith("/")]
        names = [PurePosixPath(f).name for f in files] or [PurePosixPath(key).name]
        first = sorted(names)[0]
        more = f" ({len(names)} parts)" if len(names) > 1 else ""
        return f"[{first}]({HUB}/{repo}/blob/main/{first}){more}"

    def card_usage(self, ctx: CardContext) -> str:
        return usage(ctx.repo, str(ctx.entry.get("quant", "Q4_K_M")), ctx.instruct)

    def card_provenance(self, ws: Workspace, arts: Entries) -> list[str]:
        lines: list[str] = []
        if uses_imatrix(ws, arts):
            extra = f" It is published here as `{imatrix_repo_name(ws)}`, to reuse for other types." if (
                ws.root / "gguf" / "imatrix.gguf").is_file() else ""
            lines.append("- **Importance matrix:** computed by quantkit on the calibration text above and applied to "
                         f"every quantized type.{extra}")
            cals = [e["calibration"] for _, e in arts if isinstance(e.get("calibration"), dict)]
            lines += expert_coverage_lines(cals)
        return lines + tokenizer_lines(arts) + mix_lines(arts)

    def shared_files(self, ws: Workspace) -> dict[str, str]:
        """The importance matrix, named after the model as publishers name theirs (``<Model>-imatrix.gguf``)."""
        return {"imatrix.gguf": imatrix_repo_name(ws)}

    def file_texts(self, path: Path) -> list[tuple[str, str, bool]] | None:
        """A GGUF's metadata strings; the vocabulary's are searched for the token only (a piece like "/tmp" is
        nobody's path). A file that does not read as GGUF: its first megabyte, as text."""
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                return None
        from quantkit.backends.gguf.convert.check import metadata_strings

        try:
            return [(f"metadata {k}", v, not k.startswith("tokenizer.ggml.") or k == "tokenizer.ggml.pre")
                    for k, v in metadata_strings(path, vocabulary=True)]
        except Exception:  # noqa: BLE001 - not a readable GGUF: scan its first megabyte as bytes
            return [("", path.open("rb").read(1 << 20).decode("utf-8", errors="replace"), True)]

    def repo_path(self, ws: Workspace, key: str, file: Path | None) -> str:
        return PurePosixPath(key).name if file is None else super().repo_path(ws, key, file)

    def planned_quant(self, name: str, model: str) -> str | None:
        if not name.endswith(".gguf") or name == "imatrix.gguf":
            return None
        return name.removesuffix(".gguf").removeprefix(f"{model}-")


def imatrix_repo_name(ws: Workspace) -> str:
    return f"{ws.model.get('name') or ws.root.name}-imatrix.gguf"


def uses_imatrix(ws: Workspace, arts: Entries) -> bool:
    """Whether the files were quantized with an importance matrix (recorded per artifact; older manifests: the
    matrix is in the workspace and the artifacts were calibrated)."""
    flagged = [e.get("imatrix") for _, e in arts if "imatrix" in e]
    if flagged:
        return any(flagged)
    return (ws.root / "gguf" / "imatrix.gguf").is_file() and any(e.get("calibration") for _, e in arts)


FOUND_BY = {"hash": "by the hash of its token ids for llama.cpp's probe text, as llama.cpp's converter does",
            "structure": "from the structure of its tokenizer.json (split pattern, digits, byte level)",
            "trial": "by trying every pre-tokenizer llama.cpp knows and keeping the one that splits the text exactly "
                     "like the original",
            "override": "as given with --pre-tokenizer"}


def tokenizer_lines(arts: Entries) -> list[str]:
    """How the files' byte-level BPE pre-tokenizer was chosen (llama.cpp needs its name), when it was."""
    tok = next((e["tokenizer"] for _, e in arts if isinstance(e.get("tokenizer"), dict) and e["tokenizer"].get("pre")),
               None)
    if tok is None:
        return []
    how = FOUND_BY.get(str(tok.get("found_by")), str(tok.get("found_by")))
    tried = f" (tried on {tok['tried_on']})" if tok.get("tried_on") else ""
    return [f"- **Tokenizer:** llama.cpp pre-tokenizer `{tok['pre']}`, found {how}{tried}; every file tokenizes "
            "Russian text exactly like the original (checked when the file was verified)."]


def mix_lines(arts: Entries) -> list[str]:
    """Size-targeted files: which type each group of tensors got (the full list ships as .tensor-types.txt)."""
    out: list[str] = []
    by_quant = {e.get("quant"): e for _, e in arts}
    for key, e in arts:
        mix = e.get("mix")
        if not isinstance(mix, dict) or not mix:
            continue
        name = Path(key).name
        what = (f"at the size of llama.cpp's stock {e['replaces']} file" if e.get("replaces")
                else f"for a target of {e.get('target')}")
        out.append(f"- **`{name}`** was built {what}: one type per tensor, chosen to "
                   "minimise the importance-weighted error on the Russian calibration text under that size "
                   f"(`{Path(key).stem}.tensor-types.txt` holds it for `llama-quantize --tensor-type-file`)."
                   + _against_stock(e, by_quant.get(e.get("replaces"))))
        out.append("")
        out.append("  | tensors | types |")
        out.append("  |---|---|")
        for group in sorted(mix):
            types = ", ".join(f"{t} × {n}" for t, n in sorted(mix[group].items()))
            out.append(f"  | `{group}` | {types} |")
        out.append("")
    return out


def _against_stock(entry: dict[str, Any], stock: dict[str, Any] | None) -> str:
    """How a file made at a stock type's size measured against that stock file, on the same held-out tokens."""
    ours, theirs = entry.get("eval") or {}, (stock or {}).get("eval") or {}
    if "kld_mean" not in ours or "kld_mean" not in theirs or ours.get("tokens_fingerprint") != theirs.get(
            "tokens_fingerprint"):
        return ""
    tail = (f", 99.9th percentile {ours['kld_p999']:.3f} vs {theirs['kld_p999']:.3f}"
            if "kld_p999" in ours and "kld_p999" in theirs else "")
    return (f" Measured against the stock {entry['replaces']} on the same Russian text: mean KLD "
            f"{ours['kld_mean']:.4f} vs {theirs['kld_mean']:.4f}{tail}.")


def expert_coverage_lines(cals: list[dict[str, Any]]) -> list[str]:
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


def usage(repo: str, quant: str, instruct: bool) -> str:
    if instruct:
        cli = f"llama-cli -hf {repo}:{quant}"
        py = (
            "from llama_cpp import Llama\n\n"
            f'llm = Llama.from_pretrained(repo_id="{repo}", filename="*{quant}.gguf", n_ctx=4096)\n'
            f'out = llm.create_chat_completion(messages=[{{"role": "user", "content": "{PROMPT}"}}])\n'
            'print(out["choices"][0]["message"]["content"])'
        )
    else:
        cli = f'llama-cli -hf {repo}:{quant} -no-cnv -n 128 -p "{COMPLETION}"'
        py = (
            "from llama_cpp import Llama\n\n"
            f'llm = Llama.from_pretrained(repo_id="{repo}", filename="*{quant}.gguf", n_ctx=4096)\n'
            f'print(llm("{COMPLETION}", max_tokens=128)["choices"][0]["text"])'
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
