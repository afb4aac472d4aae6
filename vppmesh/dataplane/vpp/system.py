"""What VPP tells about itself: version and worker threads."""

from __future__ import annotations

from vppmesh.dataplane.vpp.client import Request, VppApi


def version(api: VppApi) -> str:
    return str(api.call(Request("show_version", {}, "version")).version)


def worker_count(api: VppApi) -> int:
    """Number of worker threads (the main thread excluded)."""
    reply = api.call(Request("show_threads", {}, "threads"))
    return sum(1 for t in reply.thread_data if t.type == "workers")


def vpp_pid(api: VppApi) -> int:
    """VPP's process id: a new one after a restart, however quick the restart was."""
    return int(api.call(Request("control_ping", {}, "ping")).vpe_pid)
