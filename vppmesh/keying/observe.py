"""What VPP's SAs say about each peer's key generations, and which keys a run may use.

A run reads its SAs once (read_key_sas: a dump, or the remembered SAs and the stats
segment's counters), observes each peer's generations in them (observe_keys) for
epochs.schedule, and leaves out the inbound generations whose agreed keys nobody holds
any more (usable_keying).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vppmesh.dataplane.state import find_sa
from vppmesh.dataplane.vpp import ipsec
from vppmesh.host.underlay import encapsulation
from vppmesh.keying.book import KeyBook
from vppmesh.keying.epochs import GenerationState, PeerKeying, PeerObservation
from vppmesh.keying.keys import spi_for

if TYPE_CHECKING:
    from vppmesh.dataplane.reconcile import Reconciler
    from vppmesh.dataplane.view import LocalView, PeerView
    from vppmesh.dataplane.vpp.client import VppApi
    from vppmesh.dataplane.vpp.stats import SaCounters
    from vppmesh.keying.agreement import Agreement
    from vppmesh.keying.ledger import KeyLedger


def usable_keying(view: LocalView, state: GenerationState, book: KeyBook,
                  keying: Mapping[str, PeerKeying]) -> dict[str, PeerKeying]:
    """`keying` without the inbound generations whose agreed keys nobody holds any
    more (this agent and its VPP both restarted): their static keys are not the
    sender's, so they are left out, and the sender's agent is told (Restarted).

    With `forward_secrecy: required`, once the pair's agents have met, no inbound
    generation above the window's base is installed with a static key either: the
    sender steps only to agreed generations, so a static inbound SA there would only
    serve a sender tricked into falling back. The base itself keeps its key, whatever
    it is: the peer's traffic arrives on it while the pair moves to agreed keys."""
    required = view.settings.forward_secrecy == "required"
    usable = dict(keying)
    for name, peer_keying in keying.items():
        pg = state.peers.get(name)
        strict = required and pg is not None and pg.pinned
        if pg is None or not (pg.ephemeral_in or strict):
            continue
        peer = view.peer(name)
        number = peer.node.node_number
        inbound = tuple(g for g in peer_keying.inbound if book.key(
            view, peer, pg, outbound=False, tunnel=0, generation=g) is not None and (
                not strict or g == pg.in_base or book.keys(number, False, g) is not None))
        if inbound != peer_keying.inbound:
            usable[name] = PeerKeying(outbound=peer_keying.outbound, inbound=inbound)
    return usable


