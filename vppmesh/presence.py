"""Is this node's agent (`vppmesh up --watch`) running?

Key rotation, the key limits (rekey at half a limit, fail closed at the limit) and
receivers following their senders' generations all happen in the agent's loop: a
one-shot `up` programs the mesh and leaves. So `status`, `verify` and a one-shot `up`
say so when no agent runs. The agent records its process id in the state directory
(`<state-dir>/<node>.agent.json`) for as long as it runs; a record whose process is gone
(the agent was killed) counts as no agent.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

NO_AGENT = ("no `vppmesh up --watch` agent is running for node {node} (state directory "
            "{state_dir}): keys do not rotate and the key limits are not enforced; run it "
            "as a service (`vppmesh install-unit`, README: Quick start)")


def record_path(state_dir: Path, node: str) -> Path:
    return state_dir / f"{node}.agent.json"


@contextlib.contextmanager
def running(state_dir: Path, node: str) -> Iterator[Path]:
    """Record this process as `node`'s agent while the block runs."""
    path = record_path(state_dir, node)
    state_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": os.getpid(), "node": node, "started": time.time()}))
    try:
        yield path
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()


def _alive(pid: int) -> bool:
    """A live process that is a vppmesh (not a recycled id)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"vppmesh" in cmdline


def agent_pid(state_dir: Path, node: str) -> int | None:
    """The running agent's process id, or None."""
    try:
        pid = int(json.loads(record_path(state_dir, node).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if _alive(pid) else None


def warning(state_dir: Path, node: str) -> str | None:
    """What to tell the operator when no agent keeps `node`'s keys fresh."""
    if agent_pid(state_dir, node) is not None:
        return None
    return NO_AGENT.format(node=node, state_dir=state_dir)
