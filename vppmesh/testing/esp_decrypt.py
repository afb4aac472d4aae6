"""An independent ESP decryptor: what an attacker holding a capture and seized nodes can do.

The forward-secrecy check records the mesh's ESP traffic, lets the key generation retire,
then hands everything an attacker who seizes both nodes would find (private keys, PSK,
mesh file, state directories) to this module, which tries every key the static key
schedule can produce. Nothing here uses vppmesh's dataplane code or VPP: packets come from
a pcap file, decryption is RFC 4106 AES-GCM with `cryptography`, and the only vppmesh code
used is the key schedule itself (vppmesh.keying.keys), which is what the attacker would run.

The positive control is the key VPP held for the SA while it was live, parsed from
`vppctl show ipsec sa <index>` (vpp_sa_key): it must decrypt the same packets, or a
"nothing decrypts" result would prove nothing.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vppmesh.config import decode_key, load_mesh
from vppmesh.keying.epochs import WINDOW, GenerationState
from vppmesh.keying.keys import GCM_KEY_BYTES, GCM_SALT_BYTES, derive_sa_key

# ---- pcap -------------------------------------------------------------------------------
PCAP_MAGIC = {  # magic as read little-endian -> (byte order, nanosecond timestamps)
    0xA1B2C3D4: ("<", False), 0xD4C3B2A1: (">", False),
    0xA1B23C4D: ("<", True), 0x4D3CB2A1: (">", True),
}
PCAPNG_MAGIC = 0x0A0D0D0A
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # bare IPv4/IPv6
LINKTYPE_LINUX_SLL = 113  # tcpdump -i any before libpcap 1.10
LINKTYPE_LINUX_SLL2 = 276  # tcpdump -i any since libpcap 1.10


class Frame(NamedTuple):
    linktype: int
    data: bytes


def read_pcap(path: Path | str) -> list[bytes]:
    """The IP packets (from their IP header on) of a classic pcap file, as tcpdump -w
    writes it: Ethernet, Linux cooked (SLL, SLL2: `tcpdump -i any`) or raw IP link type.
    Frames that carry no IPv4/IPv6 (ARP, LLDP) are left out."""
    return [ip for frame in read_frames(path) if (ip := ip_of(frame)) is not None]


def read_frames(path: Path | str) -> list[Frame]:
    """Every complete record of a classic pcap file, with the file's link type."""
    data = Path(path).read_bytes()
    if len(data) < 24:
        raise ValueError(f"{path}: {len(data)} bytes is too short for a pcap file header")
    magic = struct.unpack_from("<I", data)[0]
    if magic == PCAPNG_MAGIC:
        raise ValueError(f"{path} is pcapng; write classic pcap (tcpdump -w does, or "
                         "convert with `editcap -F pcap`)")
    if magic not in PCAP_MAGIC:
        raise ValueError(f"{path} is not a pcap file (magic {magic:#010x})")
    order, _ = PCAP_MAGIC[magic]
    linktype = struct.unpack_from(order + "I", data, 20)[0] & 0x0FFFFFFF
    frames, offset = [], 24
    while offset + 16 <= len(data):
        _, _, caplen, _ = struct.unpack_from(order + "IIII", data, offset)
        offset += 16
        if offset + caplen > len(data):
            break  # a record tcpdump is still writing
        frames.append(Frame(linktype, data[offset:offset + caplen]))
        offset += caplen
    return frames


ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD
VLAN_TAGS = (0x8100, 0x88A8)


