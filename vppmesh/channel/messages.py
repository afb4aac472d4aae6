"""What the agents of a node pair say to each other, and its compact binary form.

Two layers. The *datagram* is what crosses the underlay (through VPP's punt socket): a
6-byte clear header (version, type, sender and receiver node numbers), then a Noise
handshake message or a transport message with its counter. The *message* is what a
handshake payload or a transport message decrypts to: one kind byte and fixed-size
fields. Every kind has one exact length and every datagram type one exact length, so the
parser checks sizes before it looks at anything else and a whole datagram is never
larger than MAX_DATAGRAM.

Transport plaintexts are padded with zeros to MESSAGE_BYTES (the largest kind's length),
so an observer cannot tell a KeyInit from a keepalive by its length, nor drop only the
key exchanges: every transport datagram is TRANSPORT_BYTES long. Handshake datagrams have
their own fixed lengths, INIT_BYTES and RESPONSE_BYTES (their type is in the clear header
anyway). With VERSION 2: transport 71 bytes, Init 91, Response 87 (UDP payloads).

Parsing never raises: `parse_datagram` and `decode` return the parsed value or a `Drop`
reason the caller counts. Nothing here holds keys; `session` authenticates.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from vppmesh.channel.noise import DHLEN, TAGLEN

Address = tuple[str, int]  # (IP address, UDP port) a datagram comes from or goes to
VERSION = 2  # 2: padded transport plaintexts, SasInstalled's digest, RekeyRequest
HEADER = struct.Struct(">BBHH")  # version, type, sender node number, receiver node number
INIT_FIELDS = struct.Struct(">IQ")  # sender index, timestamp (ns, strictly increasing)
RESPONSE_FIELDS = struct.Struct(">II")  # sender index, receiver index
TRANSPORT_FIELDS = struct.Struct(">IQ")  # receiver index, counter
MAC_BYTES = 16  # the pair MAC after a handshake message (checked before any DH)


class DatagramType(IntEnum):
    INIT = 1
    RESPONSE = 2
    TRANSPORT = 3


class Kind(IntEnum):
    HELLO = 1
    KEY_INIT = 2
    KEY_RESPONSE = 3
    SAS_INSTALLED = 4
    WINDOW_SLID = 5
    RESTARTED = 6
    KEEPALIVE = 7
    OBSERVED_ADDRESS = 8
    SENDING_ON = 9
    FLOW_PROBE = 10
    REKEY_REQUEST = 11
    PREVIOUS_KEY = 12


class Drop(StrEnum):
    """Why a datagram was dropped: the counters' labels."""

    OVERSIZED = "oversized"
    TRUNCATED = "truncated"
    MALFORMED = "malformed"
    UNKNOWN_PEER = "unknown_peer"
    AUTH = "auth"  # a MAC or an AEAD tag that does not verify: forged or corrupted
    REPLAY = "replay"
    RATE_LIMITED = "rate_limited"
    OUT_OF_WINDOW = "out_of_window"  # a KeyInit for a generation the receiver does not accept


# ---- messages ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    """In both handshake messages: the sender's VPP boot id (a restart changes it)."""

    boot_id: int


@dataclass(frozen=True)
class KeyInit:
    """A key exchange for generation `generation`: the sender's ephemeral public key."""

    generation: int
    public_key: bytes


@dataclass(frozen=True)
class KeyResponse:
    """The answer to KeyInit: the responder's ephemeral public key for that generation."""

    generation: int
    public_key: bytes


@dataclass(frozen=True)
class SasInstalled:
    """The receiver's inbound SAs for `generation` are in its VPP: the sender may switch.

    `digest` is a short hash of the generation's agreed secret (session.installed_digest):
    the sender believes the ack only for the key it agreed itself, never for another."""

    generation: int
    digest: bytes = bytes(8)


@dataclass(frozen=True)
class WindowSlid:
    """The receiver slid its window to `generation`: older generations are gone."""

    generation: int


@dataclass(frozen=True)
class SendingOn:
    """The sender sends on `generation` now: the receiver may slide to it after a grace
    period, traffic or not."""

    generation: int


