"""Forward secrecy in the agent (vppmesh/secrecy.py): the scheduler's rules with what the
peer's agent said (epochs.PeerSaid), then two agents end to end on fake VPPs whose punt
paths are joined (fake_punt.PuntRelay), then hostile datagrams into an agent's socket.

`pytest -k forward_secrecy` selects the scheduler and two-agent tests, `-k channel` the
hostile ones."""

from __future__ import annotations

import base64
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
from conftest import make_mesh
from fake_vpp import FakeVpp

from vppmesh.config import MeshSettings
from vppmesh.epochs import (
    WINDOW,
    GenerationState,
    PeerGenerations,
    PeerObservation,
    PeerSaid,
    advance,
    initial,
    schedule,
)
from vppmesh.keys import load_secrets
from vppmesh.ledger import KeyLedger
from vppmesh.node import observe_keys
from vppmesh.secrecy import KeyBook
from vppmesh.view import build_view

SETTINGS = MeshSettings(rekey_interval=0, rekey_grace=10)
INSTALLED = PeerObservation(out_installed=True, out_packets=100)
LOST = PeerObservation(out_installed=False)  # VPP restarted: the SAs are gone


def fresh(out: int = 0, floor: int = 0, base: int = 0, since: float = 0.0,
          ephemeral_out: tuple[int, ...] = ()) -> PeerGenerations:
    return PeerGenerations(public_key="k", out=out, out_since=since, floor=floor, in_base=base,
                           ephemeral_out=list(ephemeral_out))


def used_up_to(last: int):  # type: ignore[no-untyped-def]
    return lambda g: g <= last


# ---- the scheduler with a channel ---------------------------------------------------------

def test_forward_secrecy_static_pair_agrees_the_next_generation_before_stepping() -> None:
    pg = fresh()
    for said in (PeerSaid(), PeerSaid(keyed=frozenset({1})), PeerSaid(installed=1),
                 PeerSaid(keyed=frozenset({2}), installed=2)):
        d = advance(pg, PeerObservation(out_installed=True), SETTINGS, now=1,
                    key_used=used_up_to(0), peer="p", said=said)
        # Upgraded at once (even a key that never protected a packet), but only by
        # agreement: generation 1, still sending on 0 meanwhile.
        assert d.want == 1 and not d.stepped and not d.waiting
        assert d.keying is not None and d.keying.outbound == 0
        assert pg.out == 0
    d = advance(pg, PeerObservation(out_installed=True), SETTINGS, now=2,
                key_used=used_up_to(0), peer="p",
                said=PeerSaid(keyed=frozenset({1}), installed=1))
    assert d.stepped and d.want is None and d.keying is not None and d.keying.outbound == 1
    assert any("0 -> 1" in n and "forward secrecy" in n for n in d.notes)


def test_forward_secrecy_agreed_pair_is_not_upgraded_again() -> None:
    pg = fresh(out=1, floor=1, base=1, ephemeral_out=(1,))
    d = advance(pg, PeerObservation(out_installed=True), SETTINGS, now=1,
                key_used=used_up_to(1), peer="p", said=PeerSaid(keyed=frozenset({1})))
    assert d.want is None and not d.stepped and d.keying is not None
    assert d.keying.outbound == 1


def test_forward_secrecy_burnt_key_waits_for_agreement_instead_of_a_static_key() -> None:
    pg = fresh(out=1, floor=1, base=1, ephemeral_out=(1,))
    d = advance(pg, LOST, SETTINGS, now=1, key_used=used_up_to(1), peer="p",
                said=PeerSaid(keyed=frozenset({1}), installed=1))
    assert d.keying is None and d.waiting and d.want == 2 and not d.stepped
    assert pg.out == 1  # not stepped to generation 2's static key
    # The scheduler reports the peer as waiting, not blocked, and asks for generation 2.
    state = GenerationState(peers={"p": fresh(out=1, floor=1, base=1, ephemeral_out=(1,))})
    out = schedule(state, SETTINGS, {"p": "k"}, {"p": LOST}, now=1,
                   key_used=lambda _n, g: g <= 1,
                   said={"p": PeerSaid(keyed=frozenset({1}), installed=1)})
    assert out.keying == {} and out.waiting == {"p"} and out.wants == {"p": 2}
    # Once agreed and installed by the peer, it steps.
    d = advance(pg, LOST, SETTINGS, now=2, key_used=used_up_to(1), peer="p",
                said=PeerSaid(keyed=frozenset({1, 2}), installed=2))
    assert d.stepped and d.keying is not None and d.keying.outbound == 2 and not d.waiting


def test_forward_secrecy_without_a_channel_a_burnt_key_steps_at_once() -> None:
    pg = fresh(out=1, floor=1, base=1)
    d = advance(pg, LOST, SETTINGS, now=1, key_used=used_up_to(1), peer="p")
    assert d.stepped and d.keying is not None and d.keying.outbound == 2
    assert d.want is None and not d.waiting


