"""The Noise handshake and transport the agents' channel runs on (Noise revision 34).

Pattern: `Noise_KKpsk0_25519_ChaChaPoly_BLAKE2s`.

- KK, not IK: every agent knows every peer's static public key before the first packet
  (the mesh file or the datastore hands them out), which is exactly KK's premise. IK
  would send the initiator's static key, encrypted, in the first message: 48 bytes for
  something the responder already knows, and a responder could only learn who is talking
  after a Diffie-Hellman. With KK the initiator's node number travels in the clear
  header and the responder looks the static key up.
- psk0: the mesh PSK is mixed in before the first message is written, so nothing a node
  outside the PSK produces is ever accepted, and the PSK keeps hedging against a future
  break of X25519 exactly as it does for the static key schedule.
- ChaChaPoly and BLAKE2s, as WireGuard: fast without AES instructions, and the agent's
  CPU time matters more here than the dataplane's.

Both messages of KK mix es, ss, ee and se, so the transport keys have forward secrecy
once the ephemerals are gone; this module never writes an ephemeral anywhere. Transport
messages carry an explicit 64-bit counter (datagrams can be lost or reordered) checked
against a sliding replay window (RFC 6479, as WireGuard). The published test vectors
(cacophony) are in tests/data/noise_vectors.json.

The primitives come from `cryptography`: X25519, ChaCha20-Poly1305 / AES-GCM, BLAKE2s /
SHA-256 and HMAC; HKDF is the Noise spec's own HMAC-based one (not RFC 5869's
`HKDF` class, whose expand step differs in what it feeds back).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

PROTOCOL = "Noise_KKpsk0_25519_ChaChaPoly_BLAKE2s"
DHLEN = 32
TAGLEN = 16
MAX_MESSAGE = 65535  # the Noise spec's limit; the channel's own limits are far smaller
MAX_NONCE = (1 << 64) - 1  # reserved by the spec: never used to encrypt
REPLAY_WINDOW = 2048  # counters accepted behind the highest seen (WireGuard's size)

# Base handshake patterns: (initiator pre-message, responder pre-message, messages).
_PATTERNS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, ...], ...]]] = {
    "KK": (("s",), ("s",), (("e", "es", "ss"), ("e", "ee", "se"))),
    "IK": ((), ("s",), (("e", "es", "s", "ss"), ("e", "ee", "se"))),
    "NN": ((), (), (("e",), ("e", "ee"))),
}

_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "BLAKE2s": lambda: hashes.BLAKE2s(32),
    "BLAKE2b": lambda: hashes.BLAKE2b(64),
    "SHA256": hashes.SHA256,
    "SHA512": hashes.SHA512,
}


class NoiseError(Exception):
    """A message does not authenticate, or the handshake was used out of order."""


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def dh(private: X25519PrivateKey, public: bytes) -> bytes:
    """X25519; a low-order public key (all-zero output) is refused, never used."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise NoiseError("public key is not usable (low-order point)") from None


@dataclass(frozen=True)
class Suite:
    """The cipher and hash functions one protocol name selects."""

    pattern: str
    psk_positions: tuple[int, ...]
    cipher: str
    hash_name: str

    @classmethod
    def parse(cls, protocol: str) -> Suite:
        try:
            noise, pattern, dh_name, cipher, hash_name = protocol.split("_")
        except ValueError:
            raise NoiseError(f"protocol name {protocol!r} is not Noise_PATTERN_DH_CIPHER_HASH") \
                from None
        base, _, modifiers = pattern.partition("psk")
        psks = tuple(int(p.removeprefix("psk")) for p in f"psk{modifiers}".split("+")) \
            if modifiers else ()
        if (noise != "Noise" or base not in _PATTERNS or dh_name != "25519"
                or cipher not in ("ChaChaPoly", "AESGCM") or hash_name not in _HASHES):
            raise NoiseError(f"protocol {protocol!r} is not supported here")
        return cls(base, psks, cipher, hash_name)

    def hash(self, data: bytes) -> bytes:
        digest = hashes.Hash(_HASHES[self.hash_name]())
        digest.update(data)
        return digest.finalize()

    def hmac(self, key: bytes, data: bytes) -> bytes:
        mac = hmac.HMAC(key, _HASHES[self.hash_name]())
        mac.update(data)
        return mac.finalize()

    def hkdf(self, chaining_key: bytes, ikm: bytes, outputs: int) -> list[bytes]:
        """HKDF as the Noise spec defines it (section 4.3)."""
        temp = self.hmac(chaining_key, ikm)
        out = [self.hmac(temp, b"\x01")]
        for i in range(2, outputs + 1):
            out.append(self.hmac(temp, out[-1] + bytes([i])))
        return out

    def aead(self, key: bytes) -> ChaCha20Poly1305 | AESGCM:
        return ChaCha20Poly1305(key) if self.cipher == "ChaChaPoly" else AESGCM(key)

    def nonce(self, n: int) -> bytes:
        # ChaChaPoly: 32 zero bits then n little-endian; AESGCM: then n big-endian.
        order = "little" if self.cipher == "ChaChaPoly" else "big"
        return b"\x00\x00\x00\x00" + n.to_bytes(8, order)  # type: ignore[arg-type]

    @property
    def hashlen(self) -> int:
        return 64 if self.hash_name in ("BLAKE2b", "SHA512") else 32


