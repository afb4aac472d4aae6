"""Node keys and the per-SA key schedule.

Each node owns an X25519 key pair; only public keys are shared. Both ends of a pair
compute the same X25519 secret, and HKDF-SHA256 turns it into an independent AES-GCM-256
key and salt for every (sender, receiver, tunnel, epoch), so no key is ever reused across
directions, tunnels or epochs (RFC 4106 forbids nonce reuse under one key, and two
senders sharing a key would share a nonce space). SPIs are built from node numbers rather
than hashed, so they can never collide at a receiver.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import SecretBytes

from vppmesh.agent import hardening
from vppmesh.config import GENERATION_MAX, decode_key
from vppmesh.errors import ConfigError, KeyFileError

PROTOCOL_LABEL = b"vppmesh esp aes-gcm-256 v1"
EPHEMERAL_LABEL = b"vppmesh esp aes-gcm-256 ephemeral v1"
DH_BYTES = 32
GCM_KEY_BYTES = 32
GCM_SALT_BYTES = 4
SPI_BASE = 0x0100_0000
EPOCH_SPI_BITS = 4


PSK_ID_LABEL = b"vppmesh psk id v1"
# A PSK rotation's second PSK, a file beside settings.psk_file (see load_secrets).
PSK_NEXT_SUFFIX = ".next"
PSK_PREVIOUS_SUFFIX = ".previous"
# A node key rotation's previous private key, a file beside the private key file.
KEY_PREVIOUS_SUFFIX = ".previous"


@dataclass(frozen=True)
class NodeSecrets:
    """What a node keeps to itself: its private key and the optional mesh PSK.

    During a PSK rotation (docs/operations.md) a node holds a second PSK beside the
    current one, never more: `psk_next` (staged, not yet promoted here) or
    `psk_previous` (promoted here, the old one not yet retired). The channel accepts a
    handshake under either and initiates under `psk` first; the static key schedule
    takes `static_psk`, the older of the two, which every node holds from the first step
    to the last but one."""

    private_key: X25519PrivateKey
    psk: bytes = b""
    psk_next: bytes = b""
    psk_previous: bytes = b""
    # During a node key rotation (docs/operations.md), the node's previous private key,
    # held until every peer's mesh file names the new one: the channel answers a
    # handshake addressed to either key and authenticates with the one each peer knows.
    private_key_previous: X25519PrivateKey | None = None

    def __post_init__(self) -> None:
        if self.psk_next and self.psk_previous:
            raise KeyFileError("a node holds at most two PSKs: the current one and either a "
                               "next or a previous one")

    def __repr__(self) -> str:  # never show key material, even in a traceback
        psk = "set" if self.psk else "unset"
        other = "".join(f", psk_{role}=set" for role, _ in self.psks()[1:])
        if self.private_key_previous is not None:
            other += f", previous_public_key={public_key_b64(self.private_key_previous)!r}"
        return f"NodeSecrets(public_key={self.public_key_b64()!r}, psk={psk}{other})"

    def private_keys(self) -> tuple[tuple[str, X25519PrivateKey], ...]:
        """The node's private keys by role ("current", "previous"), the current first;
        one entry outside a key rotation."""
        previous = (("previous", self.private_key_previous),) \
            if self.private_key_previous is not None else ()
        return (("current", self.private_key), *previous)

    def key_for(self, public_key: str) -> X25519PrivateKey | None:
        """The private key held for `public_key` (base64; None: neither key's)."""
        return next((key for _role, key in self.private_keys()
                     if public_key_b64(key) == public_key), None)

    def public_key_b64(self) -> str:
        return public_key_b64(self.private_key)

    def psks(self) -> tuple[tuple[str, bytes], ...]:
        """The PSKs a handshake may use, by role ("current", "next", "previous"), the
        current first; one entry (b"" without a mesh PSK) outside a rotation."""
        other = (("next", self.psk_next),) if self.psk_next else \
            (("previous", self.psk_previous),) if self.psk_previous else ()
        return (("current", self.psk), *other)

    @property
    def static_psk(self) -> bytes:
        """The PSK of the static key schedule: the previous one while it is held, else
        the current one (a staged next one never): every node holds it from staging
        to promotion, so pairs on static keys keep agreeing until the old PSK retires."""
        return self.psk_previous or self.psk


def psk_id(psk: bytes) -> str:
    """A short public name of a PSK (a keyed hash: it reveals nothing of the PSK), so
    status and metrics can say which PSK a pair uses without showing it."""
    if not psk:
        return "none"
    return hashlib.blake2s(PSK_ID_LABEL + psk, digest_size=4).hexdigest()


def public_key_b64(private_key: X25519PrivateKey) -> str:
    raw = private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return base64.b64encode(raw).decode()


def private_key_b64(private_key: X25519PrivateKey) -> str:
    raw = private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(raw).decode()


def write_secret_file(path: Path, content: str, *, force: bool = False) -> None:
    """Create a file readable by its owner only (0600) without a window where it is wider."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} exists already; pass --force to replace it") from None
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(content + "\n")


def generate_private_key(path: Path, *, force: bool = False) -> str:
    """Write a new X25519 private key (0600) and return its public key."""
    key = X25519PrivateKey.generate()
    write_secret_file(path, private_key_b64(key), force=force)
    return public_key_b64(key)


def generate_psk(path: Path, *, force: bool = False) -> None:
    """Write a new pre-shared key (32 random bytes, base64, 0600): settings.psk_file,
    the same file on every node."""
    write_secret_file(path, base64.b64encode(os.urandom(32)).decode(), force=force)


def secret_file_fix(path: Path, what: str) -> str:
    """How to make the secret file `what` ("private key" or "PSK") at `path`."""
    if what == "PSK":
        return (f"create it on one node with `vppmesh keygen --psk {path}` and copy it to "
                "every node (they all need the same PSK)")
    return f"create it with `vppmesh keygen --key {path}`"


def read_secret_file(path: Path, what: str) -> bytes:
    """Read a base64 32-byte secret, refusing files that others can read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise KeyFileError(f"{what} file {path} does not exist; "
                           f"{secret_file_fix(path, what)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{what} file {path} cannot be read ({exc})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{what} file {path} has mode {stat.S_IMODE(mode):04o}; it must be readable by "
            f"its owner only: chmod 600 {path}"
        )
    try:
        return decode_key(text, f"{what} file {path}", secret_file_fix(path, what))
    except ValueError as exc:
        raise KeyFileError(str(exc)) from None


def psk_sibling(psk_file: Path, suffix: str) -> Path:
    """The rotation file beside the PSK: `psk_file` with `suffix` appended."""
    return psk_file.with_name(psk_file.name + suffix)


def key_previous_file(private_key_file: Path) -> Path:
    """Where a node key rotation keeps the previous private key: beside the key file."""
    return private_key_file.with_name(private_key_file.name + KEY_PREVIOUS_SUFFIX)


def rotate_private_key(path: Path) -> str:
    """A node key rotation's first step: the current key moves to KEY.previous (0600)
    and a new one takes its place; returns the new public key. Refused while a previous
    key is held (a rotation in progress: at most two keys), and the key file is replaced
    atomically: a crash leaves the old key or the new one in place, never none."""
    previous = key_previous_file(path)
    if previous.exists() or previous.is_symlink():
        raise KeyFileError(
            f"{previous} exists: a rotation of this node's key is in progress; remove it "
            "once `vppmesh status` shows no peer on the previous key, then rotate again")
    read_secret_file(path, "private key")  # the current key is sound before it moves
    staged = path.with_name(path.name + ".new")
    key = X25519PrivateKey.generate()
    write_secret_file(staged, private_key_b64(key), force=True)
    os.link(path, previous)
    os.replace(staged, path)
    return public_key_b64(key)


def load_secrets(private_key_file: Path, psk_file: Path | None) -> NodeSecrets:
    """The node's secrets; from here on this process writes no core file (hardening).

    A PSK rotation's second PSK is a file beside settings.psk_file, per node (the mesh
    file is the same everywhere, and a datastore's settings too, while the rotation
    moves node by node): `PSK.next` (the new PSK, staged) or `PSK.previous` (the old
    one, once the new one is promoted to `PSK`); both at once is refused. A second file
    equal to the current one is ignored (a promotion caught halfway)."""
    hardening.forbid_core_dumps()
    raw = read_secret_file(private_key_file, "private key")
    # A node key rotation's previous key (rotate_private_key), equal to the current one
    # ignored (a rotation caught halfway).
    previous_file = key_previous_file(private_key_file)
    previous = None
    if previous_file.exists() or previous_file.is_symlink():
        old = read_secret_file(previous_file, "private key")
        previous = X25519PrivateKey.from_private_bytes(old) if old != raw else None
    psk = read_secret_file(psk_file, "PSK") if psk_file is not None else b""
    others = {}
    for suffix in (PSK_NEXT_SUFFIX, PSK_PREVIOUS_SUFFIX) if psk_file is not None else ():
        path = psk_sibling(psk_file, suffix)  # type: ignore[arg-type]
        if path.exists() or path.is_symlink():
            other = read_secret_file(path, "PSK")
            if other != psk:
                others[suffix] = (path, other)
    if len(others) > 1:
        (next_path, _), (previous_path, _) = others.values()
        raise KeyFileError(
            f"both {next_path} and {previous_path} exist: a node holds at most two PSKs; "
            f"finish the rotation in progress (remove {previous_path} once every node "
            "promoted the new PSK) before staging another")
    return NodeSecrets(private_key=X25519PrivateKey.from_private_bytes(raw), psk=psk,
                       psk_next=others.get(PSK_NEXT_SUFFIX, (None, b""))[1],
                       psk_previous=others.get(PSK_PREVIOUS_SUFFIX, (None, b""))[1],
                       private_key_previous=previous)


def pair_secret(secrets: NodeSecrets, peer_public_key: bytes,
                private_key: X25519PrivateKey | None = None) -> bytes:
    """X25519 shared secret; identical on both ends of the pair. `private_key`: which of
    the node's keys (during a key rotation); the current one by default."""
    try:
        return (private_key or secrets.private_key).exchange(
            X25519PublicKey.from_public_bytes(peer_public_key))
    except ValueError:
        # A low-order point gives the all-zero secret: an attacker-chosen key.
        raise KeyFileError("a peer's public key is a low-order point; it cannot be used") from None


@dataclass(frozen=True)
class SaKey:
    """AES-GCM-256 key and the 4-byte salt that prefixes every nonce."""

    key: SecretBytes
    salt: int


def _length_prefixed(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(2, "big") + p for p in parts)


# Derivation is deterministic and its inputs are the secret itself, so a cache can never
# return a stale key; it saves re-deriving every SA of the mesh on each re-plan.
SA_KEY_CACHE_SIZE = 1 << 16


@functools.lru_cache(maxsize=SA_KEY_CACHE_SIZE)
def derive_sa_key(
    shared: bytes, psk: bytes, *, sender: str, receiver: str, tunnel: int, epoch: int
) -> SaKey:
    """HKDF-SHA256 of the pair secret for one direction, tunnel and epoch.

    Fields are length-prefixed so that no two (sender, receiver) pairs can produce the
    same `info`, which plain concatenation of names would allow ("a"+"bc" == "ab"+"c").
    """
    return _hkdf_sa_key(PROTOCOL_LABEL, shared + psk, sender=sender, receiver=receiver,
                        tunnel=tunnel, epoch=epoch)


def derive_sa_key_ephemeral(
    shared: bytes, ephemeral: bytes, psk: bytes, *, sender: str, receiver: str, tunnel: int,
    epoch: int
) -> SaKey:
    """The SA key of a generation whose agents exchanged ephemeral keys over the channel.

    The input keying material holds the static secret, the generation's ephemeral X25519
    secret and the PSK, so the key stays authenticated by the static keys and hedged by
    the PSK, and once both agents have dropped the ephemeral secret (the generation
    retired) nothing on either node's disk or in the datastore recomputes it. Another
    label keeps these keys apart from derive_sa_key's even for equal inputs. Not cached:
    a cache would keep the ephemeral secret alive after its generation retired.
    """
    if len(ephemeral) != DH_BYTES:
        raise ValueError(f"an ephemeral secret has {DH_BYTES} bytes, not {len(ephemeral)}")
    return _hkdf_sa_key(EPHEMERAL_LABEL, _length_prefixed(shared, ephemeral, psk),
                        sender=sender, receiver=receiver, tunnel=tunnel, epoch=epoch)


def _hkdf_sa_key(label: bytes, ikm: bytes, *, sender: str, receiver: str, tunnel: int,
                 epoch: int) -> SaKey:
    check_generation(epoch)
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=GCM_KEY_BYTES + GCM_SALT_BYTES,
        salt=label + epoch.to_bytes(4, "big"),
        info=_length_prefixed(sender.encode(), receiver.encode(), tunnel.to_bytes(2, "big")),
    )
    okm = hkdf.derive(ikm)
    return SaKey(
        key=SecretBytes(okm[:GCM_KEY_BYTES]),
        salt=int.from_bytes(okm[GCM_KEY_BYTES:], "big"),
    )


