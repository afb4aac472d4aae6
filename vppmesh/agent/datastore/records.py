"""Membership records as the datastore holds them, and the mesh they add up to (pure).

Every node publishes one record, `<prefix>/nodes/<name>`: the same fields as a node of
the mesh file, validated by the same model (config.Node). Node numbers are claimed by
`<prefix>/numbers/<n>` keys whose value is the owner's name. Records are read in the
order they were created, and a record that conflicts with an earlier one (a name, a
number, an address, a key or a pod range someone else already has) is rejected with the
reason, so every node derives the same, valid mesh from the same snapshot.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from pydantic import ValidationError

from vppmesh.config import (
    NODE_NUMBER_MAX,
    Mesh,
    MeshSettings,
    Node,
    format_validation_error,
    node_data,
)
from vppmesh.errors import ConfigError
from vppmesh.validation import problems

DEFAULT_PREFIX = "/vppmesh"
DEFAULT_PORT = 2379
MAX_RECORD_BYTES = 64 * 1024


TLS_OPTIONS = ("ca", "cert", "key")


@dataclass(frozen=True)
class DatastoreUrl:
    """`etcd://host[:port][/prefix]`, or `etcds://...?ca=FILE&cert=FILE&key=FILE` (TLS).

    With TLS, `ca` is the CA that signed etcd's certificate (default: the system's) and
    `cert`/`key` are this node's client certificate, for etcd's --client-cert-auth.
    """

    host: str
    port: int = DEFAULT_PORT
    prefix: str = DEFAULT_PREFIX
    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def parse(cls, url: str) -> DatastoreUrl:
        parts = urlsplit(url)
        if parts.scheme not in ("etcd", "etcds") or not parts.hostname:
            raise ConfigError(f"--datastore {url!r}: expected etcd://HOST[:PORT][/PREFIX] "
                              "(or etcds://... for TLS), e.g. etcd://192.0.2.1:2379/vppmesh")
        query = parse_qs(parts.query, strict_parsing=False)
        unknown = sorted(set(query) - set(TLS_OPTIONS))
        if unknown or (query and parts.scheme != "etcds"):
            raise ConfigError(f"--datastore {url!r}: only etcds:// URLs take options, and "
                              f"only {', '.join(TLS_OPTIONS)}" +
                              (f" (not {', '.join(unknown)})" if unknown else ""))
        files = {k: Path(v[-1]) for k, v in query.items()}
        for name, path in files.items():
            if not path.is_file():
                raise ConfigError(f"--datastore {url!r}: {name}={path} is not a readable "
                                  "file")
        if ("cert" in files) != ("key" in files):
            raise ConfigError(f"--datastore {url!r}: give both cert= and key= (a client "
                              "certificate and its key), or neither")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ConfigError(f"--datastore {url!r}: the port is not a number") from None
        prefix = "/" + parts.path.strip("/") if parts.path.strip("/") else DEFAULT_PREFIX
        if not re.fullmatch(r"(/[A-Za-z0-9._-]+)+", prefix):
            raise ConfigError(f"--datastore {url!r}: the prefix {prefix!r} may only hold "
                              "letters, digits, '.', '_', '-' and '/'")
        return cls(host=parts.hostname, port=port, prefix=prefix, tls=parts.scheme == "etcds",
                   ca=files.get("ca"), cert=files.get("cert"), key=files.get("key"))

    def __str__(self) -> str:
        return f"etcd{'s' if self.tls else ''}://{self.host}:{self.port}{self.prefix}"

    @property
    def settings_key(self) -> str:
        return f"{self.prefix}/settings"

    @property
    def nodes_prefix(self) -> str:
        return f"{self.prefix}/nodes/"

    @property
    def numbers_prefix(self) -> str:
        return f"{self.prefix}/numbers/"

    def node_key(self, name: str) -> str:
        return f"{self.nodes_prefix}{name}"

    def number_key(self, number: int) -> str:
        return f"{self.numbers_prefix}{number}"


@dataclass(frozen=True)
class Record:
    """One node key as read from the datastore, before validation."""

    name: str  # from the key
    value: bytes
    create_revision: int
    mod_revision: int = 0
    lease: int = 0


@dataclass(frozen=True)
class Snapshot:
    """The whole membership prefix at one revision."""

    revision: int
    settings: bytes | None
    records: tuple[Record, ...]
    numbers: Mapping[int, str]  # claimed node number -> owner's name


@dataclass
class Membership:
    """The mesh a snapshot adds up to, and the records that were left out (with why)."""

    mesh: Mesh | None
    rejected: dict[str, str] = field(default_factory=dict)  # record name -> reason

    def has(self, name: str) -> bool:
        return self.mesh is not None and any(n.name == name for n in self.mesh.nodes)


def encode_record(node: Node) -> bytes:
    return json.dumps(node_data(node), separators=(",", ":")).encode()


def parse_record(record: Record) -> Node:
    """Validate one record with the mesh file's Node model; errors name the field."""
    where = f"node record {record.name!r}"
    if len(record.value) > MAX_RECORD_BYTES:
        raise ConfigError(f"{where}: {len(record.value)} bytes, at most {MAX_RECORD_BYTES}")
    try:
        data = json.loads(record.value)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not JSON ({exc})") from None
    try:
        node = Node.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where).replace(
            "the mesh file is not valid", "not a valid node")) from None
    if node.name != record.name:
        raise ConfigError(f"{where}: its name field says {node.name!r}; a record must be "
                          "stored under its own name")
    return node


