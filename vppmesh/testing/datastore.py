"""Datastore agents without etcd: `MemoryStore`, an in-memory stand-in for EtcdStore with its
registration rules, and `agent_options`, a node's datastore-agent options."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from vppmesh.agent.datastore.etcd import Registration, RegistrationError
from vppmesh.agent.datastore.membership import DatastoreOptions, LocalNode
from vppmesh.agent.datastore.records import (
    DatastoreUrl,
    Record,
    Snapshot,
    assemble,
    encode_record,
    free_number,
)
from vppmesh.agent.node import NodeOptions
from vppmesh.config import MeshSettings, Node
from vppmesh.keying.keys import NodeSecrets, private_key_b64


class MemoryStore:
    """An in-memory stand-in for EtcdStore with the same registration rules."""

    def __init__(self, settings: MeshSettings) -> None:
        self.settings_value = settings
        self.records: dict[str, Record] = {}
        self.numbers: dict[int, str] = {}
        self.revision = 1
        self.revoked: list[int] = []

    def put(self, node: Node, lease: int = 0) -> None:
        self.revision += 1
        created = self.records[node.name].create_revision if node.name in self.records \
            else self.revision
        self.records[node.name] = Record(name=node.name, value=encode_record(node),
                                         create_revision=created, mod_revision=self.revision,
                                         lease=lease)
        self.numbers[node.node_number] = node.name

    def drop(self, name: str) -> None:
        self.revision += 1
        del self.records[name]

    def snapshot(self) -> Snapshot:
        return Snapshot(revision=self.revision, settings=self.settings_value.model_dump_json()
                        .encode(), records=tuple(self.records.values()),
                        numbers=dict(self.numbers))

    def settings(self, snapshot: Snapshot | None = None) -> MeshSettings:
        return self.settings_value

    def grant(self, ttl: int) -> Any:
        return SimpleNamespace(id=4242)

    def revoke(self, lease: Any) -> None:
        self.revoked.append(lease.id)

    def register(self, node: Node, lease: Any, *, requested_number: int | None = None,
                 previous_key: str | None = None) -> Registration:
        number = free_number(self.numbers, node.name, requested_number)
        candidate = node.model_copy(update={"node_number": number})
        others = assemble(self.settings_value, [r for r in self.records.values()
                                                if r.name != node.name], self.numbers)
        if others.mesh is not None and not assemble(
                self.settings_value, [*self.records.values(), Record(
                    name=node.name, value=encode_record(candidate), create_revision=10**9)],
                {**self.numbers, number: node.name}).has(node.name):
            raise RegistrationError(f"node {node.name!r} conflicts")
        self.put(candidate, lease.id)
        return Registration(node=candidate, lease=lease, revision=self.revision)


def agent_options(tmp_path: Path, secrets: dict[str, NodeSecrets], name: str, local: LocalNode,
                  **node: Any) -> tuple[NodeOptions, DatastoreOptions]:
    """The options of node `name`'s datastore agent: its key written to tmp_path, no mesh
    file, `local` for its own record."""
    key = tmp_path / f"{name}.key"
    key.write_text(private_key_b64(secrets[name].private_key))
    key.chmod(0o600)
    options = NodeOptions(mesh_file=tmp_path / "unused.yaml", node=name, private_key=key,
                          host_link="none", workers=0, state_dir=tmp_path, **node)
    return options, DatastoreOptions(url=DatastoreUrl.parse("etcd://127.0.0.1/t"), local=local)
