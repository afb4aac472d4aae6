"""The Noise implementation against published vectors, and the replay window."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from vppmesh.channel.noise import (
    PROTOCOL,
    REPLAY_WINDOW,
    HandshakeState,
    NoiseError,
    ReplayWindow,
    public_bytes,
)

VECTORS = json.loads((Path(__file__).parent / "data" / "noise_vectors.json").read_text())


def _key(hex_text: str | None) -> X25519PrivateKey | None:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(hex_text)) if hex_text else None


def _side(vector: dict, role: str) -> HandshakeState:
    psks = vector.get(f"{role}_psks") or []
    remote = vector.get(f"{role}_remote_static")
    return HandshakeState(
        initiator=role == "init",
        static=_key(vector.get(f"{role}_static")),
        remote_static=bytes.fromhex(remote) if remote else None,
        psk=bytes.fromhex(psks[0]) if psks else b"",
        prologue=bytes.fromhex(vector[f"{role}_prologue"]),
        protocol=vector["protocol_name"],
        ephemeral=_key(vector[f"{role}_ephemeral"]),
    )


def test_channel_vectors_include_the_channels_own_pattern() -> None:
    assert PROTOCOL in {v["protocol_name"] for v in VECTORS["vectors"]}


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: v["protocol_name"])
def test_channel_noise_matches_published_vectors(vector: dict) -> None:
    init, resp = _side(vector, "init"), _side(vector, "resp")
    sides = [init, resp]
    ciphers: dict[int, tuple] = {}
    for i, message in enumerate(vector["messages"]):
        payload, expected = bytes.fromhex(message["payload"]), bytes.fromhex(message["ciphertext"])
        writer, reader = (sides[i % 2], sides[(i + 1) % 2])
        if not writer.complete:
            assert writer.write_message(payload) == expected
            assert reader.read_message(expected) == payload
            if writer.complete and reader.complete:
                assert init.handshake_hash.hex() == vector["handshake_hash"]
                assert resp.handshake_hash == init.handshake_hash
                ciphers = {0: init.split(), 1: resp.split()}
            continue
        send, _ = ciphers[i % 2]
        _, receive = ciphers[(i + 1) % 2]
        assert send.encrypt_with_ad(b"", payload) == expected
        assert receive.decrypt_with_ad(b"", expected) == payload
    assert ciphers, "the vector's handshake completed"


def _fresh_pair(psk: bytes = b"p" * 32) -> tuple[HandshakeState, HandshakeState]:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    pub = public_bytes
    return (HandshakeState(initiator=True, static=a, remote_static=pub(b), psk=psk),
            HandshakeState(initiator=False, static=b, remote_static=pub(a), psk=b"p" * 32))


def test_channel_noise_rejects_wrong_psk_and_tampering() -> None:
    init, resp = _fresh_pair(psk=b"q" * 32)
    with pytest.raises(NoiseError):
        resp.read_message(init.write_message(b"hello"))
    init, resp = _fresh_pair()
    message = bytearray(init.write_message(b"hello"))
    message[40] ^= 1
    with pytest.raises(NoiseError):
        resp.read_message(bytes(message))


def test_channel_noise_refuses_out_of_turn_and_short_messages() -> None:
    _init, resp = _fresh_pair()
    with pytest.raises(NoiseError):
        resp.write_message(b"")
    with pytest.raises(NoiseError):
        resp.read_message(b"\x00" * 10)


def test_channel_noise_split_drops_the_ephemeral() -> None:
    init, resp = _fresh_pair()
    resp.read_message(init.write_message(b""))
    init.read_message(resp.write_message(b""))
    assert init.ephemeral is not None
    init.split()
    resp.split()
    assert init.ephemeral is None and resp.ephemeral is None


def test_channel_noise_repr_shows_no_psk() -> None:
    init, _ = _fresh_pair()
    assert "pppp" not in repr(init) and "psk=" not in repr(init)


def test_channel_replay_window_accepts_each_counter_once() -> None:
    window = ReplayWindow()
    for counter in (0, 5, 3, 1):
        assert window.check(counter)
        window.mark(counter)
        assert not window.check(counter)
    assert window.check(2) and window.check(4)
    window.mark(5 + REPLAY_WINDOW)
    assert not window.check(5)  # now too far behind, seen or not
    assert window.check(REPLAY_WINDOW + 4)


@given(st.lists(st.integers(min_value=0, max_value=5000), max_size=200))
@settings(deadline=None)
def test_channel_replay_window_matches_a_set_model(counters: list[int]) -> None:
    window, seen, highest = ReplayWindow(), set(), -1
    for counter in counters:
        fresh = counter not in seen and (counter > highest or highest - counter < REPLAY_WINDOW)
        assert window.check(counter) == fresh
        if fresh:
            window.mark(counter)
            seen.add(counter)
            highest = max(highest, counter)