@dataclass(frozen=True)
class Restarted:
    """The sender's VPP restarted (new boot id): its peers should rekey towards it."""

    boot_id: int


@dataclass(frozen=True)
class RekeyRequest:
    """The sender lost its inbound keys from the receiver (not its VPP): the receiver
    should rekey towards it. `nonce` is new for each loss; a repeat is not honoured."""

    nonce: int


@dataclass(frozen=True)
class PreviousKey:
    """The sender, authenticated by this session's static key (its current one), still
    holds the private key of `public_key`, its previous one (a node key rotation): what
    its peer agreed with it under that key stays good. Never sent outside a rotation."""

    public_key: bytes


@dataclass(frozen=True)
class Keepalive:
    """Nothing but proof of life (and a packet to keep a NAT mapping open)."""


@dataclass(frozen=True)
class ObservedAddress:
    """Where the sender sees the receiver's datagrams come from (NAT port learning)."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int


@dataclass(frozen=True)
class FlowProbe:
    """Sent by a node behind NAT on the ESP flow of tunnel `tunnel` (not the channel's
    own, tunnel 0's): where it arrives from is where that tunnel's ESP must go."""

    tunnel: int


Message = (Hello | KeyInit | KeyResponse | SasInstalled | WindowSlid | SendingOn | Restarted
           | Keepalive | ObservedAddress | FlowProbe | RekeyRequest | PreviousKey)

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_KEY = struct.Struct(f">I{DHLEN}s")
DIGEST_BYTES = 8
_INSTALLED = struct.Struct(f">I{DIGEST_BYTES}s")
_V4 = struct.Struct(">B4sH")
_V6 = struct.Struct(">B16sH")
FAMILY_V4, FAMILY_V6 = 4, 6

# kind -> exact body length (after the kind byte); OBSERVED_ADDRESS has two.
_BODY_SIZES: dict[Kind, tuple[int, ...]] = {
    Kind.HELLO: (_U64.size,),
    Kind.KEY_INIT: (_KEY.size,),
    Kind.KEY_RESPONSE: (_KEY.size,),
    Kind.SAS_INSTALLED: (_INSTALLED.size,),
    Kind.WINDOW_SLID: (_U32.size,),
    Kind.SENDING_ON: (_U32.size,),
    Kind.FLOW_PROBE: (_U32.size,),
    Kind.RESTARTED: (_U64.size,),
    Kind.REKEY_REQUEST: (_U64.size,),
    Kind.PREVIOUS_KEY: (DHLEN,),
    Kind.KEEPALIVE: (0,),
    Kind.OBSERVED_ADDRESS: (_V4.size, _V6.size),
}
MAX_MESSAGE = 1 + max(max(sizes) for sizes in _BODY_SIZES.values())
MESSAGE_BYTES = MAX_MESSAGE  # every transport plaintext, padded with zeros
HELLO_BYTES = 1 + _U64.size


def encode(message: Message, *, padded: bool = True) -> bytes:
    """The message's bytes, padded to MESSAGE_BYTES (a transport's) unless `padded` is
    False (a handshake's Hello, inside a datagram of fixed length already)."""
    data = _compact(message)
    return data + bytes(MESSAGE_BYTES - len(data)) if padded else data


def _compact(message: Message) -> bytes:
    match message:
        case Hello(boot_id=boot) | Restarted(boot_id=boot):
            kind = Kind.HELLO if isinstance(message, Hello) else Kind.RESTARTED
            return bytes([kind]) + _U64.pack(boot)
        case KeyInit(generation=g, public_key=key) | KeyResponse(generation=g, public_key=key):
            kind = Kind.KEY_INIT if isinstance(message, KeyInit) else Kind.KEY_RESPONSE
            return bytes([kind]) + _KEY.pack(g, key)
        case SasInstalled(generation=g, digest=digest):
            return bytes([Kind.SAS_INSTALLED]) + _INSTALLED.pack(g, digest)
        case RekeyRequest(nonce=nonce):
            return bytes([Kind.REKEY_REQUEST]) + _U64.pack(nonce)
        case PreviousKey(public_key=key) if len(key) == DHLEN:
            return bytes([Kind.PREVIOUS_KEY]) + key
        case WindowSlid(generation=g):
            return bytes([Kind.WINDOW_SLID]) + _U32.pack(g)
        case SendingOn(generation=g):
            return bytes([Kind.SENDING_ON]) + _U32.pack(g)
        case Keepalive():
            return bytes([Kind.KEEPALIVE])
        case FlowProbe(tunnel=tunnel):
            return bytes([Kind.FLOW_PROBE]) + _U32.pack(tunnel)
        case ObservedAddress(address=address, port=port):
            layout, family = (_V4, FAMILY_V4) if address.version == 4 else (_V6, FAMILY_V6)
            return bytes([Kind.OBSERVED_ADDRESS]) + layout.pack(family, address.packed, port)
    raise TypeError(f"not a channel message: {type(message).__name__}")


def decode(data: bytes, *, padded: bool = True) -> Message | Drop:
    """The message in a decrypted payload, or why it is not one. A transport's (`padded`)
    is exactly MESSAGE_BYTES long and its padding all zeros."""
    if not data or (padded and len(data) < MESSAGE_BYTES):
        return Drop.TRUNCATED
    if len(data) > MAX_MESSAGE:
        return Drop.OVERSIZED
    try:
        kind = Kind(data[0])
    except ValueError:
        return Drop.MALFORMED
    body = data[1:]
    if padded:
        size = _padded_body_size(kind, body)
        if size is None or any(body[size:]):
            return Drop.MALFORMED  # an unknown address family, or padding that is not zeros
        body = body[:size]
    if len(body) not in _BODY_SIZES[kind]:
        return Drop.TRUNCATED if len(body) < min(_BODY_SIZES[kind]) else Drop.MALFORMED
    if kind in (Kind.HELLO, Kind.RESTARTED, Kind.REKEY_REQUEST):
        (value,) = _U64.unpack(body)
        return {Kind.HELLO: Hello, Kind.RESTARTED: Restarted,
                Kind.REKEY_REQUEST: RekeyRequest}[kind](value)
    if kind in (Kind.KEY_INIT, Kind.KEY_RESPONSE):
        generation, key = _KEY.unpack(body)
        return KeyInit(generation, key) if kind is Kind.KEY_INIT else KeyResponse(generation, key)
    if kind is Kind.SAS_INSTALLED:
        return SasInstalled(*_INSTALLED.unpack(body))
    if kind in (Kind.WINDOW_SLID, Kind.SENDING_ON):
        (generation,) = _U32.unpack(body)
        return _STATES[kind](generation)
    if kind is Kind.KEEPALIVE:
        return Keepalive()
    if kind is Kind.FLOW_PROBE:
        return FlowProbe(_U32.unpack(body)[0])
    if kind is Kind.PREVIOUS_KEY:
        return PreviousKey(bytes(body))
    layout, family = (_V4, FAMILY_V4) if len(body) == _V4.size else (_V6, FAMILY_V6)
    got_family, packed, port = layout.unpack(body)
    if got_family != family or port == 0:
        return Drop.MALFORMED
    return ObservedAddress(ipaddress.ip_address(packed), port)


def _padded_body_size(kind: Kind, body: bytes) -> int | None:
    """Where a padded message's body ends: its kind's length (an address's, by family)."""
    if kind is not Kind.OBSERVED_ADDRESS:
        return _BODY_SIZES[kind][0]
    return {FAMILY_V4: _V4.size, FAMILY_V6: _V6.size}.get(body[0])


_STATES: dict[Kind, type[WindowSlid] | type[SendingOn]] = {
    Kind.WINDOW_SLID: WindowSlid, Kind.SENDING_ON: SendingOn}


# ---- datagrams --------------------------------------------------------------------------
# Handshake payloads are exactly one Hello (unpadded); transport payloads one message of
# any kind, padded to MESSAGE_BYTES.
NOISE_INIT_BYTES = DHLEN + HELLO_BYTES + TAGLEN  # KK message 1: e, then the payload
NOISE_RESPONSE_BYTES = DHLEN + HELLO_BYTES + TAGLEN
INIT_BYTES = HEADER.size + INIT_FIELDS.size + NOISE_INIT_BYTES + MAC_BYTES
RESPONSE_BYTES = HEADER.size + RESPONSE_FIELDS.size + NOISE_RESPONSE_BYTES + MAC_BYTES
TRANSPORT_BYTES = HEADER.size + TRANSPORT_FIELDS.size + MESSAGE_BYTES + TAGLEN
MAX_DATAGRAM = max(INIT_BYTES, RESPONSE_BYTES, TRANSPORT_BYTES)


@dataclass(frozen=True)
class Init:
    sender: int
    receiver: int
    sender_index: int
    timestamp: int
    noise: bytes
    mac: bytes
    signed: bytes  # everything the MAC covers (the datagram up to the MAC)


@dataclass(frozen=True)
class Response:
    sender: int
    receiver: int
    sender_index: int
    receiver_index: int
    noise: bytes
    mac: bytes
    signed: bytes


@dataclass(frozen=True)
class Transport:
    sender: int
    receiver: int
    receiver_index: int
    counter: int
    ciphertext: bytes
    header: bytes  # the clear part, authenticated as the AEAD's associated data


Datagram = Init | Response | Transport


def header(kind: DatagramType, sender: int, receiver: int) -> bytes:
    return HEADER.pack(VERSION, kind, sender, receiver)


def build_init(sender: int, receiver: int, sender_index: int, timestamp: int,
               noise: bytes) -> bytes:
    """The datagram up to its MAC (the session appends the MAC)."""
    return header(DatagramType.INIT, sender, receiver) + \
        INIT_FIELDS.pack(sender_index, timestamp) + noise


def build_response(sender: int, receiver: int, sender_index: int, receiver_index: int,
                   noise: bytes) -> bytes:
    return header(DatagramType.RESPONSE, sender, receiver) + \
        RESPONSE_FIELDS.pack(sender_index, receiver_index) + noise


def transport_header(sender: int, receiver: int, receiver_index: int, counter: int) -> bytes:
    return header(DatagramType.TRANSPORT, sender, receiver) + \
        TRANSPORT_FIELDS.pack(receiver_index, counter)


def parse_datagram(data: bytes) -> Datagram | Drop:
    """Sizes and the clear header only: the cheap checks that come before any crypto."""
    size = len(data)
    if size > MAX_DATAGRAM:
        return Drop.OVERSIZED
    if size < HEADER.size:
        return Drop.TRUNCATED
    version, kind, sender, receiver = HEADER.unpack_from(data)
    if version != VERSION or sender == 0 or receiver == 0 or sender == receiver:
        return Drop.MALFORMED
    if kind == DatagramType.INIT:
        if size != INIT_BYTES:
            return Drop.TRUNCATED if size < INIT_BYTES else Drop.MALFORMED
        index, timestamp = INIT_FIELDS.unpack_from(data, HEADER.size)
        start = HEADER.size + INIT_FIELDS.size
        return Init(sender, receiver, index, timestamp, data[start:-MAC_BYTES],
                    data[-MAC_BYTES:], data[:-MAC_BYTES])
    if kind == DatagramType.RESPONSE:
        if size != RESPONSE_BYTES:
            return Drop.TRUNCATED if size < RESPONSE_BYTES else Drop.MALFORMED
        index, receiver_index = RESPONSE_FIELDS.unpack_from(data, HEADER.size)
        start = HEADER.size + RESPONSE_FIELDS.size
        return Response(sender, receiver, index, receiver_index, data[start:-MAC_BYTES],
                        data[-MAC_BYTES:], data[:-MAC_BYTES])
    if kind == DatagramType.TRANSPORT:
        if size != TRANSPORT_BYTES:
            return Drop.TRUNCATED if size < TRANSPORT_BYTES else Drop.MALFORMED
        index, counter = TRANSPORT_FIELDS.unpack_from(data, HEADER.size)
        start = HEADER.size + TRANSPORT_FIELDS.size
        return Transport(sender, receiver, index, counter, data[start:], data[:start])
    return Drop.MALFORMED
