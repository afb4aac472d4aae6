"""The independent ESP decryptor (vppmesh/testing/esp_decrypt.py) against packets built here.

Packets are sealed with AESGCM directly and framed with scapy, so the decryptor's
parsing and AAD are checked against RFC 4106 and the wire formats, not against itself.
"""

from __future__ import annotations

import base64
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1Q, Ether

from vppmesh.config import dump_mesh
from vppmesh.dataplane.view import build_view
from vppmesh.keying.epochs import WINDOW, GenerationState, PeerGenerations
from vppmesh.keying.keys import private_key_b64, spi_for, write_secret_file
from vppmesh.testing import esp_decrypt
from vppmesh.testing.meshes import make_mesh

KEY = bytes(range(32))
SALT = bytes.fromhex("a1b2c3d4")
DATA = Path(__file__).parent / "data"


def seal(key: bytes, salt: bytes, spi: int, seq: int, *, esn_high: int | None = 0,
         iv: bytes = b"\x00\x00\x00\x00\x00\x00\x00\x07",
         payload: bytes = b"inner packet\x01\x02\x02\x04") -> bytes:
    """An RFC 4106 ESP packet (from the SPI on); esn_high None: no ESN in the AAD."""
    header = struct.pack("!II", spi, seq)
    aad = header if esn_high is None else struct.pack("!III", spi, esn_high, seq)
    return header + iv + AESGCM(key).encrypt(salt + iv, payload, aad)


# ---- decrypts ---------------------------------------------------------------------------
def test_the_right_key_decrypts_and_gives_the_plaintext() -> None:
    packet = seal(KEY, SALT, 0x01000100, 5)
    assert esp_decrypt.decrypts(packet, KEY, SALT)
    assert esp_decrypt.open_esp(packet, KEY, SALT) == b"inner packet\x01\x02\x02\x04"


@pytest.mark.parametrize("change", ["key", "salt", "esn_high", "no_esn", "spi", "seq",
                                    "iv", "ciphertext", "icv"])
def test_anything_wrong_fails_the_tag(change: str) -> None:
    packet = bytearray(seal(KEY, SALT, 0x01000100, 5))
    key, salt, high, esn = KEY, SALT, 0, True
    if change == "key":
        key = bytes([KEY[0] ^ 1]) + KEY[1:]
    elif change == "salt":
        salt = SALT[:3] + b"\x00"
    elif change == "esn_high":
        high = 1
    elif change == "no_esn":
        esn = False
    else:
        offset = {"spi": 3, "seq": 7, "iv": 12, "ciphertext": 17, "icv": -1}[change]
        packet[offset] ^= 0x80
    assert not esp_decrypt.decrypts(bytes(packet), key, salt, high, esn=esn)


def test_the_esn_high_bits_and_the_plain_aad() -> None:
    high = seal(KEY, SALT, 0x01000100, 5, esn_high=3)
    assert esp_decrypt.decrypts(high, KEY, SALT, 3)
    assert not esp_decrypt.decrypts(high, KEY, SALT, 0)
    plain = seal(KEY, SALT, 0x01000100, 5, esn_high=None)
    assert esp_decrypt.decrypts(plain, KEY, SALT, esn=False)
    assert not esp_decrypt.decrypts(plain, KEY, SALT)


def test_short_packets_never_decrypt_and_bad_keys_are_refused() -> None:
    assert not esp_decrypt.decrypts(b"\x01" * 31, KEY, SALT)
    with pytest.raises(ValueError, match="32-byte key and a 4-byte salt"):
        esp_decrypt.decrypts(seal(KEY, SALT, 1, 1), KEY[:16], SALT)


# ---- pcap -------------------------------------------------------------------------------
def pcap(frames: list[bytes], linktype: int, *, order: str = "<", nanoseconds: bool = False,
         snaplen: int | None = None) -> bytes:
    """A classic pcap file written field by field (libpcap's savefile format)."""
    magic = 0xA1B23C4D if nanoseconds else 0xA1B2C3D4
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 262144, linktype)
    for i, frame in enumerate(frames):
        kept = frame[:snaplen] if snaplen else frame
        out += struct.pack(order + "IIII", 1_700_000_000 + i, 0, len(kept), len(frame)) + kept
    return out


def ethertype(packet: bytes) -> int:
    return 0x86DD if packet[0] >> 4 == 6 else 0x0800


