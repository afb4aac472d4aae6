"""Forward secrecy in the agent (vppmesh/agent/secrecy.py): the scheduler's rules with what the
peer's agent said (epochs.PeerSaid), then two agents end to end on fake VPPs whose punt
paths are joined (fake_punt.PuntRelay), then hostile datagrams into an agent's socket.

`pytest -k forward_secrecy` selects them all, `-k channel` the hostile ones (with the
channel's own tests)."""

from __future__ import annotations

import base64
import itertools
import select
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from vppmesh.agent.clock import TimestampFile
from vppmesh.agent.node import UpResult
from vppmesh.channel import messages as m
from vppmesh.channel import session as s
from vppmesh.channel.endpoint import PORT
from vppmesh.channel.messages import Drop
from vppmesh.channel.noise import public_bytes
from vppmesh.channel.transport import build_packet
from vppmesh.config import MeshSettings, dump_mesh
from vppmesh.dataplane.state import SA_DIRECTION_BIT, sa_peer
from vppmesh.dataplane.view import build_view
from vppmesh.errors import VppMeshError
from vppmesh.keying.book import KeyBook
from vppmesh.keying.channel_agreement import KEY_VOUCH_WAIT
from vppmesh.keying.epochs import (
    WINDOW,
    GenerationState,
    PeerObservation,
    PeerSaid,
    advance,
    initial,
    schedule,
)
from vppmesh.keying.keys import (
    NodeSecrets,
    load_secrets,
    private_key_b64,
    public_key_b64,
    write_secret_file,
)
from vppmesh.keying.ledger import KeyLedger
from vppmesh.keying.observe import observe_keys
from vppmesh.testing.agents import Agents, Pair, fresh, never, short_tmp, static_keys
from vppmesh.testing.fake_punt import PuntRelay, punted
from vppmesh.testing.fake_vpp import FakeVpp
from vppmesh.testing.meshes import make_mesh

SETTINGS = MeshSettings(rekey_interval=0, rekey_grace=10)
INSTALLED = PeerObservation(out_installed=True, out_packets=100)
LOST = PeerObservation(out_installed=False)  # VPP restarted: the SAs are gone


def used_up_to(last: int) -> Callable[[int], bool]:
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
    # The scheduler, after a VPP restart burnt generation 0, skips 1 for 2 (no channel),
    # with `forward_secrecy: preferred`; `required` (the default) stops the pair instead:
    # its agents met (an offer was made), so no static key may follow.
    observations, key_used = observe_keys(pair_view.vpp, view, state, pair_view.ledger, book)
    preferred = view.settings.model_copy(update={"forward_secrecy": "preferred"})
    out = schedule(state.model_copy(deep=True), preferred, {"node2": peer.node.public_key},
                   observations, now=1, key_used=lambda n, g: g == 0 or key_used(n, g))
    assert out.keying["node2"].outbound == 2 and out.downgraded == {"node2"}
    out = schedule(state, view.settings, {"node2": peer.node.public_key}, observations,
                   now=1, key_used=lambda n, g: g == 0 or key_used(n, g))
    assert "node2" not in out.keying and out.stopped == {"node2": "no agreement"}
    assert state.peers["node2"].out == 0


def key_text_forms(key: bytes) -> list[bytes]:
    """How a key could appear in a file: raw, hex (both cases), base64 (both alphabets)."""
    return [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key),
            base64.urlsafe_b64encode(key), base64.b64encode(key).rstrip(b"=")]


# ---- two agents on fake VPPs, their punt paths joined ------------------------------------

@pytest.fixture
def agents() -> Iterator[Agents]:
    pair = Agents()
    yield pair
    pair.close()


def out_generation(agents: Agents, name: str) -> set[int]:
    return {spi & 0xF for spi in agents.sas(name, True)}


def test_forward_secrecy_two_agents_move_to_agreed_keys(agents: Agents) -> None:
    agents.step()
    assert not agents.forward_secret()  # first runs: static keys, the channel not up yet
    assert all(agents.link_ok(a, b) for a, b in (("node1", "node2"), ("node2", "node1")))
    agents.until(agents.forward_secret, "both pairs on agreed keys")
    for name, peer in (("node1", "node2"), ("node2", "node1")):
        result = agents.results[name]
        assert result.secrecy[peer].forward_secret and not result.waiting_peers
        assert not result.blocked_peers
        # The SAs of the generations in use, both ways, are not on the static schedule.
        pg = agents.generations(name).peers[peer]
        arriving = pg.in_seen if pg.in_seen is not None else pg.in_base
        for outbound, generation in ((True, pg.out), (False, arriving)):
            static = static_keys(agents, name, peer, outbound)
            used = {spi: key for spi, (key, _) in agents.sas(name, outbound, peer).items()
                    if spi & 0xF == generation}
            assert len(used) == 2 and all(key != static[spi] for spi, key in used.items())
    # Both receivers slide to the agreed generation; the static generation 0 is gone.
    agents.until(lambda: agents.slid(1), "both windows slid to generation 1")
    assert agents.forward_secret()
    # Only agreed inbound SAs (`forward_secrecy: required`): generations 2 and 3 of the
    # window get theirs once agreed, never a static key beforehand.
    assert {spi & 0xF for spi in agents.sas("node2", False)} == {1}
    static = static_keys(agents, "node2", "node1", False)
    assert all(static[spi] != key for spi, (key, _) in agents.sas("node2", False).items())
    assert out_generation(agents, "node1") == {1}


def test_forward_secrecy_three_agents_agree_every_pair_apart() -> None:
    agents = Agents(3)
    try:
        agents.until(agents.forward_secret, "every pair on agreed keys")
        agents.until(lambda: agents.slid(1), "every window slid to generation 1")
        assert agents.forward_secret()
        for name in agents.names:
            peers = [p for p in agents.names if p != name]
            # The same SPIs towards both peers, each pair with keys of its own.
            one, two = (agents.sas(name, True, p) for p in peers)
            assert one.keys() == two.keys()
            assert all(one[spi][0] != two[spi][0] for spi in one)
    finally:
        agents.close()


