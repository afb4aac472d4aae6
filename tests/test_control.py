"""`vppmesh rekey` with the agents running: the operator's request is honoured for every
peer (idle pairs too, by agreement, never onto a static key), and the agent's control
socket (vppmesh/agent/control.py) answers per peer once the peers acknowledged, or why not.

Agents on fake VPPs joined by a punt relay (vppmesh.testing.agents.Agents), one fake clock;
the control socket's clients run in threads, as `vppmesh rekey` would. `-k
forward_secrecy` selects the agent tests, `-k control` all of them."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from vppmesh.agent import control
from vppmesh.agent.control import Control, request
from vppmesh.agent.node import up
from vppmesh.errors import VppMeshError
from vppmesh.keying.agreement import NoAgreement
from vppmesh.keying.epochs import GenerationStore
from vppmesh.testing.agents import Agents, short_tmp, static_keys


def settled_idle(count: int = 3) -> Agents:
    """Every pair on agreed keys and slid, without a single packet of traffic."""
    agents = Agents(count)
    for _ in range(30):
        if agents.forward_secret() and agents.slid(1):
            return agents
        agents.step(traffic=False)
    agents.close()
    raise AssertionError("the agents never agreed keys without traffic")


def poll(agents: Agents, traffic: tuple[tuple[str, str], ...] = ()) -> None:
    """One poll of every agent (2 s), pod traffic on the `traffic` pairs only."""
    for name in agents.names:
        agents.run(name)
        agents.settle()
    agents.clock.now += 2
    for a, b in traffic:
        agents.traffic(a, b)
    agents.settle()


def outs(agents: Agents, name: str) -> dict[str, int]:
    return {p: pg.out for p, pg in agents.generations(name).peers.items()}


def assert_agreed_not_static(agents: Agents, name: str) -> None:
    """The node's outbound SAs towards every peer are of agreed generations, and none
    carries a key of the static schedule."""
    for peer, pg in agents.generations(name).peers.items():
        assert pg.out in pg.ephemeral_out, (name, peer, pg.out)
        static = set(static_keys(agents, name, peer, True).values())
        sent = agents.sas(name, True, peer)
        assert sent and not {key for key, _ in sent.values()} & static


@pytest.fixture
def idle() -> Iterator[Agents]:
    agents = settled_idle()
    yield agents
    agents.close()


# ---- the scheduler: an operator's request is not a scheduled rekey -------------------------

def test_forward_secrecy_one_shot_rekey_moves_idle_pairs_on_agreed_keys(idle: Agents) -> None:
    """`vppmesh rekey` without the control socket (a one-shot run, no channel) while the
    agents run: every pair of the node moves, the idle ones too, by agreement. Before,
    the request was dropped for a key that had protected no packet ("0 change(s)", no
    note), so only a pair with traffic ever moved."""
    for _ in range(3):
        poll(idle, traffic=(("node1", "node2"), ("node2", "node1")))
    before = {n: outs(idle, n) for n in idle.names}
    result = up(idle.options["node3"], rekey=True, api=idle.vpp("node3"), now=idle.clock(),
                agreement=NoAgreement(idle.options["node3"].clock))
    assert result.rekey_pending == ["node1", "node2"]  # told: left to the agents
    assert all("rekey left to the agents" in n for n in result.notes) and result.notes
    assert outs(idle, "node3") == before["node3"]  # never stepped onto a static key
    for _ in range(3):
        poll(idle, traffic=(("node1", "node2"), ("node2", "node1")))
    assert outs(idle, "node3") == {p: g + 1 for p, g in before["node3"].items()}
    assert_agreed_not_static(idle, "node3")
    assert outs(idle, "node1") == before["node1"]  # nobody else was asked
    assert idle.forward_secret()


def test_forward_secrecy_a_scheduled_rekey_rotates_idle_pairs_by_agreement(
        idle: Agents) -> None:
    """With the agents, rekey_interval rotates idle pairs too, by agreement: every agreed
    key stays within the forward-secrecy window, busy or not (`verify
    --require-forward-secrecy` would otherwise fail an idle pair), and the steps are
    acknowledged, so they spend no generation of the peer's window for nothing."""
    data = idle.mesh_file.read_text().replace("rekey_interval: 0", "rekey_interval: 4")
    assert data != idle.mesh_file.read_text()
    idle.mesh_file.write_text(data)
    before = outs(idle, "node3")
    for _ in range(12):
        poll(idle)
    assert all(g > before[p] for p, g in outs(idle, "node3").items())
    assert_agreed_not_static(idle, "node3")


