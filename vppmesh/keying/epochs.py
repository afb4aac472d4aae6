"""Key generations: every sender rekeys on its own, receivers follow, nothing is coordinated.

Why generations per sender rather than one mesh-wide epoch: VPP restarts an SA's sequence
number (hence the AES-GCM IV) at 1 whenever the SA is created, so an outbound key must
never be installed twice. After a VPP restart, a reinstalled SA needs a fresh key, and
asking an operator to raise a mesh-wide epoch on every node is the manual step this
module removes.

The scheme, per ordered pair (sender S, receiver R), all tunnels of the pair together:

- R accepts S's traffic under a *window* of generations [base, base + WINDOW). WINDOW = 3
  fits the 4-bit generation field of SPIs and SA ids many times over, so the SAs of one
  window never share an SPI.
- S sends under one generation `out`. It steps to the next generation whose keys its
  used-key ledger has never seen: after a VPP restart (its old key is burnt), on
  `vppmesh rekey`, on the schedule (`rekey_interval`) and at half of any key limit.
  The new generation is already inside R's window, so the switch is make-before-break:
  R holds the new inbound SA before S uses it, and S's old outbound SA is deleted only
  after the tunnel was re-protected with the new one.
- R slides its window to h once S's traffic has been seen on h (the inbound SA's
  `last_seq_inbound` moved) for `rekey_grace` seconds; the older inbound SAs go then.
  The base is persisted, so a restarted R still accepts exactly what S may send.
- S never steps past `floor + WINDOW - 1`, and a voluntary rekey not past
  `floor + WINDOW - 2`: one generation stays in reserve for a VPP restart. `floor` is
  the highest generation S knows R has slid to: one S has used for twice the grace
  period while R's packets kept arriving (R slides after one grace period). There is no
  message from R to S, so this rests on R's agent running (`up --watch`). A blocked step
  is deferred (voluntary rekey) or fails closed (the key is burnt: the peer gets no
  tunnels, so its traffic is dropped, never sent in clear). Only a second VPP restart
  before the reserve generation was proven (2 x rekey_grace of traffic both ways) gets
  there; S cannot learn more without a message from R, and raising `key_epoch` on every
  node resynchronises the pair.

A receiver's own VPP restart loses the anti-replay state of its inbound SAs: packets
recorded under S's current generation could then be replayed once each (they still
authenticate; nothing decrypts for the attacker). The exposure ends at S's next rekey,
so `rekey_interval` bounds it.

With the agents' channel (vppmesh/agent/secrecy.py, docs/design.md), a pair whose agents both
run keys every generation with a fresh ephemeral X25519 exchange (forward secrecy), and
inference gives way to what the peer says: the sender steps to a generation only once
its key is agreed and the receiver said its inbound SAs for it are installed; the
receiver's "slid" is the sender's floor; the sender's "sending" lets the receiver slide
without traffic; a receiver's VPP restart makes the sender rekey at once. A generation
once offered over the channel is never used with its static key (`ephemeral_out`), and a
receiver remembers which inbound generations carry agreed keys (`ephemeral_in`), so an
agent restarted without those keys adopts what VPP holds rather than replace it. Without
a channel to a peer (its agent not running, a one-shot `up`), the static schedule above
runs unchanged.

Key limits: VPP 26.06 SAs carry no lifetime (ipsec_sa.h has no soft/hard byte or packet
limit and ipsec_sad_entry_add_v2 takes none), so the agent enforces them from the SA's
`seq_outbound` (packets, 64-bit with ESN) and an upper bound on bytes (packets times the
underlay MTU), plus the key's age. At half of a limit the sender rekeys; at the limit, if
it still could not, the peer fails closed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import to_json

from vppmesh.config import MeshSettings
from vppmesh.errors import ConfigError
from vppmesh.keying.files import exclusive, replace_file

WINDOW = 3
# Generations live in 4 bits of SPIs and SA ids; a window must never wrap onto itself.
assert WINDOW < 16


class PeerKeying(BaseModel):
    """What plan() needs per peer: the generation sent on and the ones accepted."""

    model_config = ConfigDict(frozen=True)
    outbound: int
    inbound: tuple[int, ...]


class PeerGenerations(BaseModel):
    """What one node remembers about one peer's key generations (both directions)."""

    model_config = ConfigDict(extra="forbid")
    public_key: str
    out: int
    out_since: float
    out_sent_at: float | None = None  # when `out` was first seen carrying traffic both ways
    # Per accepted generation, the peer's highest inbound sequence numbers at the last look.
    in_marks: dict[int, int] = {}
    floor: int
    in_base: int
    in_seen: int | None = None  # a generation above in_base carrying the peer's traffic
    in_seen_at: float | None = None
    rekey_pending: bool = False
    last_note: str | None = None  # repeated notes (a deferral, a block) are told once
    # Our outbound generations offered over the channel (claimed before the offer: never
    # used with their static key), and the peer's whose inbound SAs here got agreed keys.
    ephemeral_out: list[int] = []
    ephemeral_in: list[int] = []
    # Per tunnel, the port the peer's NAT maps its ESP in UDP to, learned over the channel
    # when one is not its record's `nat.port` (secrecy.py); kept so a restarted agent
    # sends there. Empty: the record's.
    nat_ports: list[int] = []
    # The pair's agents have spoken over an authenticated session (this public key):
    # under `forward_secrecy: required` the pair never goes back to static keys.
    agents_met: bool = False
    # Since when the next outbound generation is being agreed (None: nothing pending),
    # and since when the pair has no usable outbound key (None: it has one) and why.
    agreeing_since: float | None = None
    stopped_since: float | None = None
    stopped_why: str | None = None
    # The PSK the pair's channel session runs on, as "ROLE ID" (role here: current,
    # next or previous; keys.psk_id), at the agent's last run; None: no session.
    channel_psk: str | None = None
    # Which of this node's keys ("current", "previous") that session authenticated:
    # during this node's key rotation, whether the peer still knows it by the old one.
    channel_key: str | None = None
    # The path ("underlay", "tunnel": channel/endpoint.py) of the peer's datagram that
    # completed the pair's last agreement; "tunnel": the underlay's channel did not get
    # through (blocked, or lost).
    channel_path: str | None = None
    # The newest generation the peer's agent said it installed inbound with agreed keys,
    # since its VPP last restarted: the pair's tunnel carries the channel (endpoint.py).
    # Kept so that a restarted agent (the peer states it only when it changes) can still
    # use that path; a peer VPP restart this agent missed costs two unanswered datagrams
    # on the tunnel before the underlay is tried.
    tunnel_in: int | None = None
    # The peer's public key changed in the mesh file while the pair held agreed keys:
    # its old key, and since when its agent has not yet vouched, over a session of the
    # new key, that it still holds the old one (a node key rotation: Secrecy.follow_keys).
    # Until it does, for KEY_VOUCH_WAIT at most, the keys agreed under the old key stay;
    # then they are dropped, as for a key replaced because it leaked.
    previous_public_key: str | None = None
    key_changed_since: float | None = None

    @property
    def pinned(self) -> bool:
        """Agreed keys only, whatever happens (with `forward_secrecy: required`)."""
        return self.agents_met or bool(self.ephemeral_out or self.ephemeral_in)

    @property
    def window(self) -> tuple[int, ...]:
        return tuple(range(self.in_base, self.in_base + WINDOW))


