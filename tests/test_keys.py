"""Keys: RFC test vectors for the primitives, symmetry and separation of derived keys."""

from __future__ import annotations

import base64
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vppmesh.errors import KeyFileError
from vppmesh.keying.keys import (
    PROTOCOL_LABEL,
    NodeSecrets,
    derive_sa_key,
    generate_private_key,
    load_secrets,
    pair_secret,
    spi_for,
    write_secret_file,
)
from vppmesh.testing.meshes import make_mesh


def test_x25519_rfc7748_vector() -> None:
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob_pub = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    secrets = NodeSecrets(private_key=X25519PrivateKey.from_private_bytes(alice))
    assert pair_secret(secrets, bob_pub) == shared


def test_hkdf_rfc5869_case1() -> None:
    okm = HKDF(algorithm=hashes.SHA256(), length=42, salt=bytes(range(13)),
               info=bytes(range(0xF0, 0xFA))).derive(b"\x0b" * 22)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")


def test_derivation_is_the_documented_hkdf() -> None:
    shared, psk = bytes(range(32)), b"\x42" * 32
    key = derive_sa_key(shared, psk, sender="a", receiver="b", tunnel=3, epoch=7)
    info = b"\x00\x01a\x00\x01b\x00\x02\x00\x03"
    okm = HKDF(algorithm=hashes.SHA256(), length=36, salt=PROTOCOL_LABEL + (7).to_bytes(4, "big"),
               info=info).derive(shared + psk)
    assert key.key.get_secret_value() == okm[:32]
    assert key.salt == int.from_bytes(okm[32:], "big")


def test_both_ends_derive_the_same_keys_and_directions_differ() -> None:
    mesh, secrets = make_mesh(2)
    a, b = mesh.nodes
    ab = pair_secret(secrets[a.name], b.public_key_bytes)
    ba = pair_secret(secrets[b.name], a.public_key_bytes)
    assert ab == ba
    k_ab = derive_sa_key(ab, b"", sender=a.name, receiver=b.name, tunnel=0, epoch=0)
    k_ba = derive_sa_key(ba, b"", sender=a.name, receiver=b.name, tunnel=0, epoch=0)
    assert k_ab.key.get_secret_value() == k_ba.key.get_secret_value()
    others = [
        derive_sa_key(ab, b"", sender=b.name, receiver=a.name, tunnel=0, epoch=0),
        derive_sa_key(ab, b"", sender=a.name, receiver=b.name, tunnel=1, epoch=0),
        derive_sa_key(ab, b"", sender=a.name, receiver=b.name, tunnel=0, epoch=1),
        derive_sa_key(ab, b"\x01" * 32, sender=a.name, receiver=b.name, tunnel=0, epoch=0),
        derive_sa_key(ab, b"", sender=a.name + "x", receiver=b.name[1:], tunnel=0, epoch=0),
    ]
    keys = {k.key.get_secret_value() for k in [k_ab, *others]}
    assert len(keys) == 6


def test_spis_never_collide_at_a_receiver() -> None:
    spis = {spi_for(n, t, e) for n in range(1, 300) for t in range(16) for e in range(16)}
    assert len(spis) == 299 * 16 * 16
    assert min(spis) > 255


