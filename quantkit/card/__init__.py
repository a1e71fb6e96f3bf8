"""The model card (README.md) of a published format; see `quantkit.card.render`."""

from quantkit.backends.base import HUB, RECOMMENDED, gate_failed
from quantkit.card.render import (
    CARD_NAME,
    advice,
    artifacts_for,
    branches,
    default_repo_name,
    format_info,
    formats_in,
    model_name,
    pick,
    render_card,
    write_card,
)

__all__ = ["CARD_NAME", "HUB", "RECOMMENDED", "advice", "artifacts_for", "branches", "default_repo_name",
           "format_info", "formats_in", "gate_failed", "model_name", "pick", "render_card", "write_card"]
