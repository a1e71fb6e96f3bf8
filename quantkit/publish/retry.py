"""Talking to the Hub safely: which failures are worth retrying and how long to wait (honouring Retry-After), the
retry loop for calls the client does not retry itself, and one-line errors with the token scrubbed out."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from quantkit import console
from quantkit.errors import QuantkitError

COMMIT_TRIES = 5
MAX_WAIT = 60.0
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})

T = TypeVar("T")


def endpoint() -> str:
    """The Hub's URL (``HF_ENDPOINT``)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def _transport_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            mod = __import__(name)
            found.append(mod.TransportError)
    return tuple(found)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _status(exc: BaseException) -> int | None:
    for e in _chain(exc):
        resp = getattr(e, "response", None)
        code = getattr(resp, "status_code", None)
        if isinstance(code, int):
            return code
    return None


def retry_wait(exc: BaseException, attempt: int) -> float | None:
    """Seconds to wait before retrying `exc`, or None when it is not worth retrying."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if any(isinstance(e, OfflineModeIsEnabled) for e in _chain(exc)):
        return None
    transport = _transport_errors()
    status = _status(exc)
    if status is None and not any(isinstance(e, transport) for e in _chain(exc)):
        return None
    if status is not None and status not in RETRY_STATUS:
        return None
    for e in _chain(exc):
        headers = getattr(getattr(e, "response", None), "headers", None) or {}
        value = headers.get("Retry-After") if hasattr(headers, "get") else None
        if value is not None:
            with contextlib.suppress(ValueError):
                return min(MAX_WAIT, max(0.0, float(value)))
    return min(MAX_WAIT, 2.0 ** (attempt - 1))


def retrying(call: Callable[[], T], what: str) -> T:
    """Run one Hub call, retrying transient failures (the client does not retry these calls itself)."""
    for attempt in range(1, COMMIT_TRIES + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified below; anything not transient is re-raised
            wait = retry_wait(exc, attempt)
            if wait is None or attempt == COMMIT_TRIES:
                raise
            console.warn(f"{what}: {happened(exc)}; retrying in {wait:.0f} s")
            time.sleep(wait)
    raise AssertionError("unreachable")


def _short(exc: BaseException) -> str:
    status = _status(exc)
    if status is not None:
        server = next((getattr(e, "server_message", None) for e in _chain(exc) if getattr(e, "server_message", None)),
                      None)
        return f"HTTP {status}" + (f": {server}" if server else "")
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def happened(exc: BaseException) -> str:
    text = f"the Hub answered {_short(exc)}" if _status(exc) is not None else f"no answer ({_short(exc)})"
    return scrub(text, None)


def scrub(text: str, token: str | None) -> str:
    """`text` without the token (or anything shaped like a bearer credential)."""
    if token:
        text = text.replace(token, "***")
    text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
    return re.sub(r"\bhf_[A-Za-z0-9]{8,}\b", "hf_***", text)


@contextlib.contextmanager
def hub_errors(token: str | None, doing: str) -> Iterator[None]:
    """Turn Hub, network and metadata failures into one-line `QuantkitError`s without the token."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except QuantkitError:
        raise
    except OfflineModeIsEnabled as exc:
        raise QuantkitError("HF_HUB_OFFLINE is set, so the Hub cannot be reached",
                            "unset HF_HUB_OFFLINE to publish") from exc
    except Exception as exc:  # noqa: BLE001 - the boundary between the Hub client and our one-line errors
        status = _status(exc)
        resume = "run the same command again: files already on the Hub are not sent twice"
        if status == 401:
            err = QuantkitError(f"{doing}: the Hub rejected the token (HTTP 401)",
                                "check HF_TOKEN, or run `hf auth login` again")
        elif status == 403:
            err = QuantkitError(f"{doing}: the token may not do this (HTTP 403: {_server(exc)})",
                                "use a token with write access to that namespace")
        elif status is not None:
            err = QuantkitError(f"{doing} failed: {_short(exc)}", resume if status >= 429 else None)
        elif any(isinstance(e, _transport_errors()) for e in _chain(exc)):
            err = QuantkitError(f"{doing}: cannot reach the Hub at {endpoint()} ({_short(exc)})",
                                f"check the network (and HF_ENDPOINT), then {resume}")
        elif isinstance(exc, ValueError) and "metadata" in str(exc).lower():
            err = QuantkitError(f"the Hub refused the model card's metadata: {_short(exc)}",
                                "report this as a quantkit bug")
        elif isinstance(exc, HfHubHTTPError | OSError | ValueError | RuntimeError):
            err = QuantkitError(f"{doing} failed: {_short(exc)}", resume)
        else:
            raise
        raise QuantkitError(scrub(err.message, token)[:400], err.hint) from exc


def _server(exc: BaseException) -> str:
    return next((str(e.server_message) for e in _chain(exc) if getattr(e, "server_message", None)), "forbidden")
