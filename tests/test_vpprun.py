"""VPP's guard (`vppmesh vpp-run`, vppmesh/host/vpprun.py): whatever ends VPP, the taken NICs go
back to Linux, and the guard exits with VPP's status. `vpp` is a stand-in shell script.
Then the agent's second line (watch.leave_uplinks): on SIGTERM it gives the NIC back only
when VPP goes away too."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vppmesh.errors import ConfigError, HostError
from vppmesh.host import uplink, vpprun
from vppmesh.testing.wait import wait_for

ROOT = Path(__file__).resolve().parent.parent


def stand_in(tmp_path: Path, body: str) -> list[str]:
    """A `vpp` that records its pid (and what happened to it) in tmp_path."""
    script = tmp_path / "vpp"
    (tmp_path / "vpp.pid").unlink(missing_ok=True)  # an earlier stand-in's
    script.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/vpp.pid\n{body}\n")
    script.chmod(0o755)
    return [str(script)]


def vpp_pid(tmp_path: Path) -> int:
    pid_file = tmp_path / "vpp.pid"
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip() != "", 10,
             "the stand-in VPP's pid")
    return int(pid_file.read_text())


class Releases:
    """uplink.release_all as the guard calls it: when, for which directory, and whether
    VPP was still there then."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.calls: list[tuple[Path, bool]] = []

    def __call__(self, state_dir: Path) -> list[str]:
        pid_file = self.tmp_path / "vpp.pid"
        alive = pid_file.exists() and Path(f"/proc/{pid_file.read_text().strip()}").exists()
        self.calls.append((state_dir, alive))
        return ["linux link eth0: name, MAC, MTU, addresses and routes"]


@pytest.fixture
def releases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Releases:
    recorder = Releases(tmp_path)
    monkeypatch.setattr(uplink, "release_all", recorder)
    return recorder


def later(seconds: float, action: object) -> threading.Timer:
    timer = threading.Timer(seconds, action)  # type: ignore[arg-type]
    timer.start()
    return timer


