"""The channel's state machine for one node and all its peers: pure, no sockets, no clock.

`Channel.receive(now, source, datagram)`, `send`, `start_generation`, `restarted` and
`tick(now)` each return an `Output`: datagrams to send (destination, bytes) and events
for the agent loop (a handshake completed, a generation's ephemeral secret is known, the
peer acknowledged a generation, the peer's VPP restarted, the peer moved or told us our
public address). The caller owns the socket and the clock, so every path here runs in
unit tests and benchmarks exactly as in the agent.

Cheap before expensive. A datagram is dropped, and counted under its `Drop` reason, at
the first check it fails, in this order:

1. size and clear header (`messages.parse_datagram`): no crypto at all;
2. sender and receiver: the receiver is this node, the sender a configured peer;
3. handshakes: the pair MAC (HMAC-BLAKE2s keyed from the pair's static secret, computed
   once per peer, and the PSK) — one hash, no Diffie-Hellman; only a holder of one of
   the pair's private keys and the PSK can produce it. During a PSK rotation or a node
   key rotation a node holds two PSKs or two private keys, and the MAC names which the
   handshake used: one hash per combination held (four at most), still no
   Diffie-Hellman, and the handshake is read once, with that PSK and key;
4. handshakes: the timestamp must exceed the last accepted one from that peer (the marks,
   which the agent keeps across restarts: `timestamp_marks`), so a recorded handshake
   replayed later is refused before any Diffie-Hellman;
5. handshakes: a token bucket per peer (the MAC above authenticated which peer sent it,
   whatever the source address says) and one for the whole node bound the
   Diffie-Hellman work per second: spoofed sources cannot spend an honest peer's budget;
6. transports: the session index and the replay window, then one AEAD decryption;
7. KeyInits: only generations inside the window the agent gave (accept_generations)
   are answered; any other costs no Diffie-Hellman.

Key confirmation (as WireGuard's responder keeps its keypair as "next"): a responder's
new session stays `next` until the initiator's first authenticated transport message
arrives on it, and the responder sends nothing on it before. An Init replayed or held back
by an attacker therefore never replaces the live session nor moves the peer's endpoint
(the Response goes to the Init's source; the endpoint moves to where the confirming
message came from). The initiator, once it has the Response, sends at once (its queue,
its acknowledgements, or a keepalive), so confirmation takes one round trip.

Key material: Noise's ephemerals live inside one HandshakeState and are gone after
split(). A generation's ephemeral private key lives in `_Peer.offers` until the answer
arrives (or the generation retires); the responder's is dropped right after its single
exchange. The generation's ephemeral secret is kept, in memory only, until
`retire_generation`: the agent needs it to reinstall the generation's SAs.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac as std_hmac
import ipaddress
import itertools
import secrets as random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from vppmesh.agent.clock import Timestamps
from vppmesh.channel import messages as m
from vppmesh.channel.noise import (
    PROTOCOL,
    CipherState,
    HandshakeState,
    NoiseError,
    ReplayWindow,
    Suite,
    dh,
    public_bytes,
)
from vppmesh.keying.keys import NodeSecrets, pair_secret

Address = m.Address

# Timers, in seconds (WireGuard's where it has one).
REKEY_AFTER = 120.0  # the session's initiator starts a new handshake after this
REKEY_RESPONDER_SLACK = 10.0  # ... and the responder, if the initiator did not
REJECT_AFTER = 180.0  # a session is never used, either way, after this
# Retries back off to a short cap (WireGuard's REKEY_TIMEOUT is 5 s): the cap is how long
# a pair whose messages an attacker dropped stays without a key after the attacker
# stops, and a stopped pair (fail closed at its key's hard limit) carries no traffic
# until then. A cap of 30 s kept pairs down up to 29 s after the drops ended (the storm).
HANDSHAKE_RETRY = 0.25  # first retry of an unanswered handshake; doubles each time
HANDSHAKE_RETRY_MAX = 5.0
# The lower node number answers the peer's crossing handshake once this many of its own
# went unanswered (see _receive_init).
YIELD_AFTER = 2
KEY_RETRY = 1.0  # first resend of an unanswered KeyInit; doubles each time
KEY_RETRY_MAX = 5.0
CONFIRM_WAIT = 1.0  # a responder waiting this long for confirmation starts no handshake
# An answered offer whose "installed" has not come after this long (doubling, up to
# INSTALL_WAIT_MAX) is offered again with a fresh key: the receiver's agent that answered
# may have died before it installed the generation, and its successor knows nothing of it.
INSTALL_WAIT = 10.0
INSTALL_WAIT_MAX = 30.0
KEEPALIVE_AFTER = 15.0  # send a keepalive when nothing was sent for this long
# Towards a peer that needs no keepalives (PeerConfig.keepalive), a new acknowledgement is
# repeated this many times, KEEPALIVE_AFTER apart; every new session carries it again.
ACK_REPEATS = 2
# Diffie-Hellman budget: handshakes per second per (authenticated) peer, and per node.
PEER_RATE, PEER_BURST = 5.0, 10.0
NODE_RATE, NODE_BURST = 400.0, 400.0
MAX_QUEUE = 32  # messages held for a peer while its handshake runs
MAX_WINDOW = 16  # generations a peer may have answered at once (accept_generations)
MAX_REMEMBERED = 16  # boot ids and rekey requests remembered per peer
MAC_LABEL = b"vppmesh channel mac v1"
INSTALLED_LABEL = b"vppmesh sas installed v1"
_MAC_SUITE = Suite.parse(PROTOCOL)
# The states each side repeats until they arrive (see acknowledge): the receiver's
# "installed" and "slid", the sender's "sending".
_ACKS: dict[str, type[m.SasInstalled] | type[m.WindowSlid] | type[m.SendingOn]] = {
    "installed": m.SasInstalled, "slid": m.WindowSlid, "sending": m.SendingOn}


# ---- events -----------------------------------------------------------------------------
@dataclass(frozen=True)
class HandshakeComplete:
    peer: int


@dataclass(frozen=True)
class GenerationKeyed:
    """Both agents now hold `secret`, the ephemeral X25519 secret of one direction's
    `generation`: this node's outbound one (`outbound`, it offered) or the peer's.
    `psk`: the PSK of the session the exchange ran on, which both ends hold and derive
    the generation's keys under (during a PSK rotation a pair's sessions may use
    either); None: the node's static one."""

    peer: int
    generation: int
    outbound: bool
    secret: bytes = field(repr=False)
    psk: bytes | None = field(default=None, repr=False)
    # The pair secret of the static keys that session authenticated (during a node key
    # rotation, of this node's previous key or its current one); None: the view's.
    shared: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class PreviousKeyHeld:
    """The peer, over a session authenticated by its current key, says it still holds
    the private key of `public_key` (its previous one: a node key rotation)."""

    peer: int
    public_key: bytes