class CipherState:
    """One direction's key and nonce (spec section 5.1)."""

    __slots__ = ("_aead", "n", "suite")

    def __init__(self, suite: Suite, key: bytes | None = None) -> None:
        self.suite = suite
        self._aead = suite.aead(key) if key is not None else None
        self.n = 0

    @property
    def has_key(self) -> bool:
        return self._aead is not None

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return plaintext
        out = self.encrypt_at(self.n, ad, plaintext)
        self.n += 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self._aead is None:
            return ciphertext
        out = self.decrypt_at(self.n, ad, ciphertext)
        self.n += 1
        return out

    def encrypt_at(self, n: int, ad: bytes, plaintext: bytes) -> bytes:
        """Encrypt with an explicit nonce: the transport's counters are on the wire."""
        if self._aead is None or not 0 <= n < MAX_NONCE:
            raise NoiseError("no key, or the nonce space is exhausted")
        return self._aead.encrypt(self.suite.nonce(n), plaintext, ad)

    def decrypt_at(self, n: int, ad: bytes, ciphertext: bytes) -> bytes:
        if self._aead is None or not 0 <= n < MAX_NONCE:
            raise NoiseError("no key, or the nonce is out of range")
        try:
            return self._aead.decrypt(self.suite.nonce(n), ciphertext, ad)
        except InvalidTag:
            raise NoiseError("message does not authenticate") from None


class SymmetricState:
    """Chaining key, handshake hash and the handshake's cipher (spec section 5.2)."""

    def __init__(self, suite: Suite, protocol: str) -> None:
        self.suite = suite
        name = protocol.encode()
        self.h = name.ljust(suite.hashlen, b"\x00") if len(name) <= suite.hashlen \
            else suite.hash(name)
        self.ck = self.h
        self.cs = CipherState(suite)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = self.suite.hkdf(self.ck, ikm, 2)
        self.cs = CipherState(self.suite, temp_k[:32])

    def mix_hash(self, data: bytes) -> None:
        self.h = self.suite.hash(self.h + data)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, temp_k = self.suite.hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cs = CipherState(self.suite, temp_k[:32])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cs.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cs.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = self.suite.hkdf(self.ck, b"", 2)
        return CipherState(self.suite, k1[:32]), CipherState(self.suite, k2[:32])


