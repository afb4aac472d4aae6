"""The mesh file: every node of the mesh and the settings they share.

One YAML file describes the whole mesh; every node runs `vppmesh up` against the same
file (or the same datastore) and derives its own view from it. Every validation error
names the offending field and says how to fix it, because a half-understood mesh file
is the most common way to break a network.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import ipaddress
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vppmesh.dataplane.overhead import aligned_mtu, max_overhead, pod_mtu_for
from vppmesh.errors import ConfigError
from vppmesh.host.underlay import (
    NAT_T_PORT,
    Shape,
    behind_nat,
    families,
    shape,
    shape_pairs,
    worst_overhead,
)
from vppmesh.validation import describe

NODE_NUMBER_MAX = 65535
TUNNELS_PER_PEER_MAX = 16
# Key generations are 32-bit (the key derivation's salt, the channel's messages), and
# keys step one generation up from settings.key_epoch at every rekey. key_epoch stays in
# the lower half, so the generations after it outlast any rekey_interval (68 years at
# one rekey a second; 2^16 would last 18 hours at that rate).
GENERATION_MAX = 2**32 - 1
KEY_EPOCH_MAX = 2**31 - 1
MAX_MESH_FILE_BYTES = 16 * 1024 * 1024



def _written_as_text(example: str) -> BeforeValidator:
    """ipaddress takes integers (and so booleans) as addresses: `underlay: [true]` would be
    0.0.0.1/32. In a mesh file an address is text; anything else is a mistake."""
    def check(value: object) -> object:
        if isinstance(value, bool | int | float):
            raise ValueError(f"{value!r} is not an address: write it as text (e.g. {example})")
        return value
    return BeforeValidator(check)


IPInterface = Annotated[ipaddress.IPv4Interface | ipaddress.IPv6Interface,
                        _written_as_text("192.0.2.11/24")]
IPAddress = Annotated[ipaddress.IPv4Address | ipaddress.IPv6Address,
                      _written_as_text("192.0.2.11")]
PodCidr = Annotated[ipaddress.IPv4Network, _written_as_text("198.18.1.0/24")]
FAMILY_NAME = {4: "IPv4", 6: "IPv6"}


def decode_key(value: str, what: str, fix: str = "use the output of `vppmesh keygen`"
               ) -> bytes:
    """Decode a base64 32-byte key, the format `vppmesh keygen` and WireGuard use."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{what} is not valid base64 ({exc}); {fix}") from None
    if len(raw) != 32:
        raise ValueError(f"{what} decodes to {len(raw)} bytes, expected 32; {fix}")
    return raw