def ip_of(frame: Frame) -> bytes | None:
    """The IP packet in one frame, or None when it carries none."""
    data = frame.data
    if frame.linktype == LINKTYPE_ETHERNET:
        ethertype, offset = struct.unpack_from("!H", data, 12)[0] if len(data) >= 14 else 0, 14
        while ethertype in VLAN_TAGS and len(data) >= offset + 4:
            ethertype = struct.unpack_from("!H", data, offset + 2)[0]
            offset += 4
    elif frame.linktype == LINKTYPE_LINUX_SLL:
        ethertype, offset = struct.unpack_from("!H", data, 14)[0] if len(data) >= 16 else 0, 16
    elif frame.linktype == LINKTYPE_LINUX_SLL2:
        ethertype, offset = struct.unpack_from("!H", data, 0)[0] if len(data) >= 20 else 0, 20
    elif frame.linktype == LINKTYPE_RAW:
        version = data[0] >> 4 if data else 0
        ethertype, offset = {4: ETH_IPV4, 6: ETH_IPV6}.get(version, 0), 0
    else:
        raise ValueError(f"pcap link type {frame.linktype} is not supported; capture on an "
                         "Ethernet interface or with `tcpdump -i any`")
    return data[offset:] if ethertype in (ETH_IPV4, ETH_IPV6) else None


# ---- ESP --------------------------------------------------------------------------------
PROTO_ESP, PROTO_UDP = 50, 17
NAT_T_PORT = 4500
IPV6_EXTENSIONS = (0, 43, 60)  # hop-by-hop, routing, destination options
IPV6_FRAGMENT = 44
ESP_HEADER, GCM_IV, GCM_ICV = 8, 8, 16


class EspPacket(NamedTuple):
    spi: int
    seq: int  # the low 32 bits carried in the packet
    data: bytes  # the ESP packet from its SPI on: header, IV, ciphertext, ICV


def esp_packets(packets: Iterable[bytes], *,
                udp_ports: Collection[int] = (NAT_T_PORT,)) -> list[EspPacket]:
    """The ESP packets among IP packets (read_pcap's): IPv4 or IPv6 protocol 50, and ESP
    in UDP (RFC 3948) from or to one of `udp_ports`, where a 1-byte 0xFF NAT keepalive and
    an IKE packet (non-ESP marker: four zero bytes) are not ESP. One end of vppmesh's
    ESP-in-UDP is always port 4500, even across a NAT. Fragments are left out: the mesh
    never fragments its ESP (the pod MTU leaves room for the overhead)."""
    found = []
    for packet in packets:
        payload = transport_payload(packet)
        if payload is None:
            continue
        proto, body = payload
        if proto == PROTO_UDP:
            if len(body) < 8:
                continue
            sport, dport = struct.unpack_from("!HH", body)
            if sport not in udp_ports and dport not in udp_ports:
                continue
            body = body[8:]
            if body == b"\xff" or body[:4] == b"\0\0\0\0":
                continue
        elif proto != PROTO_ESP:
            continue
        if len(body) < ESP_HEADER + GCM_IV + GCM_ICV:
            continue
        spi, seq = struct.unpack_from("!II", body)
        found.append(EspPacket(spi, seq, bytes(body)))
    return found


