"""Peers whose key decision a run takes from the last run: a run's cost follows what changed.

A peer's key decision (observe_keys -> epochs.advance -> usable_keying, and its agreed
keys) is a function of its view (record, path, pair secret), its generation state, its
SAs and their packet counters, the used-key ledger, what the peers' agents said, the
node's own record, the mesh settings, the static PSK, and time. When one peer joins a
mesh of a thousand, the other 999 decisions are the last run's again: deciding them
costs tens of ms (every SA looked up, every key compared) to learn nothing.

SettledPeers keeps, per peer, the outcome of the last run that decided it, if that run
was a fixed point for the peer: its generation state was the same after the run as
before, it wanted no generation agreed, and its VPP objects were the ones already
applied (nothing the next run observes of it changed). The next run takes a peer's
outcome from here only if every input is unchanged:

- node-wide: the same generation state object (the store reloads only when the file
  changed: `vppmesh rekey`, another agent), saved by no one else since, the same
  remembered SAs object (a dump makes a new one), the ledger's file signature as the
  last run left it, the node's record, the settings and the static PSK, and nothing
  node-wide on the agents' channel (Agreement.peer_marks: a new channel, a restart to
  announce, a vouch awaited);
- per peer: the same view object (an unchanged record keeps it: view.build_view; a NAT
  port learned makes a new one), field by field the same generation state, no packet
  counter of its SAs moved, no time rule of its generations (epochs.next_change)
  reached since, the same word from its agent (PeerSaid: its session, what it said it
  installed, slid to and sends on, its restart), the same agreed keys (the key book's
  revision) and no offer to it open.

Anything else decides the peer again, as does every full, dry or rekey run. The
outcome is exact, not an estimate: tests/test_settled_peers.py runs random joins,
leaves, traffic, clock steps and rekeys through an agent with and without it and
requires the same plans and generation files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vppmesh.dataplane.state import sa_peer

if TYPE_CHECKING:
    from vppmesh.config import MeshSettings, Node
    from vppmesh.dataplane.index import PeerObjects
    from vppmesh.dataplane.view import AgreedKeys, LocalView, PeerView
    from vppmesh.dataplane.vpp.ipsec import SaState
    from vppmesh.keying.epochs import (
        GenerationState,
        PeerGenerations,
        PeerKeying,
        PeerSaid,
        Scheduled,
    )


def snapshot(pg: PeerGenerations) -> dict[str, object]:
    """The peer's generation state, field by field, as it is now (containers copied)."""
    return {k: v.copy() if isinstance(v, (list, dict, set)) else v
            for k, v in pg.__dict__.items()}


@dataclass(frozen=True)
class PeerOutcome:
    """One peer's decision in the run that settled it, and what it was decided from."""

    peer: PeerView
    generations: dict[str, object]  # snapshot() after that run
    since: float  # that run's time
    until: float  # epochs.next_change for the peer: its next time rule
    said: PeerSaid | None  # what its agent had said (None: no live session)
    mark: object  # Agreement.peer_marks: the rest the agreement fed in
    keying: PeerKeying | None  # usable_keying's (None: no outbound key)
    agreed: AgreedKeys | None
    waiting: bool
    stopped: str | None
    downgraded: bool


@dataclass(frozen=True)
class _Inputs:
    """The node-wide inputs of the run the outcomes were decided in (see the module)."""

    state: GenerationState
    writes: int  # GenerationStore.writes: another caller of this process saved meanwhile
    sas: Mapping[int, SaState]
    packets: Mapping[int, int]
    ledger: tuple[int, int, int] | None
    node: Node
    settings: MeshSettings
    static_psk: bytes