class GenerationState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = 1
    peers: dict[str, PeerGenerations] = {}


@dataclass(frozen=True)
class PeerObservation:
    """What VPP shows about one peer's SAs right now."""

    out_installed: bool = False  # VPP holds `out`'s outbound SAs with the expected keys
    out_packets: int = 0  # highest seq_outbound over those SAs
    inbound_active: frozenset[int] = frozenset()  # generations whose inbound SAs got traffic
    # Per accepted generation, the sum of last_seq_inbound over the peer's inbound SAs.
    inbound_seq: Mapping[int, int] = field(default_factory=dict)
    # Those outbound SAs send with another UDP encapsulation (flag or ports) than the pair
    # needs now: a new SA is needed, and its key must not be one VPP already used.
    encapsulation_changed: bool = False


@dataclass(frozen=True)
class PeerSaid:
    """What the peer's agent said over the channel (vppmesh/agent/secrecy.py), for one run.

    `keyed`: our outbound generations whose ephemeral key is agreed and held; the peer's
    latest states: `installed` (its inbound SAs for that generation carry the agreed
    key), `slid` (its window base for our traffic), `sending` (the generation it sends
    on, and when we heard it); `restarted`: its VPP restarted since the last run.
    """

    keyed: frozenset[int] = frozenset()
    installed: int | None = None
    slid: int | None = None
    sending: tuple[int, float] | None = None
    restarted: bool = False