def eth(packet: bytes) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02",
                       type=ethertype(packet)) / packet)


V4 = {"src": "192.0.2.1", "dst": "192.0.2.2"}
V6 = {"src": "2001:db8::1", "dst": "2001:db8::2"}


def captured() -> tuple[list[bytes], list[tuple[int, int, bytes]]]:
    """IP packets of every kind the underlay may carry, and the ESP among them."""
    esp = [seal(KEY, SALT, 0x01000100 + i, 10 + i) for i in range(5)]
    packets = [
        bytes(IP(**V4, proto=50) / esp[0]),
        bytes(IP(**V4) / UDP(sport=4500, dport=4500) / esp[1]),
        bytes(IP(**V4) / UDP(sport=4500, dport=4500) / b"\xff"),  # NAT keepalive
        bytes(IP(**V4) / UDP(sport=4500, dport=4500) / (b"\0" * 4 + esp[2])),  # IKE
        bytes(IP(**V4) / UDP(sport=40000, dport=4500) / esp[2]),
        bytes(IP(**V4) / UDP(sport=5000, dport=53) / esp[3]),  # not NAT-T
        bytes(IPv6(**V6, nh=50) / esp[3]),
        bytes(IPv6(**V6) / IPv6ExtHdrDestOpt(nh=50) / esp[4]),
        bytes(IPv6(**V6) / UDP(sport=4500, dport=4500) / esp[0]),
        bytes(IP(**V4, proto=50, flags="MF") / esp[1]),  # a fragment
        bytes(IPv6(**V6) / IPv6ExtHdrFragment(nh=50, m=1) / esp[1]),
    ]
    wanted = [esp[0], esp[1], esp[2], esp[3], esp[4], esp[0]]
    return packets, [(int.from_bytes(e[:4], "big"), int.from_bytes(e[4:8], "big"), e)
                     for e in wanted]


def test_ethernet_pcap_round_trip(tmp_path: Path) -> None:
    packets, wanted = captured()
    frames = [eth(p) for p in packets]
    mac = {"src": "02:00:00:00:00:01", "dst": "ff:ff:ff:ff:ff:ff"}
    frames.insert(2, bytes(Ether(**mac) / ARP()))
    frames.insert(4, bytes(Ether(**mac) / Dot1Q(vlan=7, type=0x0800) / packets[4]))
    path = tmp_path / "eth.pcap"
    path.write_bytes(pcap(frames, 1))
    read = esp_decrypt.read_pcap(path)
    assert len(read) == len(packets) + 1  # the ARP frame carries no IP packet
    assert read[0] == packets[0]
    found = esp_decrypt.esp_packets(read)
    assert [tuple(p) for p in found] == wanted[:3] + wanted[2:]
    assert all(esp_decrypt.decrypts(p, KEY, SALT) for p in found)
    other_port = esp_decrypt.esp_packets(read, udp_ports=(53,))
    assert [tuple(p) for p in other_port] == [wanted[0], wanted[3], wanted[3], wanted[4]]


@pytest.mark.parametrize(("linktype", "cooked"), [
    (113, lambda p: CookedLinux(proto=ethertype(p)) / p),
    (276, lambda p: CookedLinuxV2(proto=ethertype(p)) / p),
    (101, lambda p: p),
])
def test_cooked_and_raw_captures(tmp_path: Path, linktype: int, cooked) -> None:  # type: ignore[no-untyped-def]
    packets, wanted = captured()
    path = tmp_path / "any.pcap"
    path.write_bytes(pcap([bytes(cooked(p)) for p in packets], linktype))
    assert [tuple(p) for p in esp_decrypt.esp_packets(esp_decrypt.read_pcap(path))] == wanted


def test_big_endian_nanosecond_and_partial_pcap_and_refusals(tmp_path: Path) -> None:
    packets, wanted = captured()
    path = tmp_path / "be.pcap"
    path.write_bytes(pcap([eth(p) for p in packets], 1, order=">",
                          nanoseconds=True))
    assert [tuple(p) for p in esp_decrypt.esp_packets(esp_decrypt.read_pcap(path))] == wanted
    whole = pcap([eth(p) for p in packets], 1)
    path.write_bytes(whole[:-1])  # the last record as a capture still being written
    assert len(esp_decrypt.read_pcap(path)) == len(packets) - 1
    path.write_bytes(struct.pack("<I", 0x0A0D0D0A) + bytes(40))
    with pytest.raises(ValueError, match="pcapng"):
        esp_decrypt.read_pcap(path)
    path.write_bytes(pcap([b"x" * 20], 105))
    with pytest.raises(ValueError, match="link type 105"):
        esp_decrypt.read_pcap(path)