class MeshSettings(BaseModel):
    """Settings every node of the mesh must agree on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tunnels_per_peer: Annotated[int, Field(ge=1, le=TUNNELS_PER_PEER_MAX)] = 1
    underlay_mtu: Annotated[int, Field(ge=576, le=9216)] = 1500
    pod_mtu: int | None = Field(
        default=None,
        description="MTU of host and pod interfaces; computed from the underlay MTU and the "
        "ESP/IPIP overhead when unset.",
    )
    crypto: Literal["aes-gcm-256"] = "aes-gcm-256"
    forward_secrecy: Literal["required", "preferred"] = Field(
        default="required", description="Once a pair's agents have met over their "
        "channel, `required` never puts it on a key of the static schedule again, either "
        "way: a rekey waits for the agents' agreement, and a key that reaches its hard "
        "limit first stops the pair (fail closed, reported) rather than fall back. "
        "`preferred` falls back to the static schedule when the agents cannot agree, "
        "with a warning and a metric each time. A pair whose agents never met (a one-shot "
        "`up`, no agent on a node) runs on the static schedule either way, and says so.")
    key_epoch: Annotated[int, Field(ge=0)] = Field(
        default=0, description="Lowest key generation anyone may use: raising it moves every "
        f"node's keys forward at once (the manual escape hatch; rekeying is automatic). At "
        f"most {KEY_EPOCH_MAX}, so the 32-bit generations that follow it never run out.")
    rekey_interval: Annotated[int, Field(ge=0, le=365 * 86400)] = Field(
        default=600, description="Seconds between scheduled rekeys of each outbound key; "
        "with the agents' channel each rekey agrees a fresh ephemeral key, so a recorded "
        "packet stays decryptable for at most about this plus rekey_grace (forward-secrecy "
        "window, docs/design.md). 0 rekeys only on demand (`vppmesh rekey`) and at the key "
        "limits. The default is chosen from benchmarks.channel_rotation at 1000 peers.")
    rekey_grace: Annotated[float, Field(ge=0.5, le=3600)] = Field(
        default=10.0, description="Seconds a receiver keeps accepting a sender's older "
        "generation after that sender's traffic moved to a newer one.")
    key_max_packets: Annotated[int, Field(ge=1024, le=2**63)] = Field(
        default=2**32, description="Packets one outbound key may protect; rekeyed at half.")
    key_max_bytes: Annotated[int, Field(ge=2**20, le=2**63)] = Field(
        default=2**44, description="Bytes one outbound key may protect (bounded from the "
        "packet count times the underlay MTU); rekeyed at half.")
    key_max_seconds: Annotated[int, Field(ge=60, le=10 * 365 * 86400)] = Field(
        default=7 * 86400, description="Seconds one outbound key may be used; rekeyed at half.")
    psk_file: Path | None = None
    mesh_table_id: Annotated[int, Field(ge=1, le=2**32 - 2)] = 1717
    anti_replay_window: Annotated[int, Field(ge=64, le=65536)] = 1024
    async_crypto: bool = False
    gso: bool = Field(
        default=False,
        description="Carry large TCP segments between tap endpoints (host, pods) and VPP, "
        "which segments them before encryption. af_packet endpoints never use it (see "
        "endpoints.segmentation_offload). Off (default): Linux segments before VPP.",
    )

    @field_validator("key_epoch")
    @classmethod
    def _generations_fit(cls, value: int) -> int:
        if value > KEY_EPOCH_MAX:
            raise ValueError(
                f"settings.key_epoch={value} leaves too few key generations: keys step one "
                f"generation up from it at every rekey and a generation has 32 bits; use at "
                f"most {KEY_EPOCH_MAX} (raising it by a few moves every key forward)")
        return value

    @model_validator(mode="after")
    def _rekey_before_limit(self) -> MeshSettings:
        if self.rekey_interval and self.rekey_interval >= self.key_max_seconds:
            raise ValueError(
                f"settings.rekey_interval={self.rekey_interval} is not below "
                f"settings.key_max_seconds={self.key_max_seconds}: keys would expire before "
                "their scheduled rekey; lower rekey_interval or raise key_max_seconds")
        return self

    @model_validator(mode="after")
    def _pod_mtu_fits(self) -> MeshSettings:
        # The smallest overhead (IPv4, plain ESP) here; the mesh checks again with the
        # largest overhead of its pairs (IPv6, ESP in UDP).
        if self.pod_mtu is not None:
            ceiling = self.underlay_mtu - max_overhead(ipv6_underlay=False)
            if self.pod_mtu < 576 or self.pod_mtu > ceiling:
                raise ValueError(
                    f"settings.pod_mtu={self.pod_mtu} does not fit: with underlay_mtu="
                    f"{self.underlay_mtu} the ESP/IPIP overhead leaves at most {ceiling} "
                    "(and at least 576 is needed); remove pod_mtu to have it computed"
                )
        elif pod_mtu_for(self.underlay_mtu, ipv6_underlay=False) < 576:
            raise ValueError(
                f"settings.underlay_mtu={self.underlay_mtu} is too small for the ESP/IPIP "
                "overhead; raise it to at least 640"
            )
        return self


class NatSettings(BaseModel):
    """A node behind NAT: the address and UDP port its peers reach it at.

    Without agents the NAT must forward `public`:`port` (UDP) to the node's port 4500
    and send the node's own packets out from that same address and port: a 1:1 NAT or a
    static port forward. With agents (`up --watch`) a dynamic NAT works too: keepalives
    hold its mappings and the peers learn the port it chose (docs/underlays.md).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    public: IPAddress = Field(description="The node's address outside its NAT.")
    port: Annotated[int, Field(ge=1, le=65535)] = Field(
        default=NAT_T_PORT, description="UDP port on `public` that the NAT forwards to the "
        "node's port 4500.")


