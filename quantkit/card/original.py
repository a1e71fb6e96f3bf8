"""The original model's card below ours: read from the workspace, its YAML block split off, headings pushed down
and relative links pointed at the base model's repo."""

from __future__ import annotations

import re
from typing import Any

import yaml

from quantkit.backends.base import HUB
from quantkit.workspace import Workspace


def model_name(ws: Workspace) -> str:
    return str(ws.model.get("name") or ws.root.name)


def base_link(ws: Workspace) -> str:
    hub_id = ws.model.get("hub_id")
    return f"[{hub_id}]({HUB}/{hub_id})" if hub_id else f"`{model_name(ws)}`"


def read_source_card(ws: Workspace) -> str | None:
    rel = ws.model.get("readme")
    path = ws.root / (rel or "source-README.md")
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8", errors="replace")


def front_matter(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    _, meta = split_front_matter(text)
    return meta


def split_front_matter(text: str) -> tuple[str, dict[str, Any]]:
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


def original(ws: Workspace, source: str | None) -> str:
    hub_id = ws.model.get("hub_id")
    if not source or not source.strip():
        where = f" at {base_link(ws)}" if hub_id else ""
        return f"The original model card was not available when these files were made; see it{where}."
    body, _ = split_front_matter(source)
    body = _demote_headings(body.strip("\n"))
    if hub_id:
        body = _absolute_links(body, f"{HUB}/{hub_id}")
    intro = f"Below is the card of {base_link(ws)} as its authors published it." if hub_id else \
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