def test_forward_secrecy_slid_is_the_floor() -> None:
    pg = fresh(out=1, floor=0)
    pg.rekey_pending = True
    # Floor 0: a voluntary step to 2 would spend the reserve generation: deferred.
    d = advance(pg, INSTALLED, SETTINGS, now=1, key_used=used_up_to(1), peer="p",
                said=PeerSaid())
    assert d.want is None and not d.stepped and pg.rekey_pending
    assert any("deferred" in n for n in d.notes)
    # The peer says it slid to 1: the floor rises without any traffic evidence.
    d = advance(pg, INSTALLED, SETTINGS, now=2, key_used=used_up_to(1), peer="p",
                said=PeerSaid(slid=1))
    assert pg.floor == 1 and d.want == 2
    # A "slid" past what we send on is not believed (a stale or confused peer).
    other = fresh(out=1, floor=0)
    advance(other, INSTALLED, SETTINGS, now=1, key_used=used_up_to(1), peer="p",
            said=PeerSaid(slid=5))
    assert other.floor == 0


def test_forward_secrecy_sending_lets_the_receiver_slide_without_traffic() -> None:
    pg = fresh()
    said = PeerSaid(sending=(1, 100.0))
    advance(pg, PeerObservation(), SETTINGS, now=100, key_used=never, peer="p", said=said)
    assert pg.in_base == 0 and pg.in_seen == 1
    advance(pg, PeerObservation(), SETTINGS, now=109, key_used=never, peer="p", said=said)
    assert pg.in_base == 0
    d = advance(pg, PeerObservation(), SETTINGS, now=110, key_used=never, peer="p", said=said)
    assert pg.in_base == 1 and d.keying is not None and d.keying.inbound == (1, 2, 3)
    # Without the word (and without traffic) nothing slides.
    silent = fresh()
    for t in (100, 110, 200):
        advance(silent, PeerObservation(), SETTINGS, now=t, key_used=never, peer="p",
                said=PeerSaid())
    assert silent.in_base == 0
    # A generation outside the window is not followed.
    far = fresh()
    advance(far, PeerObservation(), SETTINGS, now=100, key_used=never, peer="p",
            said=PeerSaid(sending=(WINDOW, 100.0)))
    advance(far, PeerObservation(), SETTINGS, now=200, key_used=never, peer="p",
            said=PeerSaid(sending=(WINDOW, 100.0)))
    assert far.in_base == 0 and far.in_seen is None


def never(_g: int) -> bool:
    return False


def test_forward_secrecy_peer_restart_requests_a_rekey() -> None:
    pg = fresh(out=1, floor=1, base=1, ephemeral_out=(1,))
    d = advance(pg, INSTALLED, SETTINGS, now=1, key_used=used_up_to(1), peer="p",
                said=PeerSaid(keyed=frozenset({1}), restarted=True))
    assert d.want == 2 and pg.rekey_pending and "rekey requested" in d.notes[0]
    # Kept until done: the next run (restart no longer said) still wants it.
    d = advance(pg, INSTALLED, SETTINGS, now=2, key_used=used_up_to(1), peer="p",
                said=PeerSaid(keyed=frozenset({1})))
    assert d.want == 2
    d = advance(pg, INSTALLED, SETTINGS, now=3, key_used=used_up_to(1), peer="p",
                said=PeerSaid(keyed=frozenset({1, 2}), installed=2))
    assert d.stepped and pg.out == 2 and not pg.rekey_pending


class Receiver:
    """The receiving node's agent in the pure simulation below: its own generations for
    the sender, and what it says from what the sender said: "installed", the highest
    generation of its window whose agreed key it holds (secrecy.Secrecy.applied), and
    "slid", its window base."""

    def __init__(self) -> None:
        self.pg = fresh()

    def run(self, now: float, sending: tuple[int, float] | None,
            keyed: set[int]) -> PeerSaid:
        d = advance(self.pg, PeerObservation(), SETTINGS, now=now, key_used=never, peer="s",
                    said=PeerSaid(sending=sending))
        assert d.keying is not None
        agreed = set(d.keying.inbound) & keyed
        return PeerSaid(installed=max(agreed, default=None), slid=self.pg.in_base)