def test_truncated_capture_keeps_headers_but_cannot_decrypt(tmp_path: Path) -> None:
    """A snaplen shorter than the packet (tcpdump -s 128) keeps SPI and sequence number;
    the missing ICV can then never verify."""
    packet = bytes(IP(**V4, proto=50) / seal(KEY, SALT, 0x01000100, 9, payload=bytes(200)))
    path = tmp_path / "short.pcap"
    path.write_bytes(pcap([eth(packet)], 1, snaplen=128))
    (found,) = esp_decrypt.esp_packets(esp_decrypt.read_pcap(path))
    assert (found.spi, found.seq) == (0x01000100, 9)
    assert not esp_decrypt.decrypts(found, KEY, SALT)


# ---- the static schedule ----------------------------------------------------------------
def seize(tmp_path: Path, nodes: int = 3, *, psk: bytes | None = None,
          **settings: object) -> tuple[dict[str, object], dict[str, Path]]:
    """A mesh's files as an attacker finds them on its nodes: the mesh file, each node's
    private key and state directory, the PSK file."""
    mesh, secrets = make_mesh(nodes, **settings)
    files: dict[str, Path] = {"mesh": tmp_path / "mesh.yaml"}
    files["mesh"].write_text(dump_mesh(mesh))
    for name, secret in secrets.items():
        (tmp_path / name).mkdir()
        files[name] = tmp_path / name / "private.key"
        write_secret_file(files[name], private_key_b64(secret.private_key))
    if psk is not None:
        files["psk"] = tmp_path / "psk"
        write_secret_file(files["psk"], base64.b64encode(psk).decode())
        secrets = {n: s.__class__(private_key=s.private_key, psk=psk)
                   for n, s in secrets.items()}
    return {"mesh": mesh, "secrets": secrets}, files


def save_generations(state_dir: Path, node: str, peer: str, *, out: int, in_base: int) -> None:
    state = GenerationState(peers={peer: PeerGenerations(
        public_key="unused", out=out, out_since=0.0, floor=0, in_base=in_base)})
    (state_dir / f"{node}.generations.json").write_text(state.model_dump_json())


def schedule(files: dict[str, Path], nodes: list[str], *, extra_epochs: int = 32,
             psk: bool = False) -> list[esp_decrypt.Candidate]:
    return esp_decrypt.static_schedule_keys(
        files["mesh"], [files[n].parent for n in nodes], [files[n] for n in nodes],
        files["psk"] if psk else None, extra_epochs=extra_epochs)


def test_schedule_holds_every_key_the_mesh_uses(tmp_path: Path) -> None:
    made, files = seize(tmp_path, psk=b"\x42" * 32)
    save_generations(files["node1"].parent, "node1", "node2", out=6, in_base=9)
    candidates = schedule(files, ["node1", "node2", "node3"], extra_epochs=4, psk=True)
    last = 9 + WINDOW - 1 + 4  # node1's inbound window tops the generations named
    assert len(candidates) == 6 * 16 * (last + 1)
    pairs = {(c.key, c.salt) for c in candidates}
    assert len(pairs) == len(candidates)  # no two SAs ever share a key
    mesh, secrets = made["mesh"], made["secrets"]
    for local, peer, tunnel, epoch, outbound in [
        ("node1", "node2", 0, 0, True), ("node1", "node3", 1, 6, True),
        ("node2", "node1", 15, last, False), ("node3", "node2", 7, 11, True),
    ]:
        view = build_view(mesh, local, secrets[local])  # type: ignore[arg-type, index]
        sa = view.sa_key(view.peer(peer), outbound=outbound, tunnel=tunnel, epoch=epoch)
        assert (sa.key.get_secret_value(), sa.salt.to_bytes(4, "big")) in pairs
    view = build_view(mesh, "node1", secrets["node1"])  # type: ignore[arg-type, index]
    beyond = view.sa_key(view.peer("node2"), outbound=True, tunnel=0, epoch=last + 1)
    assert (beyond.key.get_secret_value(), beyond.salt.to_bytes(4, "big")) not in pairs


