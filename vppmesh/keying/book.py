"""The key book: the SA keys of agreed generations, in memory only.

It holds, per (peer, direction, generation), the SA keys derived from the generation's
ephemeral secret (keys.derive_sa_key_ephemeral) that the agents' channel agreed. An
entry is dropped, and the channel forgets the secret, when the generation retires:
outbound once the sender stepped past it (its SAs deleted), inbound once the receiver's
window slid past it; all of a peer's when it leaves the mesh or its public key changes.
From then on nothing on either node recomputes those keys. An agent that restarts
without its book adopts the keys VPP holds for generations its generation file marks as
agreed (`ephemeral_out`, `ephemeral_in`), so a restarted agent changes nothing in VPP; a
generation neither the agent nor VPP holds is never installed with its static key:
outbound it counts as used (the scheduler steps past it), inbound it is left out.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from vppmesh.dataplane.state import sa_id_for
from vppmesh.dataplane.view import AgreedKeys
from vppmesh.keying.keys import SaKey, derive_sa_key_ephemeral, spi_for

if TYPE_CHECKING:
    from vppmesh.dataplane.view import LocalView, PeerView
    from vppmesh.dataplane.vpp.ipsec import SaDetails
    from vppmesh.keying.epochs import GenerationState, PeerGenerations

Direction = tuple[int, bool, int]  # (peer node number, outbound, generation)


class KeyBook:
    """SA keys of agreed generations, in memory only (see the module): derived from the
    ephemeral secrets the channel agrees, or adopted from VPP by an agent that restarted
    without them (and by a one-shot `up`, which has no channel)."""

    def __init__(self) -> None:
        # peer node number -> (outbound, generation) -> the key of each tunnel
        self._keys: dict[int, dict[tuple[bool, int], tuple[SaKey, ...]]] = {}
        self._revision: dict[int, int] = {}
        self._revisions = itertools.count(1)  # never repeats: plan() caches on it
        self._agreed: dict[int, AgreedKeys] = {}
        # How to derive each peer's keys: (local name, peer name, static PSK, pair
        # secret, tunnels), from the last run's view.
        self._derive: dict[int, tuple[str, str, bytes, bytes, int]] = {}
        self._derived: LocalView | None = None  # the view _derive was made from

    def prepare(self, view: LocalView, state: GenerationState,
                sas: Mapping[int, SaDetails],
                deciding: Iterable[PeerView] | None = None) -> None:
        """Before a run's schedule: remember how to derive each peer's keys (every
        peer of the view: the channel agrees keys for all), and adopt the keys VPP
        holds for agreed generations this book lacks (for the peers `deciding`, by
        default all: the others' decisions are the last run's)."""
        count = view.settings.tunnels_per_peer
        if self._derived is not view:  # the peers' derivations, made when add() asks
            self._derive, self._derived = {}, view
        me = view.node.node_number
        for peer in view.peers if deciding is None else deciding:
            pg = state.peers.get(peer.name)
            if pg is None or pg.public_key != peer.node.public_key:
                continue
            number = peer.node.node_number
            for outbound, generations in ((True, pg.ephemeral_out), (False, pg.ephemeral_in)):
                for g in generations:
                    if (outbound, g) in self._keys.get(number, {}):
                        continue
                    sender = me if outbound else number
                    held = [sas.get(sa_id_for("out" if outbound else "in", number, t, g,
                                              agreed=True)) for t in range(count)]
                    if all(sa is not None and sa.spec.spi == spi_for(sender, t, g)
                           for t, sa in enumerate(held)):
                        self._keys.setdefault(number, {})[(outbound, g)] = tuple(
                            SaKey(key=sa.spec.key, salt=sa.spec.salt)
                            for sa in held if sa is not None)
                        self._changed(number)

    def add(self, peer: int, generation: int, outbound: bool, secret: bytes,
            psk: bytes | None = None, shared: bytes | None = None) -> bool:
        """Derive one direction's keys of `generation` from its ephemeral secret, under
        `psk` and `shared`: the PSK and the pair secret of the static keys of the channel
        session it was agreed on (None: the static ones). During a node key rotation a
        session may run on either key of the rotating node: both ends derive with the
        pair secret of the keys that session authenticated."""
        derive = self._derivation(peer)
        if derive is None:
            return False  # a peer that left meanwhile
        local, remote, static_psk, static_shared, count = derive
        psk = static_psk if psk is None else psk
        shared = static_shared if shared is None else shared
        sender, receiver = (local, remote) if outbound else (remote, local)
        self._keys.setdefault(peer, {})[(outbound, generation)] = tuple(
            derive_sa_key_ephemeral(shared, secret, psk, sender=sender, receiver=receiver,
                                    tunnel=t, epoch=generation) for t in range(count))
        self._changed(peer)
        return True

    def _derivation(self, peer: int) -> tuple[str, str, bytes, bytes, int] | None:
        """(local name, peer name, static PSK, pair secret, tunnels) of a peer of the
        last prepared view (None: not one of its peers)."""
        view = self._derived
        if view is None:
            return None
        if not self._derive:
            psk, count = view.secrets.static_psk, view.settings.tunnels_per_peer
            self._derive = {p.node.node_number: (view.name, p.name, psk, p.secret, count)
                            for p in view.peers}
        return self._derive.get(peer)

    def keys(self, peer: int, outbound: bool, generation: int) -> tuple[SaKey, ...] | None:
        return self._keys.get(peer, {}).get((outbound, generation))

    def key(self, view: LocalView, peer: PeerView, pg: PeerGenerations | None, *,
            outbound: bool, tunnel: int, generation: int) -> SaKey | None:
        """The key of one SA: agreed (or adopted); None for a generation marked agreed
        that nobody holds; else the static schedule's."""
        keys = self.keys(peer.node.node_number, outbound, generation)
        if keys is not None:
            return keys[tunnel]
        if pg is not None and generation in (pg.ephemeral_out if outbound
                                             else pg.ephemeral_in):
            return None
        return view.sa_key(peer, outbound=outbound, tunnel=tunnel, epoch=generation)

    def revision(self, peer: int) -> int | None:
        """Changes whenever the peer's keys do, never repeats (None: none held yet)."""
        return self._revision.get(peer)

    def outbound(self, peer: int) -> frozenset[int]:
        """Our outbound generations towards `peer` whose keys are held."""
        return frozenset(g for outbound, g in self._keys.get(peer, {}) if outbound)

    def agreed(self, peer: PeerView) -> AgreedKeys | None:
        """The peer's keys that are not the static schedule's (None: it has none)."""
        number = peer.node.node_number
        found = self._agreed.get(number)
        if found is None:
            keys = {(outbound, t, g): key
                    for (outbound, g), keys in self._keys.get(number, {}).items()
                    for t, key in enumerate(keys)}
            if not keys:
                return None
            found = self._agreed[number] = AgreedKeys(self._revision[number], keys)
        return found

    def retire(self, peer: PeerView, pg: PeerGenerations,
               ) -> list[tuple[Direction, tuple[SaKey, ...]]]:
        """Drop the keys of generations that are gone: outbound below the one sent on,
        inbound below the window. Returns what was dropped (the ledger forgets it)."""
        number = peer.node.node_number
        held = self._keys.get(number)
        if not held:
            return []
        retired = [(outbound, g) for outbound, g in held
                   if g < (pg.out if outbound else pg.in_base)]
        dropped = [((number, outbound, g), held.pop((outbound, g))) for outbound, g in retired]
        if retired:
            self._changed(number)
            peer.planned.clear()  # plan()'s cached objects hold the retired keys
        return dropped

    def forget(self, number: int) -> None:
        self._keys.pop(number, None)
        self._agreed.pop(number, None)
        self._revision.pop(number, None)

    def _changed(self, peer: int) -> None:
        self._revision[peer] = next(self._revisions)
        self._agreed.pop(peer, None)
