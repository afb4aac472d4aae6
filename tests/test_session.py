"""`up --watch`'s Session on the fake VPP: a change to the mesh file is applied from the
remembered state (no interface, tunnel or route dumps), and a lost VPP means reconnect and
dump."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vppmesh.config import dump_mesh
from vppmesh.errors import VppMeshError, VppUnavailableError
from vppmesh.keys import private_key_b64, write_secret_file
from vppmesh.node import NodeOptions, Session
from vppmesh.testing.fake_vpp import FakeVpp
from vppmesh.testing.meshes import make_mesh

# The dumps only reconcile() makes (`up` itself also reads interfaces and SAs each poll,
# for the uplink guard and the key generations).
DUMPS = ("ipip_tunnel_dump", "ipsec_tunnel_protect_dump", "ip_unnumbered_dump",
         "ip_table_dump")


def test_session_applies_one_joining_peer_without_dumps(tmp_path: Path) -> None:
    mesh, secrets = make_mesh(6, 2)
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(dump_mesh(mesh.model_copy(update={"nodes": mesh.nodes[:5]})))
    key = tmp_path / "node1.key"
    write_secret_file(key, private_key_b64(secrets["node1"].private_key))
    options = NodeOptions(mesh_file=mesh_file, node="node1", private_key=key,
                          host_link="none", workers=0, state_dir=tmp_path)
    vpp = FakeVpp.with_uplink(mesh.node("node1").primary)
    connections: list[FakeVpp] = []

    def connect() -> FakeVpp:
        connections.append(vpp)
        return vpp

    session = Session(options, connect=connect)  # type: ignore[arg-type]
    first = session.run()
    assert first.changes and all(vpp.counts[d] == 1 for d in DUMPS)

    mesh_file.write_text(dump_mesh(mesh))  # node6 joins
    vpp.counts.clear()
    second = session.run()
    assert {c.target.split()[0] for c in second.changes if c.kind == "tunnel"} == \
        {"ipip100000600", "ipip100000601"}
    assert not any(vpp.counts[d] for d in DUMPS)
    assert vpp.counts["ipip_add_tunnel"] == 2

    original = vpp.call

    def broken(request):  # type: ignore[no-untyped-def]
        raise VppUnavailableError("VPP stopped answering (read: the socket was closed)")

    vpp.call = broken  # type: ignore[method-assign]
    with pytest.raises(VppUnavailableError):
        session.run()
    vpp.call = original  # type: ignore[method-assign]
    vpp.counts.clear()
    assert session.run().changes == []
    assert len(connections) == 2  # reconnected
    assert all(vpp.counts[d] == 1 for d in DUMPS)  # and dumped VPP again


def test_after_a_reconnect_runs_stay_full_until_one_succeeds(tmp_path: Path) -> None:
    """A VPP that restarted may not have its uplink back yet when the agent reconnects: that
    full run fails, and the next one must be full again (dump, pods re-attached), not a
    run from remembered state that would leave the pods detached until the next resync."""
    mesh, secrets = make_mesh(3, 2)
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(dump_mesh(mesh))
    key = tmp_path / "node1.key"
    write_secret_file(key, private_key_b64(secrets["node1"].private_key))
    options = NodeOptions(mesh_file=mesh_file, node="node1", private_key=key,
                          host_link="none", workers=0, state_dir=tmp_path,
                          cni_state_dir=tmp_path / "cni")
    vpp = FakeVpp.with_uplink(mesh.node("node1").primary)
    session = Session(options, connect=lambda: vpp)  # type: ignore[arg-type,return-value]
    assert session.run().changes
    session.close()  # VPP went away; the next run reconnects
    restarted = FakeVpp.with_uplink(mesh.node("node1").primary)
    [(uplink, address)] = restarted.addresses.items()
    restarted.addresses[uplink] = []  # the host has not given VPP its address back yet
    session._connect = lambda: restarted  # type: ignore[method-assign,assignment,return-value]
    with pytest.raises(VppMeshError, match="give VPP its uplink first"):
        session.run()
    restarted.addresses[uplink] = address
    restarted.counts.clear()
    again = session.run()
    assert again.changes
    assert again.pod_report is not None  # a full run: the CNI's pods were re-attached


def test_watch_ticks_end_between_runs_once_stopped(tmp_path: Path) -> None:
    """SIGTERM sets the stop event: the loop ends at its next wait, never inside a run."""
    import threading

    from vppmesh.watch import poll_ticks

    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("x")
    stop = threading.Event()
    ticks = poll_ticks(mesh, stop=stop)
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    assert list(ticks) == []  # the first tick (2 s away) never came
    assert time.monotonic() - started < 1.0


def test_watch_tick_the_channel_asks_for_waits_only_until_it_may_come(tmp_path: Path) -> None:
    """A run the channel asks for while the last one is too recent comes once the gap
    has passed, not at the next file check."""
    from vppmesh.watch import WATCH_FILE_CHECK_SECONDS, poll_ticks

    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("x")
    allowed = time.monotonic() + 0.05
    pauses: list[float] = []

    def wait(seconds: float) -> bool:
        pauses.append(seconds)
        if len(pauses) == 1:
            return True  # a datagram at once: the channel wants a run
        time.sleep(seconds)
        return False

    next(poll_ticks(mesh, wait=wait, early_in=lambda: allowed - time.monotonic()))
    assert pauses[0] == WATCH_FILE_CHECK_SECONDS
    assert len(pauses) == 2 and pauses[1] <= 0.05


def test_watch_tick_comes_when_vpp_makes_its_api_socket_again(tmp_path: Path) -> None:
    """A restarted VPP makes its API socket again: the next run comes at the next file
    check, not at the next poll, and so does one when the socket is gone."""
    from vppmesh.watch import WATCH_FILE_CHECK_SECONDS, poll_ticks

    mesh, api = tmp_path / "mesh.yaml", tmp_path / "api.sock"
    mesh.write_text("x")
    api.write_text("")
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        if len(waits) == 2:
            made = tmp_path / "api.new"
            made.write_text("")
            made.replace(api)  # another inode: VPP started again
        if len(waits) == 4:
            api.unlink()  # VPP stopped
        return False

    ticks = poll_ticks(mesh, wait=wait, vpp_socket=api)
    next(ticks)
    assert len(waits) == 2
    next(ticks)
    assert len(waits) == 4 and waits == [WATCH_FILE_CHECK_SECONDS] * 4


def test_agent_loop_spaces_channel_runs_by_plain_steps_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The gap before a run the channel asks for is 3 x the last plain step: a first
    step, a failed one or one that recovered a restarted VPP does not set it."""
    from types import SimpleNamespace

    from vppmesh import watch

    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(watch, "time", SimpleNamespace(monotonic=lambda: clock.now))
    monkeypatch.setattr(watch, "give_back_uplinks", lambda opts: None)
    script = [(0.5, 1), (0.1, 1), (0.4, 2), (0.3, None), (0.02, 2)]

    class FakeSession:
        def run(self) -> object:
            seconds, pid = script.pop(0)
            clock.now += seconds
            if pid is None:
                raise VppMeshError("no VPP interface holding the primary underlay address")
            return SimpleNamespace(vpp_pid=pid, seconds=seconds, changes=[], pod_report=None)

    loop = watch.AgentLoop(FakeSession(), SimpleNamespace())  # type: ignore[arg-type]
    gaps = []
    for _ in range(5):
        loop.run([None])
        gaps.append(round(loop.early_in(), 3))
    assert gaps == [watch.EARLY_MIN_GAP, 0.3, 0.3, 0.3, 0.06]
    assert loop.recovered is False and loop.last_pid == 2


