"""Key generations against times from the future: a generation file written before the
clock went back (another boot's anchor, an older vppmesh on the wall clock) must neither
stall a key's rotation nor stretch it past its limits; and every run is on the node's
clock (vppmesh/agent/clock.py), one-shot `up` included."""

from __future__ import annotations

import json
import time
from pathlib import Path

from vppmesh.agent.clock import boot_id
from vppmesh.agent.node import up
from vppmesh.config import MeshSettings
from vppmesh.keying.agreement import NoAgreement
from vppmesh.keying.epochs import PeerObservation, PeerSaid, advance, age
from vppmesh.testing.agents import Pair, fresh, never

HOUR = 3600.0
NOW = 50_000.0
USED = PeerObservation(out_installed=True, out_packets=5)


def test_age_never_negative() -> None:
    assert age(10.0, 4.0) == 6.0 and age(10.0, 10.0 + HOUR) == 0.0


def test_a_key_started_in_the_future_still_rekeys_on_schedule() -> None:
    """Its age restarts at `now` (once), rather than waiting an hour for the clock."""
    settings = MeshSettings(rekey_interval=600, rekey_grace=10)
    pg = fresh(since=NOW + HOUR)
    assert not advance(pg, USED, settings, now=NOW, key_used=never, peer="p").stepped
    assert pg.out_since == NOW
    d = advance(pg, USED, settings, now=NOW + 600, key_used=never, peer="p")
    assert d.stepped and pg.out == 1


def test_a_key_started_in_the_future_still_reaches_its_hard_limit() -> None:
    """No step possible (the peer has not followed the last one): at key_max_seconds
    after the clock went back, the peer fails closed, not an hour later."""
    settings = MeshSettings(rekey_interval=0, rekey_grace=10, key_max_seconds=7200)
    pg = fresh(out=2, floor=0, since=NOW + HOUR)
    assert advance(pg, USED, settings, now=NOW, key_used=never, peer="p").keying is not None
    d = advance(pg, USED, settings, now=NOW + 7200, key_used=never, peer="p")
    assert d.keying is None


def test_the_receiver_slides_after_its_grace_whatever_the_file_says() -> None:
    settings = MeshSettings(rekey_interval=0, rekey_grace=10)
    pg = fresh()
    pg.in_seen, pg.in_seen_at = 1, NOW + HOUR  # seen "in the future"
    advance(pg, USED, settings, now=NOW, key_used=never, peer="p")
    advance(pg, USED, settings, now=NOW + 10, key_used=never, peer="p")
    assert pg.in_base == 1


def test_the_senders_word_from_the_future_lets_the_receiver_slide_after_its_grace() -> None:
    settings = MeshSettings(rekey_interval=0, rekey_grace=10)
    pg = fresh()
    said = PeerSaid(sending=(1, NOW + HOUR))
    advance(pg, USED, settings, now=NOW, key_used=never, peer="p", said=said)
    advance(pg, USED, settings, now=NOW + 10, key_used=never, peer="p", said=said)
    assert pg.in_base == 1


def test_sender_floor_evidence_from_the_future_counts_after_twice_the_grace() -> None:
    settings = MeshSettings(rekey_interval=0, rekey_grace=10)
    pg = fresh(out=1, floor=0)
    pg.out_sent_at = NOW + HOUR
    advance(pg, USED, settings, now=NOW, key_used=never, peer="p")
    advance(pg, USED, settings, now=NOW + 20, key_used=never, peer="p")
    assert pg.floor == 1


def test_a_one_shot_up_runs_on_the_nodes_clock(tmp_path: Path) -> None:
    """`up` without `now` (the CLI's `up` and `rekey`) reads the node's clock, whose
    anchor it keeps in the state directory for every later process of this boot."""
    pair = Pair(tmp_path)
    before = time.time()
    up(pair.opts["node1"], api=pair.vpp["node1"], agreement=NoAgreement(pair.opts["node1"].clock))
    anchor = json.loads((tmp_path / "node1" / "node1.clock.json").read_text())
    assert anchor["boot_id"] == boot_id()
    since = pair.opts["node1"].generations.load().peers["node2"].out_since
    assert before - 1 <= since <= time.time() + 1


def test_pairs_started_together_rotate_apart_and_never_later_than_the_interval() -> None:
    """A node that starts with 1000 peers used to rotate every pair's key in the same run,
    every rekey_interval: a burst of key exchanges and SA changes. Each pair's first
    rotation now falls at its own point of the interval's second half (derived from the
    two public keys: the same on every run), and none comes later than the interval."""
    from vppmesh.keying.epochs import GenerationState, schedule

    settings = MeshSettings(rekey_interval=120, rekey_grace=10)
    peers = {f"p{i}": f"key{i}" for i in range(200)}

    def first_rotations() -> dict[str, float]:
        state = GenerationState()
        rotated: dict[str, float] = {}
        now = NOW
        while now <= NOW + 120:
            observations = {n: USED for n in peers}
            schedule(state, settings, peers, observations, now=now, key_used=lambda n, g: False,
                     me="mine")
            rotated.update({n: now for n, pg in state.peers.items()
                            if pg.out > 0 and n not in rotated})
            now += 2  # the agent's poll
        return rotated

    rotated = first_rotations()
    assert set(rotated) == set(peers)  # every pair rotated within the interval
    assert all(NOW + 60 <= at <= NOW + 120 for at in rotated.values())
    assert len(set(rotated.values())) >= 25  # spread over the second half's 30 polls
    assert max(list(rotated.values()).count(at) for at in rotated.values()) <= 20
    assert first_rotations() == rotated  # deterministic per pair
