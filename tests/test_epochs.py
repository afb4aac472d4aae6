"""Key generations: the per-peer rules, then two agents on fake VPPs keeping a pair working."""

from __future__ import annotations

from pathlib import Path

import pytest

from vppmesh.config import MeshSettings
from vppmesh.dataplane.state import SA_DIRECTION_BIT
from vppmesh.errors import ConfigError
from vppmesh.keying.epochs import (
    WINDOW,
    GenerationStore,
    PeerObservation,
    PeerSaid,
    advance,
)
from vppmesh.testing.agents import Pair, fresh, never

SETTINGS = MeshSettings(rekey_interval=0, rekey_grace=10)


def test_agent_restart_keeps_the_installed_generation() -> None:
    pg = fresh(out=4, floor=4, base=4)
    d = advance(pg, PeerObservation(out_installed=True), SETTINGS, now=5, key_used=lambda g: g <= 4,
                peer="p")
    assert d.keying is not None and d.keying.outbound == 4 and not d.stepped
    assert d.keying.inbound == (4, 5, 6)


def test_lost_sas_with_a_burnt_key_step_forward_by_themselves() -> None:
    pg = fresh(out=4, floor=4, base=4)
    d = advance(pg, PeerObservation(out_installed=False), SETTINGS, now=5,
                key_used=lambda g: g <= 4, peer="p")
    assert d.keying is not None and d.keying.outbound == 5 and d.stepped


def test_rekeys_keep_the_last_generation_of_the_peer_window_in_reserve() -> None:
    pg = fresh()
    used: set[int] = {0}
    outs = []
    for t in range(3):
        pg.rekey_pending = True
        d = advance(pg, PeerObservation(out_installed=True, out_packets=1), SETTINGS, now=t,
                    key_used=used.__contains__, peer="p")
        assert d.keying is not None
        used.add(d.keying.outbound)
        outs.append(d.keying.outbound)
    assert outs == [1, 1, 1]  # the peer accepts 0..2 until it has surely seen us move
    assert pg.rekey_pending
    # VPP restarts: the key in use is burnt, and the reserve generation is still there.
    d = advance(pg, PeerObservation(out_installed=False), SETTINGS, now=5,
                key_used=used.__contains__, peer="p")
    assert d.keying is not None and d.keying.outbound == 2


def test_a_generation_burnt_mid_agreement_leaves_no_gap_at_the_key_limit() -> None:
    """An agent (or VPP) restart in the middle of an agreement burns the generation it
    offered: the next one is the reserve of the peer's window. The rekey is deferred
    (the peer has not slid), but the reserve is agreed meanwhile, and when the key in use
    reaches its hard limit the pair steps into it instead of failing closed."""
    settings = MeshSettings(rekey_interval=0, rekey_grace=10, key_max_seconds=60)
    pg = fresh(out=13, floor=13, base=13)
    pg.out_since = 0.0
    pg.ephemeral_out = [13, 14]
    used = {13, 14}.__contains__  # 14: offered by the agent before its restart
    seen = PeerObservation(out_installed=True, out_packets=10)
    d = advance(pg, seen, settings, now=31, key_used=used, peer="p", said=PeerSaid())
    assert d.keying is not None and d.keying.outbound == 13 and not d.stepped
    assert d.want == 15  # agreed ahead, not sent on
    d = advance(pg, seen, settings, now=61, key_used=used, peer="p",
                said=PeerSaid(keyed=frozenset({15})))
    assert d.keying is not None and d.keying.outbound == 15 and d.stepped, d.notes
    assert d.stopped is None


def test_a_key_at_its_hard_limit_may_take_the_reserve() -> None:
    """On the static schedule too (agents that never met): a key at its hard limit steps
    into the last generation the peer surely accepts rather than stopping the pair."""
    settings = MeshSettings(rekey_interval=0, rekey_grace=10, key_max_seconds=60)
    pg = fresh(out=13, floor=13, base=13)
    pg.out_since = 0.0
    d = advance(pg, PeerObservation(out_installed=True, out_packets=10), settings, now=61,
                key_used={13, 14}.__contains__, peer="p")
    assert d.keying is not None and d.keying.outbound == 15 and d.stepped, d.notes