@dataclass
class HandshakeState:
    """One handshake, one side (spec section 5.3). Not reusable: a new one per handshake.

    `ephemeral` is for the published test vectors only; the channel always lets it be
    generated here, in memory, and the object is dropped once split.
    """

    initiator: bool
    static: X25519PrivateKey | None
    remote_static: bytes | None = None
    psk: bytes = field(default=b"", repr=False)
    prologue: bytes = b""
    protocol: str = PROTOCOL
    ephemeral: X25519PrivateKey | None = None
    remote_ephemeral: bytes | None = None
    _messages: list[list[str]] = field(default_factory=list, repr=False)
    _symmetric: SymmetricState | None = field(default=None, repr=False)
    _psk_mode: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        suite = Suite.parse(self.protocol)
        self._psk_mode = bool(suite.psk_positions)
        if self._psk_mode and len(self.psk) != 32:
            raise NoiseError("a psk pattern needs a 32-byte PSK")
        pre_i, pre_r, messages = _PATTERNS[suite.pattern]
        self._messages = [list(m) for m in messages]
        for position in suite.psk_positions:
            if position == 0:
                self._messages[0].insert(0, "psk")
            else:
                self._messages[position - 1].append("psk")
        self._symmetric = ss = SymmetricState(suite, self.protocol)
        ss.mix_hash(self.prologue)
        for owner_is_initiator, tokens in ((True, pre_i), (False, pre_r)):
            for _ in tokens:  # only "s" pre-messages in the supported patterns
                ss.mix_hash(self._static_public(mine=owner_is_initiator == self.initiator))

    def _static_public(self, *, mine: bool) -> bytes:
        key = public_bytes(self.static) if mine and self.static else self.remote_static
        if key is None:
            raise NoiseError("the pattern needs a static key that was not given")
        return key

    @property
    def complete(self) -> bool:
        return not self._messages

    @property
    def handshake_hash(self) -> bytes:
        assert self._symmetric is not None
        return self._symmetric.h

    def _my_turn(self) -> bool:
        sent = 2 - len(self._messages)  # both supported patterns have two messages
        return (sent % 2 == 0) == self.initiator

    def _dh_token(self, token: str) -> bytes:
        # The token names the initiator's key first: "es" is the initiator's ephemeral
        # with the responder's static, whichever side computes it.
        mine, theirs = (token[0], token[1]) if self.initiator else (token[1], token[0])
        private = self.ephemeral if mine == "e" else self.static
        public = self.remote_ephemeral if theirs == "e" else self.remote_static
        if private is None or public is None:
            raise NoiseError(f"token {token} needs a key that is missing")
        return dh(private, public)

    def write_message(self, payload: bytes) -> bytes:
        if self.complete or not self._my_turn():
            raise NoiseError("not this side's turn to write")
        ss = self._symmetric
        assert ss is not None
        psk_mode = self._psk_mode
        out = bytearray()
        for token in self._messages.pop(0):
            if token == "e":
                if self.ephemeral is None:
                    self.ephemeral = X25519PrivateKey.generate()
                pub = public_bytes(self.ephemeral)
                out += pub
                ss.mix_hash(pub)
                if psk_mode:
                    ss.mix_key(pub)
            elif token == "s":
                out += ss.encrypt_and_hash(self._static_public(mine=True))
            elif token == "psk":
                ss.mix_key_and_hash(self.psk)
            else:
                ss.mix_key(self._dh_token(token))
        out += ss.encrypt_and_hash(payload)
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        if self.complete or self._my_turn():
            raise NoiseError("not this side's turn to read")
        if len(message) > MAX_MESSAGE:
            raise NoiseError("message longer than the Noise limit")
        ss = self._symmetric
        assert ss is not None
        psk_mode = self._psk_mode
        view = memoryview(message)
        for token in self._messages.pop(0):
            if token == "e":
                if len(view) < DHLEN:
                    raise NoiseError("message too short for an ephemeral key")
                self.remote_ephemeral = bytes(view[:DHLEN])
                view = view[DHLEN:]
                ss.mix_hash(self.remote_ephemeral)
                if psk_mode:
                    ss.mix_key(self.remote_ephemeral)
            elif token == "s":
                size = DHLEN + (TAGLEN if ss.cs.has_key else 0)
                if len(view) < size:
                    raise NoiseError("message too short for a static key")
                self.remote_static = ss.decrypt_and_hash(bytes(view[:size]))
                view = view[size:]
            elif token == "psk":
                ss.mix_key_and_hash(self.psk)
            else:
                ss.mix_key(self._dh_token(token))
        if ss.cs.has_key and len(view) < TAGLEN:
            raise NoiseError("message too short for its tag")
        return ss.decrypt_and_hash(bytes(view))

    def split(self) -> tuple[CipherState, CipherState]:
        """(sending, receiving) cipher states for this side; forgets the ephemeral."""
        if not self.complete:
            raise NoiseError("handshake not complete")
        assert self._symmetric is not None
        c1, c2 = self._symmetric.split()
        self.ephemeral = None
        return (c1, c2) if self.initiator else (c2, c1)


class ReplayWindow:
    """Which counters of one receiving key were seen (RFC 6479's sliding window).

    A counter is accepted once, and only if it is at most REPLAY_WINDOW behind the
    highest accepted; `check` says whether it would be, `mark` records it after the
    message authenticated (so a forgery cannot move the window).
    """

    __slots__ = ("_bits", "highest")

    def __init__(self) -> None:
        self.highest = -1
        self._bits = 0  # bit i set: counter highest - i was seen

    def check(self, counter: int) -> bool:
        if counter > self.highest:
            return True
        behind = self.highest - counter
        return behind < REPLAY_WINDOW and not (self._bits >> behind) & 1

    def mark(self, counter: int) -> None:
        if counter > self.highest:
            shift = counter - self.highest
            self._bits = ((self._bits << shift) | 1) & ((1 << REPLAY_WINDOW) - 1) \
                if shift < REPLAY_WINDOW else 1
            self.highest = counter
        else:
            self._bits |= 1 << (self.highest - counter)