def check_generation(epoch: int) -> None:
    """Refuse a key generation past 32 bits rather than let it wrap or overflow: a wrapped
    generation would derive a key used before (nonce reuse). MeshSettings keeps key_epoch
    low enough that rekeys never get here."""
    if not 0 <= epoch <= GENERATION_MAX:
        raise ConfigError(
            f"key generation {epoch} does not fit in 32 bits: this mesh has used up its key "
            "generations (settings.key_epoch too high?); give every node a new key "
            "(`vppmesh keygen --force`) and start the mesh again at settings.key_epoch 0")


def spi_for(sender_node_number: int, tunnel: int, epoch: int) -> int:
    """SPI of the SA carrying sender -> receiver traffic on one tunnel and epoch.

    Unique at every receiver: a receiver's inbound SAs differ in sender number, tunnel or
    epoch. The epoch takes 4 bits: only two epochs are ever live at once. The base keeps
    SPIs clear of the 1-255 range RFC 4303 reserves.
    """
    return SPI_BASE | sender_node_number << 8 | tunnel << EPOCH_SPI_BITS | (epoch & 0xF)


def spi_sender(spi: int) -> int:
    """The sender node number in one of our SPIs (the inverse of spi_for)."""
    return (spi - SPI_BASE) >> 8


def spi_tunnel(spi: int) -> int:
    """The tunnel index in one of our SPIs."""
    return (spi >> EPOCH_SPI_BITS) & 0xF