@dataclass(frozen=True)
class Decision:
    """The outcome for one peer: its keying, or None when it must fail closed (or, with
    `waiting`, has no outbound key until the peer's agent answers)."""

    keying: PeerKeying | None
    notes: tuple[str, ...] = ()
    stepped: bool = False
    want: int | None = None  # a generation to agree over the channel before stepping
    waiting: bool = False
    # The pair left agreed keys for the static schedule (`forward_secrecy: preferred`).
    downgraded: bool = False
    # Why the pair has no outbound key, when it fails closed: "key limit" (the key in
    # use reached a hard limit before a new one was agreed), "no agreement" (agreed keys
    # are required and the peer's agent cannot be reached), "window" (no generation the
    # peer surely accepts).
    stopped: str | None = None


def initial(public_key: str, settings: MeshSettings, now: float,
            offset: float = 0.0) -> PeerGenerations:
    """A new pair's generations; its first key counts as `offset` seconds old
    (rotation_offset), so that the pairs a node starts with together rotate apart."""
    g = settings.key_epoch
    return PeerGenerations(public_key=public_key, out=g, out_since=now - offset, floor=g,
                           in_base=g)


def rotation_offset(settings: MeshSettings, me: str, peer_key: str) -> float:
    """Where in the first half of rekey_interval this pair's first scheduled rotation
    falls early: the pairs of a node (all started in one run) would otherwise rotate in
    the same run, every interval, a burst of key exchanges and SA changes at 1000 peers.
    Derived from the two public keys, so it is the same on every run and every restart
    (and in tests); each later rotation comes one interval after the last, so the pairs
    stay apart. 0 without a rekey_interval. The key only ever counts older than it is:
    every limit comes sooner, none later."""
    if not settings.rekey_interval:
        return 0.0
    digest = hashlib.sha256(f"{me}\0{peer_key}".encode()).digest()
    return settings.rekey_interval / 2 * int.from_bytes(digest[:8], "big") / 2**64


def age(now: float, since: float) -> float:
    """Seconds from `since` to `now`, never negative (see clamp_future)."""
    return max(0.0, now - since)


def clamp_future(pg: PeerGenerations, now: float) -> None:
    """Times the file holds that lie ahead of `now` come back to `now`.

    Times are on the node's clock (vppmesh/agent/clock.py), which never steps back within a
    boot; one ahead of it was written under another boot's anchor (the wall clock was
    behind when this boot's was taken) or by an older vppmesh on the wall clock before
    a step back. Kept as they are, the key would not age, nor the receiver slide, until
    the clock caught up (an hour's step: an hour more on one key). Brought to `now`, the
    key's age restarts once: at most the age it had, once per such event, and a new boot
    restarts VPP, whose lost SAs make the sender step to a new generation anyway; the
    packet and byte limits count VPP's packets, whatever the clocks say.
    """
    if pg.out_since > now:
        pg.out_since = now
    if pg.out_sent_at is not None and pg.out_sent_at > now:
        pg.out_sent_at = now
    if pg.in_seen_at is not None and pg.in_seen_at > now:
        pg.in_seen_at = now


