"""Attachment records of the CNI plugin: one small JSON file per (container, interface).

ADD writes the record before it changes anything, so DEL and GC can always undo what ADD
started, even after a crash half-way or a restart of the node agent. Records are written
atomically (rename) and all commands of one node serialise on a lock file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from vppmesh.cni.models import Attachment


def attachment_key(container_id: str, ifname: str) -> str:
    """Short stable id of one attachment; names its VPP tag and veth end."""
    return hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()


class AttachmentStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, container_id: str, ifname: str) -> Path:
        return self.directory / f"{attachment_key(container_id, ifname)[:32]}.json"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One CNI command at a time on this node (the runtime runs them in parallel)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.directory / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def load(self, container_id: str, ifname: str) -> Attachment | None:
        path = self.path(container_id, ifname)
        try:
            return Attachment.model_validate_json(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError):
            return None  # unreadable: DEL falls back to what VPP holds

    def save(self, record: Attachment) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.path(record.container_id, record.ifname)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(record.model_dump_json(indent=2))
        tmp.replace(path)

    def remove(self, container_id: str, ifname: str) -> None:
        self.path(container_id, ifname).unlink(missing_ok=True)

    def all(self) -> list[Attachment]:
        if not self.directory.is_dir():
            return []
        records = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                records.append(Attachment.model_validate_json(path.read_text()))
            except (OSError, ValidationError):
                continue
        return records