def test_keygen_writes_0600_and_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k" / "private.key"
    public = generate_private_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secrets(path, None).public_key_b64() == public
    with pytest.raises(KeyFileError, match="--force"):
        generate_private_key(path)
    assert generate_private_key(path, force=True) != public


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    generate_private_key(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_secrets(path, None)


def test_malformed_key_file(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    write_secret_file(path, "short")
    with pytest.raises(KeyFileError, match=r"not valid base64|expected 32"):
        load_secrets(path, None)


def test_secrets_never_show_key_material() -> None:
    key = X25519PrivateKey.generate()
    secrets = NodeSecrets(private_key=key, psk=b"\x13" * 32)
    text = repr(secrets)
    assert "psk=set" in text
    assert "13131313" not in text


def test_low_order_public_key_is_refused() -> None:
    secrets = NodeSecrets(private_key=X25519PrivateKey.generate())
    with pytest.raises(KeyFileError, match="low-order"):
        pair_secret(secrets, bytes(32))
    assert X25519PublicKey  # imported for clarity of the primitive under test


def test_a_generation_past_32_bits_is_refused_not_wrapped() -> None:
    """The highest key_epoch leaves 2^31 generations to rekey into; past 32 bits the
    derivation refuses (a wrapped generation would repeat a key) with the fix."""
    from vppmesh.errors import ConfigError

    shared = bytes(range(32))
    for epoch in (2**31 - 1, 2**31 + 2**30, 2**32 - 1):
        derive_sa_key(shared, b"", sender="a", receiver="b", tunnel=0, epoch=epoch)
    for epoch in (2**32, 2**40, -1):
        with pytest.raises(ConfigError, match=f"key generation {epoch} does not fit in "
                           "32 bits.*vppmesh keygen"):
            derive_sa_key(shared, b"", sender="a", receiver="b", tunnel=0, epoch=epoch)


CORE_STATE = """
import ctypes, resource, sys
from pathlib import Path
libc = ctypes.CDLL(None)
def state():
    return resource.getrlimit(resource.RLIMIT_CORE), libc.prctl(3, 0, 0, 0, 0)  # GET_DUMPABLE
print(state())
from vppmesh.keying.keys import load_secrets
load_secrets(Path(sys.argv[1]), None)
print(state())
"""


def test_a_process_holding_the_private_key_cannot_dump_core(tmp_path: Path) -> None:
    """A crash or SIGQUIT of the agent, or a same-uid user's gcore, would write the private
    key, the PSK and the agreed SA keys to a core file. Once the key is loaded, the process
    has RLIMIT_CORE (0, 0) and is not dumpable. In a subprocess: pytest's own is left be."""
    import resource
    import subprocess
    import sys

    key = tmp_path / "private.key"
    generate_private_key(key)

    def allow_core() -> None:  # a process that could dump core before
        hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
        resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))

    done = subprocess.run([sys.executable, "-c", CORE_STATE, str(key)], check=True,
                          capture_output=True, text=True, preexec_fn=allow_core,
                          cwd=Path(__file__).parents[1])
    before, after = done.stdout.splitlines()
    assert before.endswith(", 1)")  # dumpable, as every process starts
    assert after == "((0, 0), 0)"


def test_the_agents_forbid_core_dumps_before_reading_any_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`up` (with --watch, the metrics TLS key is read before the node's) and the
    datastore agent forbid core dumps first thing."""
    from typer.testing import CliRunner

    from vppmesh.agent import hardening
    from vppmesh.agent.datastore.membership import follow
    from vppmesh.agent.node import NodeOptions
    from vppmesh.cli import app
    from vppmesh.errors import ConfigError

    calls: list[str] = []
    monkeypatch.setattr(hardening, "forbid_core_dumps", lambda: calls.append("forbidden"))
    missing = tmp_path / "missing"
    result = CliRunner().invoke(app, ["up", "--mesh", str(missing), "--key", str(missing),
                                      "--node", "node1", "--state-dir", str(tmp_path)])
    assert result.exit_code != 0 and calls == ["forbidden"]
    options = NodeOptions(mesh_file=missing, node="node1", private_key=missing)
    with pytest.raises(ConfigError, match="--datastore needs --watch"):
        follow(options, "etcd://127.0.0.1:1", watch=False, underlay=[], pod_cidr=None,
               node_number=None, settings_file=None, lease_ttl=30)
    assert calls == ["forbidden", "forbidden"]


def test_a_missing_psk_names_the_command_that_makes_one(tmp_path: Path) -> None:
    """The error said `vppmesh keygen`, which makes a node key, not a PSK: it now names
    `vppmesh keygen --psk FILE`, which writes one (0600) that load_secrets takes."""
    from typer.testing import CliRunner

    from vppmesh.cli import app

    key = tmp_path / "private.key"
    psk = tmp_path / "psk"
    with pytest.raises(KeyFileError, match=re.escape(
            f"private key file {tmp_path}/nokey does not exist; create it with `vppmesh "
            f"keygen --key {tmp_path}/nokey`")):
        load_secrets(tmp_path / "nokey", None)
    generate_private_key(key)
    with pytest.raises(KeyFileError, match=re.escape(
            f"`vppmesh keygen --psk {psk}` and copy it to every node")):
        load_secrets(key, psk)
    made = CliRunner().invoke(app, ["keygen", "--psk", str(psk)])
    assert made.exit_code == 0, made.output
    assert stat.S_IMODE(psk.stat().st_mode) == 0o600
    secret = load_secrets(key, psk).psk
    assert len(secret) == 32
    assert psk.read_text().strip() not in made.output  # a secret is never printed
    again = CliRunner().invoke(app, ["keygen", "--psk", str(psk)])
    assert again.exit_code == 1 and "--force" in again.output
    assert load_secrets(key, psk).psk == secret
    psk.write_text(base64.b64encode(bytes(16)).decode() + "\n")
    with pytest.raises(KeyFileError, match="expected 32; create it on one node with "
                       "`vppmesh keygen --psk"):
        load_secrets(key, psk)