class SettledPeers:
    """The per-peer outcomes of the last runs (see the module); owned by node.QuietRuns."""

    def __init__(self) -> None:
        self._inputs: _Inputs | None = None
        self._peers: dict[str, PeerOutcome] = {}
        self._objects: Mapping[int, PeerObjects] = {}  # the last plan's, by peer number
        self._stat_peers: dict[int, int] | None = None  # stat index -> peer number

    def forget(self) -> None:
        self._inputs, self._peers, self._objects, self._stat_peers = None, {}, {}, None

    def clean(self, view: LocalView, state: GenerationState, writes: int,
              sas: Mapping[int, SaState],
              packets: Mapping[int, int] | None, ledger: tuple[int, int, int] | None,
              now: float, said: Mapping[str, PeerSaid], marks: Mapping[str, object] | None,
              ) -> dict[str, PeerOutcome]:
        """The view's peers whose outcome this run takes from the last one (by name).
        `said` and `marks`: the agreement's (Agreement.said, peer_marks) now."""
        last = self._inputs
        if last is None or packets is None or marks is None or last.state is not state or \
                last.writes != writes or \
                last.sas is not sas or last.ledger != ledger or last.node != view.node or \
                last.settings != view.settings or \
                last.static_psk != view.secrets.static_psk:
            return {}
        moved: set[int] = set()
        if packets != last.packets:
            # Counters that moved. A stat index new or gone since the last run is an SA
            # that run added or deleted: its peer changed then, so none of its outcomes
            # was kept (ran), and any other change of VPP's SAs (a reconcile that had to
            # start over from a dump) makes a new `sas` object.
            old = last.packets
            counted = [i for i, n in packets.items() if old.get(i, n) != n]
            if counted:
                # Kept while VPP's SAs are as the last run left them: VPP reuses a
                # deleted SA's stat index for the next SA it adds (ran: `changed`).
                if self._stat_peers is None:
                    self._stat_peers = {sa.stat_index: sa_peer(sa_id)
                                        for sa_id, sa in sas.items()}
                where = self._stat_peers
                moved = {where.get(i, -1) for i in counted}
        clean = {}
        known, generations = self._peers, state.peers
        said_now, marks_now = said.get, marks.get
        for peer in view.peers:
            name = peer.name
            outcome = known.get(name)
            if outcome is None or outcome.peer is not peer or \
                    not outcome.since <= now < outcome.until or \
                    (moved and peer.node.node_number in moved) or \
                    said_now(name) != outcome.said or marks_now(name) != outcome.mark:
                continue
            pg = generations.get(name)
            if pg is not None and pg.__dict__ == outcome.generations:
                clean[name] = outcome
        return clean

    def ran(self, view: LocalView, state: GenerationState, *, writes: int,
            sas: Mapping[int, SaState],
            packets: Mapping[int, int] | None, ledger: tuple[int, int, int] | None,
            now: float, settings: MeshSettings, decided: Mapping[str, dict[str, object]],
            said: Mapping[str, PeerSaid], marks: Mapping[str, object] | None,
            kept: Mapping[str, PeerOutcome], scheduled: Scheduled,
            keying: Mapping[str, PeerKeying], agreed: Mapping[str, AgreedKeys],
            objects: Mapping[int, PeerObjects], until: Iterable[tuple[str, float]],
            changed: bool) -> None:
        """After a run that applied: keep the outcomes of the peers it settled.

        `decided`: the peers this run decided, with snapshot() of their generation state
        before the decision; `kept`: the outcomes it took from the last run; `until`:
        epochs.next_change per decided peer; `said`, `marks`: the agreement's, as the
        decision saw them; `changed`: the run changed VPP. A decided
        peer is kept only at a fixed point: the same generation state after the run, no
        generation wanted, and the same VPP objects as the last plan's (else the next
        run decides it again)."""
        if packets is None or marks is None:
            self.forget()
            return
        deadlines = dict(until)
        outcomes = {name: o for name, o in kept.items()}
        previous = self._objects
        for peer in view.peers:
            name = peer.name
            before = decided.get(name)
            pg = state.peers.get(name)
            if before is None or pg is None or name in scheduled.wants or \
                    pg.__dict__ != before:
                continue
            number = peer.node.node_number
            now_objects, before_objects = objects.get(number), previous.get(number)
            if before_objects is None or (now_objects is not before_objects
                                          and now_objects != before_objects):
                continue  # its SAs changed in this run: the next one looks again
            outcomes[name] = PeerOutcome(
                peer=peer, generations=before, since=now, until=deadlines[name],
                said=said.get(name), mark=marks.get(name),
                keying=keying.get(name), agreed=agreed.get(name),
                waiting=name in scheduled.waiting, stopped=scheduled.stopped.get(name),
                downgraded=name in scheduled.downgraded)
        self._inputs = _Inputs(state=state, writes=writes, sas=sas, packets=dict(packets),
                               ledger=ledger, node=view.node, settings=settings,
                               static_psk=view.secrets.static_psk)
        self._peers = outcomes
        self._objects = objects
        if changed:
            self._stat_peers = None


def take_over(kept: Mapping[str, PeerOutcome], scheduled: Scheduled,
              keying: dict[str, PeerKeying], agreed: dict[str, AgreedKeys]) -> None:
    """Add the outcomes `kept` from the last run to this run's: its schedule (waiting,
    stopped, downgraded), its usable keying and its agreed keys."""
    for name, outcome in kept.items():
        if outcome.keying is not None:
            keying[name] = outcome.keying
        if outcome.agreed is not None:
            agreed[name] = outcome.agreed
        scheduled.mark(name, waiting=outcome.waiting, stopped=outcome.stopped,
                       downgraded=outcome.downgraded)
