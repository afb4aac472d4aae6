"""`up --watch`'s Agent on the fake VPP: a change to the mesh file is applied from the
remembered state (no interface, tunnel or route dumps), and a lost VPP means reconnect and
dump."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from vppmesh.agent.node import Agent, NodeOptions
from vppmesh.config import dump_mesh
from vppmesh.dataplane.state import SA_DIRECTION_BIT
from vppmesh.errors import VppMeshError, VppUnavailableError
from vppmesh.keying.keys import private_key_b64, write_secret_file
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

    session = Agent(options, connect=connect)  # type: ignore[arg-type]
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
    session = Agent(options, connect=lambda: vpp)  # type: ignore[arg-type,return-value]
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

    from vppmesh.agent.loop import poll_ticks

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
    from vppmesh.agent.loop import WATCH_FILE_CHECK_SECONDS, poll_ticks

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
    from vppmesh.agent.loop import WATCH_FILE_CHECK_SECONDS, poll_ticks

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

    from vppmesh.agent import loop as watch

    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(watch, "time", SimpleNamespace(monotonic=lambda: clock.now))
    monkeypatch.setattr(watch, "give_back_uplinks", lambda opts: None)
    script = [(0.5, 1), (0.1, 1), (0.4, 2), (0.3, None), (0.02, 2)]

    class FakeSession:
        """Decides, as the Agent does, that a new pid is a restarted VPP."""

        def __init__(self) -> None:
            self.hooks: list[object] = []
            self.met: int | None = None

        def run(self) -> object:
            seconds, pid = script.pop(0)
            clock.now += seconds
            if pid is None:
                raise VppMeshError("no VPP interface holding the primary underlay address")
            if pid != self.met:
                for hook in self.hooks:
                    hook.on_vpp_met(None, pid, restarted=self.met is not None, view=None)  # type: ignore[attr-defined]
                self.met = pid
            return SimpleNamespace(vpp_pid=pid, seconds=seconds, changes=[], pod_report=None)

    loop = watch.Loop(FakeSession(), SimpleNamespace())  # type: ignore[arg-type]
    gaps = []
    for _ in range(5):
        loop.run([None])
        gaps.append(round(loop.early_in(), 3))
    assert gaps == [watch.EARLY_MIN_GAP, 0.3, 0.3, 0.3, 0.06]
    assert loop.recovered is False and loop.last_pid == 2


SA_DUMP = "ipsec_sa_v5_dump"


def node1_agent(tmp_path: Path, mesh: object, secrets: dict, **kwargs: object,
                ) -> tuple[Agent, FakeVpp, Path]:
    """node1's Agent on a fake VPP, the mesh file holding `mesh`."""
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(dump_mesh(mesh))  # type: ignore[arg-type]
    key = tmp_path / "node1.key"
    write_secret_file(key, private_key_b64(secrets["node1"].private_key))
    options = NodeOptions(mesh_file=mesh_file, node="node1", private_key=key,
                          host_link="none", workers=0, state_dir=tmp_path)
    vpp = FakeVpp.with_uplink(mesh.node("node1").primary)  # type: ignore[attr-defined]
    return Agent(options, connect=lambda: vpp, **kwargs), vpp, mesh_file  # type: ignore[arg-type]


def counted_session(tmp_path: Path, nodes: int = 3, **settings: object,
                    ) -> tuple[Agent, FakeVpp, Path, object]:
    """node1's Agent on a fake VPP whose SA counters it reads (a FakeVpp is its own
    stats reader), the mesh file holding all nodes but the last."""
    from vppmesh.dataplane.vpp.stats import SaCounters

    mesh, secrets = make_mesh(nodes, 2, **settings)
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(dump_mesh(mesh.model_copy(update={"nodes": mesh.nodes[:-1]})))
    key = tmp_path / "node1.key"
    write_secret_file(key, private_key_b64(secrets["node1"].private_key))
    options = NodeOptions(mesh_file=mesh_file, node="node1", private_key=key,
                          host_link="none", workers=0, state_dir=tmp_path)
    vpp = FakeVpp.with_uplink(mesh.node("node1").primary)
    counters = SaCounters(tmp_path / "stats.sock", open_reader=lambda _path: vpp)
    session = Agent(options, connect=lambda: vpp,  # type: ignore[arg-type,return-value]
                      counters=counters)
    return session, vpp, mesh_file, mesh