def test_forward_secrecy_retired_generations_leave_no_key_anywhere(agents: Agents) -> None:
    agents.until(lambda: agents.slid(1), "both pairs agreed and slid")
    sender, receiver = agents.secrecy["node1"], agents.secrecy["node2"]
    assert sender.channel is not None and receiver.channel is not None
    one = {"sender": sender.agreement.book.keys(2, True, 1),
           "receiver": receiver.agreement.book.keys(1, False, 1)}
    assert one["sender"] == one["receiver"] and one["sender"] is not None
    secret = sender.channel.generation_secret(2, 1, outbound=True)
    assert secret is not None and secret == receiver.channel.generation_secret(1, 1,
                                                                                outbound=False)
    spent = {key for key, _ in agents.sas("node1", True).values()} | {secret}
    agents.run("node1", rekey=True)
    assert any("agreeing generation 2" in n for n in agents.results["node1"].notes)
    agents.until(lambda: agents.generations("node2").peers["node1"].in_base == 2,
                 "node2 slid to node1's generation 2")
    agents.step()
    assert out_generation(agents, "node1") == {2} and agents.forward_secret()
    # Generation 1 of node1 -> node2 is gone from both books, both channels, both VPPs.
    assert sender.agreement.book.keys(2, True, 1) is None
    assert receiver.agreement.book.keys(1, False, 1) is None
    assert sender.channel.generation_secret(2, 1, outbound=True) is None
    assert receiver.channel.generation_secret(1, 1, outbound=False) is None
    assert not any(key in spent for key, _ in agents.sas("node1", True).values())
    assert not any(key in spent for key, _ in agents.sas("node2", False).values())
    assert sender.channel.held_private_keys() == 0  # answered offers keep no private key
    # Nothing on disk holds a key in any form: neither the spent generation's, nor the
    # ones in use, nor the channel's secrets.
    live = {key for n in agents.names for o in (True, False)
            for key, _ in agents.sas(n, o).values()}
    secrets = {s for n, p in (("node1", 2), ("node2", 1)) for g in range(16) for o in (True, False)
               if (s := agents.secrecy[n].channel.generation_secret(p, g, outbound=o))}  # type: ignore[union-attr]
    files = [f for f in agents.dir.rglob("*") if f.is_file()]
    assert any(f.name.endswith(".generations.json") for f in files)
    for path in files:
        data = path.read_bytes()
        for key in spent | live | secrets:
            assert not any(form in data for form in key_text_forms(key)), path


def sa_snapshot(vpp: FakeVpp) -> dict[int, tuple[int, bytes, int]]:
    return {sa_id: (s["entry"]["spi"], bytes(s["entry"]["crypto_key"]["data"]),
                    s["entry"]["salt"]) for sa_id, s in vpp.sas.items()}


def test_forward_secrecy_receiver_vpp_restart_makes_the_sender_rekey_at_once(
        agents: Agents) -> None:
    agents.until(lambda: agents.slid(1), "both pairs agreed and slid")
    agents.step()  # traffic on generation 1 both ways
    agents.restart_vpp("node2")
    restarted = agents.run("node2")  # reconnects, punts again, tells node1
    # Its own outbound key is burnt: it waits for a new agreed one, never a static key
    # (meanwhile the pair has no tunnel there: protection needs an outbound SA).
    assert restarted.waiting_peers == ["node1"] and not restarted.blocked_peers
    assert not agents.sas("node2", True) and not agents.vpp("node2").tunnels
    agents.settle()
    sender = agents.run("node1")  # the very next run
    assert any("agreeing generation 2" in n and "rekey requested" in n for n in sender.notes)
    agents.settle()
    again = agents.run("node2")  # its offer was answered and installed by node1
    assert not again.waiting_peers and out_generation(agents, "node2") == {2}
    assert agents.link_ok("node2", "node1") and agents.link_ok("node1", "node2")
    agents.settle()
    agents.run("node1")  # node2 said its inbound generation 2 is installed
    assert out_generation(agents, "node1") == {2}
    assert agents.link_ok("node1", "node2") and agents.forward_secret()


def test_forward_secrecy_restart_is_announced_once_vpp_holds_the_mesh(
        agents: Agents) -> None:
    """A restarted VPP without its uplink address yet (the host gives it back after VPP
    starts) can send nothing: the announcement waits for the run that programs VPP
    instead of dying there and waiting for a retry."""
    agents.until(lambda: agents.slid(1), "both pairs agreed and slid")
    vpp = agents.restart_vpp("node2")
    uplink = dict(vpp.addresses)
    vpp.addresses.clear()
    with pytest.raises(VppMeshError, match="primary underlay address"):
        agents.run("node2")
    sent = len(agents.relay.relayed)
    agents.settle()
    assert agents.relay.relayed[sent:] == []  # nothing announced from an unprogrammed VPP
    vpp.addresses.update(uplink)
    agents.run("node2")
    agents.settle()
    assert {r.sender for r in agents.relay.relayed[sent:]} == {"node1", "node2"}
    sender = agents.run("node1")
    assert any("agreeing generation 2" in n and "rekey requested" in n for n in sender.notes)


def test_forward_secrecy_agent_restart_adopts_what_vpp_holds(agents: Agents) -> None:
    agents.until(lambda: agents.slid(1), "both pairs agreed and slid")
    agents.step()
    held = sa_snapshot(agents.vpp("node1"))
    agents.start_agent("node1")  # a new process: no key book, no channel state
    first = agents.run("node1")
    assert first.changes == [] and sa_snapshot(agents.vpp("node1")) == held
    assert first.secrecy["node2"].forward_secret
    # The peer sees a new agent, not a new VPP: nobody rekeys, nothing changes.
    for _ in range(12):
        agents.step()
        assert agents.results["node1"].changes == [] == agents.results["node2"].changes
    assert sa_snapshot(agents.vpp("node1")) == held
    assert agents.forward_secret()
    # The adopted keys are the agreed ones, and the pair can still rekey by agreement.
    assert agents.secrecy["node1"].agreement.book.keys(2, True, 1) is not None
    agents.run("node1", rekey=True)
    agents.until(lambda: agents.generations("node2").peers["node1"].in_base == 2,
                 "node2 slid to node1's generation 2")
    assert out_generation(agents, "node1") == {2} and agents.forward_secret()