def test_a_burnt_key_beyond_the_peer_window_fails_closed() -> None:
    pg = fresh(out=2, floor=0)
    d = advance(pg, PeerObservation(out_installed=False), SETTINGS, now=1,
                key_used=lambda g: g <= 2, peer="p")
    assert d.keying is None
    assert "dropped" in d.notes[-1]


def test_receiver_slides_only_after_the_grace_period() -> None:
    pg = fresh()
    seen = PeerObservation(inbound_active=frozenset({0, 1}))
    advance(pg, seen, SETTINGS, now=100, key_used=never, peer="p")
    assert pg.in_base == 0
    advance(pg, seen, SETTINGS, now=105, key_used=never, peer="p")
    assert pg.in_base == 0
    d = advance(pg, seen, SETTINGS, now=110, key_used=never, peer="p")
    assert pg.in_base == 1 and d.keying is not None and d.keying.inbound == (1, 2, 3)


def test_sender_floor_moves_only_after_traffic_for_twice_the_grace() -> None:
    pg = fresh(out=1, floor=0)

    def look(t: float, sent: int, received: int) -> None:
        advance(pg, PeerObservation(out_installed=True, out_packets=sent,
                                    inbound_seq={1: received}), SETTINGS, now=t,
                key_used=never, peer="p")

    look(0, 10, 5)  # first look: nothing to compare the peer's counter with yet
    look(1, 20, 9)  # both ways: evidence starts
    look(20, 30, 12)
    assert pg.floor == 0
    look(21, 40, 15)
    assert pg.floor == 1


def test_packets_sent_into_silence_are_no_evidence() -> None:
    """A peer failing closed (or gone) sends nothing back: we may not assume it moved."""
    pg = fresh(out=1, floor=0)
    for t in range(0, 100, 2):
        advance(pg, PeerObservation(out_installed=True, out_packets=10 * t, inbound_seq={1: 7}),
                SETTINGS, now=t, key_used=never, peer="p")
    assert pg.floor == 0
    idle = fresh(out=1, floor=0)
    for t in range(0, 100, 10):
        advance(idle, PeerObservation(out_installed=True), SETTINGS, now=t, key_used=never,
                peer="p")
    assert idle.floor == 0  # no traffic: no evidence that the peer moved


@pytest.mark.parametrize(("packets", "age", "stepped"), [
    (2**31, 0, True),  # half of the default 2^32 packets
    (2**31 - 1, 0, False),
    (0, 3.5 * 86400, True),  # half of key_max_seconds (7 days)
])
def test_key_limits_trigger_a_rekey_at_half(packets: int, age: float, stepped: bool) -> None:
    pg = fresh(since=0)
    d = advance(pg, PeerObservation(out_installed=True, out_packets=max(packets, 1)),
                SETTINGS, now=age, key_used=never, peer="p")
    assert d.stepped is stepped


