"""Hub names: what a repo id looks like (`HUB_ID`, `REPO_NAME`), and repo names made from model names (Russian letters
transliterated, anything else the Hub refuses replaced)."""

from __future__ import annotations

import re
import unicodedata

_RU = dict(zip("абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
               ["a", "b", "v", "g", "d", "e", "e", "zh", "z", "i", "y", "k", "l", "m", "n", "o", "p", "r", "s", "t",
                "u", "f", "kh", "ts", "ch", "sh", "shch", "", "y", "", "e", "yu", "ya"], strict=True))
MAX_LEN = 96  # the Hub's limit on a repo name
# NAMESPACE/NAME and a bare NAME, in the ASCII the Hub takes (the one definition; source, recipes and publish use it)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$", re.ASCII)
REPO_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*$", re.ASCII)


def hub_safe_name(name: str) -> str:
    """A valid Hub repo name (letters, digits, '.', '-', '_') that reads like `name`: ``Сайга 7B`` → ``Sayga-7B``."""
    out = []
    for ch in name:
        low = ch.lower()
        if low in _RU:
            t = _RU[low]
            out.append(t.capitalize() if ch != low else t)
        else:
            out.append(ch)
    text = unicodedata.normalize("NFKD", "".join(out)).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text)
    text = re.sub(r"-{2,}", "-", text).strip("-.")
    return text[:MAX_LEN].rstrip("-.") or "model"
