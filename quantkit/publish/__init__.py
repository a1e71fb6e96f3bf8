"""Publish one format of a workspace to the Hugging Face Hub: `layout` decides what goes where (from the format's
backend, no network), `hub` sends it (token and path checks, resume), `retry` keeps transient failures from ending
a publish and the token out of every message."""

from quantkit.publish.hub import (
    SMALL_FILE,
    _check_role,
    _repo_id,
    check_files,
    hub_token,
    plan_publish,
    publish_folder,
    publish_format,
)
from quantkit.publish.layout import MAX_FILE_SIZE, SKIP, Item, Layout, layout, resolve_target, verify_failed
from quantkit.publish.retry import COMMIT_TRIES, MAX_WAIT, RETRY_STATUS, hub_errors, scrub

__all__ = ["COMMIT_TRIES", "MAX_FILE_SIZE", "MAX_WAIT", "RETRY_STATUS", "SKIP", "SMALL_FILE", "Item", "Layout",
           "_check_role", "_repo_id", "check_files", "hub_errors", "hub_token", "layout", "plan_publish",
           "publish_folder", "publish_format", "resolve_target", "scrub", "verify_failed"]