def observe_keys(api: VppApi, view: LocalView, state: GenerationState, ledger: KeyLedger,
                 book: KeyBook | None = None, agreement: Agreement | None = None, *,
                 sas: Mapping[int, ipsec.SaState] | None = None,
                 packets: Mapping[int, int] | None = None,
                 peers: Sequence[PeerView] | None = None,
                 ) -> tuple[dict[str, PeerObservation], Callable[[str, int], bool]]:
    """What VPP's SAs say about each peer's generations, and a used-key test per peer.

    Keys come from `book` (agreed generations, adopted from VPP when the book lacks
    them) or the static schedule; `agreement` says which offers are under way.

    `sas` (by SA id): this run's dump, or the SAs a Reconciler remembers (read_key_sas);
    None: dump them here. `packets` (by stat index, from the stats segment) raises each
    SA's count to what its counter says now: a remembered SA's counts are those of the
    last dump, and a count is never taken below what either source says, so a key's
    limit is never reached later than with dumps alone. `peers`: those of the view to
    observe (the others' decisions are the last run's: keying/settled.py); all if None.
    """
    count = view.settings.tunnels_per_peer
    me = view.node.node_number
    if sas is None:
        sas = {s.spec.sa_id: s for s in ipsec.dump_sas(api)}
    counted = packets or {}

    def sent(sa: ipsec.SaState) -> int:
        return max(sa.seq_outbound, counted.get(sa.stat_index, 0))

    def received(sa: ipsec.SaState) -> int:
        return max(sa.last_seq_inbound, counted.get(sa.stat_index, 0))
    book = book if book is not None else KeyBook()
    deciding = view.peers if peers is None else peers
    book.prepare(view, state, sas, deciding)
    observations = {}
    for peer in deciding:
        number = peer.node.node_number
        pg = state.peers.get(peer.name)
        if pg is None or pg.public_key != peer.node.public_key:
            continue
        out = [find_sa(sas, "out", number, t, pg.out) for t in range(count)]
        expected = [book.key(view, peer, pg, outbound=True, tunnel=t, generation=pg.out)
                    for t in range(count)]
        installed = all(
            sa is not None and key is not None and sa.spec.spi == spi_for(me, t, pg.out)
            and sa.spec.key.get_secret_value() == key.key.get_secret_value()
            for t, (sa, key) in enumerate(zip(out, expected, strict=True)))
        reencapsulate = installed and any(
            sa is not None and encapsulation(sa.spec) != peer.path.encapsulation(t)
            for t, sa in enumerate(out))
        active: set[int] = set()
        inbound_seq: dict[int, int] = {}
        for g in pg.window:  # one lookup per inbound SA
            seq = 0
            for t in range(count):
                sa = find_sa(sas, "in", number, t, g)
                if sa is None:
                    continue
                got = received(sa)
                seq += got
                if got > 0 and sa.spec.spi == spi_for(number, t, g):
                    active.add(g)
            inbound_seq[g] = seq
        observations[peer.name] = PeerObservation(
            out_installed=installed,
            out_packets=max((sent(sa) for sa in out if sa is not None), default=0),
            inbound_active=frozenset(active),
            inbound_seq=inbound_seq,
            encapsulation_changed=reencapsulate)

    def key_used(name: str, generation: int) -> bool:
        peer = view.peer(name)
        pg = state.peers.get(name)
        for t in range(count):
            key = book.key(view, peer, pg, outbound=True, tunnel=t, generation=generation)
            if key is None:  # agreed, held by nobody: used unless its offer is under way
                return agreement is None or not agreement.offering(peer.node.node_number,
                                                                   generation)
            if ledger.seen(key.key.get_secret_value(), key.salt):
                return True
        return False

    return observations, key_used


@dataclass
class KeySas:
    """The SAs a run's key generations look at (observe_keys) and where they came from."""

    sas: Mapping[int, ipsec.SaState]  # by SA id
    packets: Mapping[int, int] | None  # by stat index, from the stats segment
    dumped: dict[int, ipsec.SaState] | None  # this run's dump: the reconcile's too
    note: str | None = None  # the stats segment became unreadable in this run


def read_key_sas(api: VppApi, reconciler: Reconciler | None, full: bool,
                 counters: SaCounters | None) -> KeySas:
    """The SAs and their packet counts for this run, at the least cost that is exact.

    A long-running agent's steady-state run (not `full`, its reconciler remembers VPP
    exactly) takes the SAs it remembers and their counts from the stats segment: no SA
    dump, whatever the size of the mesh. Full runs (the periodic resync, a reconnect), a
    one-shot `up`, a reconciler that forgot, or an unreadable stats segment dump the SAs,
    once per run: reconcile() compares the same dump. (The Agent closes the counters'
    reader when it meets another VPP: VppHooks.)
    """
    remembered = None if full or reconciler is None or counters is None else \
        reconciler.remembered_sas()
    was = counters.unavailable if counters is not None else None
    if remembered is not None and counters is not None:
        # (In any order: the counts come back by stat index.)
        packets = counters.read([sa.stat_index for sa in remembered.values()])
        if packets is not None:
            return KeySas(remembered, packets, None)
    dumped = {sa.spec.sa_id: sa for sa in ipsec.dump_sas(api)}
    packets = None
    if counters is not None and (remembered is None or counters.unavailable is None):
        packets = counters.read([sa.stat_index for sa in dumped.values()])
    note = None
    if counters is not None and was is None and counters.unavailable is not None:
        note = (f"VPP's stats segment is unavailable ({counters.unavailable}): SA counts "
                "for key limits come from full SA dumps on every run until it is back")
    return KeySas(dumped, packets, dumped, note)