def parse_settings(raw: bytes | None, source: str) -> MeshSettings:
    if raw is None:
        raise ConfigError(f"{source}: no mesh settings stored; seed them once with "
                          "`vppmesh up --datastore ... --settings settings.yaml`")
    try:
        return MeshSettings.model_validate_json(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source).replace(
            "the mesh file is not valid", "the mesh settings are not valid")) from None


def mesh_error(settings: MeshSettings, nodes: list[Node]) -> str | None:
    """Why these nodes do not form a valid mesh (the Mesh model's own checks), or None."""
    try:
        Mesh(settings=settings, nodes=nodes)
    except ValidationError as exc:
        return "; ".join(message for _, message in problems(exc))
    return None


def assemble(settings: MeshSettings, records: Iterable[Record],
             numbers: Mapping[int, str],
             known: dict[tuple[str, bytes], Node] | None = None) -> Membership:
    """The mesh of every acceptable record; earlier records win every conflict.

    `known` (kept by the agent, which assembles every snapshot): the nodes of the last
    call by record name and value, refilled with this call's. A record stored exactly
    as before is taken as its Node without being decoded and validated again (at 1000
    nodes that was most of a sync, and one node joining changes one record); a changed
    one is checked as any, and the mesh-wide checks see every node."""
    rejected: dict[str, str] = {}
    candidates: list[Node] = []
    parsed: dict[tuple[str, bytes], Node] = {}
    for record in sorted(records, key=lambda r: (r.create_revision, r.name)):
        node = known.get((record.name, record.value)) if known is not None else None
        if node is None:
            try:
                node = parse_record(record)
            except ConfigError as exc:
                rejected[record.name] = str(exc)
                continue
        parsed[(record.name, record.value)] = node
        owner = numbers.get(node.node_number)
        if owner != node.name:
            rejected[node.name] = (
                f"node record {node.name!r} claims node_number {node.node_number}, which "
                + (f"belongs to {owner!r}" if owner else "was never allocated to it")
                + "; let `vppmesh up --datastore` allocate a number")
            continue
        candidates.append(node)
    if known is not None:
        known.clear()
        known.update(parsed)
    if not candidates:
        return Membership(mesh=None, rejected=rejected)
    try:  # the usual case: one validation
        return Membership(mesh=Mesh(settings=settings, nodes=candidates), rejected=rejected)
    except ValidationError:
        pass  # find the records that break it, earliest first
    accepted: list[Node] = []
    for node in candidates:
        error = mesh_error(settings, [*accepted, node])
        if error is None:
            accepted.append(node)
        else:
            rejected[node.name] = f"node record {node.name!r} rejected: {error}"
    mesh = Mesh(settings=settings, nodes=accepted) if accepted else None
    return Membership(mesh=mesh, rejected=rejected)


def free_number(numbers: Mapping[int, str], name: str,
                requested: int | None = None) -> int:
    """The number this node should claim: its own, the requested one, or the lowest free."""
    if requested is not None:
        owner = numbers.get(requested)
        if owner not in (None, name):
            raise ConfigError(f"--node-number {requested} belongs to node {owner!r}; pick "
                              "another or leave it out to have one allocated")
        return requested
    for number, owner in numbers.items():
        if owner == name:
            return number
    taken = set(numbers)
    for number in range(1, NODE_NUMBER_MAX + 1):
        if number not in taken:
            return number
    raise ConfigError(f"every node number 1..{NODE_NUMBER_MAX} is taken; release stale ones "
                      "with `vppmesh down --datastore` on the nodes that left")


@dataclass(frozen=True)
class MembershipChange:
    """Who joined, left or changed between two meshes (for the log and the tests)."""

    joined: tuple[str, ...]
    left: tuple[str, ...]
    changed: tuple[str, ...]
    settings_changed: bool

    @property
    def empty(self) -> bool:
        return not (self.joined or self.left or self.changed or self.settings_changed)

    def __str__(self) -> str:
        parts = [f"+{n}" for n in self.joined] + [f"-{n}" for n in self.left]
        parts += [f"~{n}" for n in self.changed]
        if self.settings_changed:
            parts.append("~settings")
        return " ".join(parts) or "no change"


def membership_change(old: Mesh | None, new: Mesh | None) -> MembershipChange:
    before = {n.name: n for n in old.nodes} if old else {}
    after = {n.name: n for n in new.nodes} if new else {}
    return MembershipChange(
        joined=tuple(sorted(after.keys() - before.keys())),
        left=tuple(sorted(before.keys() - after.keys())),
        changed=tuple(sorted(n for n in after.keys() & before.keys()
                             if after[n] is not before[n] and after[n] != before[n])),
        settings_changed=(old is not None and new is not None
                          and old.settings != new.settings),
    )
