"""Connecting to a Ray cluster for the Ray executor: the address checked and waited for (one line when nothing
answers), token authentication as ``ray start`` does it, Ray started quietly, and the storage probe that refuses a
cluster whose nodes do not see the workspace."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ray

from quantkit.errors import QuantkitError
from quantkit.pipeline.job import Job
from quantkit.pipeline.ray_tasks import absolute, workspace_roots

PROBE_PREFIX = ".quantkit-probe-"
PROBE_TIMEOUT = 120  # seconds
CONNECT_TIMEOUT = 60.0  # seconds for a cluster address to answer
# the driver's variables every task gets (Hub endpoint and quantkit's own switches; never a token: see Secret)
FORWARDED_ENV = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET", "QUANTKIT_DEBUG")


def use_token_if_here() -> None:
    """Authenticate to a cluster by address with the token found here (RAY_AUTH_TOKEN, ~/.ray/auth_token), as
    `ray start --address` does; Ray's driver does that only for a cluster it finds by itself."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # another Ray version: RAY_AUTH_MODE=token does the same
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _probe(paths: list[str], sources: list[str]) -> dict[str, Any]:
    """On a worker: which probe files it can read (their contents) and which source folders it sees."""
    found: dict[str, str | None] = {}
    for p in paths:
        try:
            found[p] = Path(p).read_text(encoding="utf-8")
        except OSError:
            found[p] = None
    return {"node": ray.util.get_node_ip_address(), "probes": found,
            "sources": {s: Path(s).exists() for s in sources}}


def parse_address(address: str) -> tuple[str, int] | None:
    """``HOST:PORT`` → (host, port); None for the addresses Ray resolves itself (``auto``, ``local``, ``ray://``)."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise QuantkitError(f"'{address}' is not a Ray cluster address",
                            "give HOST:PORT of the head node (the port `ray start --head` printed, 6379 by default)")
    return host.strip("[]"), int(port)


def wait_for(address: str, timeout: float) -> None:
    """Wait until something listens at the cluster address, at most `timeout` seconds (Ray itself would wait,
    warning, for a quarter of an hour); one line when nothing does."""
    import socket

    target = parse_address(address)
    if target is None:
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(target, timeout=min(5.0, max(timeout, 0.1))):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                why = exc.strerror or type(exc).__name__
                raise QuantkitError(f"cannot reach the Ray cluster at {address} ({why}, waited {timeout:g} s)",
                                    "start it with `ray start --head` (workers: `ray start --address HEAD:6379`), "
                                    "check the address and the firewall, or raise --connect-timeout") from None
            time.sleep(1.0)


class ClusterConnection:
    """What the Ray executor needs of a cluster: connecting to it (or starting a local one) and checking that every
    node sees the workspace. Subclasses set `address`, `num_cpus`, `resources` and `connect_timeout`."""

    address: str | None = None
    num_cpus: int | None = None
    resources: dict[str, float] | None = None
    connect_timeout: float = CONNECT_TIMEOUT

    @contextlib.contextmanager
    def cluster(self) -> Iterator[None]:
        """Connected to the cluster for the block; a local cluster started here is shut down after it."""
        if ray.is_initialized():  # a caller (a notebook, a test) is connected already: use it, leave it running
            yield
            return
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False,
                                  "logging_level": "error"}
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}  # set before the worker imports
        if env:
            kwargs["runtime_env"] = {"env_vars": env}
        # token authentication (Ray's default; a local cluster makes a token in ~/.ray) without Ray's notice
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        if self.address:
            wait_for(self.address, self.connect_timeout)
            kwargs["address"] = self.address
            use_token_if_here()
        else:
            kwargs["address"] = "local"
            if self.num_cpus is not None:
                kwargs["num_cpus"] = self.num_cpus
            if self.resources:
                kwargs["resources"] = self.resources
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise QuantkitError(f"cannot reach the Ray cluster at {self.address or 'this machine'}: {first}",
                                "start it with `ray start --head` (workers: `ray start --address HEAD:6379`); a "
                                "cluster with token authentication (Ray's default) needs its token here too "
                                "(~/.ray/auth_token or RAY_AUTH_TOKEN); leave --address and RAY_ADDRESS unset for "
                                "a cluster on this machine") from None
        try:
            yield
        finally:
            ray.shutdown()

    def check_storage(self, jobs: Sequence[Job]) -> None:
        """Refuse before any work unless every node sees the workspace roots (and local source folders): a probe
        file written here must be readable by a task on each node."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probes: dict[str, str] = {}
        for root in workspace_roots(jobs):
            root.mkdir(parents=True, exist_ok=True)
            path = root / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
            token = uuid.uuid4().hex
            path.write_text(token, encoding="utf-8")
            probes[str(path)] = token
        sources = sorted({j.source for j in map(absolute, jobs) if Path(j.source).is_absolute()
                          and Path(j.source).exists()})
        probe = ray.remote(num_cpus=0, max_retries=1)(_probe)
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(list(probes), sources) for n in nodes]
            answers = ray.get(refs, timeout=PROBE_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            raise QuantkitError(f"the storage probe got no answer from every node within {PROBE_TIMEOUT} s",
                                "check the cluster with `ray status`") from None
        finally:
            for p in probes:
                with contextlib.suppress(OSError):
                    os.unlink(p)
        for ans in answers:
            unseen = [p for p, token in probes.items() if ans["probes"].get(p) != token]
            if unseen:
                raise QuantkitError(
                    f"node {ans['node']} cannot read {Path(unseen[0]).parent}: the workspace must be on storage "
                    "every node of the cluster sees at the same path",
                    "put the workspace (recipe `workspace:`) on a shared file system (NFS or similar) mounted at "
                    "the same path on every node")
            missing = [s for s, seen in ans["sources"].items() if not seen]
            if missing:
                raise QuantkitError(f"node {ans['node']} does not see the model folder {missing[0]}",
                                    "put local checkpoints on storage every node sees, or use Hub ids")

