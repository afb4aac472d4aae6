"""The used-key ledger: an outbound AES-GCM key is installed in VPP at most once.

VPP builds each ESP IV from the SA's sequence number, which starts again at 1 whenever
an SA is created. Installing the same outbound key twice (after a VPP restart, say)
would therefore repeat GCM nonces under one key, which breaks both confidentiality and
integrity. The ledger remembers a fingerprint of every outbound key ever installed on
this node, is written before the key reaches VPP, and makes vppmesh refuse a reinstall.
vppmesh.keying.epochs consults it to step to a fresh key generation by itself, so a reinstall is
never even planned; the refusal in reconcile() remains as the last line of defence.

The file is a journal, so that recording a key costs what it adds (at 1000 peers x 4
tunnels it holds 8000 fingerprints, and a join records a handful): a header line, then
one line per change, `+ <fingerprint> ...` (recorded) or `- <fingerprint> ...`
(forgotten), each ending in the CRC-32 of the line and a newline. A change is one
write() of one line, appended under a lock file and fsynced before record() returns.
So after a crash:

- a last line without its newline (a torn append) is a record whose write never
  completed: its fsync never returned, nor did record(), so its keys never reached VPP
  (reconcile installs them only after record() returns). It is dropped (kept if it is
  whole but for its newline: the safe side), with a warning, and the next change
  rewrites the file without it;
- any other damaged line may hold a key VPP had: the ledger fails closed (ConfigError).

The file is rewritten whole (a temporary file, fsync, rename, fsync of the directory:
a crash leaves the old file or the new one, never less) when it was torn, is in the
format before the journal (`{"outbound": [...]}`, still read), or holds more than twice
its live fingerprints (forgotten keys, see forget()) plus COMPACT_SLACK.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vppmesh.dataplane.state import SaSpec
from vppmesh.errors import ConfigError
from vppmesh.keying.files import exclusive, replace_file

FINGERPRINT_LABEL = b"vppmesh key fingerprint v1"
HEADER = b"vppmesh used-keys v2\n"
COMPACT_SLACK = 1024  # fingerprints beyond twice the live ones before a rewrite
PER_LINE = 1024  # fingerprints per line when the file is rewritten whole
_RECORD = re.compile(rb"([+-])((?: [0-9a-f]{32})+) ([0-9a-f]{8})")
_FINGERPRINT = re.compile(r"[0-9a-f]{32}")

log = logging.getLogger("vppmesh")


def fingerprint(sa: SaSpec) -> str:
    """A one-way tag of (key, salt): reveals nothing usable about the key."""
    return key_fingerprint(sa.key.get_secret_value(), sa.salt)


def key_fingerprint(key: bytes, salt: int) -> str:
    digest = hashlib.sha256(FINGERPRINT_LABEL + key + salt.to_bytes(4, "big"))
    return digest.hexdigest()[:32]


@dataclass
class _Journal:
    used: set[str]
    written: int  # fingerprints the file's lines hold, recorded and forgotten
    tail: str  # "" (ends with a whole line), "kept" or "dropped" (a last line cut short)
    old: bool  # the format before the journal: rewritten on the first change


def _line(op: bytes, fingerprints: Iterable[str]) -> bytes:
    body = op + b"".join(b" " + f.encode() for f in fingerprints)
    return body + b" %08x\n" % zlib.crc32(body)


def _snapshot(used: set[str]) -> bytes:
    ordered = sorted(used)
    return HEADER + b"".join(_line(b"+", ordered[i:i + PER_LINE])
                             for i in range(0, len(ordered), PER_LINE))


def _record(line: bytes) -> tuple[bytes, list[str]] | None:
    """(op, fingerprints) of one whole line (without its newline); None if damaged."""
    match = _RECORD.fullmatch(line)
    if match is None or int(match[3], 16) != zlib.crc32(line[:match.start(3) - 1]):
        return None
    return match[1], match[2].decode().split()


def _parse(data: bytes) -> _Journal:
    """The ledger file's content; ValueError saying what is damaged."""
    if data.startswith(b"{"):  # the format before the journal
        document = json.loads(data)
        outbound = document.get("outbound", []) if isinstance(document, dict) else None
        if not isinstance(outbound, list) or not all(
                isinstance(f, str) and _FINGERPRINT.fullmatch(f) for f in outbound):
            raise ValueError('"outbound" is not a list of fingerprints')
        return _Journal(set(outbound), len(outbound), tail="", old=True)
    if not data.startswith(HEADER):
        raise ValueError("it does not begin with the ledger's header")
    end = data.rfind(b"\n") + 1
    lines = data[len(HEADER):end].split(b"\n")[:-1]
    tail = data[end:]  # a last line without its newline: torn (see the module)
    if tail:
        lines.append(tail)
    used: set[str] = set()
    written = 0
    for number, line in enumerate(lines, start=2):
        record = _record(line)
        if record is None:
            if tail and number == len(lines) + 1:
                return _Journal(used, written, tail="dropped", old=False)
            raise ValueError(f"line {number} is damaged")
        op, fingerprints = record
        if op == b"+":
            used.update(fingerprints)
        else:
            used.difference_update(fingerprints)
        written += len(fingerprints)
    return _Journal(used, written, tail="kept" if tail else "", old=False)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class KeyLedger:
    """The ledger file of one node. A long-running agent keeps one: it reads the file
    again only when another process (`vppmesh rekey`, a second `up`) wrote it since
    (an append changes the file's size, a rewrite its inode). Changes are made under
    `<ledger>.lock`, after reading again what another process wrote, so no process
    appends to a file that another is replacing, nor rewrites it without the others'
    records."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_suffix(".lock")
        self._used: set[str] | None = None
        self._signature: tuple[int, int, int] | None = None
        self._written = 0  # see _Journal
        self._appendable = False  # the file ends with a whole line of the journal
        self._holding = False  # this object holds the lock

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def used(self) -> set[str]:
        if self._used is None or self._stat() != self._signature:
            self._load()
        assert self._used is not None
        return self._used

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                st = os.fstat(handle.fileno())
                data = handle.read()
        except FileNotFoundError:
            self._used, self._signature, self._written, self._appendable = set(), None, 0, False
            return
        except OSError as exc:
            raise self._damaged(str(exc)) from None
        try:
            journal = _parse(data)
        except ValueError as exc:
            raise self._damaged(str(exc)) from None
        if journal.tail and not self._holding:
            # Another process may be appending right now: only under the lock is a
            # torn last line what a crash left.
            with self._locked():
                self._load()
            return
        if journal.tail:
            log.warning("key ledger %s: its last line was cut short, by a crash while it "
                        "recorded keys that therefore never reached VPP; %s, and the file is "
                        "rewritten on the next change", self.path,
                        "dropped" if journal.tail == "dropped" else "whole, kept")
        self._used, self._written = journal.used, journal.written
        self._signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        self._appendable = not (journal.tail or journal.old)

    def _damaged(self, why: str) -> ConfigError:
        return ConfigError(
            f"key ledger {self.path} is unreadable ({why}); it guards against nonce reuse, "
            "so it must not be deleted or edited. Restore it from a backup, or move the mesh "
            "to a new key epoch (raise settings.key_epoch on every node) and then remove it")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with exclusive(self.lock_path):
            self._holding = True
            try:
                yield
            finally:
                self._holding = False

    def seen(self, key: bytes, salt: int) -> bool:
        return key_fingerprint(key, salt) in self.used()

    def reused(self, sas: Iterable[SaSpec]) -> list[SaSpec]:
        used = self.used()
        return [sa for sa in sas if fingerprint(sa) in used]

    def record(self, sas: Iterable[SaSpec]) -> None:
        """Persist before installing: a recorded key that never reached VPP is harmless.
        On disk (fsynced) when this returns; costs what it adds (one appended line)."""
        new = {fingerprint(sa) for sa in sas} - self.used()
        if new:
            with self._locked():
                new -= self.used()  # with what another process wrote since
                if new:
                    self._change(b"+", new)

    def forget(self, keys: Iterable[tuple[bytes, int]]) -> None:
        """Drop the fingerprints of agreed keys whose generation retired (key, salt).

        Only keys nothing can derive again may go: an agreed key lived in the agent's
        memory and VPP, both of which dropped it, so it can never be installed again,
        and its fingerprint would only grow the ledger (a rotation every few minutes at
        1000 peers adds half a million a day). Static keys are never forgotten. The
        forgotten fingerprints are appended too; the file is rewritten without them
        once they outnumber the live ones (see the module).
        """
        gone = {key_fingerprint(key, salt) for key, salt in keys} & self.used()
        if gone:
            with self._locked():
                gone &= self.used()
                if gone:
                    self._change(b"-", gone)

    def _change(self, op: bytes, fingerprints: set[str]) -> None:
        """Under the lock, after used(): append one line, or rewrite the file whole when
        due; the set in memory changes (in place: it may hold 10^4 entries) once the
        change is on disk."""
        used = self.used()
        written = self._written + len(fingerprints)
        live = len(used) + len(fingerprints) if op == b"+" else len(used) - len(fingerprints)
        if self._appendable and written <= 2 * live + COMPACT_SLACK:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                _write_all(fd, _line(op, sorted(fingerprints)))
                os.fsync(fd)
            finally:
                os.close(fd)
            self._written = written
        else:
            self._rewrite(used | fingerprints if op == b"+" else used - fingerprints)
        if op == b"+":
            used |= fingerprints
        else:
            used -= fingerprints
        self._signature = self._stat()

    def _rewrite(self, used: set[str]) -> None:
        """The whole file anew: a crash leaves either the old file or this one."""
        replace_file(self.path, _snapshot(used), sync_dir=True)
        self._written, self._appendable = len(used), True