def test_a_psk_rotation_step_takes_effect_at_the_next_run_not_the_next_full_one(
        tmp_path: Path) -> None:
    """Staging the next PSK (docs/operations.md, PSK rotation) changes no mesh file: the
    session sees the node's secret files change and builds its view again at once."""
    import base64
    import os

    psk, psk_next = tmp_path / "psk", tmp_path / "psk.next"
    write_secret_file(psk, base64.b64encode(os.urandom(32)).decode())
    mesh, secrets = make_mesh(3, 2, psk_file=psk)
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(dump_mesh(mesh))
    key = tmp_path / "node1.key"
    write_secret_file(key, private_key_b64(secrets["node1"].private_key))
    options = NodeOptions(mesh_file=mesh_file, node="node1", private_key=key,
                          host_link="none", workers=0, state_dir=tmp_path)
    vpp = FakeVpp.with_uplink(mesh.node("node1").primary)
    session = Session(options, connect=lambda: vpp, full_every=3600)  # type: ignore[arg-type,return-value]
    session.run()
    first = session.view()
    assert first.secrets.psk_next == b""
    assert session.view() is first  # nothing changed: the same view
    write_secret_file(psk_next, base64.b64encode(os.urandom(32)).decode())
    session.run()
    assert session.view().secrets.psk_next != b""
    psk_next.unlink()
    session.run()
    assert session.view().secrets.psk_next == b""
