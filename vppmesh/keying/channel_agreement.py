"""The agreement of key generations over the agents' channel (a long-running agent's).

What the peers said goes into the key generations (epochs.PeerSaid, per peer with a live
session); the generations the scheduler wants are offered (KeyInit), and after each
successful run the agent states what VPP now holds: the inbound generations installed
with agreed keys ("installed"), its window base ("slid") and the generation it sends on
("sending"). The keys agreed go into the key book (book.py). The channel itself, its
socket and its events are secrecy.Secrecy's; this module keeps what they mean for keys.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vppmesh.channel import session as s
from vppmesh.keying.agreement import Agreement, Claim
from vppmesh.keying.book import KeyBook
from vppmesh.keying.epochs import WINDOW, GenerationState, PeerSaid
from vppmesh.keying.keys import psk_id

if TYPE_CHECKING:
    from vppmesh.agent.nat import ChannelLink, NatLearning
    from vppmesh.dataplane.view import LocalView, PeerView
    from vppmesh.dataplane.vpp.ipsec import SaState

log = logging.getLogger("vppmesh")

# A peer's public key changed in the mesh file: how long the keys agreed under its old
# key wait for its agent's word (over a session of the new key) that it still holds the
# old one, before they are dropped (follow_keys). Two handshake retry ceilings: a peer
# whose agent runs answers within a few retries.
KEY_VOUCH_WAIT = 2 * s.HANDSHAKE_RETRY_MAX


@dataclass
class _Heard:
    """The latest of what one peer's agent said."""

    installed: int | None = None
    slid: int | None = None
    sending: tuple[int, float] | None = None
    restarted: bool = False