class Node(BaseModel):
    """One host of the mesh, as every other node sees it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=48,
                               pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    node_number: Annotated[int, Field(ge=1, le=NODE_NUMBER_MAX)]
    underlay: Annotated[list[IPInterface], Field(min_length=1, max_length=TUNNELS_PER_PEER_MAX)]
    pod_cidr: PodCidr
    public_key: str
    uplink: str | None = Field(
        default=None,
        description="Name of the VPP interface that carries the underlay addresses; found "
        "from the primary address when unset.",
    )
    nat: NatSettings | None = Field(
        default=None, description="Set when the node is behind NAT: its peers send to "
        "nat.public, and every SA towards or from it is ESP in UDP.")
    udp_encap: bool = Field(
        default=False, description="ESP in UDP (port 4500) for every SA towards or from this "
        "node, without NAT (e.g. a firewall that passes UDP but not IP protocol 50).")

    @field_validator("public_key")
    @classmethod
    def _key_is_x25519(cls, value: str) -> str:
        decode_key(value, "public_key")
        return value.strip()

    @field_validator("pod_cidr")
    @classmethod
    def _cidr_has_room(cls, value: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
        if value.prefixlen > 30:
            raise ValueError(f"pod_cidr {value} is too small; give at least a /30")
        return value

    @field_validator("underlay")
    @classmethod
    def _underlay_consistent(cls, value: list[IPInterface]) -> list[IPInterface]:
        ips = [addr.ip for addr in value]
        if len(set(ips)) != len(ips):
            raise ValueError("underlay lists the same address twice")
        return value

    @model_validator(mode="after")
    def _nat_matches_underlay(self) -> Node:
        if self.nat is not None and self.nat.public.version not in families(self):
            raise ValueError(
                f"nat.public {self.nat.public} is {FAMILY_NAME[self.nat.public.version]} but "
                f"the node has no {FAMILY_NAME[self.nat.public.version]} underlay address; "
                "give the public address of the family its underlay uses")
        return self

    @property
    def primary(self) -> IPInterface:
        return self.underlay[0]

    @property
    def public_key_bytes(self) -> bytes:
        return decode_key(self.public_key, "public_key")

    @property
    def mesh_address(self) -> ipaddress.IPv4Address:
        """The host's own address in the mesh: the first address of its pod CIDR."""
        return self.pod_cidr.network_address + 1

    @property
    def channel_address(self) -> ipaddress.IPv4Address:
        """Its VPP's address for the agents' channel inside the tunnels: the last address
        of its pod CIDR (never a pod's: IPAM hands out up to the one before), held by
        VPP's gateway loopback in the mesh VRF. Every peer routes the pod CIDR through
        its tunnels, so a channel datagram to it travels encrypted (channel/endpoint.py)."""
        return self.pod_cidr.broadcast_address


