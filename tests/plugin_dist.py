"""Installing a test plugin the way pip leaves one: its modules and a ``*.dist-info`` folder (METADATA and
entry_points.txt) in a folder that goes on ``sys.path`` / ``PYTHONPATH``."""

from __future__ import annotations

import textwrap
from pathlib import Path


def write_distribution(site: Path, name: str, modules: dict[str, str], entry_points: dict[str, str]) -> Path:
    """Write distribution `name` into `site`: `modules` maps a relative path to its source, `entry_points` a
    backend name to ``module:Class`` in the ``quantkit.backends`` group. Returns `site`."""
    for rel, source in modules.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(textwrap.dedent(source), encoding="utf-8")
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n", encoding="utf-8")
    lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[quantkit.backends]\n{lines}", encoding="utf-8")
    return site
