"""`vppmesh up --watch` with a mesh file: re-apply on a timer and on file changes, and
recover from VPP restarts.

The loop around node.Session (one VPP connection, only changed peers re-applied); the
datastore path has its own loop (datastore/agent.py). Printing what a poll changed is
the caller's: it passes `report`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from vppmesh import node as agent
from vppmesh.errors import VppMeshError, VppUnavailableError

if TYPE_CHECKING:
    from vppmesh.metrics import AgentMetrics, MetricsTls

log = logging.getLogger("vppmesh")

WATCH_POLL_SECONDS = 2.0
WATCH_FILE_CHECK_SECONDS = 0.2
# While VPP is away the agent knocks this often: pods wait for the first answer.
WATCH_VPP_RETRY_SECONDS = 0.25


def start_metrics(listen: str, tls: MetricsTls | None = None) -> AgentMetrics:
    """Serve Prometheus metrics on `listen` (ADDR:PORT), over HTTPS with `tls`; the
    exporter the loop fills."""
    from vppmesh.metrics import AgentMetrics, MetricsServer, parse_listen

    address = parse_listen(listen)
    exporter = AgentMetrics()
    server = MetricsServer(exporter, address, tls).start()
    clients = f", clients need a certificate from {tls.client_ca}" \
        if tls is not None and tls.client_ca is not None else ""
    log.info("metrics on %s://%s:%d/metrics%s", server.scheme, address[0], server.port,
             clients)
    return exporter


def file_signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def poll_ticks(path: Path, hurry: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """Yield every WATCH_POLL_SECONDS, and at once when `path` changes.

    A plain timer rather than filesystem events: the agent must run on schedule however
    busy the directory is (rekeys, key limits and receiver windows depend on it), and a
    stream of unrelated events must not be able to starve it. While `hurry()` (VPP is
    away) the next tick comes after WATCH_VPP_RETRY_SECONDS.
    """
    signature = file_signature(path)
    while True:
        wait = WATCH_VPP_RETRY_SECONDS if hurry() else WATCH_POLL_SECONDS
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(min(WATCH_FILE_CHECK_SECONDS, wait))
            now = file_signature(path)
            if now != signature:
                signature = now
                break
        yield


def give_back_uplinks(opts: agent.NodeOptions) -> None:
    """VPP went away: the NICs it had go back to Linux, so the host stays reachable."""
    from vppmesh.uplink import release_all

    try:
        for line in release_all(opts.state_dir):
            log.warning("VPP is gone: %s given back to Linux", line)
    except VppMeshError as exc:
        log.error("%s", exc)


def watch_loop(opts: agent.NodeOptions, metrics: AgentMetrics | None = None,
               stats_socket: Path | None = None,
               report: Callable[[agent.UpResult], None] | None = None) -> None:
    """Re-apply every poll and on mesh file changes; notice VPP restarts and recover.

    Every poll runs `up`, which also advances key generations (scheduled rekeys, key
    limits, receivers following their senders). A restart of VPP is noticed whether the
    agent saw VPP gone or only a new VPP process id: either way the mesh is programmed
    again under fresh keys, the CNI pods are re-attached, and the time from VPP's return
    to that is logged (and exported with --metrics). A poll that changed something or
    has notes goes to `report`.
    """
    log.info("watching %s and VPP at %s", opts.mesh_file, opts.api_socket)
    vpp_gone_at: float | None = None
    last_pid: int | None = None
    session = agent.Session(opts)  # one connection; only changed peers are re-applied
    # The lambda reads vpp_gone_at as it is at each tick (late binding is the point).
    for _tick in poll_ticks(opts.mesh_file,
                            hurry=lambda: vpp_gone_at is not None):  # noqa: B023
        attempt = time.monotonic()
        try:
            result = session.run()
        except VppUnavailableError as exc:
            if vpp_gone_at is None:
                vpp_gone_at = attempt
                log.warning("VPP unavailable (%s); waiting for it", exc)
                give_back_uplinks(opts)
                if metrics is not None:
                    metrics.vpp_up.set(0)
            continue
        except VppMeshError as exc:
            log.error("%s", exc)
            if metrics is not None:
                metrics.reconcile_errors.inc()
            continue
        elapsed = time.monotonic() - attempt
        restarted = last_pid is not None and result.vpp_pid != last_pid
        pods = result.pod_report
        if vpp_gone_at is not None or restarted:
            log.info("VPP is back (pid %s): mesh programmed again in %.0f ms after it "
                     "answered (%d change(s)); %d pod(s) re-attached in %.0f ms in all",
                     result.vpp_pid, result.seconds * 1000, len(result.changes),
                     len(pods.reattached) if pods else 0, elapsed * 1000)
        if metrics is not None:
            metrics.record_poll(elapsed, pods, restarted=vpp_gone_at is not None or restarted,
                                unavailable=attempt - vpp_gone_at
                                if vpp_gone_at is not None else None)
        vpp_gone_at = None
        if report is not None and (result.changes or result.notes):
            report(result)
        last_pid = result.vpp_pid
        if metrics is not None and result.mesh is not None and session.client is not None \
                and metrics.snapshot_due(time.monotonic()):
            try:
                metrics.observe(session.client, result.mesh, opts.node, stats_socket,
                                opts.generations.load(), vpp_pid=result.vpp_pid)
            except VppMeshError as exc:  # the next poll finds out what happened
                log.warning("metrics snapshot failed: %s", exc)
