"""Is this node's agent (`vppmesh up --watch`) running?

Key rotation, the key limits (rekey at half a limit, fail closed at the limit) and
receivers following their senders' generations all happen in the agent's loop: a
one-shot `up` programs the mesh and leaves. So `status`, `verify` and a one-shot `up`
say so when no agent runs. The agent records its process id in the state directory
(`<state-dir>/<node>.agent.json`) for as long as it runs; a record whose process is gone
(the agent was killed) counts as no agent.

`down` and `uninstall` need more than a warning: a running agent would put back what
they remove at its next poll. live_agent() asks the agent's control socket
(vppmesh/agent/control.py) first, and stop_agent() stops it so that it stays stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vppmesh.errors import VppMeshError

if TYPE_CHECKING:
    from vppmesh.host.unit import Unit

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


# ---- an agent that would undo `down` (vppmesh down, vppmesh uninstall) ---------------------
PING_SECONDS = 10.0  # the agent answers between two runs; a run at scale takes seconds
STOP_SECONDS = 60.0  # the run in progress ends first, then the loop (as on SIGTERM)


@dataclass(frozen=True)
class LiveAgent:
    """A running agent of this node: it programs the mesh again at its next poll."""

    pid: int | None
    where: str  # how it was found: its control socket, or its process record

    def describe(self) -> str:
        pid = f" (pid {self.pid})" if self.pid is not None else ""
        return f"an agent{pid} runs for this node ({self.where})"


def live_agent(control_path: Path, state_dir: Path, node: str) -> LiveAgent | None:
    """The agent that runs for this node, or None.

    Its control socket answering is what counts: any process that listens there is an
    agent of this VPP, even one too old to know `ping` (it answers with an error) or too
    busy to answer in time. An agent whose socket could not be made is found by its
    process record (`up --watch` and the datastore agent both keep one). control.NotAllowed
    when the socket refuses us (not root): then nobody can tell."""
    from vppmesh.agent import control

    where = f"its control socket {control_path} answers"
    try:
        answer = control.request(control_path, {"request": "ping"}, PING_SECONDS)
    except control.NoAgent:
        pass
    except control.NotAllowed:
        raise
    except VppMeshError:  # it listens but did not answer: busy, or an older agent
        return LiveAgent(agent_pid(state_dir, node), where)
    else:
        pid = answer.get("pid")
        return LiveAgent(pid if isinstance(pid, int) else agent_pid(state_dir, node), where)
    pid = agent_pid(state_dir, node)
    if pid is not None and pid != os.getpid():
        return LiveAgent(pid, f"its record {record_path(state_dir, node)} names a live "
                         "process; it has no control socket")
    return None


def stop_agent(found: LiveAgent, control_path: Path, state_dir: Path, node: str,
               unit: Unit | None = None) -> list[str]:
    """Stop the agent so that it stays stopped; what was done, for the operator.

    The service first, through systemd: its Restart=always would start again an agent
    that merely exited. Then, if one still runs (not the unit's), a `stop` on its control
    socket, which ends its loop between two runs as SIGTERM does; SIGTERM itself for an
    agent without a socket. VppMeshError when it still runs after STOP_SECONDS."""
    from vppmesh.agent import control

    done: list[str] = []
    if unit is not None and unit.installed() and unit.active():
        unit.stop()
        done.append(f"stopped the service {unit.name} (`systemctl stop {unit.name}`; it "
                    f"starts again at boot while enabled: `systemctl disable {unit.name}`)")
    again = live_agent(control_path, state_dir, node)
    if again is None:
        return done
    if again.pid is not None and again.where.startswith("its record"):
        os.kill(again.pid, signal.SIGTERM)
        done.append(f"sent SIGTERM to the agent (pid {again.pid})")
    else:
        answer = control.request(control_path, {"request": "stop"}, STOP_SECONDS)
        if not answer.get("stopped"):
            raise VppMeshError(f"the agent{_pid(again.pid)} did not stop: "
                               f"{answer.get('error', answer)}")
        done.append(f"stopped the agent{_pid(answer.get('pid', again.pid))} over its "
                    f"control socket {control_path}")
    deadline = time.monotonic() + STOP_SECONDS
    while live_agent(control_path, state_dir, node) is not None:
        if time.monotonic() >= deadline:
            raise VppMeshError(f"the agent{_pid(again.pid)} still runs {STOP_SECONDS:g} s "
                               "after it was asked to stop; stop it as it was started")
        time.sleep(0.1)
    return done


def _pid(pid: object) -> str:
    return f" (pid {pid})" if pid is not None else ""