class Mesh(BaseModel):
    """The whole mesh: settings plus every node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    settings: MeshSettings = MeshSettings()
    nodes: Annotated[list[Node], Field(min_length=1)]

    @model_validator(mode="after")
    def _mesh_consistent(self) -> Mesh:
        global _last_checked
        # A mesh read again after one node joined, left or changed differs from the
        # last one checked by that node: its checks are then made for that node against
        # what the last check found (_Checked.updated), a few dict lookups instead of
        # walking every node (at 1000 nodes, most of a mesh file's read). Anything the
        # update cannot prove fine is checked whole, which raises the error it names.
        base = _last_checked
        checked = base.updated(self) if base is not None else None
        _last_checked = checked or self._check_all()
        return self

    def _check_all(self) -> _Checked:
        names = check_unique(self.nodes, "name", lambda n: n.name)
        numbers = check_unique(self.nodes, "node_number", lambda n: n.node_number)
        keys = check_unique(self.nodes, "public_key", lambda n: n.public_key)
        # By (family, integer): these checks run on every read of a 1000-node mesh file,
        # and an address's text or .ip builds new objects.
        seen: dict[tuple[int, int], str] = {}
        for node in self.nodes:
            for addr in node.underlay:
                other = seen.setdefault((addr.version, int(addr)), node.name)
                if other != node.name:
                    raise ValueError(
                        f"nodes[{node.name}].underlay: {addr.ip} is already an address of "
                        f"node {other}; every underlay address must belong to one node"
                    )
        for node in self.nodes:
            if node.nat is None:
                continue
            other = seen.setdefault((node.nat.public.version, int(node.nat.public)),
                                    node.name)
            if other != node.name:
                raise ValueError(
                    f"nodes[{node.name}].nat.public: {node.nat.public} is already an "
                    f"address of node {other}; two nodes cannot share a public address "
                    "(their peers' tunnels would collide): give each its own")
        by_net = sorted(self.nodes, key=lambda n: (int(n.pod_cidr.network_address),
                                                   n.pod_cidr.prefixlen))
        for left, right in itertools.pairwise(by_net):  # sorted: right starts within left?
            if int(right.pod_cidr.network_address) <= int(left.pod_cidr.broadcast_address):
                raise ValueError(
                    f"nodes[{left.name}].pod_cidr {left.pod_cidr} overlaps "
                    f"nodes[{right.name}].pod_cidr {right.pod_cidr}; give each node its "
                    "own range"
                )
        shapes = [shape(n) for n in self.nodes]  # once per node, for both checks
        used = self._pairs_can_meet(shapes)
        self._mtu_fits(shapes)
        counts: dict[Shape, int] = {}
        for s in shapes:
            counts[s] = counts.get(s, 0) + 1
        return _Checked(settings=self.settings, nodes={id(n): n for n in self.nodes},
                        names=names, numbers=numbers, keys=keys, addresses=seen,
                        pods=[_pod_range(n) for n in by_net], shapes=counts, used=used,
                        natted=sum(n.nat is not None for n in self.nodes))

    def _pairs_can_meet(self, shapes: Sequence[Shape]) -> dict[Shape, set[int]]:
        """Every pair shares a family, with enough addresses of it for the tunnels; the
        families each shape's nodes need."""
        wanted = self.settings.tunnels_per_peer
        # A node always needs the addresses of its primary family (also alone in the
        # mesh, as the first to join a datastore), and of every family its pairs use.
        used = {s: {s[1]} for s in shapes}
        for left, right, family in shape_pairs(self.nodes, shapes):
            if family is None:
                raise ValueError(
                    f"nodes[{left.name}] ({_family_names(left)} underlay) and "
                    f"nodes[{right.name}] ({_family_names(right)} underlay) share no "
                    "underlay family; give one of them an address of the other's family")
            used[shape(left)].add(family)
            used[shape(right)].add(family)
        natted = [n.name for n in self.nodes if n.nat is not None]
        if wanted > 1 and len(natted) > 1:
            raise ValueError(
                f"nodes {natted[0]} and {natted[1]} are both behind NAT, which needs "
                f"settings.tunnels_per_peer=1 (it is {wanted}): their {wanted} tunnels would "
                "all run between the same two public addresses and ports")
        for node, node_shape in zip(self.nodes, shapes, strict=True):
            for family in sorted(used[node_shape]):
                have = sum(a.version == family for a in node.underlay)
                # Behind NAT, every tunnel starts at the address the NAT forwards to.
                need = 1 if behind_nat(node, family) else wanted
                if have < need:
                    raise ValueError(
                        f"nodes[{node.name}].underlay has {have} {FAMILY_NAME[family]} "
                        f"address(es) but settings.tunnels_per_peer={wanted}; add "
                        f"{wanted - have} extra uplink address(es) or lower tunnels_per_peer "
                        "(two tunnels cannot share a source and destination)"
                    )
        return used

    def _mtu_fits(self, shapes: Sequence[Shape]) -> None:
        worst = self.worst_overhead(shapes)
        ceiling = self.settings.underlay_mtu - worst
        if self.settings.pod_mtu is not None and self.settings.pod_mtu > ceiling:
            raise ValueError(
                f"settings.pod_mtu={self.settings.pod_mtu} does not fit: the largest "
                f"overhead of a pair of this mesh (IPv6 underlay or ESP in UDP) is {worst} "
                f"bytes, so with underlay_mtu={self.settings.underlay_mtu} at most {ceiling}; "
                "remove pod_mtu to have it computed")
        if self.settings.pod_mtu is None and aligned_mtu(self.settings.underlay_mtu,
                                                         worst) < 576:
            raise ValueError(
                f"settings.underlay_mtu={self.settings.underlay_mtu} is too small for the "
                f"{worst}-byte overhead of this mesh's pairs; raise it to at least "
                f"{576 + worst + 7}")

    def worst_overhead(self, shapes: Sequence[Shape] | None = None,
                       nodes: Sequence[Node] | None = None) -> int:
        """Largest per-packet overhead of any pair (IPv4 ESP when there is no pair).
        `shapes`: those of `nodes` (this mesh's, in any order; by default in its order),
        when the caller knows them already."""
        worst = worst_overhead(self.nodes if nodes is None else nodes, shapes)
        return max_overhead(ipv6_underlay=False) if worst is None else worst

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        names = ", ".join(sorted(n.name for n in self.nodes))
        raise ConfigError(
            f"node {name!r} is not in the mesh file (nodes: {names}); add it or pass "
            "--node with one of these names"
        )

    def peers_of(self, name: str) -> list[Node]:
        self.node(name)
        return sorted((n for n in self.nodes if n.name != name), key=lambda n: n.node_number)

    def pod_mtu(self, shapes: Sequence[Shape] | None = None,
                nodes: Sequence[Node] | None = None) -> int:
        """Pod MTU for the whole mesh: the explicit setting or the worst case over pairs.

        One MTU serves every pod and every tunnel: a pod's packets may go to any peer,
        so the pair with the largest overhead (IPv6, ESP in UDP) sets it for all.
        `shapes`, `nodes`: as for worst_overhead.
        """
        if self.settings.pod_mtu is not None:
            return self.settings.pod_mtu
        return aligned_mtu(self.settings.underlay_mtu, self.worst_overhead(shapes, nodes))