def test_idle_runs_dump_no_sa_and_full_runs_dump_them_once(tmp_path: Path) -> None:
    """An idle `up --watch` at 1000 peers spent most of its CPU dumping every SA for the
    key generations, twice on a full run. Now: one SA dump per full run (the key
    generations and the reconcile share it), none in a steady-state run, a peer joining
    included; a resync and a reconnect dump again."""
    session, vpp, mesh_file, mesh = counted_session(tmp_path)
    assert session.run().changes and vpp.counts[SA_DUMP] == 1  # the first run is full
    for _ in range(3):
        vpp.counts.clear()
        assert session.run().changes == []
        assert vpp.counts[SA_DUMP] == 0
    mesh_file.write_text(dump_mesh(mesh))  # node3 joins: applied without an SA dump
    vpp.counts.clear()
    joined = session.run()
    assert any(c.kind == "sa" for c in joined.changes) and vpp.counts[SA_DUMP] == 0
    session._last_full = float("-inf")  # the periodic resync is due
    vpp.counts.clear()
    assert session.run().changes == [] and vpp.counts[SA_DUMP] == 1
    session.close()  # VPP went away: the reconnect's run is full
    vpp.counts.clear()
    assert session.run().changes == [] and vpp.counts[SA_DUMP] == 1
    vpp.counts.clear()
    assert session.run().changes == [] and vpp.counts[SA_DUMP] == 0


def test_unreadable_stats_segment_falls_back_to_dumps_and_says_so_once(
        tmp_path: Path) -> None:
    """No counters, no guessing: every run dumps the SAs (once), the first run says why
    in its notes, and the counters object says it is unavailable (the agent's metric)."""
    session, vpp, _, _ = counted_session(tmp_path)
    session.run()

    def unreadable(_path: Path) -> FakeVpp:
        raise OSError("stats segment gone")

    assert session.counters is not None
    session.counters.close()
    session.counters._open = unreadable  # type: ignore[method-assign]
    notes = []
    for _ in range(3):
        vpp.counts.clear()
        result = session.run()
        assert vpp.counts[SA_DUMP] == 1
        notes += [n for n in result.notes if "stats segment" in n]
    assert len(notes) == 1 and "full SA dumps" in notes[0]
    assert session.counters.unavailable is not None and session.counters.fallbacks == 3


def test_key_limit_is_read_from_counters_on_idle_runs(tmp_path: Path) -> None:
    """Traffic pushes node1's outbound SAs past half of key_max_packets while its runs
    dump no SA: the counters show it and the key is replaced, as a dump would have."""
    session, vpp, _, _ = counted_session(tmp_path, key_max_packets=2048, rekey_interval=0)
    session.run()
    session.run()

    def out_spis() -> set[int]:
        return {sa["entry"]["spi"] for sa_id, sa in vpp.sas.items()
                if sa_id & SA_DIRECTION_BIT}

    before = out_spis()
    for sa_id, sa in vpp.sas.items():
        if sa_id & SA_DIRECTION_BIT:
            sa["seq_out"] = 1024  # half of key_max_packets: a new key is due
    vpp.counts.clear()
    result = session.run()
    assert vpp.counts[SA_DUMP] == 0
    assert any("key_max_packets" in n for n in result.notes), result.notes
    assert out_spis().isdisjoint(before)


def test_a_psk_rotation_step_takes_effect_at_the_next_run_not_the_next_full_one(
        tmp_path: Path) -> None:
    """Staging the next PSK (docs/operations.md, PSK rotation) changes no mesh file: the
    session sees the node's secret files change and builds its view again at once."""
    import base64
    import os

    psk, psk_next = tmp_path / "psk", tmp_path / "psk.next"
    write_secret_file(psk, base64.b64encode(os.urandom(32)).decode())
    mesh, secrets = make_mesh(3, 2, psk_file=psk)
    session, _, _ = node1_agent(tmp_path, mesh, secrets, full_every=3600)
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


