"""Does a quant still answer in Russian? Pure measures over generated answers, and the drift prompts.

Nothing here loads a model: `quantkit.quality.generate` produces the answers (bf16 and every artifact, greedy, from the
same token ids), and these functions compare them.

- `script_shares`: letters by script (Cyrillic / Latin / CJK / other) outside code.
- `left_russian`: an answer "left Russian" when, outside code (fenced blocks, `inline`, identifiers), it holds a run
  of ``MIN_RUN`` or more consecutive non-Cyrillic words, or ``MIN_CJK`` or more CJK / kana / hangul characters, that
  the bf16 answer to the same prompt did not also use; or when such words hold ``MIN_FOREIGN_LETTERS`` or more
  letters and outnumber its Cyrillic letters (``EEEEEEEE…``: one long foreign word). Numbers, names and Latin terms
  (``NumPy``, ``Python``, ``SQL``) are single words in a Russian sentence and so never make a run; a term the bf16
  answer also used is covered whatever its length.
- `common_prefix`: how many generated tokens two answers share from the start.
- `summarize`: the per-artifact figures (``kept`` is the share of prompts whose answer did not leave Russian; a
  prompt whose bf16 answer itself left Russian counts as kept, and ``left_russian_bf16`` says how many there were)
  and the worst examples side by side.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError

MIN_RUN = 3  # consecutive foreign words that make an answer leave Russian
MIN_CJK = 2  # CJK / kana / hangul characters that do
MIN_FOREIGN_LETTERS = 12  # or this many letters in foreign words, outnumbering the Cyrillic ones
PREFIX_TOKENS = 16  # "identical for the first N tokens"
DEFAULT_PROMPTS = 24
DEFAULT_NEW_TOKENS = 48
DEFAULT_MAX_DRIFT = 0.1
KINDS = ("question", "instruction", "continuation")
BUILTIN = "builtin:ru-drift"

_FENCE = re.compile(r"```.*?(?:```|$)", re.S)
_INLINE = re.compile(r"`[^`\n]*`")
_EDGE = "«»\"'“”„‘’()[]{}.,;:!?…—–-*•·/|"
_CODE_CHARS = set("_=<>{}[]()/\\#@$%^&|~+*;:.")


def script_of(ch: str) -> str | None:
    """cyrillic | latin | cjk | other for a letter; None for anything else."""
    if not ch.isalpha():
        return None
    o = ord(ch)
    if 0x0400 <= o <= 0x052F or 0x1C80 <= o <= 0x1C8F or 0x2DE0 <= o <= 0x2DFF or 0xA640 <= o <= 0xA69F:
        return "cyrillic"
    if o < 0x0250 or 0x1E00 <= o <= 0x1EFF or 0xFF21 <= o <= 0xFF5A:
        return "latin"
    if (0x2E80 <= o <= 0x9FFF or 0xAC00 <= o <= 0xD7AF or 0xF900 <= o <= 0xFAFF or 0x1100 <= o <= 0x11FF
            or 0x20000 <= o <= 0x3FFFF):
        return "cjk"  # CJK ideographs, kana, bopomofo, hangul
    return "other"


def strip_code(text: str) -> str:
    """The answer without fenced code blocks and `inline code`."""
    return _INLINE.sub(" ", _FENCE.sub(" ", text))


def letter_counts(text: str) -> dict[str, int]:
    counts = {"cyrillic": 0, "latin": 0, "cjk": 0, "other": 0}
    for ch in strip_code(text):
        s = script_of(ch)
        if s:
            counts[s] += 1
    return counts


def script_shares(text: str) -> dict[str, float | None]:
    """Share of letters by script outside code; None everywhere for an answer without letters."""
    counts = letter_counts(text)
    total = sum(counts.values())
    return {k: (v / total if total else None) for k, v in counts.items()}


def _words(text: str) -> list[str]:
    return [w.strip(_EDGE) for w in strip_code(text).split()]


def _is_code(word: str) -> bool:
    """An identifier or expression (``snake_case``, ``f(x)``, ``a.b``, ``x=1``): code, not language."""
    return any(c in _CODE_CHARS for c in word) or any(c.isdigit() for c in word)


def _foreign(word: str) -> str | None:
    """'cjk' or 'foreign' for a word in another script than Cyrillic; None for Russian, numbers, code."""
    if not word or _is_code(word):
        return None
    counts = {"cyrillic": 0, "latin": 0, "cjk": 0, "other": 0}
    for ch in word:
        s = script_of(ch)
        if s:
            counts[s] += 1
    if counts["cjk"]:
        return "cjk"
    letters = sum(counts.values())
    if not letters or counts["cyrillic"] * 2 >= letters:
        return None
    return "foreign"


def vocabulary(text: str) -> set[str]:
    """The words (lower case) and CJK characters of an answer: what a compared answer may reuse."""
    words = {w.lower() for w in _words(text) if w}
    chars = {ch for ch in strip_code(text) if script_of(ch) == "cjk"}
    return words | chars


def left_russian(text: str, reference: str | None = None) -> str | None:
    """Why `text` left Russian (the offending words), or None when it did not.

    Words and CJK characters that also occur in `reference` (the bf16 answer to the same prompt) are allowed."""
    allowed = vocabulary(reference) if reference else set()
    run: list[str] = []
    longest: list[str] = []
    cjk: list[str] = []
    foreign = cyrillic = 0
    for word in _words(text):
        kind = _foreign(word)
        if kind == "cjk":
            cjk += [ch for ch in word if script_of(ch) == "cjk" and ch not in allowed]
        if kind is None:
            cyrillic += sum(script_of(ch) == "cyrillic" for ch in word)
        if kind is not None and word.lower() not in allowed:
            foreign += sum(ch.isalpha() for ch in word)
            run.append(word)
            if len(run) > len(longest):
                longest = list(run)
        elif kind is None:
            run = []
    if len(cjk) >= MIN_CJK:
        return f"{len(cjk)} CJK characters ({''.join(cjk[:12])})"
    if len(longest) >= MIN_RUN:
        return f"{len(longest)} foreign words in a row ({' '.join(longest[:8])})"
    if foreign >= MIN_FOREIGN_LETTERS and foreign > cyrillic:
        return f"{foreign} letters in foreign words, {cyrillic} Cyrillic ({' '.join(longest)[:40]})"
    return None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def same_start(a: list[int], b: list[int], n: int = PREFIX_TOKENS) -> bool:
    """Identical for the first `n` tokens (or identical altogether when both stopped earlier)."""
    return a[:n] == b[:n]


def summarize(prompts: list[str], ref: list[dict[str, Any]], out: list[dict[str, Any]], *,
              prefix: int = PREFIX_TOKENS, examples: int = 3) -> dict[str, Any]:
    """One artifact's drift figures: answers ``{"text", "ids"}`` per prompt, bf16's in `ref`, the artifact's in
    `out`."""
    if len(ref) != len(out) or len(out) != len(prompts):
        raise ValueError("one answer per prompt is needed on both sides")
    letters = {"cyrillic": 0, "latin": 0, "cjk": 0, "other": 0}
    ref_letters = dict(letters)
    left = ref_left = same = 0
    prefixes: list[int] = []
    rows = []
    for i, (r, a) in enumerate(zip(ref, out, strict=True)):
        for k, v in letter_counts(a["text"]).items():
            letters[k] += v
        for k, v in letter_counts(r["text"]).items():
            ref_letters[k] += v
        ref_gone = left_russian(r["text"]) is not None
        ref_left += ref_gone
        why = None if ref_gone else left_russian(a["text"], r["text"])  # bf16 itself left Russian: not the quant's
        left += why is not None
        cp = common_prefix(r["ids"], a["ids"])
        prefixes.append(cp)
        same += same_start(r["ids"], a["ids"], prefix)
        cyr = script_shares(a["text"])["cyrillic"]
        rows.append((why is not None, -(cyr if cyr is not None else 1.0), -cp, i, why))
    n = len(prompts)
    total, ref_total = sum(letters.values()), sum(ref_letters.values())
    worst = []
    for flagged, _, neg_cp, i, why in sorted(rows, reverse=True)[:examples]:
        if not flagged and -neg_cp >= len(ref[i]["ids"]) and ref[i]["ids"] == out[i]["ids"]:
            continue  # identical answers are no example
        worst.append({"prompt": prompts[i], "bf16": ref[i]["text"], "answer": out[i]["text"],
                      "left_russian": why, "common_prefix": -neg_cp})
    return {
        "prompts": n,
        "kept": round(1.0 - left / n, 4) if n else None,
        "left_russian": left,
        "left_russian_bf16": ref_left,
        "cyrillic": round(letters["cyrillic"] / total, 4) if total else None,
        "cyrillic_bf16": round(ref_letters["cyrillic"] / ref_total, 4) if ref_total else None,
        "scripts": {k: round(v / total, 4) if total else None for k, v in letters.items()},
        "same_prefix": same,
        "prefix_tokens": prefix,
        "mean_common_prefix": round(sum(prefixes) / n, 2) if n else None,
        "identical": sum(r["ids"] == a["ids"] for r, a in zip(ref, out, strict=True)),
        "examples": worst,
    }


def drift_value(result: dict[str, Any]) -> float:
    """The gated figure: the share of prompts whose answer left Russian (relative to bf16's answer)."""
    return 1.0 - float(result["kept"])


# -- prompts ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prompt:
    text: str
    kind: str = "question"  # question | instruction | continuation
    domain: str = ""


def builtin_path() -> Path:
    from quantkit.calibration import builtin_dir

    return builtin_dir() / "ru-drift" / "prompts.jsonl"


def load_prompts(spec: str | Path | None = None, limit: int | None = DEFAULT_PROMPTS) -> list[Prompt]:
    """The built-in prompts (or a user's ``.jsonl`` of ``{"prompt", "kind"?}`` / ``.txt`` one per line); the
    first `limit` of them (None: all)."""
    path = builtin_path() if spec in (None, "", BUILTIN) else Path(str(spec)).expanduser()
    name = BUILTIN if spec in (None, "", BUILTIN) else str(path)
    hint = 'give a .jsonl file with one {"prompt": "..."} per line, or a .txt file with one prompt per line'
    if not path.is_file():
        raise QuantkitError(f"drift prompts {name}: " + ("not a file" if path.exists() else "no such file"), hint)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QuantkitError(f"drift prompts {name}: cannot read it as UTF-8 text ({exc.__class__.__name__})",
                            hint) from None
    prompts: list[Prompt] = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(Prompt(line.strip().replace("\\n", "\n")))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QuantkitError(f"drift prompts {name}, line {no}: not JSON ({exc.msg})", hint) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise QuantkitError(f'drift prompts {name}, line {no}: needs a non-empty "prompt" string', hint)
        kind = obj.get("kind", "question")
        if kind not in KINDS:
            raise QuantkitError(f"drift prompts {name}, line {no}: kind '{kind}' is not one of {', '.join(KINDS)}",
                                hint)
        prompts.append(Prompt(obj["prompt"], kind, str(obj.get("domain", ""))))
    if not prompts:
        raise QuantkitError(f"drift prompts {name}: holds no prompts", hint)
    return prompts[:limit] if limit else prompts