@pytest.mark.parametrize("channel", [True, False])
def test_forward_secrecy_vpp_restarts_without_traffic_keep_the_pair(channel: bool) -> None:
    """The sender's VPP restarts again and again, no traffic ever flows: with the peer's
    agent answering ("installed", "slid"; the sender's "sending") the pair never fails
    closed; on inference alone it does, at the third restart."""
    sender, receiver = fresh(), Receiver()
    used: set[int] = {0}  # the ledger: every outbound key VPP ever held
    keyed: set[int] = set()  # generations the channel agreed
    heard = PeerSaid()
    sending: tuple[int, float] | None = None
    held: int | None = 0  # the outbound generation VPP holds
    now = 0.0
    outcome = []
    for _restart in range(6):
        held = None  # VPP restarted: its SAs are gone, the key in use is burnt
        failed = False
        for _tick in range(12):  # 2 s polls, 24 s between restarts
            now += 2
            said = PeerSaid(keyed=frozenset(keyed), installed=heard.installed,
                            slid=heard.slid) if channel else None
            d = advance(sender, PeerObservation(out_installed=held == sender.out), SETTINGS,
                        now=now, key_used=used.__contains__, peer="r", said=said)
            if d.want is not None:
                keyed.add(d.want)  # the channel agrees it (the offer's answer arrives)
                if d.want not in sender.ephemeral_out:  # Secrecy.claim
                    sender.ephemeral_out.append(d.want)
            if d.keying is None and not d.waiting:
                failed = True
                break
            if d.keying is not None:
                held = d.keying.outbound
                used.add(held)
                if sending is None or sending[0] != held:
                    sending = (held, now)
            heard = receiver.run(now, sending if channel else None, keyed)
        outcome.append(failed)
        if failed:
            break
    if channel:
        assert outcome == [False] * 6 and sender.out == 6 and receiver.pg.in_base == 6
    else:
        assert outcome == [False, False, True]


def test_forward_secrecy_without_said_the_static_schedule_is_unchanged() -> None:
    """No channel to a peer (`said` None, or a mapping without it): no wants, nothing
    waits, nothing is marked agreed, a burnt key steps at once."""
    for said in (None, {}, {"other": PeerSaid(restarted=True)}):
        state = GenerationState(peers={"p": fresh(out=1, floor=1, base=1)})
        out = schedule(state, SETTINGS, {"p": "k"}, {"p": LOST}, now=1,
                       key_used=lambda _n, g: g <= 1, said=said)
        assert out.keying["p"].outbound == 2 and out.wants == {} and out.waiting == set()
        assert state.peers["p"].ephemeral_out == [] and not state.peers["p"].rekey_pending


def test_forward_secrecy_schedule_forgets_retired_agreed_generations() -> None:
    pg = fresh(out=2, floor=2, base=2, ephemeral_out=(1, 2, 3))
    pg.ephemeral_in = [0, 1, 2, 3]
    state = GenerationState(peers={"p": pg})
    schedule(state, SETTINGS, {"p": "k"}, {"p": INSTALLED}, now=1,
             key_used=lambda _n, g: g <= 2, said={"p": PeerSaid(keyed=frozenset({2}))})
    assert pg.ephemeral_out == [2, 3] and pg.ephemeral_in == [2, 3]


# ---- used keys: agreed generations are never used with their static key ---------------------

@pytest.fixture
def pair_view(tmp_path: Path) -> Iterator[NS]:
    mesh, secrets = make_mesh(2, 2, rekey_interval=0, rekey_grace=10)
    key = tmp_path / "node1.key"
    from vppmesh.keys import private_key_b64, write_secret_file

    write_secret_file(key, private_key_b64(secrets["node1"].private_key))
    view = build_view(mesh, "node1", load_secrets(key, None))
    yield NS(view=view, vpp=FakeVpp.with_uplink(mesh.node("node1").primary),
             ledger=KeyLedger(tmp_path / "used.json"), mesh=mesh)


def test_forward_secrecy_claimed_generation_without_a_key_counts_as_used(pair_view: NS) -> None:
    view = pair_view.view
    peer = view.peer("node2")
    state = GenerationState(peers={"node2": initial(peer.node.public_key, view.settings, 0)})
    state.peers["node2"].ephemeral_out = [1]  # offered before an agent restart, never answered
    book = KeyBook()
    _, key_used = observe_keys(pair_view.vpp, view, state, pair_view.ledger, book)
    assert key_used("node2", 1)  # nobody holds its key: it is never installed statically
    assert not key_used("node2", 2) and not key_used("node2", 0)
    assert book.key(view, peer, state.peers["node2"], outbound=True, tunnel=0,
                    generation=1) is None

    class Offering:
        def offering(self, number: int, generation: int) -> bool:
            return (number, generation) == (2, 1)

    _, key_used = observe_keys(pair_view.vpp, view, state, pair_view.ledger, book,
                               Offering())  # type: ignore[arg-type]
    assert not key_used("node2", 1)  # its offer is under way: the step waits for it
    # The scheduler, after a VPP restart burnt generation 0, skips 1 for 2 (no channel).
    observations, key_used = observe_keys(pair_view.vpp, view, state, pair_view.ledger, book)
    out = schedule(state, view.settings, {"node2": peer.node.public_key}, observations,
                   now=1, key_used=lambda n, g: g == 0 or key_used(n, g))
    assert out.keying["node2"].outbound == 2


def key_text_forms(key: bytes) -> list[bytes]:
    """How a key could appear in a file: raw, hex (both cases), base64 (both alphabets)."""
    return [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key),
            base64.urlsafe_b64encode(key), base64.b64encode(key).rstrip(b"=")]


def short_tmp() -> Path:
    """A directory for unix sockets (their paths must stay under 107 bytes)."""
    return Path(tempfile.mkdtemp(dir="/tmp", prefix="vfs-"))