def test_up_watch_makes_its_first_run_once_through_the_loop_and_reports_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`up --watch` used to run a one-shot `up` and then the loop's own first (full) run:
    the first run twice, by two paths. Now the loop's first run is the agent's `up`; it
    is reported even with nothing to change (an agent restart), later runs only when they
    change something."""
    import os
    import signal
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from vppmesh.agent import loop as watch
    from vppmesh.agent import node
    from vppmesh.cli import app

    one_shot: list[object] = []
    monkeypatch.setattr(node, "up", lambda *a, **k: one_shot.append(a) or pytest.fail(
        "a one-shot up before the loop"))
    runs: list[int] = []

    class FakeSession:
        client = None

        def __init__(self, options: object, **kwargs: object) -> None:
            self.secrecy = kwargs["secrecy"]

        def close(self) -> None:
            pass

        def run(self) -> object:
            runs.append(len(runs))
            if len(runs) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            desired = SimpleNamespace(node="n1", tunnels=[], mtu=1440)
            return SimpleNamespace(vpp_pid=1, seconds=0.01, changes=[], notes=[],
                                   downgraded_peers=[], stopped_peers={}, blocked_peers=[],
                                   pod_report=None, mesh=None, desired=desired,
                                   crypto_engine=None, host_link="none")

    monkeypatch.setattr(node, "Agent", FakeSession)
    monkeypatch.setattr(watch, "WATCH_POLL_SECONDS", 0.05)
    (tmp_path / "mesh.yaml").write_text("")
    before = signal.getsignal(signal.SIGTERM)
    try:
        result = CliRunner().invoke(app, [
            "up", "--watch", "--mesh", str(tmp_path / "mesh.yaml"), "--node", "n1",
            "--key", str(tmp_path / "k"), "--api-socket", str(tmp_path / "api.sock"),
            "--state-dir", str(tmp_path / "state")])
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.exit_code == 0, result.output
    assert one_shot == [] and len(runs) == 3
    assert result.output.count("node n1: 0 change(s)") == 1  # the first run, said once


def test_watch_reads_the_mesh_file_once_per_change(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """One `up --watch` loop (Loop over a Agent) against the fake VPP: the mesh file
    is parsed on the first run and once after each change, never on runs where it did not
    change (a 1000-peer file costs far more to parse than a poll), and each change reaches
    VPP in the run that read it. Full runs, which read it again on purpose, are kept out
    of the window (full_every is long)."""
    import vppmesh.agent.node as node_module
    from vppmesh.agent.loop import Loop

    reads: list[Path] = []
    real_load = node_module.load_mesh

    def counted(path: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
        reads.append(path)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(node_module, "load_mesh", counted)
    mesh, secrets = make_mesh(6, 2)
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(dump_mesh(mesh.model_copy(update={"nodes": mesh.nodes[:4]})))
    key = tmp_path / "node1.key"
    write_secret_file(key, private_key_b64(secrets["node1"].private_key))
    options = NodeOptions(mesh_file=mesh_file, node="node1", private_key=key,
                          host_link="none", workers=0, state_dir=tmp_path)
    vpp = FakeVpp.with_uplink(mesh.node("node1").primary)
    loop = Loop(Agent(options, full_every=3600.0, connect=lambda: vpp),  # type: ignore[arg-type]
                     options)
    tunnels: list[int] = []

    def ticks():  # type: ignore[no-untyped-def]
        for step in range(12):
            if step == 4:  # node5 joins
                mesh_file.write_text(dump_mesh(mesh.model_copy(
                    update={"nodes": mesh.nodes[:5]})))
            if step == 8:  # node5 leaves, node6 joins (the same size: a rewrite, not a grow)
                mesh_file.write_text(dump_mesh(mesh.model_copy(
                    update={"nodes": mesh.nodes[:4] + mesh.nodes[5:]})))
            before = len(reads)
            yield step
            tunnels.append(len(vpp.tunnels))
            assert len(reads) - before == (1 if step in (0, 4, 8) else 0), step

    loop.run(ticks())
    assert len(reads) == 3
    assert tunnels[3] == 3 * 2 and tunnels[4] == 4 * 2 and tunnels[8] == 4 * 2


def test_quiet_runs_decide_nothing_again_yet_every_time_and_packet_limit_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle agent observed every SA and advanced every pair on every poll to decide
    what its last run decided. Now a run whose inputs are those of a run that changed
    nothing observes nothing; yet a scheduled rekey comes in the run that reaches its
    time, and packets past half of key_max_packets replace the key in the next run."""
    from vppmesh.agent import node

    observed = []
    real = node.observe_keys
    monkeypatch.setattr(node, "observe_keys",
                        lambda *a, **k: observed.append(1) or real(*a, **k))
    session, vpp, _, _ = counted_session(tmp_path, key_max_packets=1 << 20,
                                         rekey_interval=600)

    def out_spis() -> set[int]:
        return {sa["entry"]["spi"] for sa_id, sa in vpp.sas.items()
                if sa_id & SA_DIRECTION_BIT}

    def send(packets: int) -> None:  # node1's outbound SAs have carried `packets`
        for sa_id, sa in vpp.sas.items():
            if sa_id & SA_DIRECTION_BIT:
                sa["seq_out"] = packets

    start = 10_000.0
    for i in range(4):
        assert (session.run(now=start + i).changes == []) == (i > 0)
        send(5)  # (a key that protected nothing is not rotated on the static schedule)
    observed.clear()
    for i in range(4, 8):
        assert session.run(now=start + i).changes == []
    assert observed == []  # quiet: nothing new, nothing decided again
    before = out_spis()
    rekeyed = session.run(now=start + 600)  # every pair's first rotation is due by now
    assert any("scheduled rekey" in n for n in rekeyed.notes), rekeyed.notes
    assert out_spis().isdisjoint(before) and observed
    send(5)
    for i in range(601, 605):
        session.run(now=start + i)
    observed.clear()
    assert session.run(now=start + 605).changes == [] and observed == []
    send(1 << 19)  # half of key_max_packets, between two runs
    result = session.run(now=start + 606)  # (deferred: the peer's window, not quiet)
    assert any("key_max_packets" in n for n in result.notes), result.notes


