"""The ephemeral key schedule: what a generation keyed over the channel installs."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from vppmesh.channel import session as s
from vppmesh.channel.noise import public_bytes
from vppmesh.keying.keys import (
    EPHEMERAL_LABEL,
    derive_sa_key,
    derive_sa_key_ephemeral,
    pair_secret,
)
from vppmesh.testing.meshes import make_mesh

SECRETS = st.binary(min_size=32, max_size=32)
NAMES = st.text(alphabet="abcdefgh0123456789-", min_size=1, max_size=12)
TUNNELS = st.integers(min_value=0, max_value=15)
EPOCHS = st.integers(min_value=0, max_value=2**32 - 1)


def test_forward_secrecy_key_is_the_documented_hkdf() -> None:
    shared, ephemeral, psk = bytes(range(32)), bytes(range(32, 64)), b"\x42" * 32
    key = derive_sa_key_ephemeral(shared, ephemeral, psk, sender="a", receiver="b",
                                  tunnel=3, epoch=7)
    ikm = b"\x00\x20" + shared + b"\x00\x20" + ephemeral + b"\x00\x20" + psk
    okm = HKDF(algorithm=hashes.SHA256(), length=36,
               salt=EPHEMERAL_LABEL + (7).to_bytes(4, "big"),
               info=b"\x00\x01a\x00\x01b\x00\x02\x00\x03").derive(ikm)
    assert key.key.get_secret_value() == okm[:32]
    assert key.salt == int.from_bytes(okm[32:], "big")


@given(SECRETS, SECRETS, st.sampled_from([b"", b"\x07" * 32]), NAMES, NAMES, TUNNELS, EPOCHS)
@settings(deadline=None)
def test_forward_secrecy_keys_differ_from_every_static_key(
        shared: bytes, ephemeral: bytes, psk: bytes, sender: str, receiver: str, tunnel: int,
        epoch: int) -> None:
    fs = derive_sa_key_ephemeral(shared, ephemeral, psk, sender=sender, receiver=receiver,
                                 tunnel=tunnel, epoch=epoch)
    static = derive_sa_key(shared, psk, sender=sender, receiver=receiver, tunnel=tunnel,
                           epoch=epoch)
    assert fs.key.get_secret_value() != static.key.get_secret_value()
    # The static schedule fed the ephemeral secret in any slot does not give it either.
    for guess in (ephemeral, shared + ephemeral, ephemeral + shared):
        assert derive_sa_key(guess, psk, sender=sender, receiver=receiver, tunnel=tunnel,
                             epoch=epoch).key != fs.key


@given(SECRETS, SECRETS, SECRETS, TUNNELS, EPOCHS)
@settings(deadline=None)
def test_forward_secrecy_every_input_changes_the_key(
        shared: bytes, ephemeral: bytes, other: bytes, tunnel: int, epoch: int) -> None:
    base = dict(sender="n1", receiver="n2", tunnel=tunnel, epoch=epoch)
    key = derive_sa_key_ephemeral(shared, ephemeral, b"", **base).key  # type: ignore[arg-type]
    variants = [
        derive_sa_key_ephemeral(shared, other, b"", **base),  # type: ignore[arg-type]
        derive_sa_key_ephemeral(other, ephemeral, b"", **base),  # type: ignore[arg-type]
        derive_sa_key_ephemeral(shared, ephemeral, other, **base),  # type: ignore[arg-type]
        derive_sa_key_ephemeral(shared, ephemeral, b"", **{**base, "sender": "n2",
                                                          "receiver": "n1"}),  # type: ignore[arg-type]
        derive_sa_key_ephemeral(shared, ephemeral, b"", **{**base, "epoch": epoch ^ 1}),  # type: ignore[arg-type]
        derive_sa_key_ephemeral(shared, ephemeral, b"", **{**base, "tunnel": tunnel ^ 1}),  # type: ignore[arg-type]
    ]
    changed = [v.key != key for v in variants]
    assert changed[3:] == [True, True, True]
    assert changed[0] == (other != ephemeral)
    assert changed[1] == (other != shared)
    assert changed[2]


def test_forward_secrecy_ephemeral_secret_must_be_a_dh_output() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        derive_sa_key_ephemeral(bytes(32), b"", b"", sender="a", receiver="b", tunnel=0,
                                epoch=0)


def test_forward_secrecy_both_agents_derive_the_same_sa_keys_over_the_channel() -> None:
    mesh, secrets = make_mesh(2)
    a, b = mesh.nodes
    channels = {
        node.node_number: s.Channel(
            node.node_number, secrets[node.name],
            [s.PeerConfig(peer.node_number, peer.public_key_bytes, (str(peer.node_number), 1))
             for peer in mesh.nodes if peer is not node], boot_id=1)
        for node in mesh.nodes}
    channels[b.node_number].accept_generations(a.node_number, 0, 3)

    def deliver(sender: int, out: s.Output) -> None:
        for _, data in out.datagrams:
            receiver = 3 - sender
            deliver(receiver, channels[receiver].receive(5.0, (str(sender), 1), data))

    deliver(a.node_number, channels[a.node_number].start_generation(5.0, b.node_number, 2))
    ephemeral_a = channels[a.node_number].generation_secret(b.node_number, 2, outbound=True)
    ephemeral_b = channels[b.node_number].generation_secret(a.node_number, 2, outbound=False)
    assert ephemeral_a is not None and ephemeral_a == ephemeral_b
    static_a = pair_secret(secrets[a.name], b.public_key_bytes)
    static_b = pair_secret(secrets[b.name], a.public_key_bytes)
    for sender, receiver in ((a.name, b.name), (b.name, a.name)):
        at_a = derive_sa_key_ephemeral(static_a, ephemeral_a, secrets[a.name].psk,
                                       sender=sender, receiver=receiver, tunnel=1, epoch=2)
        at_b = derive_sa_key_ephemeral(static_b, ephemeral_b, secrets[b.name].psk,
                                       sender=sender, receiver=receiver, tunnel=1, epoch=2)
        assert at_a == at_b
        assert at_a.key != derive_sa_key(static_a, secrets[a.name].psk, sender=sender,
                                         receiver=receiver, tunnel=1, epoch=2).key
    assert public_bytes(secrets[a.name].private_key) == a.public_key_bytes