class ChannelAgreement(Agreement):
    """The agreement of one agent's channel (see the module). `link`: the channel
    (secrecy.Secrecy); `nat`: its NAT learning (the learned ports go into the view and
    the generation file)."""

    def __init__(self, link: ChannelLink, nat: NatLearning) -> None:
        self.link = link
        self.nat = nat
        self.clock = link.clock
        self.book = KeyBook()
        self._heard: dict[int, _Heard] = {}
        self._tunnel_in: dict[int, int] = {}  # "installed", said since the peer's restart
        self._resumed: set[int] = set()  # peers whose saved tunnel_in this agent took up
        self._agreed_path: dict[int, str] = {}  # the path of each peer's last agreement
        self._stated: dict[tuple[int, str], int] = {}
        self._asked: dict[int, frozenset[int]] = {}  # lost inbound generations, asked for
        self._outbox: list[s.Output] = []
        self._announce: int | None = None  # the boot id of a restart not yet announced
        # Per peer, the previous public key its agent said (over a session of its
        # current key) it still holds (s.PreviousKeyHeld; follow_keys).
        self._vouched: dict[int, bytes] = {}
        self.unvouched = 0  # peers' agreed keys dropped for want of a vouch (follow_keys)
        # What `settles` compares: something happened since the last run that applied
        # (a key event, a NAT port learned, a session made or changed); per peer live
        # then, the roles (PSK, key) of its session; when the first of those sessions
        # expires; whether an offer was open; whether a vouch for an old key is awaited.
        self._news = True
        self._everything = True  # a new channel: nothing of the last run's stands
        self._sessions: dict[int, tuple[str | None, str | None]] = {}
        self._live_until = float("-inf")
        self._open = False
        self._vouch_pending = False

    @property
    def settles(self) -> bool:  # type: ignore[override]
        """Nothing happened on the channel since the last run that applied, that run's
        outcome stands (node.QuietRuns compares the rest: view, generations, SAs and
        their counters, ledger, the generations' time rules). Every input of the key
        decision the channel feeds is covered: what the peers said, the keys agreed and
        vouched for (events: `heard`), the ports their NATs map to (`learned`), which
        peers have a live session and on which PSK and key (`session_made`; expiry by
        time: `_live_until`), the offers whose answers or renewals the timers bring
        (`_open`), a restart still to announce and a vouch still awaited (time rule)."""
        return not (self._news or self._open or self._vouch_pending or self._outbox
                    or self._announce is not None or self._claim is not None
                    or self.clock() >= self._live_until)

    def learned(self, changed: bool) -> bool:
        """A NAT port learned (NatLearning.learn's answer): when the SAs change, news."""
        self._news |= changed
        return changed

    def session_made(self, now: float, peer: int) -> None:
        """A handshake completed: news unless the peer was live at the last run with a
        session of the same PSK and key (the sessions' 2-minute renewals change nothing
        a run decides)."""
        channel = self.link.channel
        if channel is None or self._sessions.get(peer) != (
                channel.session_psk(peer, now), channel.session_key(peer, now)):
            self._news = True

    def _remember(self, view: LocalView) -> None:
        """After a run that applied: what `settles` compares the channel with."""
        channel = self.link.channel
        now = self.clock()
        sessions: dict[int, tuple[str | None, str | None]] = {}
        until = float("inf")
        if channel is not None:
            known = set(channel.peers())
            for peer in view.peers:
                number = peer.node.node_number
                if number in known and channel.established(number, now):
                    sessions[number] = (channel.session_psk(number, now),
                                        channel.session_key(number, now))
                    expires = channel.usable_until(number)
                    if expires is not None:
                        until = min(until, expires)
        self._sessions, self._live_until = sessions, until
        self._open = channel is not None and channel.keying_open()
        self._news = self._everything = False

    # ---- what the channel tells ------------------------------------------------------
    def new_channel(self) -> None:
        """A new channel (a new punt socket): nothing stated to the peers on it yet."""
        self._stated, self._announce = {}, None
        self._news = self._everything = True

    def announce(self, boot_id: int) -> None:
        """VPP restarted: tell every peer's agent, with the next flush (once this VPP
        holds the mesh: before that it has no address to send from, and every datagram
        would wait for a retry)."""
        self._announce = boot_id

    def forget_peer(self, number: int, *, gone: bool) -> None:
        """A peer that left (`gone`), or whose record changed, starts afresh on both
        ends. A new public key: its agreed keys were authenticated by the old key only
        (perhaps the reason it was replaced); follow_keys keeps them only if the peer,
        authenticated by the new key, vouches for the old one."""
        self._heard.pop(number, None)
        self._tunnel_in.pop(number, None)
        self._asked.pop(number, None)
        for what in ("installed", "slid", "sending"):
            self._stated.pop((number, what), None)
        self._vouched.pop(number, None)
        self._news = True
        if gone:
            self.book.forget(number)

    def heard(self, now: float, event: s.Event) -> bool:
        """An event of the channel about keys; True when it needs a run."""
        if isinstance(event, (s.GenerationKeyed, s.PreviousKeyHeld, s.PeerAcked,
                              s.PeerRestarted)):
            self._news = True  # the next run decides again (settles)
        match event:
            case s.GenerationKeyed(peer=peer, generation=g, outbound=outbound, secret=secret,
                                   psk=psk, shared=shared):
                endpoint = self.link.endpoint
                if endpoint is not None and peer in endpoint.last_path:
                    self._agreed_path[peer] = endpoint.last_path[peer]
                return self.book.add(peer, g, outbound, secret, psk, shared)
            case s.PreviousKeyHeld(peer=peer, public_key=key):
                changed = self._vouched.get(peer) != key
                self._vouched[peer] = key
                return changed
            case s.PeerAcked(peer=peer, what=what, generation=g):
                heard = self._heard.setdefault(peer, _Heard())
                if what == "installed":
                    heard.installed = g
                    self._tunnel_in[peer] = g
                elif what == "slid":
                    heard.slid = g
                else:
                    heard.sending = (g, now)
                return True
            case s.PeerRestarted(peer=peer):
                self._tunnel_in.pop(peer, None)
                self._resumed.add(peer)  # what the last agent saved is stale now
                self._heard.setdefault(peer, _Heard()).restarted = True
                return True
        return False

    # ---- what a run uses -------------------------------------------------------------
    def learned_view(self, view: LocalView, state: GenerationState) -> LocalView:
        return self.nat.learned_view(view, state)

    def watch_flows(self, sas: Mapping[int, SaState], packets: Mapping[int, int] | None,
                    ) -> list[int]:
        return self.nat.watch_flows(sas, packets)

    def said(self, view: LocalView, peers: Iterable[PeerView] | None = None,
             ) -> dict[str, PeerSaid]:
        """What each peer (of `peers`, by default the view's) with a live session
        said, for epochs.schedule."""
        channel = self.link.channel
        if channel is None:
            return {}
        said = {}
        for peer in view.peers if peers is None else peers:
            number = peer.node.node_number
            if not self.link.live(number):
                continue
            heard = self._heard.get(number, _Heard())
            said[peer.name] = PeerSaid(keyed=self.book.outbound(number),
                                       installed=heard.installed, slid=heard.slid,
                                       sending=heard.sending, restarted=heard.restarted)
        return said

    def peer_marks(self, view: LocalView) -> dict[str, object] | None:
        """Per peer, its agreed keys' revision (the key book: keys agreed, adopted or
        retired) and whether an offer or an answered offer's "installed" is awaited
        (the timers act on those without any event). What the peers said is compared
        apart (`said`); NAT ports learned change the peer's view, and what applied()
        records changes its generation state: both are compared too (settled.py)."""
        if self._everything or self._announce is not None or self._outbox or \
                self._claim is not None or self._vouch_pending:
            return None
        channel = self.link.channel
        known = frozenset(channel.peers()) if channel is not None else frozenset()
        revision = self.book.revision
        marks: dict[str, object] = {}
        for peer in view.peers:
            number = peer.node.node_number
            marks[peer.name] = (revision(number), channel is not None and number in known
                                and channel.keying_open(number))
        return marks

    def offering(self, peer: int, generation: int) -> bool:
        """An offer of our outbound `generation` to `peer` awaits its answer (from a
        peer with a live session: else the generation counts as used, observe.observe_keys)."""
        channel = self.link.channel
        return channel is not None and self.link.live(peer) and \
            channel.offering(peer, generation)

    def _mark(self, state: GenerationState, wants: Mapping[str, int]) -> None:
        for name, g in wants.items():
            pg = state.peers[name]
            if g not in pg.ephemeral_out:
                pg.ephemeral_out.append(g)

    def applied(self, claim: Claim, view: LocalView, state: GenerationState,
                installed: Mapping[str, tuple[int, ...]]) -> list[tuple[bytes, int]]:
        """After a successful run (VPP holds the plan), before the state is saved:
        record the inbound generations installed with agreed keys, retire what is gone,
        and queue (flush() sends) the states and offers of `claim` for the peers.

        `installed`: the inbound generations the run installed, per peer. Returns the
        outbound agreed keys retired, (key, salt): the ledger forgets them.
        """
        wants = claim.wants
        retired: list[tuple[bytes, int]] = []
        channel = self.link.channel
        now = self.clock()
        self._resume_tunnels(view, state)
        if self.link.endpoint is not None:  # the channel's path inside the tunnels (endpoint.py)
            self.link.endpoint.tunnel_usable = self._tunnel_usable(view, state, installed)
        # Once per run, not per peer: both are built afresh by each call.
        ports = self.nat.ports()
        known = frozenset(channel.peers()) if channel is not None else frozenset()
        for peer in view.peers:
            number = peer.node.node_number
            pg = state.peers.get(peer.name)
            if pg is None:
                continue
            pg.nat_ports = list(ports.get(number, ()))
            pg.channel_psk = self.session_psk(view, number)
            pg.channel_key = self.session_key(number)
            pg.channel_path = self._agreed_path.get(number, pg.channel_path)
            pg.tunnel_in = self._tunnel_in.get(number)
            agreed_in = [g for g in installed.get(peer.name, ())
                         if self.book.keys(number, False, g) is not None]
            pg.ephemeral_in = sorted(set(agreed_in) | set(pg.ephemeral_in))
            live = channel is not None and number in known
            if live:  # the peer's KeyInits are answered for its window here only
                assert channel is not None
                channel.accept_generations(number, pg.in_base, WINDOW)
            for (_, outbound, g), keys in self.book.retire(peer, pg):
                if outbound:
                    retired += [(k.key.get_secret_value(), k.salt) for k in keys]
                if live:
                    assert channel is not None
                    channel.retire_generation(number, g, outbound=outbound)
            heard = self._heard.get(number)
            if heard is not None:
                heard.restarted = False
            if not live or channel is None or not self.link.live(number):
                continue
            # Inbound generations agreed before, whose keys neither this agent nor VPP
            # holds any more (the peer left the mesh and came back, say): the peer must
            # rekey towards us, once per loss.
            lost = frozenset(g for g in pg.ephemeral_in
                             if self.book.keys(number, False, g) is None)
            if lost and self._asked.get(number) != lost:
                self._outbox.append(channel.ask_rekey(now, number))
            self._asked[number] = lost
            states = {"slid": pg.in_base}
            if agreed_in:
                states["installed"] = max(agreed_in)
            if peer.name in installed:  # its outbound SAs of pg.out are in VPP now
                states["sending"] = pg.out
            for what, g in states.items():
                if self._stated.get((number, what)) != g:
                    self._stated[(number, what)] = g
                    self._outbox.append(channel.acknowledge(now, number, what, g))
            want = wants.get(peer.name)
            if want is not None and self.book.keys(number, True, want) is None and \
                    not channel.offering(number, want):
                self._outbox.append(channel.start_generation(now, number, want))
        self._remember(view)
        return retired

    def _resume_tunnels(self, view: LocalView, state: GenerationState) -> None:
        """What the peers said they installed, as the last agent saved it, taken up once
        per peer: a peer states "installed" only when it changes, so an agent that
        restarted would otherwise never use the tunnel path (an attacker who blocks the
        underlay's channel right after an agent restart stopped the pairs at their key
        limit)."""
        for peer in view.peers:
            number = peer.node.node_number
            if number in self._resumed:
                continue
            self._resumed.add(number)
            pg = state.peers.get(peer.name)
            if pg is not None and pg.tunnel_in is not None:
                self._tunnel_in.setdefault(number, pg.tunnel_in)

    def _tunnel_usable(self, view: LocalView, state: GenerationState,
                       installed: Mapping[str, tuple[int, ...]]) -> frozenset[int]:
        """The peers whose tunnel carries the channel (endpoint.py): this node sends on
        an agreed key there (the pair is not stopped: `installed` names it), and the
        peer's agent said, since its last restart, that it installed agreed keys
        inbound. A peer whose VPP restarted holds none of the old keys: until it says so
        again, datagrams into the tunnel would only be lost. (A generation it has not
        installed yet costs at most one retry: the next goes on the underlay.)"""
        usable = []
        for peer in view.peers:
            pg = state.peers.get(peer.name)
            number = peer.node.node_number
            if pg is not None and peer.name in installed and pg.out in pg.ephemeral_out \
                    and number in self._tunnel_in:
                usable.append(number)
        return frozenset(usable)

    def _send(self) -> None:
        """Send what applied() queued (flush(): after the generation state is saved),
        after a restart of VPP first its announcement."""
        outbox, self._outbox = self._outbox, []
        endpoint = self.link.endpoint
        if endpoint is None:
            return
        if self._announce is not None:
            log.info("VPP restarted: telling every peer's agent")
            outbox.insert(0, endpoint.channel.restarted(self.clock(), self._announce))
            self._announce = None
        for out in outbox:
            endpoint.emit(out)
        self.link.save_marks()  # handshakes accepted since the last run: at most one write

    def quiet(self) -> None:
        """A quiet run sends nothing, but keeps the handshake marks as every run does."""
        self.link.save_marks()

    # ---- reporting -------------------------------------------------------------------
    def session_key(self, peer: int) -> str | None:
        """The role ("current", "previous") of this node's key the peer's live session
        authenticated (None: no session)."""
        channel = self.link.channel
        if channel is None or not channel.knows(peer):
            return None
        return channel.session_key(peer, self.clock())

    def follow_keys(self, view: LocalView, state: GenerationState) -> None:
        """A peer's public key changed in the mesh file (a node key rotation's step 2, or
        a key replaced because it leaked): keep the pair's agreed keys only if the peer
        vouches for its old key.

        The keys agreed under the old key were authenticated by it alone. The peer's
        agent, over a session the new key authenticated, says it still holds the old
        one (PreviousKey: it rotated with `keygen --rotate` and keeps KEY.previous):
        then they are its keys, and they stay until the pair's generations move on, so
        no packet is lost. Until it does, for KEY_VOUCH_WAIT at most, they stay too
        (the new key's handshake takes a round trip, and no one holding the old key
        only can make a session any more); past it they are dropped and the pair starts
        afresh (fail closed: a leaked key's agreements protect nothing more), said in
        the log and counted (vppmesh_channel_previous_key_unvouched)."""
        now = self.clock()
        for peer in view.peers:
            pg = state.peers.get(peer.name)
            number = peer.node.node_number
            if pg is None:
                continue
            if pg.public_key != peer.node.public_key:
                if not pg.pinned:
                    continue  # nothing agreed: the pair starts afresh (epochs.schedule)
                pg.previous_public_key, pg.key_changed_since = pg.public_key, now
                pg.public_key = peer.node.public_key
                log.info("%s: new public key in the mesh file; the keys agreed under its "
                         "old one stay while its agent vouches for it (a key rotation), "
                         "%.0f s at most", peer.name, KEY_VOUCH_WAIT)
            if pg.previous_public_key is None:
                continue
            vouched = self._vouched.get(number)
            if vouched is not None and base64.b64encode(vouched).decode() == \
                    pg.previous_public_key:
                log.info("%s: its agent holds its previous key still: the keys agreed under "
                         "it stay until the pair's next generations", peer.name)
                pg.previous_public_key = pg.key_changed_since = None
                continue
            since = pg.key_changed_since if pg.key_changed_since is not None else now
            if 0 <= now - since < KEY_VOUCH_WAIT:
                continue
            log.warning(
                "%s: its agent did not vouch for its previous key within %.0f s (it no "
                "longer holds it: the key was replaced, not rotated, or KEY.previous was "
                "removed too early): the keys agreed under the old key are dropped and "
                "the pair starts afresh under the new one", peer.name, KEY_VOUCH_WAIT)
            self.book.forget(number)
            self.unvouched += 1
            pg.public_key = ""  # epochs.schedule starts the pair afresh
        # A vouch still awaited ends by time (KEY_VOUCH_WAIT): no run may be skipped.
        self._vouch_pending = any(pg.previous_public_key is not None
                                  for pg in state.peers.values())

    def session_psk(self, view: LocalView, peer: int) -> str | None:
        """"ROLE ID" of the PSK the peer's live session runs on (None: no session)."""
        channel = self.link.channel
        if channel is None or not channel.knows(peer):
            return None
        role = channel.session_psk(peer, self.clock())
        if role is None:
            return None
        return f"{role} {psk_id(dict(view.secrets.psks()).get(role, b''))}"

    def established(self, view: LocalView) -> set[str]:
        """The peers with a live session now."""
        if self.link.channel is None:
            return set()
        return {p.name for p in view.peers if self.link.live(p.node.node_number)}