def test_vpp_exiting_by_itself_gives_the_nic_back_and_its_status_is_the_guards(
        tmp_path: Path, releases: Releases, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    assert vpprun.run(stand_in(tmp_path, "exit 3"), state) == 3
    assert releases.calls == [(state, False)]  # once, after VPP was gone
    assert "eth0: name, MAC, MTU, addresses and routes" in caplog.text
    assert vpprun.run(stand_in(tmp_path, "exit 0"), state) == 0
    assert len(releases.calls) == 2


def test_sigterm_to_the_guard_reaches_vpp_then_the_nic_goes_back(
        tmp_path: Path, releases: Releases) -> None:
    """A container runtime signals the container's main process only: the guard passes
    SIGTERM on, waits for VPP to exit, gives the NIC back and exits with VPP's status."""
    before = signal.getsignal(signal.SIGTERM)
    command = stand_in(tmp_path, f"trap 'echo TERM > {tmp_path}/got; exit 7' TERM\n"
                                 "while :; do sleep 0.05; done")
    timer = later(0, lambda: (vpp_pid(tmp_path), os.kill(os.getpid(), signal.SIGTERM)))
    started = time.monotonic()
    assert vpprun.run(command, tmp_path / "state") == 7
    timer.join()
    assert (tmp_path / "got").read_text() == "TERM\n"
    assert releases.calls == [(tmp_path / "state", False)]
    assert time.monotonic() - started < 5
    assert signal.getsignal(signal.SIGTERM) == before  # the guard's handler is gone


def test_vpp_killed_by_a_signal_exits_128_plus_it_and_still_gives_the_nic_back(
        tmp_path: Path, releases: Releases) -> None:
    """SIGKILL of VPP alone (the OOM killer picks the biggest process: VPP, not the guard)."""
    command = stand_in(tmp_path, "while :; do sleep 0.05; done")
    timer = later(0, lambda: os.kill(vpp_pid(tmp_path), signal.SIGKILL))
    assert vpprun.run(command, tmp_path / "state") == 128 + signal.SIGKILL
    timer.join()
    assert releases.calls == [(tmp_path / "state", False)]
    # Killed by the passed-on SIGTERM (no trap): 143, as a shell says it.
    command = stand_in(tmp_path, "while :; do sleep 0.05; done")
    timer = later(0, lambda: (vpp_pid(tmp_path), os.kill(os.getpid(), signal.SIGTERM)))
    assert vpprun.run(command, tmp_path / "state") == 128 + signal.SIGTERM
    timer.join()
    assert len(releases.calls) == 2


def test_vpp_ignoring_sigterm_is_killed_in_time_to_give_the_nic_back(
        tmp_path: Path, releases: Releases) -> None:
    """VPP ignores SIGTERM while it starts: the guard kills it after kill_after, inside
    the container's grace period, rather than let the runtime kill both with the NIC
    still taken."""
    command = stand_in(tmp_path, "trap '' TERM\nwhile :; do sleep 0.05; done")
    timer = later(0, lambda: (vpp_pid(tmp_path), os.kill(os.getpid(), signal.SIGTERM)))
    started = time.monotonic()
    assert vpprun.run(command, tmp_path / "state", kill_after=0.5) == 128 + signal.SIGKILL
    timer.join()
    assert 0.4 < time.monotonic() - started < 5
    assert releases.calls == [(tmp_path / "state", False)]


def test_a_signal_before_vpp_started_is_passed_on_once_it_runs(
        tmp_path: Path, releases: Releases) -> None:
    """A SIGTERM between the guard's start and VPP's is not lost: VPP gets it at once
    (were it lost, the safety below would kill VPP: 137)."""
    guard = vpprun.Guard(stand_in(tmp_path, "while :; do sleep 0.05; done"),
                         tmp_path / "state")
    guard.forward(signal.SIGTERM)
    safety = later(5, lambda: guard.child and guard.child.kill())
    try:
        assert guard.run() == 128 + signal.SIGTERM
    finally:
        safety.cancel()
    assert releases.calls == [(tmp_path / "state", False)]


def test_a_failed_give_back_is_said_and_the_status_stays_vpps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(state_dir: Path) -> list[str]:
        raise HostError("the NIC eth0 is not here to restore")

    monkeypatch.setattr(uplink, "release_all", broken)
    assert vpprun.run(stand_in(tmp_path, "exit 9"), tmp_path / "s") == 9
    assert "not here to restore" in caplog.text
    assert f"vppmesh uplink restore --all --state-dir {tmp_path / 's'}" in caplog.text


def test_no_command_or_a_missing_vpp_is_a_clear_error(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ConfigError, match="after --"):
        vpprun.Guard([], tmp_path)
    with pytest.raises(ConfigError, match="cannot start '/nonexistent/vpp'"):
        vpprun.run(["/nonexistent/vpp"], tmp_path)
    assert signal.getsignal(signal.SIGTERM) == before


def test_vppmesh_vpp_run_as_a_containers_main_process(tmp_path: Path) -> None:
    """The command a container runs: SIGTERM to the guard's process (what `podman stop` and
    the kubelet send) ends VPP, the saved NICs are looked at in --state-dir, and the exit
    status is VPP's."""
    state = tmp_path / "state"
    state.mkdir()
    # An avf NIC: release_all reads it and leaves Linux alone (it stays with vfio-pci).
    saved = uplink.SavedUplink(
        spec=uplink.UplinkSpec(interface="ens1f0", driver="avf", vpp_interface="uplink0"),
        ifname="ens1f0", mac="3c:fd:fe:12:34:56", mtu=1500, up=True, promisc=False,
        addresses=[], routes=[], nic_name=uplink.nic_name("ens1f0"), host_link="veth")
    uplink.state_file(state, "ens1f0").write_text(saved.model_dump_json())
    command = stand_in(tmp_path, f"trap 'echo TERM > {tmp_path}/got; exit 5' TERM\n"
                                 "while :; do sleep 0.05; done")
    proc = subprocess.Popen([sys.executable, "-m", "vppmesh", "vpp-run", "--state-dir",
                             str(state), "--", *command], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        vpp_pid(tmp_path)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 5, stderr
    assert (tmp_path / "got").read_text() == "TERM\n"
    assert "SIGTERM passed to VPP" in stderr
    assert "ens1f0 stays bound to VPP's avf driver" in stderr


# ---- the agent's second line: SIGTERM gives the NIC back only if VPP goes too --------------
def saved_uplink(state: Path, driver: str = "af_packet") -> None:
    spec = uplink.UplinkSpec(interface="eth0", driver=driver,  # type: ignore[arg-type]
                             vpp_interface="uplink0" if driver in uplink.NIC_IN_VPP else None)
    state.mkdir(parents=True, exist_ok=True)
    uplink.state_file(state, "eth0").write_text(uplink.SavedUplink(
        spec=spec, ifname="eth0", mac="3c:fd:fe:12:34:56", mtu=1500, up=True, promisc=False,
        addresses=[], routes=[], nic_name=uplink.nic_name("eth0"), host_link="veth",
    ).model_dump_json())


class ApiSocketDouble:
    """VPP's API socket as far as a stopping agent sees it: it answers sockclnt_create,
    closes a client that says sockclnt_delete, and `die()` closes every connection and
    the listener (the socket file stays, as a dead VPP's does on a hostPath). It counts
    clients that closed on it without sockclnt_delete: VPP may never notice those (see
    watch.vpp_stops_within)."""

    def __init__(self, path: Path) -> None:
        import importlib.resources

        from vpp_papi.vpp_papi import VPPApiJSONFiles

        memclnt = importlib.resources.files("vpp_papi.data").joinpath("memclnt.api.json")
        self.messages, _ = VPPApiJSONFiles.process_json_str(memclnt.read_text())
        self.ids = {"sockclnt_delete": 17, "sockclnt_delete_reply": 18}
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(8)
        self.conns: list[socket.socket] = []
        self.registered = self.deleted = self.dropped = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def send(self, conn: socket.socket, name: str, fields: dict[str, object]) -> None:
        from vppmesh.dataplane.vpp.channel import FRAME

        body = bytes(self.messages[name].pack(fields))
        conn.sendall(FRAME.pack(0, len(body), 0) + body)

    def serve(self, conn: socket.socket) -> None:
        from vppmesh.dataplane.vpp.channel import FRAME, MSG_ID

        buf = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return  # died
            if not chunk:
                with self.lock:
                    self.dropped += 1
                return
            buf += chunk
            while len(buf) >= FRAME.size and len(buf) >= FRAME.size + FRAME.unpack_from(buf)[1]:
                length = FRAME.unpack_from(buf)[1]
                raw, buf = buf[FRAME.size:FRAME.size + length], buf[FRAME.size + length:]
                msg_id = MSG_ID.unpack_from(raw)[0]
                if msg_id == 15:
                    with self.lock:
                        self.registered += 1
                    table = [{"index": i, "name": f"{n}_{self.messages[n].crc[2:]}"}
                             for n, i in self.ids.items()]
                    self.send(conn, "sockclnt_create_reply", {
                        "_vl_msg_id": 16, "context": 124, "response": 0, "index": 3,
                        "count": len(table), "message_table": table})
                elif msg_id == self.ids["sockclnt_delete"]:
                    request, _ = self.messages["sockclnt_delete"].unpack(raw)
                    self.send(conn, "sockclnt_delete_reply", {
                        "_vl_msg_id": 18, "context": request.context, "response": 1})
                    with self.lock:
                        self.deleted += 1
                    conn.close()
                    return

    def die(self) -> None:
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept(): nothing listens
        self.server.close()
        with self.lock:
            for conn in self.conns:
                if conn.fileno() >= 0:  # one that said sockclnt_delete is closed already
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()


def test_vpp_stops_within_watches_one_registered_connection(tmp_path: Path) -> None:
    from vppmesh.agent.loop import vpp_stops_within

    api = tmp_path / "api.sock"
    assert vpp_stops_within(api, 0.5)  # no file
    vpp = ApiSocketDouble(api)
    started = time.monotonic()
    assert not vpp_stops_within(api, 0.5)
    assert 0.5 <= time.monotonic() - started < 2
    # One registered client, which left with sockclnt_delete: nothing for VPP to notice
    # by a read that may fail with a stale EAGAIN. The old probe (connect, close) left
    # VPP a dead connection per try, ten a second.
    wait_for(lambda: vpp.deleted == 1, 5, "the watcher's sockclnt_delete")
    assert (vpp.registered, vpp.dropped) == (1, 0)
    later(0.3, vpp.die)
    started = time.monotonic()
    assert vpp_stops_within(api, 3)
    assert time.monotonic() - started < 1.5
    assert api.exists() and vpp_stops_within(api, 3)  # a dead VPP's file stays on the hostPath


def test_stopped_agent_leaves_the_nic_to_a_vpp_that_still_runs(
        tmp_path: Path, releases: Releases) -> None:
    """An agent-only upgrade: VPP answers all through the grace; the NIC stays VPP's."""
    from vppmesh.agent import node
    from vppmesh.agent.loop import leave_uplinks

    saved_uplink(tmp_path / "state")
    vpp = ApiSocketDouble(tmp_path / "api.sock")
    options = node.NodeOptions(mesh_file=tmp_path / "m", node="n1", private_key=tmp_path / "k",
                               api_socket=tmp_path / "api.sock", state_dir=tmp_path / "state")
    try:
        started = time.monotonic()
        leave_uplinks(options, grace=0.3)
        assert 0.3 <= time.monotonic() - started < 2
    finally:
        vpp.die()
    assert releases.calls == []


def test_stopped_agent_gives_the_nic_back_when_vpp_goes_too(
        tmp_path: Path, releases: Releases) -> None:
    """A rolling update signals VPP and the agent at once: VPP stops within the grace, and
    the agent gives the NIC back (in case no guard ran VPP)."""
    from vppmesh.agent import node
    from vppmesh.agent.loop import leave_uplinks

    saved_uplink(tmp_path / "state")
    vpp = ApiSocketDouble(tmp_path / "api.sock")
    later(0.3, vpp.die)
    options = node.NodeOptions(mesh_file=tmp_path / "m", node="n1", private_key=tmp_path / "k",
                               api_socket=tmp_path / "api.sock", state_dir=tmp_path / "state")
    started = time.monotonic()
    leave_uplinks(options, grace=3)
    assert time.monotonic() - started < 2
    assert [d for d, _ in releases.calls] == [tmp_path / "state"]
    # Nothing VPP-independent to give back (avf stays with vfio-pci): no wait at all.
    (tmp_path / "state" / "uplink-eth0.json").unlink()
    saved_uplink(tmp_path / "state", "avf")
    probes: list[Path] = []
    leave_uplinks(options, grace=3, stops_within=lambda p, _: bool(probes.append(p)) or True)
    assert probes == [] and len(releases.calls) == 1


def test_agent_on_sigterm_gives_the_nic_back_when_vpp_is_gone(
        tmp_path: Path, releases: Releases, monkeypatch: pytest.MonkeyPatch) -> None:
    """`up --watch` ended by SIGTERM with VPP gone (its socket file left behind) gives the
    taken NIC back before it exits; before, it just stopped and the host stayed offline."""
    from types import SimpleNamespace

    from vppmesh.agent import loop as watch
    from vppmesh.agent import node

    class FakeSession:
        client = None
        closed = 0

        def close(self) -> None:
            FakeSession.closed += 1

        def __init__(self, options: object, **kwargs: object) -> None:
            self.secrecy = kwargs["secrecy"]

        def run(self) -> object:
            os.kill(os.getpid(), signal.SIGTERM)  # the runtime stops the pod
            return SimpleNamespace(vpp_pid=1, seconds=0.01, changes=[], notes=[],
                                   downgraded_peers=[], stopped_peers={}, blocked_peers=[],
                                   pod_report=None, mesh=None)

    monkeypatch.setattr(node, "Agent", FakeSession)
    (tmp_path / "mesh.yaml").write_text("")
    ApiSocketDouble(tmp_path / "api.sock").die()  # VPP went with the pod: its file stays
    saved_uplink(tmp_path / "state")
    options = node.NodeOptions(mesh_file=tmp_path / "mesh.yaml", node="n1",
                               private_key=tmp_path / "k", api_socket=tmp_path / "api.sock",
                               state_dir=tmp_path / "state")
    before = signal.getsignal(signal.SIGTERM)
    try:
        watch.watch_loop(options)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert [d for d, _ in releases.calls] == [tmp_path / "state"]
    assert FakeSession.closed >= 1  # its VPP connection left with sockclnt_delete


# ---- for real: a veth in a namespace of its own stands for the NIC -----------------------
NS = f"vpr-{os.getpid()}"


def in_ns(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", NS, *args], capture_output=True, text=True,
                          check=True, timeout=60)


def nic_view() -> dict[str, object]:
    """What the host needs of its NIC: name, MAC, promiscuity, addresses, routes."""
    links = {link["ifname"]: link for link in json.loads(in_ns("ip", "-j", "-d", "link",
                                                                "show").stdout)}
    eth0 = links.get("eth0", {})
    return {"links": sorted(links), "mac": eth0.get("address"),
            "promiscuity": eth0.get("promiscuity"),
            "addresses": sorted(f"{a['local']}/{a['prefixlen']}" for a in json.loads(
                in_ns("ip", "-j", "addr", "show", "dev", "eth0").stdout or "[{}]"
            )[0].get("addr_info", []) if a["family"] == "inet") if "eth0" in links else [],
            "routes": sorted(json.dumps(r, sort_keys=True) for r in json.loads(
                in_ns("ip", "-j", "route", "show").stdout))}


@pytest.mark.root
def test_vpp_exiting_gives_a_real_nic_its_address_and_routes_back(tmp_path: Path) -> None:
    """A veth "NIC" with an address and a route through a gateway; its configuration saved
    by the uplink code that needs no VPP, then moved away as a takeover with a veth host
    link leaves it once VPP died (the NIC renamed eth0-nic with VPP's MAC and promiscuous,
    the host's address on the host link's veth). `vppmesh vpp-run` with a stand-in VPP that
    exits: within 5 s the NIC is eth0 again with its MAC, address and routes."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace)")
    state = tmp_path / "state"
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        in_ns("ip", "link", "set", "lo", "up")
        in_ns("ip", "link", "add", "eth0", "address", "02:00:5e:00:53:21", "type", "veth",
              "peer", "name", "wire0")
        in_ns("ip", "addr", "add", "198.51.100.21/24", "dev", "eth0")
        in_ns("ip", "link", "set", "wire0", "up")
        in_ns("ip", "link", "set", "eth0", "up")
        in_ns("ip", "route", "add", "203.0.113.0/24", "via", "198.51.100.1", "metric", "7")
        before = nic_view()
        in_ns(sys.executable, "-c", (
            "import pathlib, json\n"
            "from vppmesh.host import uplink\n"
            f"state = pathlib.Path({str(state)!r})\n"
            "uplink.save(uplink.UplinkSpec(interface='eth0', host_link='veth'), state)\n"
            "path = uplink.state_file(state, 'eth0')\n"
            "saved = json.loads(path.read_text()); saved['taken'] = True\n"
            "path.write_text(json.dumps(saved))\n"))
        # What a takeover left once VPP died: the NIC renamed, VPP's end MAC, promiscuous;
        # the host's address on the host link (a veth whose other end VPP had opened).
        in_ns("ip", "addr", "flush", "dev", "eth0")
        in_ns("ip", "link", "set", "eth0", "down")
        in_ns("ip", "link", "set", "eth0", "name", "eth0-nic")
        in_ns("ip", "link", "set", "eth0-nic", "address", "02:fe:fd:00:53:21", "promisc", "on",
              "up")
        in_ns("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0-vpp")
        in_ns("ip", "addr", "add", "198.51.100.21/24", "dev", "eth0")
        in_ns("ip", "link", "set", "eth0", "up")
        taken = nic_view()
        assert "eth0-nic" in taken["links"] and taken["mac"] != before["mac"]
        exited = tmp_path / "exited"
        guard = subprocess.Popen(
            ["ip", "netns", "exec", NS, sys.executable, "-m", "vppmesh", "vpp-run",
             "--state-dir", str(state), "--", "sh", "-c", f"sleep 1; touch {exited}; exit 3"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE,
            text=True)
        try:
            wait_for(exited.exists, 30, "the stand-in VPP's exit")
            seconds = wait_for(lambda: nic_view() == before, 5,
                               "eth0 as it was before the takeover")
            _, stderr = guard.communicate(timeout=30)
        finally:
            if guard.poll() is None:
                guard.kill()
        assert guard.returncode == 3, stderr
        assert "vpp-run: VPP exited (status 3)" in stderr
        assert not uplink.saved_uplinks(state)
        print(f"\nNIC back {seconds:.2f} s after VPP exited")
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=False)


def test_a_second_sigterm_does_not_cut_the_give_back_short(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime (or an impatient operator) signals again while the NIC is being given
    back: the guard finishes giving it back; only then are its handlers gone."""
    steps: list[str] = []

    def slow(state_dir: Path) -> list[str]:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the give-back
        time.sleep(0.1)
        steps.append("all given back")
        return []

    monkeypatch.setattr(uplink, "release_all", slow)
    before = signal.getsignal(signal.SIGTERM)
    caught: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: caught.append(signum))
    try:
        assert vpprun.run(stand_in(tmp_path, "exit 6"), tmp_path / "s") == 6
    finally:
        signal.signal(signal.SIGTERM, before)
    assert steps == ["all given back"] and caught == []  # the guard's handler took it