def _pod_range(node: Node) -> tuple[int, int, str]:
    return (int(node.pod_cidr.network_address), int(node.pod_cidr.broadcast_address),
            node.name)


def _address_keys(node: Node) -> list[tuple[int, int]]:
    keys = [(a.version, int(a)) for a in node.underlay]
    if node.nat is not None:
        keys.append((node.nat.public.version, int(node.nat.public)))
    return keys


@dataclass(frozen=True)
class _Checked:
    """What the mesh-wide checks found in a mesh that passed them: each node's unique
    values, addresses and pod range, and how many nodes of each shape there are.

    updated() makes the same checks for the nodes another mesh adds or drops: each check
    is a property of every pair of nodes (or of the shapes present), so a mesh that
    passed, minus some nodes, plus others that pass against the rest and each other,
    passes too. Nodes are told apart by identity (config.parse_mesh and the datastore's
    records hand out the same Node for an unchanged entry); `nodes` holds them, so an
    id is never another node's. Never changed once made (agents may parse in threads).
    """

    settings: MeshSettings
    nodes: dict[int, Node]
    names: dict[object, str]
    numbers: dict[object, str]
    keys: dict[object, str]
    addresses: dict[tuple[int, int], str]  # underlay and NAT public: whose
    pods: list[tuple[int, int, str]]  # (first, last address, node), sorted
    shapes: dict[Shape, int]  # how many nodes have each
    used: dict[Shape, set[int]]  # the families each shape's nodes need
    natted: int

    def updated(self, mesh: Mesh) -> _Checked | None:
        """The checks of `mesh` from these, when it differs from the mesh checked by a
        few nodes and every check passes; None: check `mesh` whole (which raises the
        error, or the changes were too many to be worth it)."""
        nodes = mesh.nodes
        if mesh.settings is not self.settings and mesh.settings != self.settings:
            return None
        ids = {id(n): n for n in nodes}
        if len(ids) != len(nodes):  # one entry's Node twice: let check_unique name it
            return None
        added = [n for n in nodes if id(n) not in self.nodes]
        removed = [n for i, n in self.nodes.items() if i not in ids]
        if len(added) + len(removed) > 8 + len(nodes) // 4:
            return None
        names, numbers, keys = dict(self.names), dict(self.numbers), dict(self.keys)
        addresses, pods, shapes = dict(self.addresses), list(self.pods), dict(self.shapes)
        natted = self.natted
        for node in removed:
            del names[node.name], numbers[node.node_number], keys[node.public_key]
            for key in _address_keys(node):
                if addresses.get(key) == node.name:
                    del addresses[key]
            del pods[bisect.bisect_left(pods, _pod_range(node))]
            shapes[shape(node)] -= 1
            natted -= node.nat is not None
        for node in added:
            for seen, value in ((names, node.name), (numbers, node.node_number),
                                (keys, node.public_key)):
                if value in seen:
                    return None
                seen[value] = node.name
            for key in _address_keys(node):
                if addresses.setdefault(key, node.name) != node.name:
                    return None
            pod = _pod_range(node)
            at = bisect.bisect_left(pods, pod)
            if (at > 0 and pods[at - 1][1] >= pod[0]) or \
                    (at < len(pods) and pod[1] >= pods[at][0]):
                return None
            pods.insert(at, pod)
            node_shape = shape(node)
            shapes[node_shape] = shapes.get(node_shape, 0) + 1
            natted += node.nat is not None
        # The pairs of shapes (a shape pairs with itself from two nodes on: shape_pairs)
        # decide which families each shape needs and the MTU: unchanged, they pass.
        if {s for s, n in shapes.items() if n} != {s for s, n in self.shapes.items() if n} \
                or {s for s, n in shapes.items() if n > 1} != \
                {s for s, n in self.shapes.items() if n > 1}:
            return None
        wanted = self.settings.tunnels_per_peer
        if wanted > 1 and natted > 1:
            return None
        for node in added:
            for family in self.used[shape(node)]:
                have = sum(a.version == family for a in node.underlay)
                if have < (1 if behind_nat(node, family) else wanted):
                    return None
        return _Checked(settings=self.settings, nodes=ids, names=names, numbers=numbers,
                        keys=keys, addresses=addresses, pods=pods,
                        shapes={s: n for s, n in shapes.items() if n}, used=self.used,
                        natted=natted)


