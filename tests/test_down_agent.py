"""`vppmesh down` with a live agent, and `vppmesh uninstall` on a host.

A running agent (`up --watch`, the unit's or the datastore agent) puts back what `down`
removes at its next poll: `down` refuses while one answers on its control socket, stops it
first with --stop-agent (systemd for the unit: its Restart=always would start an agent that
merely exited; a `stop` request otherwise, which ends the loop as SIGTERM does), and goes
on anyway with --force. `uninstall` takes the unit, the agent, the mesh and (--purge) the
key and state off the host, and a second run finds nothing left.

The agent is the real watch loop (watch.watch_loop, with its real control socket) in a
thread; its session runs the real `up` on a FakeVpp that the CLI's `down` talks to as well.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from vppmesh.agent import control, node, presence
from vppmesh.agent import loop as watch
from vppmesh.agent.control import Control, request
from vppmesh.cli import app
from vppmesh.config import dump_mesh
from vppmesh.errors import VppUnavailableError
from vppmesh.host import unit
from vppmesh.keying.agreement import NoAgreement
from vppmesh.keying.epochs import GenerationStore
from vppmesh.keying.keys import private_key_b64, write_secret_file
from vppmesh.testing.agents import short_tmp
from vppmesh.testing.fake_vpp import FakeVpp
from vppmesh.testing.meshes import make_mesh
from vppmesh.testing.wait import wait_for


def owned(vpp: FakeVpp) -> int:
    return sum(vpp.owned_objects().values())


class FakeSystemd:
    """systemctl for the tests: which units are active, every call kept; `stop` of an
    active unit runs `on_stop` (what SIGTERM does to the unit's agent)."""

    def __init__(self) -> None:
        self.active: set[str] = set()
        self.calls: list[tuple[str, ...]] = []
        self.on_stop: Any = None

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        self.calls.append(args)
        code = 0
        if args[0] == "is-active":
            code = 0 if args[-1] in self.active else 3
        elif args[0] in ("stop", "disable") and args[-1] in self.active:
            self.active.discard(args[-1])
            if self.on_stop is not None:
                self.on_stop()
        return subprocess.CompletedProcess(["systemctl", *args], code, "", "")


class Host:
    """node1 of a 3-node mesh on a FakeVpp, with the files a host install has: key, mesh
    file, state directory, an API socket directory for the control socket."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        mesh, secrets = make_mesh(3)
        self.etc = tmp / "etc"
        self.etc.mkdir()
        self.mesh_file = self.etc / "mesh.yaml"
        self.mesh_file.write_text(dump_mesh(mesh))
        self.key = self.etc / "private.key"
        write_secret_file(self.key, private_key_b64(secrets["node1"].private_key))
        self.state = tmp / "state"
        self.run_dir = short_tmp()  # the control socket's path must stay short
        self.api_socket = self.run_dir / "api.sock"
        self.unit_file = tmp / "systemd" / "vppmesh.service"
        self.options = node.NodeOptions(mesh_file=self.mesh_file, node="node1",
                                        private_key=self.key, api_socket=self.api_socket,
                                        host_link="none", workers=0, state_dir=self.state)
        self.vpp = FakeVpp.with_uplink(mesh.node("node1").primary)
        self.vpp_up = True
        self.lock = threading.Lock()  # one of the agent's run and a `down` at a time
        node.up(self.options, api=self.vpp, agreement=NoAgreement(self.options.clock))
        monkeypatch.setattr("vppmesh.agent.node.VppClient", lambda path: SimpleNamespace(
            connect=self.connect))
        monkeypatch.setattr("vppmesh.host.link.remove_link", lambda name, netns=None: False)
        real_down = node.down

        def locked_down(*args: Any, **kwargs: Any) -> list[str]:
            with self.lock:
                return real_down(*args, **kwargs)

        monkeypatch.setattr(node, "down", locked_down)
        self.systemd = FakeSystemd()
        monkeypatch.setattr(unit, "systemctl", self.systemd)
        # The agent's control socket is root's only; the tests run as whoever they run as.
        monkeypatch.setitem(Control.__init__.__kwdefaults__, "uids",  # type: ignore[index]
                            frozenset({os.geteuid()}))
        self.agent: threading.Thread | None = None

    def connect(self) -> FakeVpp:
        if not self.vpp_up:
            raise VppUnavailableError(f"VPP is not running ({self.api_socket})")
        return self.vpp

    @property
    def control_path(self) -> Path:
        return control.socket_path(self.options)

    def start_agent(self, monkeypatch: pytest.MonkeyPatch) -> threading.Thread:
        """`up --watch` in a thread: the real loop and control socket, polling every
        0.1 s; each run is the real `up` on the FakeVpp (it puts back what is missing)."""
        host = self

        class Agent:
            client = None

            def __init__(self, options: node.NodeOptions, **kwargs: Any) -> None:
                self.secrecy = kwargs["secrecy"]  # never attached: the fake has no punt

            def run(self) -> node.UpResult:
                with host.lock:
                    return node.up(host.options, api=host.vpp,
                                   agreement=NoAgreement(host.options.clock))

            def close(self) -> None:
                pass

        monkeypatch.setattr(node, "Agent", Agent)
        monkeypatch.setattr(watch, "WATCH_POLL_SECONDS", 0.1)
        self.agent = threading.Thread(target=watch.watch_loop, args=(self.options,),
                                      daemon=True, name="agent")
        self.agent.start()
        wait_for(self.control_path.is_socket, 10, "the agent's control socket")
        return self.agent

    def cli(self, *args: str) -> Result:
        return CliRunner().invoke(app, [*args, "--mesh", str(self.mesh_file), "--node",
                                        "node1", "--state-dir", str(self.state),
                                        "--api-socket", str(self.api_socket),
                                        "--unit-file", str(self.unit_file)])

    def stop(self) -> None:
        if self.agent is not None and self.agent.is_alive():
            request(self.control_path, {"request": "stop"}, 30)
            self.agent.join(10)


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    made = Host(tmp_path, monkeypatch)
    yield made
    made.stop()


# ---- down ----------------------------------------------------------------------------------

def test_down_refuses_while_an_agent_answers_and_names_the_fix(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    running = host.start_agent(monkeypatch)
    before = owned(host.vpp)
    assert before > 0
    refused = host.cli("down")
    assert refused.exit_code == 4, refused.output
    assert "an agent (pid" in refused.output and str(host.control_path) in refused.output
    assert "systemctl stop vppmesh.service" in refused.output
    assert "vppmesh down --stop-agent" in refused.output and "--force" in refused.output
    assert "Nothing was removed" in refused.output
    assert owned(host.vpp) == before and running.is_alive()


def test_down_stop_agent_ends_the_agent_loop_then_removes_everything(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    running = host.start_agent(monkeypatch)
    result = host.cli("down", "--stop-agent")
    assert result.exit_code == 0, result.output
    assert f"* stopped the agent (pid {os.getpid()}) over its control socket" in result.output
    running.join(5)
    assert not running.is_alive()  # the loop ended (as on SIGTERM)
    assert not host.control_path.exists()
    assert owned(host.vpp) == 0
    time.sleep(0.5)  # five of the agent's polls: nobody puts it back
    assert owned(host.vpp) == 0
    assert host.systemd.calls == []  # no unit installed: systemd is not asked


def test_down_stop_agent_stops_the_unit_through_systemd(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """The unit's agent is stopped by systemd, not asked to exit: Restart=always would
    start an agent that merely exited again."""
    running = host.start_agent(monkeypatch)
    host.unit_file.parent.mkdir()
    host.unit_file.write_text("[Service]\n")
    host.systemd.active.add("vppmesh.service")
    host.systemd.on_stop = lambda: (request(host.control_path, {"request": "stop"}, 30),
                                    running.join(10))  # SIGTERM, as systemd sends it
    result = host.cli("down", "--stop-agent")
    assert result.exit_code == 0, result.output
    assert ("stop", "vppmesh.service") in host.systemd.calls
    assert "* stopped the service vppmesh.service" in result.output
    assert "over its control socket" not in result.output  # nothing left to ask
    assert not running.is_alive() and owned(host.vpp) == 0


def test_down_force_proceeds_and_warns_that_the_agent_puts_it_back(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    running = host.start_agent(monkeypatch)
    before = owned(host.vpp)
    result = host.cli("down", "--force")
    assert result.exit_code == 0, result.output
    assert "warning: an agent (pid" in result.output and "next poll" in result.output
    removed = int(result.output.split("node node1: removed ")[1].split()[0])
    assert removed >= before > 0
    wait_for(lambda: owned(host.vpp) > 0, 10, "the agent to put the mesh back")
    assert running.is_alive()
    refused = host.cli("down", "--force", "--stop-agent")
    assert refused.exit_code == 2 and "not both" in refused.output


def test_down_without_an_agent_goes_ahead(host: Host) -> None:
    host.control_path.parent.mkdir(parents=True, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(host.control_path))  # an agent that died: its socket file, no listener
    stale.close()
    result = host.cli("down")
    assert result.exit_code == 0, result.output
    assert owned(host.vpp) == 0


def test_down_refuses_an_agent_too_old_or_too_busy_to_answer_ping(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever listens on the control socket is an agent: one that answers ping with an
    error (it predates ping) and one that answers nothing both stop `down`."""
    monkeypatch.setattr(presence, "PING_SECONDS", 0.5)
    for answer in ({"ok": False, "error": "request: unknown 'ping'"}, None):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        host.control_path.unlink(missing_ok=True)
        listener.bind(str(host.control_path))
        listener.listen(1)

        def serve(listener: socket.socket = listener, answer: Any = answer) -> None:
            conn, _ = listener.accept()
            with conn:
                conn.makefile().readline()
                if answer is not None:
                    conn.sendall(json.dumps(answer).encode() + b"\n")
                else:
                    time.sleep(1)

        threading.Thread(target=serve, daemon=True).start()
        result = host.cli("down")
        listener.close()
        assert result.exit_code == 4, result.output
        assert "runs for this node" in result.output and owned(host.vpp) > 0


def test_down_finds_an_agent_without_control_socket_by_its_record_and_stops_it(
        host: Host) -> None:
    """An agent whose socket could not be made still runs: its process record names it,
    and --stop-agent ends it with SIGTERM, as systemd would."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "vppmesh", "up", "--watch"])
    try:
        host.state.mkdir(exist_ok=True)
        presence.record_path(host.state, "node1").write_text(json.dumps({"pid": proc.pid}))
        refused = host.cli("down")
        assert refused.exit_code == 4, refused.output
        assert f"an agent (pid {proc.pid})" in refused.output and "record" in refused.output
        stopped = host.cli("down", "--stop-agent")
        assert stopped.exit_code == 0, stopped.output
        assert f"sent SIGTERM to the agent (pid {proc.pid})" in stopped.output
        assert proc.wait(5) == -15 and owned(host.vpp) == 0
    finally:
        proc.kill()
        proc.wait()


# ---- the control socket's ping and stop ----------------------------------------------------

def test_control_ping_and_stop_answered_once_the_loop_ended() -> None:
    directory = short_tmp()
    ctl = Control(directory / "ctl.sock", GenerationStore(directory, "n"),
                  uids={os.geteuid()})
    answers: dict[str, Any] = {}

    def ask(what: str) -> None:
        answers[what] = request(ctl.path, {"request": what}, 10)

    pinging = threading.Thread(target=ask, args=("ping",))
    pinging.start()
    while pinging.is_alive():
        ctl.service()
        pinging.join(0.01)
    assert answers["ping"] == {"ok": True, "pid": os.getpid()}

    # Without a loop to end (nobody set on_stop) a stop is refused, not pretended.
    refusing = threading.Thread(target=ask, args=("stop",))
    refusing.start()
    while refusing.is_alive():
        ctl.service()
        refusing.join(0.01)
    assert answers["stop"]["ok"] is False and "cannot be stopped" in answers["stop"]["error"]

    stopped = threading.Event()
    ctl.on_stop = stopped.set
    stopping = threading.Thread(target=ask, args=("stop",))
    stopping.start()
    waiting = ctl.wait(lambda timeout: time.sleep(timeout) or False)
    assert any(waiting(0.01) for _ in range(200))  # the loop is woken at once
    assert stopped.is_set()
    stopping.join(0.2)
    assert stopping.is_alive()  # answered only when the agent closes its socket
    ctl.close()
    stopping.join(5)
    assert answers["stop"] == {"ok": True, "stopped": True, "pid": os.getpid()}
    with pytest.raises(control.NoAgent):
        request(ctl.path, {"request": "ping"}, 1)


def test_datastore_agent_ends_on_a_stop_request(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from vppmesh.agent.datastore.membership import LocalNode, MembershipSource
    from vppmesh.testing.datastore import MemoryStore, agent_options

    class Store(MemoryStore):
        def watch(self, revision: int, on_change: Any, on_end: Any) -> Any:
            return lambda: None

        def keepalive(self, lease: Any) -> bool:
            return True

    mesh, secrets = make_mesh(2, tunnels=1)
    store = Store(mesh.settings)
    store.put(mesh.nodes[1])
    local = mesh.nodes[0]
    vpp = FakeVpp.with_uplink(local.primary)
    options, ds = agent_options(tmp_path, secrets, "node1", LocalNode(
        underlay=tuple(local.underlay), pod_cidr=local.pod_cidr, node_number=1))
    options = replace(options, api_socket=short_tmp() / "api.sock")
    monkeypatch.setitem(Control.__init__.__kwdefaults__, "uids",  # type: ignore[index]
                        frozenset({os.geteuid()}))
    member = MembershipSource(options, ds, store=store, api=vpp)  # type: ignore[arg-type]
    running = threading.Thread(target=member.run, daemon=True)
    running.start()
    try:
        path = control.socket_path(options)
        wait_for(lambda: owned(vpp) > 0 and path.is_socket(), 10, "the datastore agent")
        assert request(path, {"request": "stop"}, 30)["stopped"] is True
        running.join(5)
        assert not running.is_alive()
    finally:
        member.stop.set()
        member.changed.set()


# ---- uninstall -----------------------------------------------------------------------------

def install(host: Host) -> Path:
    """What a host install leaves: the unit (install-unit), a vpp.service drop-in of
    vppmesh's, a startup.conf from render-startup."""
    made = CliRunner().invoke(app, ["install-unit", "--out", str(host.unit_file), "--",
                                    "--node", "node1"])
    assert made.exit_code == 0, made.output
    drop_in = host.unit_file.parent / "vpp.service.d" / "vppmesh-uplink.conf"
    drop_in.parent.mkdir(exist_ok=True)
    drop_in.write_text("[Service]\n")
    startup = host.etc.parent / "vpp" / "startup.conf"
    startup.parent.mkdir()
    rendered = CliRunner().invoke(app, ["render-startup", "--profile", "testbed",
                                        "--no-host-check", "--out", str(startup)])
    assert rendered.exit_code == 0, rendered.output
    host.systemd.active.add("vppmesh.service")
    return startup


def test_uninstall_stops_everything_keeps_the_key_and_state_then_purge_leaves_nothing(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    startup = install(host)
    running = host.start_agent(monkeypatch)  # an agent run by hand, not the unit's
    state = sorted(p.name for p in host.state.iterdir())
    assert "node1.used-keys.json" in state and "node1.generations.json" in state

    first = host.cli("uninstall", "--startup-conf", str(startup), "--key", str(host.key))
    assert first.exit_code == 0, first.output
    assert ("disable", "--now", "vppmesh.service") in host.systemd.calls
    assert ("daemon-reload",) in host.systemd.calls
    assert not host.unit_file.exists()
    assert not (host.unit_file.parent / "vpp.service.d").exists()  # VPP's drop-in too
    assert f"- service vppmesh.service: stopped, disabled, unit file {host.unit_file}" \
        in first.output
    assert "over its control socket" in first.output
    running.join(5)
    assert not running.is_alive() and owned(host.vpp) == 0
    # Kept, and said why: the key and the state go together or not at all.
    assert sorted(p.name for p in host.state.iterdir()) == state and host.key.exists()
    assert "left: the node's key and state" in first.output
    assert "never reuses a key generation" in first.output
    assert f"left: {startup}: rendered by `vppmesh render-startup`" in first.output
    assert startup.exists()
    assert "left: vppmesh itself: remove" in first.output

    again = host.cli("uninstall", "--startup-conf", str(startup), "--key", str(host.key))
    assert again.exit_code == 0, again.output
    assert "nothing of vppmesh left to remove on this host" in again.output
    assert not [line for line in again.output.splitlines() if line.startswith("- ")]

    purged = host.cli("uninstall", "--purge", "--startup-conf", str(startup), "--key",
                      str(host.key))
    assert purged.exit_code == 0, purged.output
    assert not host.state.exists() and not host.key.exists() and not startup.exists()
    assert not host.mesh_file.exists() and not host.etc.exists()
    assert "--force-confmiss" in purged.output  # how VPP gets a startup.conf back

    last = host.cli("uninstall", "--purge", "--startup-conf", str(startup), "--key",
                    str(host.key))
    assert last.exit_code == 0, last.output
    assert "nothing of vppmesh left to remove on this host" in last.output
    assert [line for line in last.output.splitlines() if line.startswith("left:")] == \
        [next(line for line in last.output.splitlines() if "vppmesh itself" in line)]


def test_down_and_uninstall_look_where_install_unit_writes() -> None:
    from vppmesh.cli.service import UNIT_PATH

    assert unit.UNIT_FILE == UNIT_PATH


def test_uninstall_with_vpp_stopped_gives_the_host_back_and_purges(host: Host) -> None:
    host.vpp_up = False
    result = host.cli("uninstall", "--purge", "--key", str(host.key), "--startup-conf",
                      str(host.etc / "none.conf"))
    assert result.exit_code == 0, result.output
    assert not host.state.exists() and not host.key.exists()


def test_uninstall_stops_before_the_purge_when_down_fails(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """No key or state is removed while VPP may still hold the node's SAs."""
    from vppmesh.errors import VppApiError

    def broken(*args: Any, **kwargs: Any) -> list[str]:
        raise VppApiError("ipsec_sad_entry_del", -7)

    monkeypatch.setattr(node, "down", broken)
    result = host.cli("uninstall", "--purge", "--key", str(host.key), "--startup-conf",
                      str(host.etc / "none.conf"))
    assert result.exit_code == 1, result.output
    assert "no key or state was removed" in result.output
    assert host.key.exists() and (host.state / "node1.used-keys.json").exists()