def soft_limit_reached(pg: PeerGenerations, obs: PeerObservation, settings: MeshSettings,
                       now: float) -> str | None:
    """Why the current outbound key should be replaced now (None: it is fine)."""
    if settings.rekey_interval and age(now, pg.out_since) >= settings.rekey_interval:
        return "scheduled rekey"
    return half_limit(pg, obs, settings, now)


def half_limit(pg: PeerGenerations, obs: PeerObservation, settings: MeshSettings,
               now: float) -> str | None:
    """Which hard limit the current outbound key is half way to (None: none)."""
    if age(now, pg.out_since) >= settings.key_max_seconds / 2:
        return "key age at half of key_max_seconds"
    if obs.out_packets >= settings.key_max_packets // 2:
        return "packets at half of key_max_packets"
    if obs.out_packets * settings.underlay_mtu >= settings.key_max_bytes // 2:
        return "bytes at half of key_max_bytes"
    return None


def hard_limit_reached(pg: PeerGenerations, obs: PeerObservation, settings: MeshSettings,
                       now: float) -> bool:
    return (age(now, pg.out_since) >= settings.key_max_seconds
            or obs.out_packets >= settings.key_max_packets
            or obs.out_packets * settings.underlay_mtu >= settings.key_max_bytes)


def advance(pg: PeerGenerations, obs: PeerObservation, settings: MeshSettings, *,
            now: float, key_used: Callable[[int], bool], peer: str,
            said: PeerSaid | None = None) -> Decision:
    """Update one peer's generations from what VPP shows and, with a channel to the
    peer, what its agent said (`said`); pure but for `pg`, in place."""
    notes: list[str] = []
    clamp_future(pg, now)
    epoch = settings.key_epoch
    if pg.out < epoch:  # the operator moved the whole mesh forward
        pg.out, pg.out_since, pg.out_sent_at = epoch, now, None
    pg.floor = max(pg.floor, epoch)
    pg.in_base = max(pg.in_base, epoch)
    if said is not None and said.slid is not None and said.slid <= pg.out:
        pg.floor = max(pg.floor, said.slid)  # the peer's word, not an inference

    # Receiver: follow the peer to a newer generation once its traffic was seen there.
    # What was seen is remembered: a restart of VPP (which resets the counters) in the
    # grace period must not stop the slide the sender counts on.
    if pg.in_seen is not None and pg.in_seen <= pg.in_base:
        pg.in_seen, pg.in_seen_at = None, None
    newer = [g for g in obs.inbound_active if g > pg.in_base]
    if newer and (pg.in_seen is None or max(newer) > pg.in_seen):
        pg.in_seen, pg.in_seen_at = max(newer), now
    if said is not None and said.sending is not None:
        h, heard = said.sending  # the sender's word: it sends on h (traffic or not)
        if pg.in_base < h < pg.in_base + WINDOW and (pg.in_seen is None or h > pg.in_seen):
            pg.in_seen, pg.in_seen_at = h, min(heard, now)
    if pg.in_seen is not None and pg.in_seen_at is not None and \
            age(now, pg.in_seen_at) >= settings.rekey_grace:
        h = pg.in_seen
        notes.append(f"{peer}: accepting generations {h}..{h + WINDOW - 1} "
                     f"(was {pg.in_base}..{pg.in_base + WINDOW - 1})")
        pg.in_base, pg.in_seen, pg.in_seen_at = h, None, None

    # Sender: learn how far the peer has surely slid. The evidence is traffic both ways
    # while `out` is in use: we sent on it, and the peer's packets kept arriving, so the
    # peer has tunnels to us (it is not failing closed) and, its agent running, sees us
    # on `out`. Sent packets alone would not do: they are counted even when the peer
    # drops them. The evidence is remembered, so it still counts after VPP lost the SAs.
    # Compared per generation: SAs come and go with the window, and a recreated SA starts
    # from zero, so only growth of the same generation's counter counts.
    peer_sending = any(seq > pg.in_marks.get(g, seq) for g, seq in obs.inbound_seq.items())
    pg.in_marks = dict(obs.inbound_seq)
    if obs.out_installed and obs.out_packets > 0 and peer_sending and pg.out_sent_at is None:
        pg.out_sent_at = now
    if pg.out_sent_at is not None and age(now, pg.out_sent_at) >= 2 * settings.rekey_grace:
        pg.floor = max(pg.floor, pg.out)

    forced = (not obs.out_installed or obs.encapsulation_changed) and key_used(pg.out)
    lost = "UDP encapsulation changed" if obs.encapsulation_changed else \
        "key already used (VPP lost its SAs)"
    if said is not None and said.restarted:
        # Its anti-replay state, or its keys, are gone: a new generation at once, kept
        # as a request until taken.
        pg.rekey_pending = True
    # Agreed keys only, whatever happens: a pair whose agents have met never moves to a
    # key of the static schedule, which anyone holding one node's private key (and the
    # PSK) can recompute for ever; an attacker who blocks the channel must not be able
    # to bring that about.
    strict = settings.forward_secrecy == "required" and pg.pinned
    upgrade = said is not None and pg.out not in pg.ephemeral_out
    hard = obs.out_installed and hard_limit_reached(pg, obs, settings, now)
    reason = lost if forced else (
        "rekey requested" if pg.rekey_pending else
        soft_limit_reached(pg, obs, settings, now) if obs.out_installed else None)
    # A request is taken even for a key that protected nothing: the operator's
    # (`vppmesh rekey`, a suspected compromise) and the peer's (it may have lost the key)
    # are about the key, not its use.
    asked = pg.rekey_pending
    if reason is not None and not forced and not asked and not hard and said is None and \
            obs.out_installed and obs.out_packets == 0:
        # On the static schedule a key that never protected a packet has nothing to
        # rotate away from, and each step spends a generation of the peer's window
        # (which only traffic both ways gives back): keep it. With the agents, steps
        # are acknowledged and idle pairs rotate too (the forward-secrecy window).
        reason = None
    if reason is None and upgrade:
        reason = "forward secrecy: the peer's agent answers"
    if said is None and reason is not None and (strict or (
            not forced and not hard and pg.out in pg.ephemeral_out
            and reason in ("rekey requested", "scheduled rekey"))):
        # A pair on agreed keys is rekeyed by its agents, over their channel: a one-shot
        # `up` or `rekey`, or an agent that cannot reach the peer's, leaves the request
        # to them rather than step to a static key.
        if forced or hard:
            why = lost if forced else "its key reached a hard limit"
            note = (f"{peer}: no agreed key to send on ({why}) and no channel to the "
                    "peer's agent: the pair is stopped (forward_secrecy: required) until "
                    "the agents agree a new key; its traffic is dropped")
            return Decision(keying=None, notes=(note,),
                            stopped="key limit" if hard and not forced else "no agreement")
        notes.append(f"{peer}: rekey left to the agents (the pair runs on agreed keys)")
        pg.rekey_pending = pg.rekey_pending or reason == "rekey requested"
        return Decision(keying=PeerKeying(outbound=pg.out, inbound=pg.window),
                        notes=tuple(notes))
    stepped = downgraded = False
    if reason is not None:
        candidate = pg.out + 1
        while key_used(candidate):
            candidate += 1
        # A voluntary step leaves the last generation of the peer's window in reserve, so
        # a VPP restart (which burns the key in use) can always step once more. A key at
        # its hard limit is as unusable as a burnt one: the reserve is for it too (else
        # the pair fails closed although the peer accepts a generation).
        reserve = pg.floor + WINDOW - 1
        edge = reserve if forced or hard else reserve - 1
        # A pair that has no usable key anyway (the key is burnt, or at its limit) steps
        # as soon as the key is agreed, without waiting for the peer's "installed": there
        # is nothing left to break, and a peer in the same state installs our generation
        # only once it has a key again itself (each would wait for the other).
        broken_and_keyed = (forced or hard) and said is not None and candidate in said.keyed
        if candidate <= edge and said is not None and not broken_and_keyed and not (
                candidate in said.keyed and said.installed == candidate):
            # Make-before-break by acknowledgement: agree the key, let the peer install
            # it and say so, then step (a later run).
            note = f"{peer}: agreeing generation {candidate} with the peer's agent ({reason})"
            if forced:
                return Decision(keying=None, notes=(note,), want=candidate, waiting=True)
            if hard:
                # The agreement is late (dropped, delayed): the key in use goes no
                # further than its limit, and no static key stands in.
                return Decision(keying=None, want=candidate, stopped="key limit", notes=(
                    note, f"{peer}: its outbound key reached a hard limit before the "
                    f"agents agreed generation {candidate}: the pair is stopped until "
                    "they do; its traffic is dropped"))
            return Decision(keying=PeerKeying(outbound=pg.out, inbound=pg.window),
                            notes=(note,), want=candidate)
        if candidate <= edge:
            if said is None and pg.pinned:
                # Only `preferred` gets here (`required` returned above).
                downgraded = True
                notes.append(f"{peer}: leaving agreed keys for the static schedule "
                             f"(forward_secrecy: preferred; {reason}, no channel to the "
                             "peer's agent): generation "
                             f"{candidate}'s key is not forward secret")
            notes.append(f"{peer}: outbound generation {pg.out} -> {candidate} ({reason})")
            pg.out, pg.out_since, pg.out_sent_at = candidate, now, None
            pg.rekey_pending = False
            stepped = True
        elif forced or hard:
            notes.append(
                f"{peer}: no usable outbound key: generation {candidate} is beyond what the "
                f"peer surely accepts (up to {pg.floor + WINDOW - 1}); its traffic is dropped. "
                "Raise settings.key_epoch on every node to resynchronise")
            return Decision(keying=None, notes=tuple(notes), stopped="window")
        else:
            pg.rekey_pending = True
            notes.append(f"{peer}: rekey deferred ({reason}): the peer has not yet moved to "
                         f"generation {pg.out}")
            if said is not None and candidate <= reserve and \
                    half_limit(pg, obs, settings, now) is not None:
                # The reserve is the pair's next key if the one in use reaches its hard
                # limit before the peer slides (a generation burnt by an agent or VPP
                # restart in the middle of an agreement gets the pair here): agree it
                # now, step into it only then, without a gap (keyed, as above). Only on
                # the way to a limit: agreed early, it would count as used if this agent
                # restarted, and the reserve is what a VPP restart steps to.
                return Decision(keying=PeerKeying(outbound=pg.out, inbound=pg.window),
                                notes=tuple(notes), want=candidate)
    return Decision(keying=PeerKeying(outbound=pg.out, inbound=pg.window), notes=tuple(notes),
                    stepped=stepped, downgraded=downgraded)


