"""``quality.csv``: the measured numbers of a published format, one row per file, beside the card (what the card's
table shows, with the 99th and 99.9th percentile KLD and the evaluation set, for readers who chart or compare)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from quantkit.backends.base import Entries, gate_failed

QUALITY_CSV = "quality.csv"
COLUMNS = ("file", "quant", "size_bytes", "bpw", "ppl", "ppl_ref", "delta_ppl", "kld_mean", "kld_p99", "kld_p999",
           "top1", "tokens", "ctx", "eval_set", "gate")


def evaluated(entry: dict[str, Any]) -> bool:
    ev = entry.get("eval")
    return isinstance(ev, dict) and "kld_mean" in ev


def quality_csv(arts: Entries) -> str | None:
    """The CSV text for these artifacts; None when none was evaluated."""
    rows = [(k, e) for k, e in arts if evaluated(e)]
    if not rows:
        return None
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(COLUMNS)
    for key, entry in rows:
        ev = entry["eval"]
        out.writerow([Path(key).name, entry.get("quant", ""), entry.get("size", ""), entry.get("bpw", ""),
                      *(ev.get(c, "") for c in COLUMNS[4:-1]), "failed" if gate_failed(entry) else "passed"])
    return buf.getvalue()