def test_forward_secrecy_a_new_public_key_drops_the_keys_agreed_under_the_old_one(
        agents: Agents) -> None:
    """node2's private key leaked and the operator gives node2 a new one (no KEY.previous:
    not a rotation). Every key node1 agreed with "node2" was authenticated by the leaked
    key only, so it may have been agreed with the attacker: node2's agent, authenticated
    by its new key, never vouches for the old one, so within KEY_VOUCH_WAIT none of them
    stays in node1's book or VPP."""
    agents.until(lambda: agents.slid(1), "both pairs agreed and slid")
    agents.step()
    book = agents.secrecy["node1"].agreement.book
    agreed = {k.key.get_secret_value() for o in (True, False) for g in range(16)
              if (keys := book.keys(2, o, g)) is not None for k in keys}
    assert agreed
    new_key = X25519PrivateKey.generate()
    write_secret_file(agents.options["node2"].private_key, private_key_b64(new_key),
                      force=True)
    nodes = [n.model_copy(update={"public_key": public_key_b64(new_key)})
             if n.name == "node2" else n for n in agents.mesh.nodes]
    agents.mesh_file.write_text(dump_mesh(agents.mesh.model_copy(update={"nodes": nodes})))
    agents.clock.now += 1
    agents.run("node1")
    for _ in range(int(KEY_VOUCH_WAIT // 5) + 1):  # both agents run: node2 never vouches
        agents.clock.now += 5
        agents.run("node2")
        agents.run("node1")
    assert agents.secrecy["node1"].agreement.unvouched == 1
    assert not any(book.keys(2, o, g) for o in (True, False) for g in range(16))
    installed = {key for o in (True, False) for key, _ in agents.sas("node1", o, "node2").values()}
    assert installed and not installed & agreed



# ---- hostile datagrams into an agent's socket ----------------------------------------------

def channel_frame(source: str, destination: str, payload: bytes) -> bytes:
    """A channel datagram as node `destination`'s VPP punts it, from `source`."""
    return punted(build_packet((source, PORT), (destination, PORT), payload))


def hostile_frames(agents: Agents, target: str, peer: str) -> dict[Drop, list[bytes]]:
    """Datagrams an attacker can make from what crossed the wire between `peer` and
    `target` (all recorded by the relay), by the drop reason each must get."""
    me, other = agents.number(target), agents.number(peer)
    src = str(agents.mesh.node(peer).primary.ip)
    dst = str(agents.mesh.node(target).primary.ip)
    heard = [r.payload for r in agents.relay.relayed if (r.sender, r.receiver) == (peer, target)]
    transports = [p for p in heard if p[1] == m.DatagramType.TRANSPORT]
    responses = [p for p in heard if p[1] == m.DatagramType.RESPONSE]
    # Its handshake Init (or, if the target initiated, the target's, turned round).
    inits = [p for p in heard if p[1] == m.DatagramType.INIT] or [
        m.HEADER.pack(m.VERSION, m.DatagramType.INIT, other, me) + r.payload[m.HEADER.size:]
        for r in agents.relay.relayed if r.payload[1] == m.DatagramType.INIT]
    assert transports and (responses or inits)
    latest = transports[-1]
    fresh_counter = latest[:m.HEADER.size + 4] + (2**40).to_bytes(8, "big") + \
        latest[m.HEADER.size + 12:]
    corrupted = bytearray(fresh_counter)
    corrupted[-1] ^= 1
    bad_mac = bytearray(inits[0])
    bad_mac[-1] ^= 1
    # A node outside the mesh, with a key of its own, that knows the target's public key.
    stranger = s.Channel(99, NodeSecrets(X25519PrivateKey.generate(), bytes(32)),
                         [s.PeerConfig(me, agents.mesh.node(target).public_key_bytes,
                                       (dst, PORT))], boot_id=1)
    [(_, stranger_init)] = stranger.tick(agents.clock()).datagrams
    relabelled = m.HEADER.pack(m.VERSION, m.DatagramType.TRANSPORT, 99, me) + \
        fresh_counter[m.HEADER.size:]
    misaddressed = m.HEADER.pack(m.VERSION, m.DatagramType.TRANSPORT, other, 77) + \
        fresh_counter[m.HEADER.size:]
    packet = build_packet((src, PORT), (dst, PORT), latest)
    too_long = build_packet((src, PORT), (dst, PORT), bytes(m.MAX_DATAGRAM + 1))
    return {
        Drop.REPLAY: [channel_frame(src, dst, p) for p in [latest, *responses[:1]]],
        Drop.AUTH: [channel_frame(src, dst, bytes(corrupted)),
                    channel_frame(src, dst, bytes(bad_mac))],
        Drop.UNKNOWN_PEER: [channel_frame(src, dst, stranger_init),
                            channel_frame("192.0.2.99", dst, relabelled),
                            channel_frame(src, dst, misaddressed)],
        Drop.TRUNCATED: [channel_frame(src, dst, latest[:10]),
                         channel_frame(src, dst, inits[0][:-1]),
                         punted(packet[:len(packet) - 5]),
                         punted(b"")],
        Drop.OVERSIZED: [punted(too_long), punted(packet + bytes(4096))],
        Drop.MALFORMED: [channel_frame(src, dst, b"\x09" + latest[1:]),
                         punted(b"\x45" + packet[1:9] + b"\x06" + packet[10:])],  # TCP
    }


def deliver(agents: Agents, target: str, frames: list[bytes]) -> None:
    """Write every frame to the target agent's socket, letting it read when full."""
    secrecy = agents.secrecy[target]
    for frame in frames:
        while not agents.relay.punt(target, frame):
            secrecy.service()
    while select.select([secrecy], [], [], 0)[0]:
        secrecy.service()


def channel_state(agents: Agents, name: str) -> tuple[object, ...]:
    """Everything hostile datagrams must leave alone in one agent."""
    secrecy = agents.secrecy[name]
    channel = secrecy.channel
    assert channel is not None
    peers = channel.peers()
    agreement = secrecy.agreement
    return (dict(agreement.book._keys), {k: vars(v).copy() for k, v in agreement._heard.items()},
            {p: (channel.established(p), channel.endpoint(p), [
                channel.generation_secret(p, g, outbound=o) for g in range(16)
                for o in (True, False)]) for p in peers},
            channel.held_private_keys(), agents.options[name].generations.path.read_bytes(),
            sa_snapshot(agents.vpp(name)))


def test_channel_hostile_datagrams_are_counted_and_change_nothing(agents: Agents) -> None:
    agents.until(lambda: agents.slid(1), "both pairs agreed and slid")
    agents.step()
    target = agents.secrecy["node1"]
    frames = hostile_frames(agents, "node1", "node2")
    before, counters = channel_state(agents, "node1"), target.counters()
    sent = agents.relay.relayed[:]
    burst = [f for _ in range(5000 // sum(map(len, frames.values())) + 1)
             for fs in frames.values() for f in fs][:5000]
    expected = {f"drop_{reason}": sum(burst.count(f) for f in fs) + len(fs)
                for reason, fs in frames.items()}
    assert sum(expected.values()) == 5000 + sum(map(len, frames.values()))
    deliver(agents, "node1", [f for fs in frames.values() for f in fs])
    deliver(agents, "node1", burst)
    after = target.counters()
    for reason, count in expected.items():
        assert after.get(reason, 0) - counters.get(reason, 0) == count, reason
    assert after["dh"] == counters["dh"]  # none of it cost a Diffie-Hellman
    assert after["received"] == counters["received"]  # nor reached the agent
    assert agents.relay.pump() == 0 and agents.relay.relayed == sent  # nor got an answer
    assert channel_state(agents, "node1") == before
    # The pair works on: a rekey by agreement goes through.
    agents.step()
    agents.run("node1", rekey=True)
    agents.until(lambda: agents.generations("node2").peers["node1"].in_base == 2,
                 "node2 slid to node1's generation 2")
    assert out_generation(agents, "node1") == {2} and agents.forward_secret()


def test_forward_secrecy_vpp_restarts_in_a_row_without_traffic_keep_the_pair(
        agents: Agents) -> None:
    """Without traffic nothing proves the receiver slid, but its agent says so: restart
    after restart, node1 steps to a fresh agreed generation and the pair stays up."""
    agents.until(lambda: agents.slid(1), "both pairs agreed and slid")
    for restart in range(4):
        agents.restart_vpp("node1")
        for _ in range(12):
            agents.step(traffic=False)
            assert not any(r.blocked_peers for r in agents.results.values())
        assert out_generation(agents, "node1") == {restart + 2}
        assert agents.generations("node2").peers["node1"].in_base == restart + 2
        assert agents.forward_secret()


def test_forward_secrecy_without_a_punt_socket_the_static_schedule_runs(
        agents: Agents, caplog: pytest.LogCaptureFixture) -> None:
    """A VPP without `punt { socket }` refuses the registration: the agents run on the
    static schedule as without a channel, and say so once."""
    for name in agents.names:
        agents.vpp(name).punt_socket = None
    for _ in range(6):
        agents.step()
    assert all(agents.link_ok(a, b) for a, b in itertools.permutations(agents.names, 2))
    for name, peer in (("node1", "node2"), ("node2", "node1")):
        assert not agents.results[name].secrecy[peer].outbound
        assert agents.secrecy[name].channel is None and agents.secrecy[name].unavailable
        held = agents.sas(name, True, peer)
        static = static_keys(agents, name, peer, True)
        assert held and all(key == static[spi] for spi, (key, _) in held.items())
    assert sum("no channel between agents" in r.message for r in caplog.records) == 2
    assert agents.relay.relayed == []


@pytest.fixture
def preferred_agents() -> Iterator[Agents]:
    pair = Agents(forward_secrecy="preferred")
    yield pair
    pair.close()


def test_forward_secrecy_preferred_a_peer_whose_agent_stopped_falls_back_to_static_keys(
        preferred_agents: Agents, caplog: pytest.LogCaptureFixture) -> None:
    """`forward_secrecy: preferred`: node2's agent stops for good while its VPP runs on:
    once the last session with it has expired, node1 no longer waits for its word. A VPP
    restart of node1 then steps to a key node2's VPP still accepts (the static schedule),
    never to no tunnel at all, and says so as a downgrade; when node2's agent is back the
    pair returns to agreed keys."""
    agents = preferred_agents
    agents.until(lambda: agents.slid(1), "both pairs agreed and slid")
    agents.step()
    agents.secrecy["node2"].close()
    agents.names = ["node1"]  # only node1's agent runs
    for _ in range(int(s.REJECT_AFTER / 2) + 1):
        agents.step()
    agents.restart_vpp("node1")
    result = agents.run("node1")
    assert not result.waiting_peers and not result.blocked_peers  # was: waiting forever
    assert result.downgraded_peers == ["node2"] and not result.stopped_peers
    assert any("leaving agreed keys for the static schedule" in n for n in result.notes)
    assert agents.secrecy["node1"].agreement.said(agents.sessions["node1"].view()) == {}
    assert out_generation(agents, "node1") == {2}
    assert agents.link_ok("node1", "node2") and agents.link_ok("node2", "node1")
    agents.names = ["node1", "node2"]
    agents.start_agent("node2")
    agents.until(agents.forward_secret, "both pairs on agreed keys again", steps=40)


def test_forward_secrecy_required_a_peer_whose_agent_stopped_never_gets_a_static_key(
        agents: Agents) -> None:
    """`forward_secrecy: required` (the default): the same story ends with node1's pair
    stopped (fail closed, reported), never on a static key in either direction; when
    node2's agent is back the pair returns to agreed keys."""
    agents.until(lambda: agents.slid(1), "both pairs agreed and slid")
    agents.step()
    agents.secrecy["node2"].close()
    agents.names = ["node1"]
    for _ in range(int(s.REJECT_AFTER / 2) + 1):
        agents.step()
    agents.restart_vpp("node1")
    result = agents.run("node1")
    assert result.stopped_peers == {"node2": "no agreement"} and not result.downgraded_peers
    assert any("no agreed key to send on" in n for n in result.notes)
    for outbound in (True, False):  # not one static key in node1's VPP, either way
        static = static_keys(agents, "node1", "node2", outbound)
        held = agents.sas("node1", outbound, "node2")
        assert all(static.get(spi) != key for spi, (key, _) in held.items())
    assert agents.sas("node1", True, "node2") == {}
    assert agents.generations("node1").peers["node2"].stopped_why == "no agreement"
    agents.names = ["node1", "node2"]
    agents.start_agent("node2")
    agents.until(agents.forward_secret, "both pairs on agreed keys again", steps=40)
    assert agents.generations("node1").peers["node2"].stopped_since is None


# ---- lost answers, replayed handshakes, crossing handshakes --------------------------------

def test_forward_secrecy_an_answer_lost_with_the_receiver_agent_is_offered_again(
        agents: Agents) -> None:
    agents.until(lambda: agents.slid(1), "both pairs agreed and slid")
    agents.step()
    agents.run("node1", rekey=True)  # offers generation 2
    agents.relay.pump()
    agents.secrecy["node2"].service()  # node2 answers ...
    agents.start_agent("node2")  # ... and its agent dies before a run installs it
    agents.settle()
    # node1 offers generation 2 again with a fresh key once its "installed" is overdue
    # (INSTALL_WAIT), and steps on the answer its new peer agent installs.
    agents.until(lambda: out_generation(agents, "node1") == {2}, "node1 on generation 2")
    assert agents.secrecy["node1"].channel.stats["offers_renewed"] >= 1  # type: ignore[union-attr]
    assert agents.link_ok("node1", "node2") and agents.link_ok("node2", "node1")


def test_channel_a_replayed_init_does_not_replace_the_live_session() -> None:
    """A handshake Init that lost a collision (or was held back by an attacker) and is
    replayed later is answered, but its session stays `next` until the initiator
    confirms it, which it never does: the live session carries on."""
    keys = {n: X25519PrivateKey.generate() for n in (1, 2)}
    address = {1: ("192.0.2.1", PORT), 2: ("192.0.2.2", PORT)}
    nodes = {n: s.Channel(n, NodeSecrets(keys[n], bytes(32)),
                          [s.PeerConfig(3 - n, public_bytes(keys[3 - n]), address[3 - n])],
                          boot_id=n) for n in (1, 2)}

    def deliver(sender: int, out: s.Output, now: float) -> None:
        for _, data in out.datagrams:
            deliver(3 - sender, nodes[3 - sender].receive(now, address[sender], data), now)

    first, second = nodes[1].tick(100.0), nodes[2].tick(100.0)  # both initiate at once
    [(_, init)] = second.datagrams
    deliver(2, second, 100.0)  # node 1 has its own handshake pending: it ignores this one
    deliver(1, first, 100.0)
    assert nodes[1].established(2) and nodes[2].established(1)
    nodes[1].receive(110.0, address[2], init)  # recorded, replayed ten seconds later
    for _, data in nodes[1].send(111.0, 2, m.Keepalive()).datagrams:
        nodes[2].receive(111.0, address[1], data)
    assert nodes[2].drops == {}, nodes[2].drops


def test_channel_a_replayed_init_after_an_agent_restart_moves_nothing() -> None:
    """An agent that restarted has no timestamp high-water mark: a recorded Init from
    its peer, replayed from the attacker's address, gets an answer there, but neither
    a session nor the peer's endpoint nor a restart report; the agent's own handshake
    goes to the peer's real address and completes."""
    keys = {n: X25519PrivateKey.generate() for n in (1, 2)}
    address = {1: ("192.0.2.1", PORT), 2: ("192.0.2.2", PORT)}
    attacker = ("203.0.113.66", PORT)

    def node(n: int, boot_id: int) -> s.Channel:
        return s.Channel(n, NodeSecrets(keys[n], bytes(32)),
                         [s.PeerConfig(3 - n, public_bytes(keys[3 - n]), address[3 - n])],
                         boot_id=boot_id)

    one, two = node(1, 1), node(2, 2)
    [(_, recorded)] = two.tick(100.0).datagrams  # node 2's Init, recorded on the path
    one.receive(100.0, address[2], recorded)
    one = node(1, 1)  # node 1's agent restarts: it has forgotten the Init's timestamp
    out = one.receive(200.0, attacker, recorded)
    assert [destination for destination, _ in out.datagrams] == [attacker]  # the answer
    assert out.events == []  # no HandshakeComplete, no EndpointChanged, no PeerRestarted
    assert one.endpoint(2) == address[2] and not one.established(2)
    later = 200.0 + s.CONFIRM_WAIT  # no confirmation came: its own handshake, to the
    own = one.tick(later)  # peer's address
    assert [destination for destination, _ in own.datagrams] == [address[2]]
    [(_, own_init)] = own.datagrams
    [(_, response)] = two.receive(later, address[1], own_init).datagrams
    [(_, confirmation)] = one.receive(later, address[2], response).datagrams
    assert one.established(2) and not two.established(1)  # until node 1 confirms
    events = two.receive(later, address[1], confirmation).events
    assert s.HandshakeComplete(1) in events and two.established(1)
    assert one.endpoint(2) == address[2] and one.drops == {}


def test_forward_secrecy_datastore_agents_agree_like_mesh_file_agents() -> None:
    """Two datastore agents (MembershipSource: the membership is their mesh source) reach
    agreed keys through the same channel as `up --watch` agents."""
    from vppmesh.agent.datastore.membership import LocalNode, MembershipSource
    from vppmesh.testing.datastore import MemoryStore, agent_options

    directory = short_tmp()
    mesh, secrets = make_mesh(2, 2, rekey_grace=10, rekey_interval=0)
    store = MemoryStore(mesh.settings)
    relay = PuntRelay(directory)
    members: dict[str, MembershipSource] = {}
    try:
        for node in mesh.nodes:
            (directory / node.name).mkdir()
            options, ds = agent_options(
                directory / node.name, secrets, node.name,
                LocalNode(underlay=tuple(node.underlay), pod_cidr=node.pod_cidr,
                          node_number=node.node_number),
                api_socket=directory / node.name / "api.sock")
            vpp = relay.attach(node.name, FakeVpp.with_uplink(node.primary))
            members[node.name] = MembershipSource(options, ds, store=store,  # type: ignore[arg-type]
                                                 api=vpp)  # type: ignore[arg-type]
        results: dict[str, UpResult] = {}

        def agreed() -> bool:
            return len(results) == 2 and all(
                s.forward_secret for r in results.values() for s in r.secrecy.values())

        for _ in range(10):
            if agreed():
                break
            for name, member in members.items():
                result = member.sync()
                assert result is not None
                results[name] = result
                for _ in range(20):  # the channel, until quiet
                    if not relay.pump() and not any(m.secrecy.service()
                                                    for m in members.values()):
                        break
        assert agreed()
        for a, b in (("node1", "node2"), ("node2", "node1")):
            number = mesh.node(a).node_number
            out = {sa["entry"]["spi"]: sa["entry"]["crypto_key"]
                   for sa_id, sa in relay.vpps[a].sas.items()
                   if sa_id & SA_DIRECTION_BIT and sa_peer(sa_id) == mesh.node(b).node_number}
            inbound = {sa["entry"]["spi"]: sa["entry"]["crypto_key"]
                       for sa_id, sa in relay.vpps[b].sas.items()
                       if not sa_id & SA_DIRECTION_BIT and sa_peer(sa_id) == number}
            assert out and all(inbound.get(spi) == key for spi, key in out.items())
    finally:
        for member in members.values():
            member.secrecy.close()
        relay.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_forward_secrecy_rekeys_by_agreement_never_break_the_pair(agents: Agents) -> None:
    """Make-before-break with acknowledgements: after every single run of either agent
    (and every channel exchange) each outbound SA has its twin at the receiver."""
    agents.until(lambda: agents.slid(1), "both pairs agreed and slid")

    def both_ways() -> bool:
        return agents.link_ok("node1", "node2") and agents.link_ok("node2", "node1")

    generations = []
    for _ in range(6):
        agents.run("node1", rekey=True)
        agents.settle()
        for _tick in range(14):
            for name in agents.names:
                agents.run(name)
                assert both_ways()
                agents.settle()
                assert both_ways()
            agents.clock.now += 2
            for a, b in itertools.permutations(agents.names, 2):
                agents.traffic(a, b)
        generations.append(out_generation(agents, "node1"))
    assert generations == [{g} for g in range(2, 8)]
    assert agents.forward_secret()
    assert agents.secrecy["node1"].channel.held_private_keys() == 0  # type: ignore[union-attr]
    # The ledger keeps the static key of generation 0 and the live agreed ones only: the
    # fingerprints of retired agreed keys go with them (it does not grow by rotation).
    used = agents.options["node1"].ledger.used()
    tunnels = agents.sessions["node1"].view().settings.tunnels_per_peer
    assert len(used) <= 3 * tunnels < 7 * tunnels, len(used)  # 7 generations were used


def test_forward_secrecy_receiver_reboot_without_traffic_gets_a_new_key(
        agents: Agents) -> None:
    """node2's host reboots (VPP and agent: the agreed inbound keys are gone everywhere)
    before node1 ever sent a packet: node1 must still rekey towards it, or its traffic
    would be dropped there once it starts."""
    agents.until(lambda: agents.slid(1), "both pairs agreed and slid")  # no traffic yet:
    for sa in agents.vpp("node1").sas.values():  # the first steps' counters are forgotten
        sa["seq_out"] = 0
    agents.restart_vpp("node2")
    agents.start_agent("node2")
    for _ in range(4):  # its first run has no session yet: it waits for the agents
        agents.step(traffic=False)
    assert agents.link_ok("node1", "node2") and agents.link_ok("node2", "node1")
    assert out_generation(agents, "node1") == {2}
    assert agents.results["node1"].secrecy["node2"].outbound
    agents.until(agents.forward_secret, "both pairs on agreed keys again")


def test_forward_secrecy_restart_request_survives_a_run_without_traffic() -> None:
    """The peer's restart is said once; the rekey it asks for stays wanted while the
    agreement is under way, even on a key that never protected a packet."""
    pg = fresh(out=1, floor=1, base=1, ephemeral_out=(1,))
    quiet = PeerObservation(out_installed=True)
    d = advance(pg, quiet, SETTINGS, now=1, key_used=used_up_to(1), peer="p",
                said=PeerSaid(keyed=frozenset({1}), restarted=True))
    assert d.want == 2
    pg.ephemeral_out.append(2)  # Secrecy.claim
    d = advance(pg, quiet, SETTINGS, now=2, key_used=used_up_to(1), peer="p",
                said=PeerSaid(keyed=frozenset({1})))
    assert d.want == 2 and pg.rekey_pending
    d = advance(pg, quiet, SETTINGS, now=3, key_used=used_up_to(1), peer="p",
                said=PeerSaid(keyed=frozenset({1, 2}), installed=2))
    assert d.stepped and pg.out == 2


def test_forward_secrecy_a_peer_that_rejoins_gets_keys_its_receivers_hold() -> None:
    """node3 leaves node1's and node2's mesh and comes back (a datastore lease that
    lapsed): they forgot the agreed keys of its traffic, so they ask it to rekey; its
    traffic is accepted again without waiting for a scheduled rekey."""
    agents = Agents(3)
    try:
        agents.until(lambda: agents.slid(1), "every window slid to generation 1")
        agents.step()
        full = agents.mesh
        agents.mesh_file.write_text(dump_mesh(full.model_copy(update={"nodes": full.nodes[:2]})))
        agents.names = ["node1", "node2"]  # node3's agent cannot run: its node is gone
        for _ in range(3):
            agents.step()
        assert not agents.sas("node1", False, "node3")  # its SAs and keys are gone
        assert agents.secrecy["node1"].agreement.book.keys(3, False, 1) is None
        agents.mesh_file.write_text(dump_mesh(full))
        agents.names = ["node1", "node2", "node3"]
        agents.until(lambda: all(agents.link_ok(a, b)
                                 for a, b in itertools.permutations(agents.names, 2)),
                     "every pair works both ways", steps=6)
        agents.until(agents.forward_secret, "every pair on agreed keys")
    finally:
        agents.close()


def test_channel_crossing_handshakes_after_a_lost_first_attempt_end_on_one_session() -> None:
    """node1's first Init is lost (node3's agent was not up yet); its retry and node3's own
    Init cross, each answered by the other side: both must end on the same session, or
    everything either sends is dropped as forged until the next handshake."""
    keys = {n: X25519PrivateKey.generate() for n in (1, 3)}
    address = {1: ("192.0.2.1", PORT), 3: ("192.0.2.3", PORT)}
    nodes = {n: s.Channel(n, NodeSecrets(keys[n], bytes(32)),
                          [s.PeerConfig(4 - n, public_bytes(keys[4 - n]), address[4 - n])],
                          boot_id=n) for n in (1, 3)}
    nodes[1].tick(100.0)  # lost
    retry = nodes[1].tick(100.0 + s.HANDSHAKE_RETRY)
    own = nodes[3].tick(100.0 + s.HANDSHAKE_RETRY)
    [(_, init1)], [(_, init3)] = retry.datagrams, own.datagrams
    now = 101.0
    answer1 = nodes[1].receive(now, address[3], init3)  # both Inits arrive first ...
    answer3 = nodes[3].receive(now, address[1], init1)
    for sender, out in ((1, answer1), (3, answer3)):  # ... then both Responses
        for _, data in out.datagrams:
            nodes[4 - sender].receive(now, address[sender], data)
    for sender in (1, 3):
        for _, data in nodes[sender].send(now, 4 - sender, m.Keepalive()).datagrams:
            nodes[4 - sender].receive(now, address[sender], data)
    # The crossing is a collision (node1's handshake stands), not a replay: nothing is
    # dropped, and each keepalive arrives.
    assert nodes[1].drops == {} and nodes[3].drops == {}
    assert nodes[1].stats["collisions"] + nodes[3].stats["collisions"] == 1
    assert nodes[1].stats["received"] == 1 == nodes[3].stats["received"]


# ---- an attacker on the path: no quiet downgrade, no key past its limit ------------------

def key_exchange_sized(relayed: object) -> bool:
    """The attacker's filter: channel transport datagrams the size of a KeyInit or a
    KeyResponse (once every transport plaintext is padded to one size, that is every
    transport datagram: the attacker cannot pick the key exchange out)."""
    payload = relayed.payload  # type: ignore[attr-defined]
    size = len(m.transport_header(1, 2, 0, 0)) + len(m.encode(m.KeyInit(1, bytes(32)))) + 16
    return payload[1] == m.DatagramType.TRANSPORT and len(payload) == size


@pytest.mark.parametrize("counters", [False, True], ids=["dumps", "counters"])
@pytest.mark.parametrize("mode", ["required", "preferred"])
def test_forward_secrecy_dropped_key_exchanges_never_stretch_a_key_past_its_limit(
        mode: str, counters: bool) -> None:
    """An attacker drops only the key exchange: sessions and keepalives live on, no new
    generation is ever agreed. The key in use still stops at its hard limit (packets
    here): the pair then sends nothing (fail closed, reported, `stopped_why`), never on
    the old key past the limit, never on a static key; once the attacker stops, the pair
    is back on a new agreed key. With `counters` the agents' steady runs dump no SA (the
    packets come from the stats segment's counters) and stop exactly the same way."""
    agents = Agents(key_max_packets=2048, forward_secrecy=mode, counters=counters)
    try:
        agents.until(lambda: agents.slid(1), "both pairs agreed and slid")
        agents.step()
        agents.relay.lose = key_exchange_sized
        for name in agents.names:
            agents.vpp(name).counts.clear()
        limit = agents.mesh.settings.key_max_packets
        stopped = None
        for _ in range(40):
            agents.step()
            for name, peer in (("node1", "node2"), ("node2", "node1")):
                for sa_id, sa in agents.vpp(name).sas.items():
                    if sa_id & SA_DIRECTION_BIT:  # no outbound key beyond its limit
                        assert sa.get("seq_out", 0) <= limit + 100, (name, sa_id)
                held = agents.sas(name, True, peer)
                static = static_keys(agents, name, peer, True)
                assert all(static[spi] != key for spi, (key, _) in held.items())
            if agents.results["node1"].stopped_peers:
                stopped = agents.results["node1"]
                break
        assert stopped is not None, "the pair never stopped at its key's hard limit"
        if counters:  # the limit was seen without a single SA dump
            assert all(agents.vpp(n).counts["ipsec_sa_v5_dump"] == 0 for n in agents.names)
        assert stopped.stopped_peers == {"node2": "key limit"}
        assert any("reached a hard limit" in n for n in stopped.notes)
        pg = agents.generations("node1").peers["node2"]
        assert pg.stopped_why == "key limit" and pg.agreeing_since is not None
        assert agents.sas("node1", True, "node2") == {}  # sends nothing
        # Its pods' packets die in VPP (a drop route), not bounce to the host and back.
        cidr = str(agents.mesh.node("node2").pod_cidr)
        assert agents.vpp("node1").routes[agents.mesh.settings.mesh_table_id][cidr] == ()
        agents.step()  # the next run (its key burnt by the stop) still says stopped
        assert agents.generations("node1").peers["node2"].stopped_why == "key limit"
        agents.relay.lose = None
        agents.until(agents.forward_secret, "a new agreed key once the attacker stops",
                     steps=40)
        assert agents.generations("node1").peers["node2"].out > pg.out
    finally:
        agents.close()


def test_the_gateway_holds_the_channel_address_in_the_mesh_vrf(tmp_path: Path) -> None:
    """Every VPP's gateway loopback holds its node's channel address (the last of its pod
    CIDR), in the mesh VRF only; a VPP that lacks it (an agent upgraded on a running
    VPP) gets it at the next run."""
    pair = Pair(tmp_path)
    pair.run("node1", now=1000.0)
    vpp = pair.vpp["node1"]
    address = f"{pair.mesh.node('node1').pod_cidr.broadcast_address}/32"
    [gateway] = [i for i, addresses in vpp.addresses.items() if address in addresses]
    assert vpp.table_of[gateway] == pair.mesh.settings.mesh_table_id
    vpp.addresses[gateway].remove(address)
    pair.run("node1", now=1001.0)
    assert address in vpp.addresses[gateway]


@pytest.mark.parametrize("blocked", ["underlay", "underlay and tunnel"])
def test_forward_secrecy_channel_blocked_on_the_underlay_agrees_through_the_tunnel(
        blocked: str) -> None:
    """An attacker on the underlay drops every channel datagram (UDP 4501, whatever its
    size) for three times key_max_seconds, under traffic. The agents' channel also runs
    inside the pair's own tunnel (endpoint.py): the pair keeps agreeing new keys, never
    stops, never sends on a static key, and says the tunnel carried it. When the
    attacker drops the tunnel's datagrams too (the ESP itself), the pair still fails
    closed at the key's hard limit."""
    agents = Agents(key_max_seconds=60)
    try:
        agents.until(lambda: agents.slid(1), "both pairs agreed and slid")
        agents.step()
        agents.relay.lose = lambda relayed: relayed.path in blocked
        first = agents.generations("node1").peers["node2"].out
        stopped = False
        for _ in range(int(3 * 60 / 2)):
            agents.step()
            for name, peer in (("node1", "node2"), ("node2", "node1")):
                held = agents.sas(name, True, peer)
                static = static_keys(agents, name, peer, True)
                assert all(static[spi] != key for spi, (key, _) in held.items())
            stopped = stopped or bool(agents.results["node1"].stopped_peers
                                      or agents.results["node2"].stopped_peers)
            if stopped and blocked != "underlay":
                break
        if blocked == "underlay":
            assert not stopped, "the pair stopped although its tunnel carried the channel"
            assert agents.forward_secret()
            assert agents.generations("node1").peers["node2"].out >= first + 2
            assert agents.results["node1"].secrecy["node2"].channel_path == "tunnel"
            assert agents.results["node2"].secrecy["node1"].channel_path == "tunnel"
            for name in agents.names:
                counters = agents.secrecy[name].counters()
                assert counters["path_tunnel"] > 0
                assert not any(v for k, v in counters.items() if k.startswith("drop_")), \
                    counters  # no datagram twice: nothing looks like a replay
        else:
            assert stopped, "the pair never failed closed"
            assert agents.results["node1"].stopped_peers == {"node2": "key limit"}
            agents.relay.lose = None
            agents.until(agents.forward_secret, "agreed keys once the attacker stops",
                         steps=60)
    finally:
        agents.close()


def test_forward_secrecy_channel_blocked_right_after_an_agent_restart_still_uses_the_tunnel(
        ) -> None:
    """node1's agent restarts (an upgrade, a SIGTERM), and an attacker drops every channel
    datagram on the underlay from then on, under traffic, for three times
    key_max_seconds. The peer stated long before that it installed node1's agreed keys,
    and states it again only when it changes: the new agent takes up what the last one
    saved, so the tunnel still carries the channel and the pair never stops. (Found by
    the storm: the pairs of a node whose agent had just restarted stopped at their key
    limit for 51 s.)"""
    agents = Agents(key_max_seconds=60)
    try:
        agents.until(lambda: agents.slid(1), "both pairs agreed and slid")
        agents.step()
        agents.start_agent("node1")
        agents.relay.lose = lambda relayed: relayed.path == "underlay"
        first = agents.generations("node1").peers["node2"].out
        for _ in range(int(3 * 60 / 2)):
            agents.step()
            stopped = agents.results["node1"].stopped_peers or \
                agents.results["node2"].stopped_peers
            assert not stopped, "the pair stopped although its tunnel carried the channel"
        assert agents.forward_secret()
        assert agents.generations("node1").peers["node2"].out >= first + 2
        assert agents.secrecy["node1"].counters()["path_tunnel"] > 0
    finally:
        agents.close()


@pytest.mark.parametrize("mode", ["required", "preferred"])
def test_forward_secrecy_blocked_channel_and_a_forced_step(
        mode: str, caplog: pytest.LogCaptureFixture) -> None:
    """The channel's port is blocked (every datagram dropped) until the sessions expire,
    then node1's VPP restarts (its key is burnt: a step is forced). `required` (the
    default): no static-schedule key is installed in either direction on either node;
    the pair is stopped and says why. `preferred`: the pair falls back to a static key,
    and says so as a downgrade (a warning each time)."""
    agents = Agents(forward_secrecy=mode)
    try:
        agents.until(lambda: agents.slid(1), "both pairs agreed and slid")
        agents.step()
        agents.relay.lose = lambda _relayed: True
        for _ in range(int(s.REJECT_AFTER / 2) + 1):
            agents.step()
        agents.restart_vpp("node1")
        for _ in range(3):
            agents.step()
        result = agents.results["node1"]
        statics = [
            (name, peer, outbound)
            for name, peer in (("node1", "node2"), ("node2", "node1"))
            for outbound in (True, False)
            for spi, (key, _) in agents.sas(name, outbound, peer).items()
            if static_keys(agents, name, peer, outbound)[spi] == key]
        if mode == "required":
            assert statics == []
            assert result.stopped_peers == {"node2": "no agreement"}
            assert not any("forward secrecy lost" in r.message for r in caplog.records)
        else:
            assert ("node1", "node2", True) in statics  # the fallback, out in the open
            assert agents.link_ok("node1", "node2")
            assert any("forward secrecy lost" in r.message and r.levelname == "WARNING"
                       for r in caplog.records)
        agents.relay.lose = None
        agents.until(agents.forward_secret, "both pairs on agreed keys again", steps=60)
    finally:
        agents.close()


# ---- clock attacks: the wall clock stepped, the agent restarted, the host rebooted ------

HOUR = 3600.0


def sessions_up(agents: Agents) -> bool:
    """Every agent has a usable channel session with every peer now."""
    for name in agents.names:
        channel = agents.secrecy[name].channel
        now = agents.secrecy[name].clock()
        if channel is None or not all(channel.established(agents.number(p), now)
                                      for p in agents.names if p != name):
            return False
    return True


@pytest.mark.parametrize("steps", [(-HOUR,), (HOUR, -HOUR)], ids=["back", "ahead-then-back"])
def test_forward_secrecy_a_wall_clock_step_and_an_agent_restart_keep_agreed_keys(
        agents: Agents, steps: tuple[float, ...]) -> None:
    """node1's wall clock steps an hour (NTP, or an attacker answering it) and its agent
    restarts: sessions are back at the first poll, stay up through rekeys and expiries
    (5 minutes), the pair stays on agreed keys and a rekey still goes through."""
    agents.until(lambda: agents.slid(1) and agents.forward_secret(), "agreed and slid")
    for step in steps:
        agents.wall_step["node1"] += step
        agents.start_agent("node1")
        for _ in range(30):
            agents.step(10.0)
            assert sessions_up(agents) and agents.forward_secret()
    drops = agents.secrecy["node2"].counters()
    assert drops.get("drop_replay", 0) == 0 and drops.get("drop_rate_limited", 0) == 0
    agents.run("node1", rekey=True)
    agents.until(lambda: agents.generations("node2").peers["node1"].in_base == 2,
                 "node2 slid to node1's generation 2")
    assert agents.forward_secret()


def test_forward_secrecy_a_reboot_with_the_wall_clock_behind_regains_agreed_keys(
        agents: Agents) -> None:
    """node1's host reboots and comes up with its wall clock an hour behind: its
    handshakes are answered at the first poll (its timestamps start above what it
    reserved before the reboot, so node2 does not take them for replays), and the pair
    is back on agreed keys as soon as after a reboot on a right clock (9 polls here)."""
    agents.until(lambda: agents.slid(1) and agents.forward_secret(), "agreed and slid")
    agents.step()
    agents.wall_step["node1"] -= HOUR
    agents.reboot("node1")
    agents.step()
    assert sessions_up(agents)
    assert agents.secrecy["node2"].counters().get("drop_replay", 0) == 0
    agents.until(agents.forward_secret, "both pairs on agreed keys again", steps=10)


def test_forward_secrecy_a_restarted_agent_refuses_a_recorded_handshake(
        agents: Agents) -> None:
    """node1's handshake Init, recorded on the wire, replayed to node2's agent after it
    restarted: refused before any Diffie-Hellman (the marks outlive the agent), nothing
    changes."""
    agents.until(lambda: agents.slid(1) and agents.forward_secret(), "agreed and slid")
    agents.step()
    recorded = [r.payload for r in agents.relay.relayed
                if (r.sender, r.receiver) == ("node1", "node2")
                and r.payload[1] == m.DatagramType.INIT]
    assert recorded
    # Kept at the run after the handshake (a crash now loses nothing), not per handshake.
    marks = TimestampFile(agents.options["node2"].state_dir / "node2.handshakes.json").load()[1]
    assert marks[1] >= max(m.parse_datagram(i).timestamp for i in recorded)  # type: ignore[union-attr]
    agents.start_agent("node2")
    agents.step()
    channel = agents.secrecy["node2"].channel
    assert channel is not None
    completed, dh = channel.stats["handshakes_completed"], channel.stats["dh"]
    replays = channel.drops[Drop.REPLAY]
    src = str(agents.mesh.node("node1").primary.ip)
    dst = str(agents.mesh.node("node2").primary.ip)
    deliver(agents, "node2", [channel_frame(src, dst, init) for init in recorded])
    assert channel.drops[Drop.REPLAY] - replays == len(recorded)
    assert channel.stats["handshakes_completed"] == completed and channel.stats["dh"] == dh
    assert sessions_up(agents) and agents.forward_secret()