def next_change(state: GenerationState, settings: MeshSettings, peers: Iterable[str],
                now: float) -> float:
    """The earliest time after `now` at which advance() could decide otherwise for one of
    `peers` although nothing else changed: a key's age reaching rekey_interval, half or
    all of key_max_seconds, a receiver's grace, a sender's twice-grace proof. Every time
    rule is `age >= limit`, and ages only grow, so a rule already met at `now` stays met;
    only the next one to be met counts. -inf when a peer has no generations yet."""
    soonest = float("inf")
    for name in peers:
        pg = state.peers.get(name)
        if pg is None:
            return float("-inf")
        times = [pg.out_since + settings.key_max_seconds / 2,
                 pg.out_since + settings.key_max_seconds]
        if settings.rekey_interval:
            times.append(pg.out_since + settings.rekey_interval)
        if pg.in_seen_at is not None:
            times.append(pg.in_seen_at + settings.rekey_grace)
        if pg.out_sent_at is not None:
            times.append(pg.out_sent_at + 2 * settings.rekey_grace)
        for t in times:
            if now < t < soonest:
                soonest = t
    return soonest


def request_rekey(state: GenerationState) -> int:
    """Mark every peer for a rekey at the next run; returns how many."""
    for pg in state.peers.values():
        pg.rekey_pending = True
    return len(state.peers)