@dataclass(frozen=True)
class PeerAcked:
    """The peer said its inbound SAs for `generation` are installed, or it slid to it,
    or (as sender) that it sends on `generation` now."""

    peer: int
    what: str  # "installed", "slid" or "sending"
    generation: int


@dataclass(frozen=True)
class PeerRestarted:
    peer: int
    boot_id: int


@dataclass(frozen=True)
class EndpointChanged:
    """Authenticated datagrams from the peer now come from `endpoint` (NAT, roaming)."""

    peer: int
    endpoint: Address


@dataclass(frozen=True)
class PeerObserved:
    """The peer sees this node's datagrams come from `endpoint` (its NAT mapping)."""

    peer: int
    endpoint: Address


@dataclass(frozen=True)
class FlowSeen:
    """The peer's probe of its tunnel `tunnel` came from `source` (that flow's mapping at
    its NAT); the channel itself stays where it is."""

    peer: int
    tunnel: int
    source: Address


Event = (HandshakeComplete | GenerationKeyed | PeerAcked | PeerRestarted | EndpointChanged
         | PeerObserved | FlowSeen | PreviousKeyHeld)


@dataclass
class Output:
    datagrams: list[tuple[Address, bytes]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def extend(self, other: Output) -> Output:
        self.datagrams += other.datagrams
        self.events += other.events
        return self


@dataclass(frozen=True)
class PeerConfig:
    """A peer as the mesh describes it: node number, static public key, underlay address
    and the UDP port its channel listens on (None until learned).

    `keepalive`: something between the pair keeps state only while datagrams flow (a NAT
    mapping): send at least every KEEPALIVE_AFTER, the latest acknowledgements or a
    Keepalive. Without it an idle pair sends nothing between its sessions' rekeys (no
    timer here needs the peer's traffic: a session expires by age, REJECT_AFTER, heard
    from or not), and a new acknowledgement is repeated ACK_REPEATS times."""

    node_number: int
    public_key: bytes
    endpoint: Address | None = None
    keepalive: bool = True


# ---- internal state ---------------------------------------------------------------------
class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def take(self, now: float) -> bool:
        # Elapsed time clamped at zero: a clock that went back refills nothing, and
        # drains nothing either (else one step back of an hour refuses for an hour).
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass
class _Session:
    local_index: int
    remote_index: int
    send: CipherState
    receive: CipherState
    created: float
    initiator: bool
    window: ReplayWindow = field(default_factory=ReplayWindow)
    next_counter: int = 0
    psk: bytes = field(default=b"", repr=False)  # the PSK its handshake used
    # This node's static public key its handshake used, and the pair secret of it
    key: bytes = b""
    shared: bytes = field(default=b"", repr=False)


@dataclass
class _Pending:
    handshake: HandshakeState
    local_index: int
    sent: float
    credential: _Credential


@dataclass(frozen=True)
class _Credential:
    """One way this node authenticates to a peer: one of its private keys and one of its
    PSKs (more than one of each during a rotation), the pair secret of that key with the
    peer's and the pair MAC's key made from both."""

    key_role: str  # "current" or "previous" (NodeSecrets.private_keys)
    private_key: X25519PrivateKey = field(repr=False)
    public_key: bytes
    psk: bytes = field(repr=False)
    shared: bytes = field(repr=False)
    mac_key: bytes = field(repr=False)


@dataclass
class _Peer:
    config: PeerConfig
    # Per (private key, PSK) this node holds, the credential (the current ones first).
    credentials: tuple[_Credential, ...] = field(repr=False)
    endpoint: Address | None
    current: _Session | None = None
    previous: _Session | None = None
    next: _Session | None = None  # answered, not yet confirmed by the initiator
    next_boot: int = 0  # the boot id in the Hello of `next`'s Init
    pending: _Pending | None = None
    given_up: int | None = None  # the index of our handshake given up for the peer's
    attempts: int = 0
    boot_id: int | None = None
    boots: deque[int] = field(default_factory=lambda: deque(maxlen=MAX_REMEMBERED))
    rekeys: deque[int] = field(default_factory=lambda: deque(maxlen=MAX_REMEMBERED))
    bucket: TokenBucket | None = None  # its handshakes' Diffie-Hellman budget
    accept: range = range(0)  # its outbound generations we answer (accept_generations)
    last_sent: float = float("-inf")
    queue: list[m.Message] = field(default_factory=list)
    # Key exchanges are per direction: each is offered by the sender of its generation.
    # Our outbound generation -> (our ephemeral private key, when the KeyInit was last
    # sent, how many times)
    offers: dict[int, tuple[X25519PrivateKey, float, int]] = field(default_factory=dict)
    # Their outbound generation -> (their ephemeral public key, our answer's, the PSK and
    # our static key of the session it went on) to re-answer
    answers: dict[int, tuple[bytes, bytes, bytes, bytes]] = field(default_factory=dict)
    keyed_out: dict[int, bytes] = field(default_factory=dict, repr=False)
    keyed_in: dict[int, bytes] = field(default_factory=dict, repr=False)
    # Our answered offers awaiting the peer's "installed": generation -> (when answered,
    # how many times it was renewed before); those whose "installed" (for that very
    # secret) came; and how often each generation's offer was renewed (_offers_lost).
    awaiting: dict[int, tuple[float, int]] = field(default_factory=dict)
    confirmed: set[int] = field(default_factory=set)
    renewed: dict[int, int] = field(default_factory=dict)
    # Our latest acknowledgement of each kind to the peer, repeated (see acknowledge),
    # and the latest of the peer's we reported.
    acks: dict[str, m.Message] = field(default_factory=dict)
    heard: dict[str, int] = field(default_factory=dict)
    # The PSK of the peer's last authenticated handshake: the one it is known to hold;
    # and which of this node's public keys it used: the one it knows for this node.
    psk_hint: bytes | None = field(default=None, repr=False)
    key_hint: bytes | None = None
    repeats: int = 0  # repeats of the acknowledgements left (a peer without keepalives)
    # The channel's timer queue: the peer's place in the channel's peers (the order tick
    # visits them in), when its next timer is due as queued (None: not queued), and the
    # channel's set of peers whose timers may have moved (see __setattr__).
    order: int = field(default=0, compare=False)
    due: float | None = field(default=None, compare=False)
    touched: set[int] | None = field(default=None, repr=False, compare=False)

    def __setattr__(self, name: str, value: object) -> None:
        """Whoever replaces a field a timer is computed from, the channel computes the
        peer's next deadline again before its next tick."""
        object.__setattr__(self, name, value)
        if name in _TIMED:
            touched = self.__dict__.get("touched")
            if touched is not None:
                touched.add(self.config.node_number)


# The fields of _Peer the deadline of its timers depends on (besides its offers and
# awaiting tables, whose changes the channel marks itself).
_TIMED = frozenset({"config", "endpoint", "current", "next", "pending", "attempts",
                    "last_sent", "repeats"})


def installed_digest(secret: bytes) -> bytes:
    """What SasInstalled carries for a generation agreed on `secret`: a short hash, so an
    acknowledgement confirms that key and no other (and reveals nothing of it)."""
    return hashlib.blake2s(INSTALLED_LABEL + secret, digest_size=m.DIGEST_BYTES).digest()


def _handshake_retry(state: _Peer) -> float:
    """How long an unanswered handshake waits before it is sent again."""
    return min(HANDSHAKE_RETRY * 2 ** max(state.attempts - 1, 0), HANDSHAKE_RETRY_MAX)


def _install_wait(renewed: int) -> float:
    """How long an answered offer, renewed `renewed` times before, waits for its
    "installed"."""
    return min(INSTALL_WAIT * 2 ** renewed, INSTALL_WAIT_MAX)


def _key_retry(tries: int) -> float:
    """How long an offer sent `tries` times waits before it is sent again."""
    return min(KEY_RETRY * 2 ** max(tries - 1, 0), KEY_RETRY_MAX)


def _deadline(state: _Peer, now: float) -> float | None:
    """The earliest time tick has something to do for the peer (None: never, until its
    state changes), from its state and the latest `now`: a handshake retry or rekey, and
    over its session a KeyInit's resend, an answered offer renewed, a keepalive. Never
    later than the first time tick would act (earlier costs one visit that does nothing)."""
    if state.endpoint is None:
        return None  # tick passes it by
    if state.pending is not None:
        due = state.pending.sent + _handshake_retry(state)
    else:
        current = state.current
        due = float("-inf") if current is None else current.created + REKEY_AFTER + (
            0.0 if current.initiator else REKEY_RESPONDER_SLACK)
        if state.next is not None:  # the peer's handshake, one confirmation away
            due = max(due, state.next.created + CONFIRM_WAIT)
    session = state.current
    if session is None:
        return due
    expires = session.created + REJECT_AFTER  # the session's timers die with it
    if now >= expires:
        return due
    timers = [sent + _key_retry(tries) for _key, sent, tries in state.offers.values()]
    timers += [at + _install_wait(tries) for at, tries in state.awaiting.values()]
    if state.config.keepalive or state.repeats:
        timers.append(state.last_sent + KEEPALIVE_AFTER)
    return min([due] + [t for t in timers if t < expires])


def _offers_again(state: _Peer, now: float, *, at_once: bool = False) -> list[m.KeyInit]:
    """The KeyInits of the peer's offers whose retry is due (`at_once`: all of them, the
    backoff started again: a new session proves the path), sent now."""
    due = [(g, key, 0 if at_once else tries) for g, (key, sent, tries) in state.offers.items()
           if at_once or now - sent >= _key_retry(tries)]
    for generation, key, tries in due:
        state.offers[generation] = (key, now, tries + 1)
    return [m.KeyInit(generation, public_bytes(key)) for generation, key, _ in due]


def _pull_back(state: _Peer, now: float) -> None:
    """Stamps ahead of `now` come back to `now`: the caller's clock went back (the agent's
    never does: vppmesh/agent/clock.py). A timer then restarts rather than stall for as long as
    the step, and a session lives at most REJECT_AFTER past it."""
    for session in (state.current, state.previous):
        if session is not None and session.created > now:
            session.created = now
    if state.pending is not None and state.pending.sent > now:
        state.pending.sent = now
    for generation, (key, sent, tries) in state.offers.items():
        if sent > now:
            state.offers[generation] = (key, now, tries)
    state.last_sent = min(state.last_sent, now)


def _noise_psk(psk: bytes) -> bytes:
    """Noise's psk0 for the mesh PSK `psk`: without a mesh PSK the slot holds zeros, as
    Noise allows."""
    return psk or bytes(32)


def _held_keys(secrets: NodeSecrets) -> dict[bytes, tuple[X25519PrivateKey, str]]:
    """This node's private keys by public key, with their roles (the current first)."""
    return {public_bytes(key): (key, role) for role, key in secrets.private_keys()}


def _roles(keys: Mapping[bytes, tuple[X25519PrivateKey, str]]) -> dict[bytes, str]:
    return {public: role for public, (_key, role) in keys.items()}


def _session(local: int, remote: int, send: CipherState, receive: CipherState, now: float,
             initiator: bool, credential: _Credential) -> _Session:
    return _Session(local, remote, send, receive, now, initiator=initiator,
                    psk=credential.psk, key=credential.public_key, shared=credential.shared)


def pair_mac_key(static_secret: bytes, psk: bytes) -> bytes:
    return _MAC_SUITE.hash(MAC_LABEL + static_secret + psk)


def pair_mac(key: bytes, data: bytes) -> bytes:
    return _MAC_SUITE.hmac(key, data)[:m.MAC_BYTES]


class Channel:
    """This node's end of the channel with every peer."""

    def __init__(self, node_number: int, secrets: NodeSecrets, peers: Iterable[PeerConfig],
                 *, boot_id: int, new_index: Callable[[], int] | None = None,
                 timestamps: Callable[[], int] | None = None,
                 timestamp_marks: Mapping[int, int] | None = None) -> None:
        """`timestamps`: the next handshake timestamp (the agent's: clock.Timestamps,
        strictly increasing across restarts); None: from the `now` of each call, strictly
        increasing for this object only. `timestamp_marks`: per peer node number, the
        highest handshake timestamp accepted before (what an earlier agent kept)."""
        self.node_number = node_number
        self._secrets = secrets
        self.boot_id = boot_id
        self._new_index = new_index or (lambda: random.randbits(32))
        self._peers: dict[int, _Peer] = {}
        # Per this node's public key, its private key and role (two during a rotation).
        self._keys = _held_keys(secrets)
        self._sessions: dict[int, tuple[_Peer, _Session]] = {}
        self._node_bucket: TokenBucket | None = None
        self.drops: Counter[m.Drop] = Counter()
        self.stats: Counter[str] = Counter()
        self._timestamps = timestamps
        self._own_timestamps = Timestamps()
        # Per peer, the highest handshake timestamp accepted (kept for a peer whose
        # record changes, or that leaves and comes back: its old handshakes stay old).
        self._marks: dict[int, int] = dict(timestamp_marks or {})
        # Timers: a heap of (deadline, peer), one live entry per peer (_Peer.due; others
        # are stale and skipped), the peers whose deadline may have moved since, and the
        # latest `now` seen (a tick before it means the caller's clock went back).
        self._due: list[tuple[float, int]] = []
        self._touched: set[int] = set()
        self._order = itertools.count()
        self._latest = float("-inf")
        self.set_peers(peers)

    def __repr__(self) -> str:
        return f"Channel(node={self.node_number}, peers={len(self._peers)})"

    # ---- queries ------------------------------------------------------------------------
    @property
    def secrets(self) -> NodeSecrets:
        """The node's secrets the channel follows now (set_secrets)."""
        return self._secrets

    def peers(self) -> list[int]:
        return sorted(self._peers)

    def knows(self, peer: int) -> bool:
        """`peer` is one of the channel's peers (peers() sorts them all: a membership
        test per peer of a 1000-peer mesh made each run quadratic)."""
        return peer in self._peers

    def established(self, peer: int, now: float | None = None) -> bool:
        """A session with `peer` is up; given `now`, one still usable (a peer whose agent
        stopped answering drops out once its last session expired, REJECT_AFTER)."""
        state = self._peers[peer]
        return state.current is not None if now is None else \
            self._usable(state, now) is not None

    def endpoint(self, peer: int) -> Address | None:
        return self._peers[peer].endpoint

    def session_key(self, peer: int, now: float) -> str | None:
        """The role here ("current", "previous") of this node's key the peer's usable
        session authenticated (None: no session): during a node key rotation, whether
        the peer still knows this node by its previous key."""
        session = self._usable(self._peers[peer], now)
        if session is None or session.key not in self._keys:
            return None
        return self._keys[session.key][1]

    def session_psk(self, peer: int, now: float) -> str | None:
        """The role here ("current", "next", "previous") of the PSK the peer's usable
        session was made with (None: no session): during a PSK rotation, which PSK the
        pair's channel runs on."""
        session = self._usable(self._peers[peer], now)
        if session is None:
            return None
        return next((role for role, psk in self._secrets.psks() if psk == session.psk), None)

    def generation_secret(self, peer: int, generation: int, *, outbound: bool) -> bytes | None:
        state = self._peers[peer]
        return (state.keyed_out if outbound else state.keyed_in).get(generation)

    def offering(self, peer: int, generation: int) -> bool:
        """Our offer for outbound `generation` awaits the peer's answer."""
        return generation in self._peers[peer].offers

    def usable_until(self, peer: int) -> float | None:
        """When the peer's current session stops being usable (REJECT_AFTER; None: no
        session): `established(peer, now)` changes then without any event."""
        session = self._peers[peer].current
        return None if session is None else session.created + REJECT_AFTER

    def keying_open(self, peer: int | None = None) -> bool:
        """An offer of ours (to `peer`, or to anyone) awaits its answer, or an answered
        one the peer's "installed" (the timers renew those without any event:
        _offers_lost)."""
        if peer is not None:
            state = self._peers[peer]
            return bool(state.offers or state.awaiting)
        return any(p.offers or p.awaiting for p in self._peers.values())

    def held_private_keys(self) -> int:
        """Ephemeral private keys of generations this node holds (awaiting an answer)."""
        return sum(len(p.offers) for p in self._peers.values())

    def timestamp_marks(self) -> dict[int, int]:
        """Per peer node number, the highest handshake timestamp accepted (for the next
        agent: the constructor's `timestamp_marks`)."""
        return dict(self._marks)

    def probe(self, now: float, peer: int, tunnel: int) -> bytes | None:
        """A FlowProbe for the peer, to be sent on tunnel `tunnel`'s flow (None: no
        session yet)."""
        self._see(now)
        state = self._peers[peer]
        session = self._usable(state, now)
        if session is None:
            return None
        ((_, datagram),) = self._transmit(now, state, session, m.FlowProbe(tunnel)).datagrams
        return datagram

    def reach(self, peer: int, endpoint: Address) -> None:
        """Send to `endpoint` until the peer is heard from (a NAT mapping learned by an
        earlier agent); a live session keeps following the peer itself."""
        state = self._peers[peer]
        if state.current is None:
            state.endpoint = endpoint

    def set_peers(self, peers: Iterable[PeerConfig]) -> None:
        """Follow the mesh: a peer whose record is unchanged keeps its sessions and
        generations; a new or changed one starts afresh; one that left is forgotten."""
        wanted = {peer.node_number: peer for peer in peers}
        for number in list(self._peers):
            state = self._peers[number]
            config = wanted.get(number)
            if config is not None and config != state.config and \
                    replace(config, keepalive=state.config.keepalive) == state.config:
                state.config = config  # only whether it needs keepalives changed
            if config != state.config:
                for session in (state.current, state.previous, state.next):
                    if session is not None:
                        self._sessions.pop(session.local_index, None)
                del self._peers[number]
                if number in wanted and wanted[number].public_key != state.config.public_key:
                    # Handshakes made with its old key fail the pair MAC now: the mark
                    # protects nothing, and would refuse a reinstalled node's clock.
                    # (One that left keeps it: it may come back with the same key.)
                    self._marks.pop(number, None)
        for number, peer in wanted.items():
            if number not in self._peers:
                state = _Peer(peer, self._credentials(peer.public_key), peer.endpoint,
                              order=next(self._order))
                state.touched = self._touched
                self._peers[number] = state
                self._touched.add(number)

    def _credentials(self, peer_key: bytes) -> tuple[_Credential, ...]:
        """Every (key, PSK) this node holds towards the peer: one X25519 per key held,
        once per peer and secrets change, never per datagram."""
        found = []
        for role, key in self._secrets.private_keys():
            shared = pair_secret(self._secrets, peer_key, key)
            found += [_Credential(role, key, public_bytes(key), psk, shared,
                                  pair_mac_key(shared, psk))
                      for _psk_role, psk in self._secrets.psks()]
        return tuple(found)

    def set_secrets(self, secrets: NodeSecrets) -> None:
        """Follow the node's secrets as its key files say now: its PSKs (a rotation's
        step: docs/operations.md) or its private keys (a node key rotation's step).

        A session or a pending handshake made with a PSK or a private key no longer held
        ends here, and a new handshake starts at the next tick: the retired secret
        authenticates nothing more, not even what was agreed under it before. A key
        rotated to previous keeps its sessions: it is still held."""
        keys = _held_keys(secrets)
        if _roles(keys) == _roles(self._keys) and secrets.psks() == self._secrets.psks():
            self._secrets = secrets
            return
        self._secrets, self._keys = secrets, keys
        held = {(key, psk) for key in keys for _role, psk in secrets.psks()}
        for state in self._peers.values():
            state.credentials = self._credentials(state.config.public_key)
            if state.psk_hint not in {psk for _key, psk in held}:
                state.psk_hint = None
            if state.key_hint not in keys:
                state.key_hint = None
            if state.pending is not None and (state.pending.credential.public_key,
                                              state.pending.credential.psk) not in held:
                state.pending, state.attempts = None, 0
            for name in ("current", "previous", "next"):
                session = getattr(state, name)
                if session is not None and (session.key, session.psk) not in held:
                    self._sessions.pop(session.local_index, None)
                    setattr(state, name, None)
                    self.stats["sessions_psk_retired" if session.key in keys
                               else "sessions_key_retired"] += 1

    # ---- what the agent asks for --------------------------------------------------------
    def send(self, now: float, peer: int, message: m.Message) -> Output:
        """Send `message` to `peer` now, or as soon as a session is up."""
        self._see(now)
        state = self._peers[peer]
        out = Output()
        session = self._usable(state, now)
        if session is None:
            if len(state.queue) < MAX_QUEUE:
                state.queue.append(message)
            else:
                self.stats["queue_full"] += 1
            if state.pending is None:
                out.extend(self._initiate(now, state))
            return out
        return self._transmit(now, state, session, message)

    def start_generation(self, now: float, peer: int, generation: int) -> Output:
        """Offer a fresh ephemeral key for this node's outbound `generation` towards
        `peer`; GenerationKeyed follows the answer."""
        self._see(now)
        state = self._peers[peer]
        key = X25519PrivateKey.generate()
        state.offers[generation] = (key, now, 1)
        self._touched.add(peer)
        return self.send(now, peer, m.KeyInit(generation, public_bytes(key)))

    def acknowledge(self, now: float, peer: int, what: str, generation: int) -> Output:
        """Tell `peer` this node's inbound SAs for `generation` are installed ("installed"),
        that it slid its window to `generation` ("slid"), or that it sends on
        `generation` now ("sending").

        Acknowledgements are states, not events: the latest of each kind is sent now,
        again over every new session and in place of every keepalive, so a lost one
        arrives within KEEPALIVE_AFTER; the peer reports each state once.

        "installed" carries the digest of the generation's secret as this node agreed it
        (installed_digest); for a generation whose secret the channel does not hold (SAs
        adopted from VPP by a restarted agent) nothing is sent, and it is counted.
        """
        state = self._peers[peer]
        message: m.Message
        if what == "installed":
            secret = state.keyed_in.get(generation)
            if secret is None:
                self.stats["installed_unknown_secret"] += 1
                return Output()
            message = m.SasInstalled(generation, installed_digest(secret))
        else:
            message = _ACKS[what](generation)
        state.acks[what] = message
        state.repeats = ACK_REPEATS
        return self.send(now, peer, message)

    def accept_generations(self, peer: int, base: int, count: int) -> None:
        """Answer the peer's KeyInits for generations base .. base + count - 1 only (its
        outbound window at this node), and forget answers outside it. Until the agent
        sets a window, no KeyInit is answered."""
        state = self._peers[peer]
        state.accept = range(base, base + min(count, MAX_WINDOW))
        for table in (state.answers, state.keyed_in):
            for generation in [g for g in table if g not in state.accept]:
                del table[generation]

    def retire_generation(self, peer: int, generation: int, *, outbound: bool) -> None:
        """Forget everything of one direction's `generation`: its private key, answer
        and secret."""
        state = self._peers[peer]
        self._touched.add(peer)
        if outbound:
            state.offers.pop(generation, None)
            state.keyed_out.pop(generation, None)
            state.awaiting.pop(generation, None)
            state.confirmed.discard(generation)
            state.renewed.pop(generation, None)
        else:
            state.answers.pop(generation, None)
            state.keyed_in.pop(generation, None)

    def ask_rekey(self, now: float, peer: int) -> Output:
        """Ask `peer` to rekey towards this node now (a RekeyRequest with a fresh nonce,
        honoured once): its inbound keys here are lost, although VPP did not restart."""
        return self.send(now, peer, m.RekeyRequest(random.randbits(64)))

    def restarted(self, now: float, boot_id: int) -> Output:
        """This node's VPP restarted: tell every peer, reliably.

        A Restarted message goes at once over every session; a fresh VPP has resolved no
        neighbour yet and may drop it, so a new handshake follows too: its Hello carries
        the new boot id and it is retried until answered.
        """
        self._see(now)
        self.boot_id = boot_id
        out = Output()
        for number, state in self._peers.items():
            if state.current is not None:
                out.extend(self.send(now, number, m.Restarted(boot_id)))
            if state.pending is None:
                state.attempts = 0
                out.extend(self._initiate(now, state))
        return out

    def tick(self, now: float) -> Output:
        """Timers: handshake retries and rekeys, KeyInit retries, keepalives. Visits only
        the peers whose earliest timer is due (the heap), in the order of the peers; after
        a step back of the caller's clock, every peer (their stamps come back to `now`)."""
        if now < self._latest:
            return self._tick_every_peer(now)
        self._latest = now
        self._reschedule()
        due: list[_Peer] = []
        while self._due and self._due[0][0] <= now:
            when, number = heapq.heappop(self._due)
            state = self._peers.get(number)
            if state is not None and state.due == when:
                state.due = None
                due.append(state)
        out = Output()
        for state in sorted(due, key=lambda state: state.order):
            out.extend(self._tick_peer(now, state))
            self._touched.add(state.config.node_number)
        self._reschedule()
        return out

    def _tick_every_peer(self, now: float) -> Output:
        """tick, visiting every peer (a clock step back; tests compare tick with it)."""
        out = Output()
        for state in self._peers.values():
            out.extend(self._tick_peer(now, state))
        self._latest = now  # every stamp _pull_back moves is at `now` at most now
        self._touched.clear()
        self._due = []
        for number, state in self._peers.items():
            state.due = _deadline(state, now)
            if state.due is not None:
                self._due.append((state.due, number))
        heapq.heapify(self._due)
        return out

    def _tick_peer(self, now: float, state: _Peer) -> Output:
        """One peer's timers at `now`."""
        out = Output()
        if state.endpoint is None:
            return out
        _pull_back(state, now)
        session = self._usable(state, now)
        if state.pending is not None:
            if now - state.pending.sent >= _handshake_retry(state):
                out.extend(self._initiate(now, state))
        elif state.next is not None and now - state.next.created < CONFIRM_WAIT:
            pass  # the peer's handshake is one confirmation away
        elif session is None or now - session.created >= REKEY_AFTER + (
                0.0 if session.initiator else REKEY_RESPONDER_SLACK):
            out.extend(self._initiate(now, state))
        if session is None:
            return out
        for message in _offers_again(state, now) + self._offers_lost(state, now):
            out.extend(self._transmit(now, state, session, message))
        if now - state.last_sent >= KEEPALIVE_AFTER and (state.config.keepalive
                                                         or state.repeats):
            if not state.config.keepalive:
                state.repeats -= 1
            for message in self._ack_messages(state) or [m.Keepalive()]:
                out.extend(self._transmit(now, state, session, message))
        return out

    def _see(self, now: float) -> None:
        """A call at `now`: a later tick before it visits every peer (_pull_back)."""
        if now > self._latest:
            self._latest = now

    def _reschedule(self) -> None:
        """Queue the deadline of every peer marked as moved, where it changed."""
        for number in self._touched:
            state = self._peers.get(number)
            if state is None:
                continue
            due = _deadline(state, self._latest)
            if due != state.due:
                state.due = due
                if due is not None:
                    heapq.heappush(self._due, (due, number))
        self._touched.clear()
        if len(self._due) > 2 * len(self._peers) + 64:  # mostly stale entries: compact
            self._due = [(state.due, number) for number, state in self._peers.items()
                         if state.due is not None]
            heapq.heapify(self._due)

    def next_due(self) -> float | None:
        """When tick next has something to do (a handshake or KeyInit retry, a rekey, a
        keepalive), or None: the top of the timer heap. The loop waits no longer than
        that: after a VPP restart the first datagrams die while VPP resolves its
        neighbours, and a retry that waits for the loop's next poll adds that poll's
        period to the recovery."""
        self._reschedule()
        while self._due:
            when, number = self._due[0]
            state = self._peers.get(number)
            if state is not None and state.due == when:
                return when
            heapq.heappop(self._due)
        return None

    def next_retry(self, now: float) -> float | None:
        """When tick's earliest retry is due (a handshake, or a KeyInit over a usable
        session, still unanswered), or None (every peer looked at: the loop asks
        next_due)."""
        due = []
        for state in self._peers.values():
            if state.endpoint is None:
                continue
            if state.pending is not None:
                due.append(state.pending.sent + _handshake_retry(state))
            if (state.offers or state.awaiting) and self._usable(state, now) is not None:
                due += [sent + _key_retry(tries) for _key, sent, tries in state.offers.values()]
                due += [at + _install_wait(tries) for at, tries in state.awaiting.values()]
        return min(due, default=None)

    def _offers_lost(self, state: _Peer, now: float) -> list[m.KeyInit]:
        """Answered offers whose "installed" is overdue, offered again with a fresh key
        (INSTALL_WAIT). Safe: the sender steps to a generation only on an "installed"
        for its very secret, so the old one protected nothing, and a late "installed" for
        it no longer matches; a generation whose "installed" came is never offered again."""
        again = []
        for g, (at, tries) in list(state.awaiting.items()):
            if g in state.confirmed or g not in state.keyed_out:
                del state.awaiting[g]
                continue
            if now - at < _install_wait(tries):
                continue
            del state.awaiting[g], state.keyed_out[g]
            state.renewed[g] = tries + 1
            key = X25519PrivateKey.generate()
            state.offers[g] = (key, now, 1)
            self.stats["offers_renewed"] += 1
            again.append(m.KeyInit(g, public_bytes(key)))
        return again

    # ---- receiving ----------------------------------------------------------------------
    def receive(self, now: float, source: Address, data: bytes) -> Output:
        """One datagram from the transport; never raises on what the network sends."""
        self._see(now)
        parsed = m.parse_datagram(data)
        if isinstance(parsed, m.Drop):
            return self._drop(parsed)
        state = self._peers.get(parsed.sender)
        if parsed.receiver != self.node_number or state is None:
            return self._drop(m.Drop.UNKNOWN_PEER)
        self._touched.add(parsed.sender)  # its offers may be answered, its timers moved
        if isinstance(parsed, m.Transport):
            return self._receive_transport(now, source, state, parsed)
        credential = self._mac_credential(state, parsed.signed, parsed.mac)
        if credential is None:
            return self._drop(m.Drop.AUTH)
        if isinstance(parsed, m.Init):
            return self._receive_init(now, source, state, parsed, credential)
        return self._receive_response(now, source, state, parsed, credential)

    @staticmethod
    def _mac_credential(state: _Peer, signed: bytes, mac: bytes) -> _Credential | None:
        """The (private key, PSK) whose pair MAC `mac` is (None: none this node holds).
        One HMAC per combination held, four at most (a PSK rotation and a key rotation
        at once), and no Diffie-Hellman: the MAC names the PSK and the key, so the
        handshake itself is read once, with them, and counted under the peer's and the
        node's handshake budgets like any other: a handshake to the previous key costs
        what one to the current key costs, and a retired key's MAC matches nothing."""
        for credential in state.credentials:
            if std_hmac.compare_digest(pair_mac(credential.mac_key, signed), mac):
                return credential
        return None

    def _drop(self, reason: m.Drop) -> Output:
        self.drops[reason] += 1
        return Output()

    def _dh_allowed(self, now: float, state: _Peer) -> bool:
        """The peer's budget (its MAC verified: the sender is that peer, or replays its
        datagrams), then the node's: whatever the source addresses, one peer cannot
        spend the others' handshakes."""
        if state.bucket is None:
            state.bucket = TokenBucket(PEER_RATE, PEER_BURST, now)
        if self._node_bucket is None:
            self._node_bucket = TokenBucket(NODE_RATE, NODE_BURST, now)
        return state.bucket.take(now) and self._node_bucket.take(now)

    def _receive_init(self, now: float, source: Address, state: _Peer, init: m.Init,
                      credential: _Credential) -> Output:
        peer = state.config.node_number
        if init.timestamp <= self._marks.get(peer, 0):
            return self._drop(m.Drop.REPLAY)
        if state.pending is not None and self.node_number < peer and \
                source == state.endpoint and state.attempts <= YIELD_AFTER:
            # Both initiated at once: the lower node number's stands, but only if the
            # peer's came from where ours went (else a NAT chose another port: ours is
            # lost, and neither would ever complete), and only while ours has a chance:
            # once YIELD_AFTER of ours went unanswered (the peer refuses them, say),
            # the peer's is answered, ours still pending (below).
            self.stats["collisions"] += 1
            return Output()
        if not self._dh_allowed(now, state):
            return self._drop(m.Drop.RATE_LIMITED)
        handshake = HandshakeState(initiator=False, static=credential.private_key,
                                   remote_static=state.config.public_key,
                                   psk=_noise_psk(credential.psk),
                                   prologue=init.signed[:m.HEADER.size + m.INIT_FIELDS.size])
        hello = self._read_hello(handshake, init.noise)
        if isinstance(hello, m.Drop):
            return self._drop(hello)
        self._marks[peer] = init.timestamp
        state.psk_hint, state.key_hint = credential.psk, credential.public_key
        if self.node_number > state.config.node_number:
            # The higher node gives its own handshake up. The lower one keeps its own
            # (answered only after a first attempt went unanswered): if the peer answers
            # it too, both end on that session rather than on one each.
            if state.pending is not None:
                state.given_up = state.pending.local_index
            state.pending = None
        local = self._fresh_index()
        noise = handshake.write_message(m.encode(m.Hello(self.boot_id), padded=False))
        self.stats["dh"] += 2
        self.stats["handshakes_answered"] += 1
        body = m.build_response(self.node_number, state.config.node_number, local,
                                init.sender_index, noise)
        send, receive = handshake.split()
        # Held as `next` until the initiator confirms it; answered where the Init came
        # from, but the peer's endpoint stays until then.
        if state.next is not None:
            self._sessions.pop(state.next.local_index, None)
        state.next = _session(local, init.sender_index, send, receive, now, False, credential)
        state.next_boot = hello.boot_id
        self._sessions[local] = (state, state.next)
        return Output(datagrams=[(source, body + pair_mac(credential.mac_key, body))])

    def _receive_response(self, now: float, source: Address, state: _Peer,
                          response: m.Response, credential: _Credential) -> Output:
        pending = state.pending
        if pending is not None and response.receiver_index == pending.local_index and \
                credential != pending.credential:
            return self._drop(m.Drop.AUTH)  # answered under another PSK or key: forged
        if pending is None or response.receiver_index != pending.local_index:
            if response.receiver_index == state.given_up:  # the peer's answer crossed
                state.given_up = None  # ours; authentic (its MAC held): not a replay
                self.stats["collisions"] += 1
                return Output()
            return self._drop(m.Drop.REPLAY)  # no handshake of ours is waiting for it
        if not self._dh_allowed(now, state):
            return self._drop(m.Drop.RATE_LIMITED)
        handshake = pending.handshake
        hello = self._read_hello(handshake, response.noise)
        if isinstance(hello, m.Drop):
            return self._drop(hello)
        state.pending = None
        state.psk_hint, state.key_hint = credential.psk, credential.public_key
        send, receive = handshake.split()
        moved = self._move(state, source)
        out = self._established(now, state, _session(
            pending.local_index, response.sender_index, send, receive, now, True, credential),
            hello.boot_id)
        out.extend(self._moved(now, state) if moved else Output())
        if not out.datagrams:  # the responder waits for a first message: confirm at once
            out.extend(self._transmit(now, state, state.current, m.Keepalive()))
        return out

    def _read_hello(self, handshake: HandshakeState, noise: bytes) -> m.Hello | m.Drop:
        """The Hello a handshake message carries: two Diffie-Hellmans, then the AEAD."""
        self.stats["dh"] += 2
        try:
            hello = m.decode(handshake.read_message(noise), padded=False)
        except NoiseError:
            return m.Drop.AUTH
        return hello if isinstance(hello, m.Hello) else m.Drop.MALFORMED

    def _receive_transport(self, now: float, source: Address, state: _Peer,
                           datagram: m.Transport) -> Output:
        found = self._sessions.get(datagram.receiver_index)
        if found is None or found[0] is not state:
            return self._drop(m.Drop.AUTH)  # no session of that peer has this index
        if now - found[1].created >= REJECT_AFTER:
            return self._drop(m.Drop.REPLAY)  # recorded under a session now expired
        session = found[1]
        if not session.window.check(datagram.counter):
            return self._drop(m.Drop.REPLAY)
        try:
            plain = session.receive.decrypt_at(datagram.counter, datagram.header,
                                               datagram.ciphertext)
        except NoiseError:
            return self._drop(m.Drop.AUTH)
        session.window.mark(datagram.counter)
        message = m.decode(plain)
        if isinstance(message, m.Drop):
            return self._drop(message)
        self.stats["received"] += 1
        probe = isinstance(message, m.FlowProbe)  # another flow than the channel's: no move
        moved = not probe and self._move(state, source)
        out = Output()
        if session is state.next:  # the initiator's first message: the session is proven
            # Our own handshake, if one is pending, is not needed any more: answered
            # later, it stays the peer's `next`, never confirmed, and both keep this one.
            state.next, state.pending = None, None
            out.extend(self._established(now, state, session, state.next_boot))
        if isinstance(message, m.FlowProbe):
            out.events.append(FlowSeen(state.config.node_number, message.tunnel, source))
            return out
        out.extend(self._handle(now, state, session, message))
        return out.extend(self._moved(now, state) if moved else Output())

    def _handle(self, now: float, state: _Peer, session: _Session,
                message: m.Message) -> Output:
        peer = state.config.node_number
        match message:
            case m.KeyInit(generation=g, public_key=theirs):
                return self._answer_key(now, state, session, g, theirs)
            case m.KeyResponse(generation=g, public_key=theirs):
                offer = state.offers.pop(g, None)
                if offer is None:
                    self.stats["late_key_responses"] += 1
                    return Output()
                self.stats["dh"] += 1
                try:
                    secret = dh(offer[0], theirs)
                except NoiseError:
                    return self._drop(m.Drop.MALFORMED)
                state.keyed_out[g] = secret
                state.awaiting[g] = (now, state.renewed.get(g, 0))
                return Output(events=[GenerationKeyed(peer, g, True, secret, session.psk,
                                                      session.shared)])
            case m.SasInstalled(generation=g, digest=digest) if not self._agreed(state, g,
                                                                                 digest):
                return Output()
            case m.SasInstalled(generation=g) | m.WindowSlid(generation=g) | \
                    m.SendingOn(generation=g):
                what = next(k for k, kind in _ACKS.items() if isinstance(message, kind))
                if state.heard.get(what) == g:
                    return Output()  # a repeat
                state.heard[what] = g
                return Output(events=[PeerAcked(peer, what, g)])
            case m.Restarted(boot_id=boot):
                if boot in state.boots:  # honoured once per boot id
                    self.stats["restarts_repeated"] += 1
                    return Output()
                state.boots.append(boot)
                state.boot_id = boot
                return Output(events=[PeerRestarted(peer, boot)])
            case m.RekeyRequest(nonce=nonce):
                if nonce in state.rekeys:  # honoured once per request
                    self.stats["rekey_requests_repeated"] += 1
                    return Output()
                state.rekeys.append(nonce)
                return Output(events=[PeerRestarted(peer, state.boot_id or 0)])
            case m.ObservedAddress(address=address, port=port):
                return Output(events=[PeerObserved(peer, (str(address), port))])
            case m.PreviousKey(public_key=key):
                return Output(events=[PreviousKeyHeld(peer, key)])
            case m.Keepalive():
                return Output()
        return self._drop(m.Drop.MALFORMED)  # a Hello outside a handshake

    def _agreed(self, state: _Peer, generation: int, digest: bytes) -> bool:
        """The peer's "installed" is for the secret this node agreed for `generation`."""
        secret = state.keyed_out.get(generation)
        if secret is not None and std_hmac.compare_digest(installed_digest(secret), digest):
            state.confirmed.add(generation)
            state.awaiting.pop(generation, None)
            return True
        self.stats["installed_mismatch"] += 1
        return False

    def _answer_key(self, now: float, state: _Peer, session: _Session, generation: int,
                    theirs: bytes) -> Output:
        if generation not in state.accept:  # outside the window: no work, no event
            return self._drop(m.Drop.OUT_OF_WINDOW)
        answered = state.answers.get(generation)
        if answered is not None and answered[0] == theirs and \
                answered[2:] == (session.psk, session.key):
            # our answer was lost: again (over a session of another PSK or key a fresh
            # answer, so both ends derive the generation's keys under the PSK and the
            # pair secret it went with)
            return self._transmit(now, state, session, m.KeyResponse(generation, answered[1]))
        key = X25519PrivateKey.generate()
        self.stats["dh"] += 1
        try:
            secret = dh(key, theirs)
        except NoiseError:
            return self._drop(m.Drop.MALFORMED)
        ours = public_bytes(key)
        del key  # the responder's private key is used once, here
        state.answers[generation] = (theirs, ours, session.psk, session.key)
        state.keyed_in[generation] = secret
        out = self._transmit(now, state, session, m.KeyResponse(generation, ours))
        out.events.append(GenerationKeyed(state.config.node_number, generation, False, secret,
                                          session.psk, session.shared))
        return out

    # ---- sessions -----------------------------------------------------------------------
    def _fresh_index(self) -> int:
        while True:
            index = self._new_index()
            if index not in self._sessions:
                return index

    def _usable(self, state: _Peer, now: float) -> _Session | None:
        session = state.current
        if session is None or now - session.created >= REJECT_AFTER:
            return None
        return session

    def _initiate(self, now: float, state: _Peer) -> Output:
        if state.endpoint is None:
            return Output()
        timestamp = self._timestamps() if self._timestamps is not None else \
            self._own_timestamps.next(now)
        local = self._fresh_index()
        prologue = m.build_init(self.node_number, state.config.node_number, local, timestamp,
                                b"")
        credential = self._initiator_credential(state)
        handshake = HandshakeState(initiator=True, static=credential.private_key,
                                   remote_static=state.config.public_key,
                                   psk=_noise_psk(credential.psk), prologue=prologue)
        noise = handshake.write_message(m.encode(m.Hello(self.boot_id), padded=False))
        self.stats["dh"] += 2
        self.stats["handshakes_initiated"] += 1
        state.pending = _Pending(handshake, local, now, credential)
        state.attempts += 1
        body = prologue + noise
        return Output(datagrams=[(state.endpoint,
                                  body + pair_mac(credential.mac_key, body))])

    def _initiator_credential(self, state: _Peer) -> _Credential:
        """The PSK and the key of our next handshake to the peer.

        PSK: the one it is known to hold when that is our next one (it promoted before
        us), else our current one; every other retry of an unanswered handshake takes
        the other PSK held (a peer that has not staged our current one yet, or retired
        our previous one). Key (a node key rotation): the one the peer is known to know
        this node by (its last handshake used it), else the current one; unanswered
        retries go through the PSKs under one key, then under the other (a peer whose
        mesh file does not name the new key yet)."""
        psks = [psk for _role, psk in self._secrets.psks()]
        if state.psk_hint is not None and state.psk_hint == self._secrets.psk_next:
            psks.reverse()
        keys = list(self._keys)
        if state.key_hint is not None and state.key_hint != keys[0]:
            keys.reverse()
        psk = psks[state.attempts % len(psks)]
        key = keys[state.attempts // len(psks) % len(keys)]
        return next(c for c in state.credentials if (c.public_key, c.psk) == (key, psk))

    def _established(self, now: float, state: _Peer, session: _Session, boot: int) -> Output:
        """`session` becomes current: the initiator's on the Response, the responder's on
        the first message that confirms it. Only now does its Hello's boot id count."""
        if state.previous is not None:
            self._sessions.pop(state.previous.local_index, None)
        state.previous, state.current = state.current, session
        state.attempts = 0
        self._sessions[session.local_index] = (state, session)
        self.stats["handshakes_completed"] += 1
        peer = state.config.node_number
        out = Output(events=[HandshakeComplete(peer)])
        if boot not in state.boots:
            if state.boot_id is not None:
                out.events.append(PeerRestarted(peer, boot))
            state.boots.append(boot)
        state.boot_id = boot
        queued, state.queue = state.queue, []
        # Offers still unanswered go again at once: the new session proves the path,
        # and after a VPP restart the first ones died while VPP resolved the neighbour.
        offers = _offers_again(state, now, at_once=True)
        for message in self._vouch(session) + queued + self._ack_messages(state) + offers:
            out.extend(self._transmit(now, state, session, message))
        return out

    def _vouch(self, session: _Session) -> list[m.Message]:
        """During a node key rotation, over a session the current key authenticated:
        this node still holds its previous key (a peer that just learned the new key
        keeps what it agreed under the old one; without it, it drops it)."""
        previous = self._secrets.private_key_previous
        if previous is None or self._keys.get(session.key, (None, ""))[1] != "current":
            return []
        return [m.PreviousKey(public_bytes(previous))]

    @staticmethod
    def _ack_messages(state: _Peer) -> list[m.Message]:
        return [message for _what, message in sorted(state.acks.items())]

    def _transmit(self, now: float, state: _Peer, session: _Session,
                  message: m.Message) -> Output:
        assert state.endpoint is not None
        counter = session.next_counter
        session.next_counter += 1
        head = m.transport_header(self.node_number, state.config.node_number,
                                  session.remote_index, counter)
        body = session.send.encrypt_at(counter, head, m.encode(message))
        state.last_sent = now
        self.stats["sent"] += 1
        return Output(datagrams=[(state.endpoint, head + body)])

    @staticmethod
    def _move(state: _Peer, source: Address) -> bool:
        """An authenticated datagram came from `source`: follow the peer there (as
        WireGuard roams), and say whether that was a move."""
        moved = state.endpoint != source
        state.endpoint = source
        return moved

    def _moved(self, now: float, state: _Peer) -> Output:
        """Report the move, and tell the peer where its datagrams appear to come from:
        behind a NAT that is its public address and port."""
        assert state.endpoint is not None
        out = Output(events=[EndpointChanged(state.config.node_number, state.endpoint)])
        session = self._usable(state, now)
        if session is not None:
            host, port = state.endpoint
            out.extend(self._transmit(now, state, session,
                                      m.ObservedAddress(ipaddress.ip_address(host), port)))
        return out