def transport_payload(packet: bytes) -> tuple[int, bytes] | None:
    """(protocol, payload) of an unfragmented IPv4/IPv6 packet, else None."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        ihl = (packet[0] & 0xF) * 4
        total = struct.unpack_from("!H", packet, 2)[0]
        flags_offset = struct.unpack_from("!H", packet, 6)[0]
        if flags_offset & 0x3FFF:  # more fragments, or not the first one
            return None
        return packet[9], packet[ihl:total]
    if version == 6 and len(packet) >= 40:
        length = struct.unpack_from("!H", packet, 4)[0]
        proto, offset, end = packet[6], 40, 40 + length
        while proto in IPV6_EXTENSIONS and offset + 2 <= end:
            proto, offset = packet[offset], offset + (packet[offset + 1] + 1) * 8
        if proto == IPV6_FRAGMENT:
            return None
        return proto, packet[offset:end]
    return None


def open_esp(packet: bytes | EspPacket, key: bytes, salt: bytes, esn_high: int = 0, *,
             esn: bool = True) -> bytes | None:
    """The plaintext (payload, padding, pad length, next header) of an RFC 4106 AES-GCM
    ESP packet, or None when the tag does not verify.

    Nonce: the SA's 4-byte salt and the packet's 8-byte IV. AAD: SPI and sequence number;
    with extended sequence numbers (vppmesh's SAs: vppmesh.dataplane.vpp.ipsec.SA_FLAGS) the high 32
    bits of the 64-bit number, which the packet does not carry, sit between them
    (RFC 4106 section 5)."""
    data = packet.data if isinstance(packet, EspPacket) else packet
    if len(key) != GCM_KEY_BYTES or len(salt) != GCM_SALT_BYTES:
        raise ValueError(f"an AES-GCM-256 SA has a {GCM_KEY_BYTES}-byte key and a "
                         f"{GCM_SALT_BYTES}-byte salt, not {len(key)} and {len(salt)}")
    if len(data) < ESP_HEADER + GCM_IV + GCM_ICV:
        return None
    spi_seq = data[:ESP_HEADER]
    aad = spi_seq[:4] + esn_high.to_bytes(4, "big") + spi_seq[4:] if esn else spi_seq
    iv = data[ESP_HEADER:ESP_HEADER + GCM_IV]
    try:
        return AESGCM(key).decrypt(salt + iv, data[ESP_HEADER + GCM_IV:], aad)
    except InvalidTag:
        return None


def decrypts(packet: bytes | EspPacket, key: bytes, salt: bytes, esn_high: int = 0, *,
             esn: bool = True) -> bool:
    """Whether (key, salt) authenticates and decrypts one ESP packet (see open_esp)."""
    return open_esp(packet, key, salt, esn_high, esn=esn) is not None


# ---- candidate keys ---------------------------------------------------------------------
class Candidate(NamedTuple):
    """One key an attacker can compute, and where it came from (for the report)."""

    key: bytes
    salt: bytes
    origin: str


def static_schedule_keys(mesh_file: Path, state_dirs: Sequence[Path],
                         private_key_files: Sequence[Path], psk_file: Path | None, *,
                         extra_epochs: int = 32) -> list[Candidate]:
    """Every (key, salt) vppmesh's static key schedule (vppmesh.keying.keys.derive_sa_key) can
    produce from seized files: for every ordered pair of mesh nodes of which one private
    key was seized, every tunnel 0..15 (the SPI's 4-bit field) and every generation from
    0 to the highest one the seized `<node>.generations.json` files or the mesh's
    key_epoch mention, plus `extra_epochs`.

    The caller adds its own candidates by appending to the list; `decrypting` takes any
    (key, salt, ...) tuples."""
    mesh = load_mesh(Path(mesh_file))
    psk = decode_key(Path(psk_file).read_text(), f"PSK file {psk_file}") if psk_file else b""
    private = {}
    for path in private_key_files:
        key = X25519PrivateKey.from_private_bytes(
            decode_key(Path(path).read_text(), f"private key file {path}"))
        private[key.public_key().public_bytes_raw()] = key
    last = max(highest_generation(state_dirs), mesh.settings.key_epoch) + extra_epochs
    candidates = []
    for sender in mesh.nodes:
        for receiver in mesh.nodes:
            if sender is receiver:
                continue
            shared = pair_secret(private, sender.public_key_bytes, receiver.public_key_bytes)
            if shared is None:
                continue
            for tunnel in range(16):
                for generation in range(last + 1):
                    sa = derive_sa_key(shared, psk, sender=sender.name,
                                       receiver=receiver.name, tunnel=tunnel,
                                       epoch=generation)
                    candidates.append(Candidate(
                        sa.key.get_secret_value(), sa.salt.to_bytes(GCM_SALT_BYTES, "big"),
                        f"static {sender.name}->{receiver.name} tunnel {tunnel} "
                        f"generation {generation}"))
    return candidates


def pair_secret(private: dict[bytes, X25519PrivateKey], a: bytes, b: bytes) -> bytes | None:
    """The X25519 secret of the pair of public keys a, b, from whichever private key of
    theirs was seized; None when neither was."""
    for mine, theirs in ((a, b), (b, a)):
        if mine in private:
            return private[mine].exchange(X25519PublicKey.from_public_bytes(theirs))
    return None


def highest_generation(state_dirs: Sequence[Path]) -> int:
    """The highest key generation any seized `<node>.generations.json` names: a peer's
    outbound generation, its floor, the top of its inbound window, a generation seen."""
    highest = 0
    for state_dir in state_dirs:
        for path in sorted(Path(state_dir).glob("*.generations.json")):
            state = GenerationState.model_validate_json(path.read_text())
            for pg in state.peers.values():
                named = [pg.out, pg.floor, pg.in_base + WINDOW - 1, *pg.in_marks]
                if pg.in_seen is not None:
                    named.append(pg.in_seen)
                highest = max(highest, *named)
    return highest


class Match(NamedTuple):
    candidate: tuple[bytes, ...]
    spi: int
    esn: bool


def decrypting(packets: Sequence[EspPacket], candidates: Iterable[tuple[bytes, ...]], *,
               esn_highs: Sequence[int] = (0,)) -> list[Match]:
    """Every candidate (key, salt, ...) that decrypts a packet of some SPI, trying both AAD
    forms (with ESN high bits from `esn_highs`, and without ESN).

    One packet of each SPI is tried: all packets of an SA share its key, so a key that
    opens one opens them all, and one that fails one packet fails every packet."""
    first: dict[int, EspPacket] = {}
    for packet in packets:
        first.setdefault(packet.spi, packet)
    matches = []
    for candidate in candidates:
        key, salt = candidate[0], candidate[1]
        for packet in first.values():
            if any(decrypts(packet, key, salt, high) for high in esn_highs):
                matches.append(Match(candidate, packet.spi, True))
            elif decrypts(packet, key, salt, esn=False):
                matches.append(Match(candidate, packet.spi, False))
    return matches


# ---- VPP's view of an SA ----------------------------------------------------------------
SA_LINE = re.compile(r"^\[(\d+)\] sa (\d+) \S+ spi (\d+) ", re.M)
SALT_LINE = re.compile(r"^\s*salt 0x([0-9a-f]+)\s*$", re.M)
CRYPTO_LINE = re.compile(r"^\s*crypto alg (\S+) key (\S+)\s*$", re.M)


def vpp_sa_indices(listing: str) -> dict[int, int]:
    """{SPI: SA index} from `show ipsec sa` (the index `show ipsec sa <index>` takes)."""
    return {int(m.group(3)): int(m.group(1)) for m in SA_LINE.finditer(listing)}


def vpp_sa_key(vppctl_output: str) -> tuple[bytes, bytes]:
    """(key, salt) of the one SA `vppctl show ipsec sa <index>` printed (VPP 26.06):

        [3] sa 1342177792 (0x50000200) spi 16777472 (0x01000100) protocol:esp flags:[...]
           ...
           salt 0x<8 hex digits>
           ...
           crypto alg aes-gcm-256 key <64 hex digits>

    VPP prints the salt as the number whose big-endian bytes are the nonce's first four.
    """
    salt = SALT_LINE.search(vppctl_output)
    crypto = CRYPTO_LINE.search(vppctl_output)
    if len(SA_LINE.findall(vppctl_output)) != 1 or salt is None or crypto is None:
        raise ValueError("not the output of `show ipsec sa <index>` for one SA: it needs "
                         "one `[index] sa ...` line, a `salt` and a `crypto alg` line")
    alg, key = crypto.groups()
    if alg != "aes-gcm-256":
        raise ValueError(f"the SA's crypto alg is {alg}, not aes-gcm-256")
    if not re.fullmatch(r"[0-9a-f]{64}", key):
        shown = "[redacted]" if key == "[redacted]" else f"{len(key)} characters"
        raise ValueError(f"VPP did not print the SA's key (it printed {shown}); an "
                         "AES-GCM-256 key is 64 hex digits")
    return bytes.fromhex(key), int(salt.group(1), 16).to_bytes(GCM_SALT_BYTES, "big")