def test_bytes_limit_counts_packets_at_the_underlay_mtu() -> None:
    settings = MeshSettings(rekey_interval=0, key_max_bytes=2**30)
    pg = fresh()
    d = advance(pg, PeerObservation(out_installed=True, out_packets=2**29 // 1500 + 1),
                settings, now=1, key_used=never, peer="p")
    assert d.stepped


def test_key_at_its_hard_limit_with_no_step_possible_fails_closed() -> None:
    pg = fresh(out=2, floor=0)
    d = advance(pg, PeerObservation(out_installed=True, out_packets=2**32), SETTINGS, now=1,
                key_used=never, peer="p")
    assert d.keying is None


def test_scheduled_rekey() -> None:
    settings = MeshSettings(rekey_interval=3600)
    pg = fresh(since=0)
    used = PeerObservation(out_installed=True, out_packets=5)
    assert not advance(pg, used, settings, now=3599, key_used=never, peer="p").stepped
    assert advance(pg, used, settings, now=3600, key_used=never, peer="p").stepped


def test_a_key_that_never_protected_a_packet_is_not_rotated_by_the_schedule() -> None:
    pg = fresh(since=0)
    d = advance(pg, PeerObservation(out_installed=True), MeshSettings(rekey_interval=3600),
                now=7200, key_used=never, peer="p")
    assert not d.stepped and not pg.rekey_pending and pg.out == 0


def test_an_operator_rekey_rotates_a_key_that_never_protected_a_packet() -> None:
    """`vppmesh rekey` after a suspected compromise is about the key, not its use."""
    pg = fresh(since=0)
    pg.rekey_pending = True
    d = advance(pg, PeerObservation(out_installed=True), MeshSettings(rekey_interval=3600),
                now=10, key_used=never, peer="p")
    assert d.stepped and pg.out == 1 and not pg.rekey_pending


def test_raising_key_epoch_moves_everything_forward() -> None:
    pg = fresh(out=1)
    d = advance(pg, PeerObservation(out_installed=True), MeshSettings(key_epoch=7), now=1,
                key_used=never, peer="p")
    assert d.keying is not None and d.keying.outbound == 7 and d.keying.inbound == (7, 8, 9)


def test_rekey_interval_must_be_below_key_lifetime() -> None:
    with pytest.raises(ValueError, match="rekey_interval"):
        MeshSettings(rekey_interval=100, key_max_seconds=100)


def test_generation_file_is_private_and_edits_are_refused(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path, "n")
    state = store.load()
    state.peers["p"] = fresh()
    store.save(state)
    assert store.path.stat().st_mode & 0o777 == 0o600
    assert store.load().peers["p"].out == 0
    store.path.write_text('{"peers": {"p": {"out": "x"}}}')
    with pytest.raises(ConfigError, match="must not be edited"):
        store.load()


# ---- two agents, two fake VPPs ------------------------------------------------------

def test_vpp_restart_steps_to_a_generation_the_peer_already_accepts(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    pair.run("node1", 0)
    pair.run("node2", 0)
    assert pair.link_ok("node1", "node2") and pair.link_ok("node2", "node1")
    pair.restart_vpp("node1")
    result = pair.run("node1", 1)
    assert any("0 -> 1" in n for n in result.notes)
    assert pair.out_generation("node1") == {1}
    assert pair.link_ok("node1", "node2")  # node2 was not touched and accepts it
    # An agent restart against the VPP that holds the mesh changes nothing.
    assert pair.run("node1", 2).changes == []
    assert pair.run("node2", 2).changes == []


def test_many_rekeys_under_traffic_never_break_the_pair(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    now = 0.0
    pair.run("node1", now)
    pair.run("node2", now)
    pair.traffic("node1", "node2")
    generations = []
    for _ in range(8):
        pair.run("node1", now, rekey=True)
        for _tick in range(12):  # 2 s polls for 24 s: the receiver follows, the sender learns
            now += 2
            pair.traffic("node1", "node2")
            pair.traffic("node2", "node1")
            pair.run("node2", now)
            pair.run("node1", now)
            assert pair.link_ok("node1", "node2") and pair.link_ok("node2", "node1")
        generations.append(pair.out_generation("node1"))
    assert generations == [{g} for g in range(1, 9)]
    # Old SAs are gone: the receiver holds one window of inbound SAs per tunnel.
    inbound = [s for s in pair.vpp["node2"].sas.values()
               if not s["entry"]["sad_id"] & SA_DIRECTION_BIT]
    assert len(inbound) == WINDOW * 2


def test_restart_of_either_side_and_rejoin_keep_the_pair_working(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    now = 0.0
    for name in ("node1", "node2"):
        pair.run(name, now)
    for victim in ("node1", "node2", "node1", "node2", "node1"):
        pair.restart_vpp(victim)
        for _tick in range(12):
            now += 2
            pair.run("node1", now)
            pair.run("node2", now)
            pair.traffic("node1", "node2")
            pair.traffic("node2", "node1")
        assert pair.link_ok("node1", "node2") and pair.link_ok("node2", "node1")
    # Every outbound key node1 ever installed was fresh (the reconcile guard never fired).
    assert pair.out_generation("node1") == {3}