def test_schedule_needs_the_psk_and_a_private_key_of_the_pair(tmp_path: Path) -> None:
    made, files = seize(tmp_path, psk=b"\x42" * 32, key_epoch=3)
    mesh, secrets = made["mesh"], made["secrets"]
    without_psk = schedule(files, ["node1"], extra_epochs=0)
    # node1's key gives its pairs only (4 ordered pairs); key_epoch 3 sets the last.
    assert len(without_psk) == 4 * 16 * 4
    view = build_view(mesh, "node1", secrets["node1"])  # type: ignore[arg-type, index]
    sa = view.sa_key(view.peer("node3"), outbound=False, tunnel=2, epoch=3)
    used = (sa.key.get_secret_value(), sa.salt.to_bytes(4, "big"))
    assert used not in {(c.key, c.salt) for c in without_psk}
    with_psk = schedule(files, ["node1"], extra_epochs=0, psk=True)
    assert used in {(c.key, c.salt) for c in with_psk}
    assert not any("node2->node3" in c.origin for c in with_psk)


def test_decrypting_finds_the_one_key_of_each_spi(tmp_path: Path) -> None:
    made, files = seize(tmp_path, nodes=2)
    mesh, secrets = made["mesh"], made["secrets"]
    view = build_view(mesh, "node2", secrets["node2"])  # type: ignore[arg-type, index]
    peer = view.peer("node1")
    packets = []
    for tunnel, epoch, seq in [(0, 1, 1), (0, 1, 2), (3, 2, 1)]:
        sa = view.sa_key(peer, outbound=True, tunnel=tunnel, epoch=epoch)
        packets.append(seal(sa.key.get_secret_value(), sa.salt.to_bytes(4, "big"),
                            spi_for(2, tunnel, epoch), seq))
    found = esp_decrypt.esp_packets([bytes(IP(**V4, proto=50) / p) for p in packets])
    candidates = schedule(files, ["node1", "node2"])
    matches = esp_decrypt.decrypting(found, candidates)
    assert sorted((m.candidate[2], m.spi, m.esn) for m in matches) == [
        ("static node2->node1 tunnel 0 generation 1", spi_for(2, 0, 1), True),
        ("static node2->node1 tunnel 3 generation 2", spi_for(2, 3, 2), True),
    ]
    # A caller's own candidates sit beside the schedule's.
    assert esp_decrypt.decrypting(found, [(KEY, SALT)]) == []
    plain = esp_decrypt.esp_packets([bytes(IP(**V4, proto=50) /
                                           seal(KEY, SALT, 7, 1, esn_high=None))])
    assert esp_decrypt.decrypting(plain, [(KEY, SALT, "mine")]) == [
        esp_decrypt.Match((KEY, SALT, "mine"), 7, False)]


# ---- show ipsec sa ----------------------------------------------------------------------
LISTING = """\
[0] sa 1073742336 (0x40000200) spi 16777728 (0x01000200) protocol:esp flags:[esn anti-replay ]
[1] sa 1090519552 (0x41000200) spi 16777729 (0x01000201) protocol:esp flags:[esn anti-replay ]
[3] sa 1342177792 (0x50000200) spi 16777472 (0x01000100) protocol:esp flags:[esn anti-replay ]
"""


def test_vpp_sa_key_reads_vpp_output() -> None:
    """tests/data/show_ipsec_sa.txt is VPP 26.06's output with the key and salt replaced."""
    text = (DATA / "show_ipsec_sa.txt").read_text()
    assert esp_decrypt.vpp_sa_key(text) == (KEY, SALT)
    assert esp_decrypt.vpp_sa_indices(LISTING) == {
        0x01000200: 0, 0x01000201: 1, 0x01000100: 3}
    with pytest.raises(ValueError, match="one SA"):
        esp_decrypt.vpp_sa_key(LISTING)
    with pytest.raises(ValueError, match=r"printed \[redacted\]"):
        esp_decrypt.vpp_sa_key(text.replace(KEY.hex(), "[redacted]"))
    with pytest.raises(ValueError, match="aes-cbc-128"):
        esp_decrypt.vpp_sa_key(text.replace("aes-gcm-256", "aes-cbc-128"))