@dataclass
class Scheduled:
    """schedule()'s outcome: keying per peer (peers that must fail closed, or wait for
    the peer's agent, are absent), the notes to tell, the generations to agree over the
    channel first (`wants`), the peers stopped (fail closed) and those that left agreed
    keys for static ones (`forward_secrecy: preferred`)."""

    keying: dict[str, PeerKeying] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    wants: dict[str, int] = field(default_factory=dict)
    waiting: set[str] = field(default_factory=set)
    stopped: dict[str, str] = field(default_factory=dict)  # failed closed, and why
    downgraded: set[str] = field(default_factory=set)  # left agreed keys (preferred)

    def mark(self, name: str, *, waiting: bool, stopped: str | None,
             downgraded: bool) -> None:
        """One peer's state beside its keying: waiting, stopped (why), downgraded."""
        if waiting:
            self.waiting.add(name)
        if stopped is not None:
            self.stopped[name] = stopped
        if downgraded:
            self.downgraded.add(name)


def schedule(state: GenerationState, settings: MeshSettings, peers: Mapping[str, str],
             observations: Mapping[str, PeerObservation], *, now: float,
             key_used: Callable[[str, int], bool],
             said: Mapping[str, PeerSaid] | None = None, me: str = "") -> Scheduled:
    """Keying for every peer (name -> public key); `said`: what the peers with a live
    channel said (the others run on the static schedule); `me`: this node's public key
    (a new pair's rotation_offset).

    A peer whose public key changed starts afresh: its old generations meant other keys.
    State of peers that left is kept, so a peer that rejoins resumes where it was.
    """
    out = Scheduled()
    heard = said or {}
    for name, public_key in peers.items():
        pg = state.peers.get(name)
        if pg is None or pg.public_key != public_key:
            pg = state.peers[name] = initial(public_key, settings, now,
                                             rotation_offset(settings, me, public_key))
        if heard.get(name) is not None:
            pg.agents_met = True  # the peer's agent answered over an authenticated session
        decision = advance(pg, observations.get(name, PeerObservation()), settings, now=now,
                           key_used=lambda g, n=name: key_used(n, g), peer=name,
                           said=heard.get(name))
        if decision.want is None:
            pg.agreeing_since = None
        elif pg.agreeing_since is None:
            pg.agreeing_since = now
        if decision.keying is not None:
            pg.stopped_since, pg.stopped_why = None, None
        elif decision.stopped is not None and (pg.stopped_since is None
                                               or pg.stopped_why != decision.stopped):
            pg.stopped_since, pg.stopped_why = now, decision.stopped
        # (A stopped pair whose next run waits for the agreement, its key now burnt
        # because the stop removed it, is still stopped, for the same reason.)
        # Agreed generations the pair no longer uses are forgotten (their keys too).
        pg.ephemeral_out = [g for g in pg.ephemeral_out if g >= pg.out]
        pg.ephemeral_in = [g for g in pg.ephemeral_in if g >= pg.in_base]
        for note in decision.notes:
            if note != pg.last_note:
                out.notes.append(note)
                pg.last_note = note
        if decision.keying is not None:
            out.keying[name] = decision.keying
        if decision.want is not None:
            out.wants[name] = decision.want
        out.mark(name, waiting=decision.waiting, stopped=decision.stopped,
                 downgraded=decision.downgraded)
    return out