def counted_hooks(session: Agent) -> dict[str, list[tuple[str, object]]]:
    """Every hook of `session` (node.VppHooks), its calls counted: hook class -> calls."""
    calls: dict[str, list[tuple[str, object]]] = {}
    for hook in session.hooks:
        seen = calls.setdefault(type(hook).__name__, [])
        met, gone = hook.on_vpp_met, hook.on_vpp_gone

        def on_met(api, pid, *, restarted, view, seen=seen, met=met):  # type: ignore[no-untyped-def]
            seen.append(("met", (pid, restarted)))
            met(api, pid, restarted=restarted, view=view)

        def on_gone(reason, seen=seen, gone=gone):  # type: ignore[no-untyped-def]
            seen.append(("gone", None))
            gone(reason)

        hook.on_vpp_met, hook.on_vpp_gone = on_met, on_gone  # type: ignore[method-assign]
    return calls


def test_one_vpp_restart_is_decided_once_and_told_to_each_hook_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The Agent alone decides that VPP went away and that the VPP it meets is another
    one; the channel, the quiet runs, the SA counters and the loop each hear of it once,
    however many runs the outage lasts, and a new pid on the same connection is a
    restart too."""
    from vppmesh.agent import loop as watch
    from vppmesh.testing.agents import Agents

    monkeypatch.setattr(watch, "give_back_uplinks", lambda opts: None)
    agents = Agents(2, counters=True)
    try:
        for _ in range(3):
            agents.step()
        session = agents.sessions["node1"]
        loop = watch.Loop(session, agents.options["node1"])
        calls = counted_hooks(session)
        assert set(calls) == {"QuietRuns", "SaCounters", "Secrecy", "Loop"}
        assert loop.step() is not None and not any(calls.values())
        old = agents.vpp("node1")

        def dead(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise VppUnavailableError("VPP stopped answering (read: the socket was closed)")

        old.call = old.call_many = dead  # type: ignore[method-assign]
        for _ in range(3):  # three runs while VPP is away: told once
            assert loop.step() is None
        assert all(seen == [("gone", None)] for seen in calls.values()), calls
        assert loop.vpp_gone_at is not None
        new = agents.restart_vpp("node1")
        assert loop.step() is not None and loop.recovered
        agents.settle()
        assert all(seen[1:] == [("met", (new.pid, True))] for seen in calls.values()), calls
        assert loop.vpp_gone_at is None
        for _ in range(3):  # nothing more: the same VPP
            assert loop.step() is not None and not loop.recovered
        assert all(len(seen) == 2 for seen in calls.values()), calls
        # Another pid behind the same connection: a restart as well, told once.
        new.pid += 1
        assert loop.step() is not None and loop.recovered
        assert loop.step() is not None and not loop.recovered
        assert all(seen[2:] == [("met", (new.pid, True))] for seen in calls.values()), calls
    finally:
        agents.close()


def test_an_agent_restart_with_the_same_vpp_is_not_a_vpp_restart() -> None:
    """A new agent meets the VPP the last one left (same pid, its boot id kept beside the
    channel's socket): its hooks hear of a VPP met, not restarted, and it keeps the boot
    id the peers know, so they do not take it for a restarted VPP."""
    from vppmesh.testing.agents import Agents

    agents = Agents(2)
    try:
        for _ in range(3):
            agents.step()
        channel = agents.secrecy["node1"].channel
        assert channel is not None
        boot = channel.boot_id
        agents.start_agent("node1")
        calls = counted_hooks(agents.sessions["node1"])
        agents.run("node1")
        pid = agents.vpp("node1").pid
        assert all(seen == [("met", (pid, False))] for seen in calls.values()), calls
        again = agents.secrecy["node1"].channel
        assert again is not None and again.boot_id == boot
    finally:
        agents.close()


def test_a_changed_entry_that_is_invalid_stops_the_run_before_vpp(tmp_path: Path) -> None:
    """The mesh file is read entry by entry between full runs (config.split_nodes): a
    node whose entry changes into an invalid one still stops the run before anything
    reaches VPP, naming the field and the fix; the file fixed, the next run applies it."""
    from vppmesh.errors import ConfigError

    session, vpp, mesh_file, mesh = counted_session(tmp_path, nodes=4)
    session.run()
    session.run()
    good = mesh_file.read_text()
    key = mesh.nodes[1].public_key
    assert good.count(key) == 1
    mesh_file.write_text(good.replace(key, "not-a-key"))
    sent = vpp.sent
    with pytest.raises(ConfigError, match=r"nodes\.1\.public_key: .*vppmesh keygen"):
        session.run()
    assert vpp.sent == sent
    mesh_file.write_text(dump_mesh(mesh))  # fixed, and node4 joins
    assert any(c.kind == "sa" for c in session.run().changes)


def test_a_stream_of_channel_events_takes_the_agent_at_most_its_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood of channel events that each ask for a run (every pair of a 1000-peer node
    rotating every 2 minutes is about 50 a second; so is a peer's agent that says
    "installed" over and over) with runs of 14 ms: the runs the channel hastens take
    EARLY_BUDGET of a core on average, the polls run on schedule whatever the credit,
    and a lone event after a quiet while is still served at once. With runs spaced only
    by three times their duration the flood took a quarter of a core."""
    from types import SimpleNamespace

    from vppmesh.agent import loop as watch

    clock = SimpleNamespace(now=1000.0)
    fake_time = SimpleNamespace(monotonic=lambda: clock.now)
    monkeypatch.setattr(watch, "time", fake_time)
    monkeypatch.setattr(watch, "give_back_uplinks", lambda opts: None)
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("x")
    flood = SimpleNamespace(until=clock.now + 120.0, asked=[])
    runs: list[float] = []

    class Session:
        def __init__(self) -> None:
            self.hooks: list[object] = []

        def run(self) -> object:
            runs.append(clock.now)
            clock.now += 0.014
            return SimpleNamespace(vpp_pid=1, seconds=0.014, changes=[], pod_report=None)

    def wait(seconds: float) -> bool:
        """A channel event every 20 ms while the flood lasts, then one at 200 s."""
        clock.now += max(min(seconds, 0.02), 1e-4)  # (a select() takes a moment)
        if clock.now < flood.until or (not flood.asked and clock.now >= flood.until + 80):
            if clock.now >= flood.until:
                flood.asked.append(clock.now)
            return True
        return False

    loop = watch.Loop(Session(), SimpleNamespace())  # type: ignore[arg-type]
    stop = SimpleNamespace(is_set=lambda: clock.now > flood.until + 90)
    loop.run(watch.poll_ticks(mesh, wait=wait, early_in=loop.early_in,
                              stop=stop))  # type: ignore[arg-type]
    in_flood = [t for t in runs if t < flood.until]
    share = len(in_flood) * 0.014 / 120.0
    polls = 0.014 / watch.WATCH_POLL_SECONDS
    assert share <= 0.01 + polls + watch.EARLY_BURST / 120.0, share  # 1 % of a core
    gaps = [b - a for a, b in itertools.pairwise(in_flood)]
    assert max(gaps) <= watch.WATCH_POLL_SECONDS + 0.2  # the polls never waited
    assert flood.asked and any(0 <= t - flood.asked[0] <= 0.25 for t in runs), \
        "a lone event after the flood waited"


def test_async_crypto_is_set_once_per_connection_and_again_when_the_mesh_changes_it(
        tmp_path: Path) -> None:
    """VPP's async crypto mode is told once per VPP connection (and after the remembered
    state was found wrong), not on every poll; a mesh that changes settings.async_crypto
    has it set at the next run."""
    mesh, secrets = make_mesh(3, 2)
    session, vpp, mesh_file = node1_agent(tmp_path, mesh, secrets, full_every=3600)
    for _ in range(3):
        session.run()
    assert vpp.counts["ipsec_set_async_mode"] == 1 and vpp.async_mode is False
    changed = mesh.model_copy(update={"settings": mesh.settings.model_copy(
        update={"async_crypto": True})})
    mesh_file.write_text(dump_mesh(changed))
    session.run()
    assert vpp.async_mode is True
    vpp.async_mode = False  # an operator's `set ipsec async mode off`
    session._reconciler.forget()  # type: ignore[union-attr]  # found wrong: told again
    session.run()
    assert vpp.async_mode is True
