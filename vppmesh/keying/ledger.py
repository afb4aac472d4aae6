"""The used-key ledger: an outbound AES-GCM key is installed in VPP at most once.

VPP builds each ESP IV from the SA's sequence number, which starts again at 1 whenever
an SA is created. Installing the same outbound key twice (after a VPP restart, say)
would therefore repeat GCM nonces under one key, which breaks both confidentiality and
integrity. The ledger remembers a fingerprint of every outbound key ever installed on
this node, is written before the key reaches VPP, and makes vppmesh refuse a reinstall.
vppmesh.keying.epochs consults it to step to a fresh key generation by itself, so a reinstall is
never even planned; the refusal in reconcile() remains as the last line of defence.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from vppmesh.dataplane.state import SaSpec
from vppmesh.errors import ConfigError

FINGERPRINT_LABEL = b"vppmesh key fingerprint v1"


def fingerprint(sa: SaSpec) -> str:
    """A one-way tag of (key, salt): reveals nothing usable about the key."""
    return key_fingerprint(sa.key.get_secret_value(), sa.salt)


def key_fingerprint(key: bytes, salt: int) -> str:
    digest = hashlib.sha256(FINGERPRINT_LABEL + key + salt.to_bytes(4, "big"))
    return digest.hexdigest()[:32]


class KeyLedger:
    """The ledger file of one node. A long-running agent keeps one: it reads the file
    again only when another process (`vppmesh rekey`, a second `up`) wrote it since."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._used: set[str] | None = None
        self._signature: tuple[int, int, int] | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def used(self) -> set[str]:
        signature = self._stat()
        if self._used is None or signature != self._signature:
            self._signature = signature
            try:
                self._used = set(json.loads(self.path.read_text()).get("outbound", []))
            except FileNotFoundError:
                self._used = set()
            except (OSError, ValueError) as exc:
                raise ConfigError(f"key ledger {self.path} is unreadable ({exc}); it guards "
                                  "against nonce reuse, so it must not be deleted or edited"
                                  ) from None
        return self._used

    def seen(self, key: bytes, salt: int) -> bool:
        return key_fingerprint(key, salt) in self.used()

    def reused(self, sas: Iterable[SaSpec]) -> list[SaSpec]:
        used = self.used()
        return [sa for sa in sas if fingerprint(sa) in used]

    def record(self, sas: Iterable[SaSpec]) -> None:
        """Persist before installing: a recorded key that never reached VPP is harmless."""
        used = self.used()
        new = {fingerprint(sa) for sa in sas} - used
        if not new:
            return
        used |= new
        self._write(used)

    def forget(self, keys: Iterable[tuple[bytes, int]]) -> None:
        """Drop the fingerprints of agreed keys whose generation retired (key, salt).

        Only keys nothing can derive again may go: an agreed key lived in the agent's
        memory and VPP, both of which dropped it, so it can never be installed again,
        and its fingerprint would only grow the ledger (a rotation every few minutes at
        1000 peers adds half a million a day). Static keys are never forgotten.
        """
        used = self.used()
        gone = {key_fingerprint(key, salt) for key, salt in keys} & used
        if gone:
            self._write(used - gone)

    def _write(self, used: set[str]) -> None:
        self._used = used
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"outbound": sorted(used)}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        self._signature = self._stat()