def _values_copy(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """A PeerGenerations' field values, its lists and dicts (of numbers) copied."""
    return tuple(v.copy() if type(v) in (list, dict) else v for v in values)


class GenerationStore:
    """`<state_dir>/<node>.generations.json` (0600), read and written under a lock file.

    The lock serialises the agents of one node (`up --watch` and `vppmesh rekey`), so a
    generation is never chosen twice from a stale file.
    """

    def __init__(self, state_dir: Path, node: str) -> None:
        self.path = state_dir / f"{node}.generations.json"
        self.lock_path = state_dir / f"{node}.lock"
        # (file text, the state it holds, that state's text as save() writes it): what
        # this store last read or wrote, for load(reuse=True) and changed().
        self._kept: tuple[str, GenerationState, str] | None = None
        # Per peer: its fields when text() last serialised it (lists and dicts copied) and
        # that text (see text()).
        self._pieces: dict[str, tuple[tuple[Any, ...], str]] = {}
        # Counts the writes through this store: a caller that keeps a decision made from
        # the kept object (node.QuietRuns) sees that another caller in this process (a
        # one-shot `up` sharing the options) changed and saved it meanwhile.
        self.writes = 0

    @contextmanager
    def locked(self) -> Iterator[None]:
        with exclusive(self.lock_path):
            yield

    def load(self, *, reuse: bool = False) -> GenerationState:
        """The generations as the file holds them now.

        `reuse` (a long-running agent, under the lock): the very object this store last
        read or wrote when the file still holds the same text, instead of parsing it
        again (at 1000 peers parsing is most of a quiet run's cost). The file is read
        and compared every time, so a write by another process (`vppmesh rekey`, a
        restored backup) is never missed, whatever its timestamps say. The caller owns
        that object: it must save() what it changed, or forget() it (a dry run, a run
        that failed half way), or the next reuse would see changes the file lacks."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            self._kept = None
            return GenerationState()
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read key generations ({exc})") from None
        kept = self._kept
        if reuse and kept is not None and kept[0] == text:
            return kept[1]
        try:
            state = GenerationState.model_validate_json(text)
        except ValidationError:
            raise ConfigError(
                f"{self.path} is not a valid key generation file; it must not be edited. "
                "Restore it, or delete it and raise settings.key_epoch on every node") from None
        if reuse:  # (another caller's load leaves the kept object: the text decides)
            self._kept = (text, state, self.text(state))
        return state

    def loaded_text(self, state: GenerationState) -> str:
        """text() of `state` as loaded (before the caller changes it): kept from the
        load when `state` is the object this store keeps."""
        kept = self._kept
        return kept[2] if kept is not None and kept[1] is state else self.text(state)

    def forget(self) -> None:
        """The next load parses the file again (the state handed out was changed and
        not saved)."""
        self._kept = None

    def text(self, state: GenerationState) -> str:
        """The file's text for `state`, as pydantic's serializer writes it (many times
        faster than json.dump's indented encoder, pure Python, on a 1000-peer file).

        Every run compares this text with the loaded one to know whether to save, and
        a run changes a few peers of a 1000-peer file: a peer whose fields equal those
        it had when last serialised here (compared by value; lists and dicts were
        copied, so a change made in place differs too) takes that text again. Equal
        values write the same text, so a change always shows (and is saved)."""
        if not state.peers:
            return state.model_dump_json(indent=1)
        kept, pieces, parts = self._pieces, {}, []
        for name, peer in state.peers.items():
            values = tuple(peer.__dict__.values())  # (the model's fields, in its order)
            piece = kept.get(name)
            if piece is None or piece[0] != values or type(peer) is not PeerGenerations:
                text = peer.model_dump_json(indent=1).replace("\n", "\n  ")
                piece = (_values_copy(values), f"{to_json(name).decode()}: {text}")
            pieces[name] = piece
            parts.append(piece[1])
        self._pieces = pieces
        head = state.model_dump_json(indent=1, exclude={"peers"})  # '{\n "version": 1\n}'
        return f'{head[:-2]},\n "peers": {{\n  ' + ",\n  ".join(parts) + "\n }\n}"

    def save(self, state: GenerationState, text: str | None = None) -> None:
        """Write `state` (`text`: text() of it, when the caller has it already)."""
        text = self.text(state) if text is None else text
        replace_file(self.path, text.encode())
        self.writes += 1
        # Only the object a reuse load handed out stays kept: another caller's may still
        # be changed after its save.
        kept = self._kept
        self._kept = (text, state, text) if kept is not None and kept[1] is state else None