# ---- the control socket, served by the agents ----------------------------------------------

class Client(threading.Thread):
    """`vppmesh rekey`'s request, in a thread: the agent answers between its runs."""

    def __init__(self, path: Path, message: dict[str, Any] | bytes, wait: float = 20) -> None:
        super().__init__(daemon=True)
        self.path, self.message, self.wait = path, message, wait
        self.answer: dict[str, Any] | None = None
        self.error: Exception | None = None
        self.start()

    def run(self) -> None:
        try:
            if isinstance(self.message, bytes):
                self.answer = raw(self.path, self.message)
            else:
                self.answer = request(self.path, self.message, self.wait)
        except Exception as exc:  # handed to the test
            self.error = exc


def raw(path: Path, data: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return json.loads(answer)


class Served:
    """Every agent of `agents` with its control socket; `poll` services them as the
    agent loop does (between runs), and tells them of every run."""

    def __init__(self, agents: Agents) -> None:
        self.agents = agents
        self.controls = {n: Control(agents.dir / f"{n}.ctl", agents.options[n].generations,
                                    uids={os.geteuid()}, clock=agents.clock)
                         for n in agents.names}

    def poll(self, *traffic: tuple[str, str]) -> None:
        agents = self.agents
        for name in agents.names:
            self.controls[name].service()
            agents.run(name)
            self.controls[name].stepped(agents.results[name], agents.secrecy[name])
            agents.settle()
        agents.clock.now += 2
        for a, b in traffic:
            agents.traffic(a, b)
        agents.settle()
        for name in agents.names:
            self.controls[name].service()

    def answered(self, client: Client, polls: int = 20) -> dict[str, Any]:
        for _ in range(polls):
            client.join(0.05)
            if not client.is_alive():
                break
            self.poll()
        client.join(5)
        assert client.error is None, client.error
        assert client.answer is not None, "no answer"
        return client.answer

    def close(self) -> None:
        for c in self.controls.values():
            c.close()


@pytest.fixture
def served(idle: Agents) -> Iterator[Served]:
    serving = Served(idle)
    yield serving
    serving.close()


def test_forward_secrecy_rekey_on_the_control_socket_moves_every_pair(served: Served) -> None:
    agents = served.agents
    for name in agents.names:
        before = outs(agents, name)
        client = Client(served.controls[name].path, {"request": "rekey", "timeout": 30})
        answer = served.answered(client)
        assert answer["ok"], answer
        assert {p["peer"]: (p["from"], p["to"], p["moved"], p["agreed"])
                for p in answer["peers"]} == {
            peer: (g, g + 1, True, True) for peer, g in before.items()}
        assert answer["seconds"] <= 6  # the fake clock: at most a few polls
        # Answered only once the peer installed it and we send on it.
        assert_agreed_not_static(agents, name)
        for peer, g in before.items():
            theirs = agents.generations(peer).peers[name]
            assert g + 1 in theirs.ephemeral_in
            assert agents.link_ok(name, peer)
    assert agents.forward_secret()


def test_forward_secrecy_a_rekey_the_reserve_rule_defers_is_answered_with_why(
        served: Served) -> None:
    """A second rekey before the peers slid to the first one's generation would spend
    the reserve generation: deferred, said per peer at the timeout; the request stays,
    and a later one with time enough goes through once the peers slid."""
    agents = served.agents
    path = served.controls["node1"].path
    first = served.answered(Client(path, {"request": "rekey", "timeout": 30}))
    assert first["ok"]
    second = served.answered(Client(path, {"request": "rekey", "timeout": 1}))
    assert not second["ok"]
    assert all(not p["moved"] and p["reason"].startswith("deferred") for p in second["peers"])
    third = served.answered(Client(path, {"request": "rekey", "timeout": 60}), polls=40)
    assert third["ok"], third
    assert {p["to"] for p in third["peers"]} == {p["to"] + 1 for p in first["peers"]}
    assert_agreed_not_static(agents, "node1")


def test_forward_secrecy_rekey_towards_a_peer_without_its_agent_says_so(
        served: Served) -> None:
    """node3's agent stops: node1's pair with it stays on its agreed key (never a static
    one), the answer says no session, node2 moves."""
    agents = served.agents
    agents.secrecy["node3"].close()
    agents.names.remove("node3")  # its agent no longer runs
    agents.clock.now += 200  # its sessions expired
    served.poll()
    before = outs(agents, "node1")
    answer = served.answered(Client(served.controls["node1"].path,
                                    {"request": "rekey", "timeout": 8}))
    assert not answer["ok"]
    peers = {p["peer"]: p for p in answer["peers"]}
    assert peers["node2"]["moved"] and peers["node2"]["agreed"]
    assert not peers["node3"]["moved"] and "no session" in peers["node3"]["reason"]
    assert outs(agents, "node1")["node3"] == before["node3"]


# ---- the protocol --------------------------------------------------------------------------

@pytest.fixture
def server() -> Iterator[Control]:
    directory = short_tmp()
    store = GenerationStore(directory, "n")
    served = Control(directory / "ctl.sock", store, uids={os.geteuid()})
    yield served
    served.close()


def serve(server: Control, client: Client) -> dict[str, Any]:
    deadline = time.monotonic() + 20  # a loaded machine: the client thread may lag
    while client.is_alive() and time.monotonic() < deadline:
        server.service()
        client.join(0.01)
    assert client.error is None, client.error
    assert client.answer is not None
    return client.answer


@pytest.mark.parametrize(("data", "error"), [
    (b"not json\n", "not JSON"),
    (b"\xff\xfe\n", "not JSON"),
    (b"[1, 2]\n", "unknown"),
    (b'{"request": "reboot"}\n', "unknown 'reboot'"),
    (b'{"request": "rekey", "timeout": "soon"}\n', "timeout"),
    (b'{"request": "rekey", "timeout": -1}\n', "timeout"),
    (b'{"request": "rekey", "timeout": true}\n', "timeout"),
    (b'{"request": "rekey", "timeout": 1e9}\n', "timeout"),
    (b"x" * (control.MAX_LINE + 10), "longer than"),
])
def test_control_malformed_requests_are_answered_with_an_error(
        server: Control, data: bytes, error: str) -> None:
    answer = serve(server, Client(server.path, data))
    assert answer["ok"] is False and error in answer["error"]
    # The server is still there and takes a good request.
    Client(server.path, {"request": "rekey", "timeout": 5})
    for _ in range(200):
        if server.service():
            break
        threading.Event().wait(0.01)
    assert len(server._rekeys) == 1  # taken: answered after the agent's next run


def test_control_a_request_without_a_run_is_answered_at_its_timeout() -> None:
    directory = short_tmp()
    store = GenerationStore(directory, "n")
    from vppmesh.keying.epochs import GenerationState, PeerGenerations

    store.save(GenerationState(peers={"p": PeerGenerations(
        public_key="k", out=4, out_since=0, floor=4, in_base=4)}))
    now = [100.0]
    ctl = Control(directory / "ctl.sock", store, uids={os.geteuid()}, clock=lambda: now[0])
    try:
        client = Client(ctl.path, {"request": "rekey", "timeout": 3})
        for _ in range(100):
            ctl.service()
            if store.load().peers["p"].rekey_pending:
                break
            client.join(0.01)
        assert store.load().peers["p"].rekey_pending  # marked at once, on disk
        ctl.stepped(None, None, "VPP unavailable (gone)")
        now[0] += 3
        answer = serve(ctl, client)
        assert answer["ok"] is False
        assert answer["peers"] == [{"peer": "p", "from": 4, "to": 4, "moved": False,
                                    "agreed": False, "reason": answer["peers"][0]["reason"]}]
        assert "no run" in answer["peers"][0]["reason"]
    finally:
        ctl.close()


def test_control_socket_is_0600_and_refuses_other_users(server: Control) -> None:
    mode = server.path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    # A peer whose credentials are not in the allowed set (root's, in the agent).
    strict = Control(server.path.with_name("strict.sock"), server.store,
                     uids={os.geteuid() + 1})
    try:
        answer = serve(strict, Client(strict.path, {"request": "rekey"}))
        assert answer["ok"] is False and "root" in answer["error"]
        assert not strict._rekeys
    finally:
        strict.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_control_a_non_root_user_is_refused_even_through_an_open_file(server: Control) -> None:
    python = Path("/usr/bin/python3")
    if not os.access(python, os.X_OK) or python.resolve().is_relative_to("/root"):
        pytest.skip("no python another user may run")
    server.path.parent.chmod(0o755)
    code = ("import socket,sys\n"
            "s=socket.socket(socket.AF_UNIX,socket.SOCK_STREAM)\n"
            "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n print('EACCES');sys.exit()\n"
            "s.sendall(b'{\"request\": \"rekey\"}\\n');print(s.recv(4096).decode())\n")
    root_only = Control(server.path.with_name("root.sock"), server.store)  # uid 0 only
    try:
        denied = subprocess.run([str(python), "-c", code, str(root_only.path)], user=65534,
                                capture_output=True, text=True, timeout=20)
        assert denied.stdout.strip() == "EACCES", denied
        root_only.path.chmod(0o666)  # even so, SO_PEERCRED refuses the user
        proc = subprocess.Popen([str(python), "-c", code, str(root_only.path)], user=65534,
                                stdout=subprocess.PIPE, text=True)
        for _ in range(500):
            root_only.service()
            if proc.poll() is not None:
                break
            threading.Event().wait(0.01)
        out, _ = proc.communicate(timeout=20)
        assert '"ok": false' in out and "root" in out and not root_only._rekeys
    finally:
        root_only.close()


def test_control_one_agent_per_socket(server: Control) -> None:
    with pytest.raises(VppMeshError, match="another agent"):
        Control(server.path, server.store)
    server.close()
    again = Control(server.path, server.store)  # a stale file is replaced
    again.close()


# ---- the command -------------------------------------------------------------------------

def run_rekey(directory: Path, *extra: str) -> Any:
    from vppmesh.cli import app

    return CliRunner().invoke(app, ["rekey", "--node", "n", "--api-socket",
                                    str(directory / "api.sock"), "--state-dir",
                                    str(directory), *extra])


def canned(path: Path, answer: dict[str, Any]) -> threading.Thread:
    """A stand-in agent that answers one request with `answer`."""
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def answer_once() -> None:
        conn, _ = listener.accept()
        with conn:
            assert json.loads(conn.makefile().readline())["request"] == "rekey"
            conn.sendall(json.dumps(answer).encode() + b"\n")
        listener.close()

    thread = threading.Thread(target=answer_once, daemon=True)
    thread.start()
    return thread


def test_control_rekey_command_prints_per_peer_and_fails_on_a_peer_not_moved() -> None:
    directory = short_tmp()
    canned(directory / control.CONTROL_SOCKET, {"ok": False, "seconds": 30.0, "peers": [
        {"peer": "n1", "from": 3, "to": 4, "moved": True, "agreed": True, "reason": None},
        {"peer": "n2", "from": 5, "to": 5, "moved": False, "agreed": True,
         "reason": "no session with the peer's agent"}]})
    result = run_rekey(directory)
    assert result.exit_code == 1, result.output
    assert "n1: generation 3 -> 4\n" in result.output
    assert "n2: generation 5, not moved: no session with the peer's agent" in result.output
    assert "1 of 2 peer(s) moved" in result.output
    canned(directory / control.CONTROL_SOCKET, {"ok": True, "seconds": 0.4, "peers": [
        {"peer": "n1", "from": 4, "to": 5, "moved": True, "agreed": True, "reason": None}]})
    result = run_rekey(directory)
    assert result.exit_code == 0 and "n1: generation 4 -> 5" in result.output
    canned(directory / control.CONTROL_SOCKET, {"ok": False, "error": "refused: root only"})
    result = run_rekey(directory)
    assert result.exit_code == 1 and "refused" in result.output


def test_control_rekey_command_without_an_agent_runs_once_and_says_so() -> None:
    directory = short_tmp()
    result = run_rekey(directory, "--mesh", str(directory / "missing.yaml"))
    assert "no agent answers" in result.output and "one-shot" in result.output
    assert result.exit_code == 1  # the one-shot run itself fails here: no mesh file


def test_control_a_rekey_wakes_the_agent_loop_at_once(server: Control) -> None:
    """The loop's wait (watch.poll_ticks, the datastore agent's) says a run is wanted as
    soon as a rekey is taken, whatever the channel's wait says."""
    waiting = server.wait(threading.Event().wait)  # waits its timeout: the client connects
    assert not waiting(0.01)
    Client(server.path, {"request": "rekey", "timeout": 5})
    assert any(waiting(0.01) for _ in range(200))
    assert not waiting(0.01)  # once per request