# The checks of the last mesh that passed them (Mesh._mesh_consistent).
_last_checked: _Checked | None = None


def _family_names(node: Node) -> str:
    return "/".join(FAMILY_NAME[f] for f in sorted(families(node)))


def check_unique(items: Sequence[Node], field: str, key: object) -> dict[object, str]:
    """Raise naming the field and both nodes when two nodes share a value; else each
    value's node name."""
    seen: dict[object, str] = {}
    for node in items:
        value = key(node)  # type: ignore[operator]
        if value in seen:
            raise ValueError(
                f"nodes: {field} {value!r} is used by both {seen[value]} and {node.name}; "
                f"every node needs its own {field}"
            )
        seen[value] = node.name
    return seen


def format_validation_error(exc: ValidationError, source: str) -> str:
    return f"{source}: the mesh file is not valid:\n  - " + describe(exc, sep="\n  - ")


def parse_mesh(data: object, source: str = "mesh", known: dict[str, Node] | None = None,
               *, entries: list[str] | None = None) -> Mesh:
    """Validate already-decoded mesh data (from a file or a datastore).

    `known` (kept by a caller that parses the same mesh again and again, MeshFile): the
    nodes of its last parse by their decoded data's repr, refilled with this one's. A
    node whose data is exactly one of those is taken as that Node instead of being
    validated again (a node's checks see only the node; at 1000 nodes they are most of
    a parse, and one node joining changes one); the mesh-wide checks run on every parse.
    `entries` (load_mesh's): the text of each node in the file, which keys `known`
    instead, the nodes already taken from it.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with 'settings' and 'nodes' at the top")
    raw = data.get("nodes")
    keys = entries
    if keys is None and known is not None and isinstance(raw, list):
        keys = [repr(n) for n in raw]
        data = {**data, "nodes": [known.get(k, n) for k, n in zip(keys, raw, strict=True)]}
    try:
        mesh = Mesh.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    if known is not None and keys is not None:
        known.clear()
        known.update(zip(keys, mesh.nodes, strict=True))
    return mesh


# libyaml's safe loader where PyYAML has it: a 1000-node mesh file reads 9x faster, and
# `up --watch` reads it again on every change.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# split_nodes's, on the text after a newline put in front.
_NODES_KEY = re.compile(r"\nnodes[ \t]*:")
_NODES_BLOCK = re.compile(r"\nnodes:[ \t]*(#.*)?\r?\n")
_DOCUMENT_MARKS = re.compile(r"\n(---|\.\.\.|%)")
_TAB_INDENT = re.compile(r"\n *\t")
_FIRST_LINE = re.compile(r"\n( *)([^ \r\n#])")  # not blank, not a comment


def split_nodes(text: str) -> tuple[str, list[str]] | None:
    """The mesh file cut into the rest (settings, `nodes:` with no value) and the text of
    each entry of its block list `nodes`, or None when it is not laid out that way (a
    flow list, several documents, tabs as indentation): then it is read whole.

    Even libyaml's loader builds every value in Python: at 1000 nodes reading the file
    costs more than the rest of a run, and one node joining changes one entry. An entry
    is the lines from its `- ` to the next one at the same indentation; each part reads
    alone as it reads inside the file, and any part that does not (an alias to another
    entry's anchor, a quoted text running across entries) sends the file to a whole read,
    whose errors carry the file's own line numbers."""
    lined = "\n" + text  # every line starts after a newline: patterns find them fast
    if len(_NODES_KEY.findall(lined)) != 1 or _DOCUMENT_MARKS.search(lined) or \
            ("\t" in text and _TAB_INDENT.search(lined)):
        return None
    found = _NODES_BLOCK.search(lined)
    first = _FIRST_LINE.search(lined, found.end() - 1) if found is not None else None
    if found is None or first is None or first.group(2) != "-":
        return None
    start, depth = found.end(), len(first.group(1))
    indent = " " * depth
    # The list ends at the first line that is neither blank, a comment, an entry's
    # start nor indented deeper than the entries (the next top-level key), or at the end.
    shallower = rf" {{0,{depth - 1}}}[^ \r\n#]|" if depth else ""
    beyond = re.compile(rf"\n(?:{shallower}{indent}[^ \r\n#-]|{indent}-[^ \r\n])").search(
        lined, start - 1)
    end = len(lined) if beyond is None else beyond.start() + 1
    starts = [m.start() + 1 for m in re.compile(rf"\n{indent}-(?=[ \r\n]|$)")
              .finditer(lined, start - 1, end)]
    # Comments and blank lines before an entry stay with the one before it.
    entries = [lined[a:b] for a, b in zip(starts, [*starts[1:], end], strict=True)]
    return lined[1:start] + lined[end:], entries


def read_entries(text: str, known: dict[str, Node],
                 ) -> tuple[dict[str, object], list[str]] | None:
    """The mesh file's data with every entry of `nodes` whose text is in `known` taken
    as that Node and the others read alone (split_nodes), and the entries' texts; None:
    read it whole."""
    parts = split_nodes(text)
    if parts is None:
        return None
    rest, entries = parts
    try:
        data = yaml.load(rest, Loader=SAFE_LOADER)
        nodes: list[object] = []
        for entry in entries:
            node = known.get(entry)
            if node is None:
                alone = yaml.load(entry, Loader=SAFE_LOADER)
                if not isinstance(alone, list) or len(alone) != 1:
                    return None
                node = alone[0]
            nodes.append(node)
    except yaml.YAMLError:
        return None
    if not isinstance(data, dict) or "nodes" not in data or data["nodes"] is not None:
        return None
    return {**data, "nodes": nodes}, entries


def load_mesh(path: Path, known: dict[str, Node] | None = None) -> Mesh:
    """Load and validate a mesh file; errors name the field and the fix. `known`: see
    parse_mesh; with it, only the entries of `nodes` whose text changed since the last
    load are read and validated again (split_nodes)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the mesh file ({exc.strerror})") from None
    if size > MAX_MESH_FILE_BYTES:
        raise ConfigError(f"{path}: {size} bytes is larger than the {MAX_MESH_FILE_BYTES} "
                          "bytes a mesh file may have")
    try:
        text = path.read_text(encoding="utf-8")
        read = read_entries(text, known) if known is not None else None
        data, entries = read if read is not None else (
            yaml.load(text, Loader=SAFE_LOADER), None)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse_mesh(data, str(path), known, entries=entries)


def node_data(node: Node) -> dict[str, object]:
    """A node as the mesh file and the datastore hold it: unset options left out, so a
    node that uses none of them reads the same to a vppmesh that does not know them."""
    data = node.model_dump(mode="json", exclude_none=True)
    if not node.udp_encap:
        del data["udp_encap"]
    return data


def dump_mesh(mesh: Mesh) -> str:
    """Serialize a mesh back to YAML (for the testbed and the examples)."""
    data = mesh.model_dump(mode="json", exclude_none=True)
    data["nodes"] = [node_data(n) for n in mesh.nodes]
    return yaml.safe_dump(data, sort_keys=False)
