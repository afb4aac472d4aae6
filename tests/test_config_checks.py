"""The mesh-wide checks made for the nodes that changed since the last mesh checked: the
same outcome, and the same error naming the field, as when every node is checked."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

import vppmesh.config as config
from vppmesh.config import Mesh, MeshSettings, Node
from vppmesh.testing.meshes import make_mesh

N = 40


def node_like(base: Node, **changes: object) -> Node:
    data = base.model_dump(mode="json", exclude_none=True)
    data.update(changes)
    return Node.model_validate(data)


def joiner(mesh: Mesh, **changes: object) -> Node:
    """A new node 41 (its own key, addresses and pods) with `changes`."""
    spare, _ = make_mesh(N + 1, 2)
    return node_like(spare.nodes[-1], **changes)


def outcome(settings: MeshSettings, nodes: list[Node], *, cold: bool,
            base: Mesh | None = None) -> str:
    if cold:
        config._last_checked = None
    elif base is not None:
        Mesh(settings=base.settings, nodes=base.nodes)  # what the agent checked last
    try:
        Mesh(settings=settings, nodes=nodes)
    except ValidationError as exc:
        return str(exc.errors()[0]["msg"])
    return "valid"


def underlay_of(node: Node) -> list[str]:
    return [str(a) for a in node.underlay]


# Each: (the mesh's settings, the nodes) from a valid 40-node mesh.
CHANGES = {
    "a node joins": lambda m: [*m.nodes, joiner(m)],
    "a node leaves": lambda m: m.nodes[:17] + m.nodes[18:],
    "a node changes its pods": lambda m: [
        *m.nodes[:5], node_like(m.nodes[5], pod_cidr="10.99.0.0/24"), *m.nodes[6:]],
    "the joiner's name is taken": lambda m: [*m.nodes, joiner(m, name="node3")],
    "the joiner's number is taken": lambda m: [*m.nodes, joiner(m, node_number=9)],
    "the joiner's key is taken": lambda m: [*m.nodes, joiner(m, public_key=m.nodes[4].public_key)],
    "the joiner's underlay is taken": lambda m: [
        *m.nodes, joiner(m, underlay=[underlay_of(m.nodes[2])[1], "10.9.9.9/12"])],
    "the joiner's NAT address is another's underlay": lambda m: [
        *m.nodes, joiner(m, nat={"public": str(m.nodes[6].underlay[0].ip)})],
    "two nodes behind NAT with 2 tunnels": lambda m: [
        *m.nodes[:3], node_like(m.nodes[3], nat={"public": "203.0.113.3"}), *m.nodes[4:],
        joiner(m, nat={"public": "203.0.113.4"})],
    "the joiner's pods inside another's": lambda m: [
        *m.nodes, joiner(m, pod_cidr=str(next(m.nodes[11].pod_cidr.subnets(1))))],
    "the joiner's pods in another's upper half": lambda m: [
        *m.nodes, joiner(m, pod_cidr=str(list(m.nodes[11].pod_cidr.subnets(1))[1]))],
    "the joiner's pods hold another's": lambda m: [
        *m.nodes, joiner(m, pod_cidr=str(m.nodes[11].pod_cidr.supernet(4)))],
    "a changed node's pods overlap its neighbour's": lambda m: [
        *m.nodes[:5], node_like(m.nodes[5], pod_cidr=str(m.nodes[6].pod_cidr)), *m.nodes[6:]],
    "the joiner shares no family": lambda m: [
        *m.nodes, joiner(m, underlay=["2001:db8::1/64", "2001:db8::2/64"])],
    "the joiner lacks an address": lambda m: [
        *m.nodes, joiner(m, underlay=underlay_of(joiner(m))[:1])],
    "the joiner's ESP in UDP no longer fits pod_mtu": lambda m: [
        *m.nodes, joiner(m, udp_encap=True)],
    "one entry twice": lambda m: [*m.nodes, m.nodes[8]],
    "a node leaves and another takes its name, number and pods": lambda m: [
        *m.nodes[:20], joiner(m, name="node21", node_number=21,
                              pod_cidr=str(m.nodes[20].pod_cidr)), *m.nodes[21:]],
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_checks_of_a_change_match_the_checks_of_every_node(change: str) -> None:
    """After a mesh was checked, the next differs by a node or two: its checks are made
    for those nodes only, and must accept and refuse exactly what the checks of every
    node do, with the same error (which names the field and both nodes)."""
    small, _ = make_mesh(2, 2)  # pod_mtu: the most that fits without ESP in UDP
    base, _ = make_mesh(N, 2, pod_mtu=small.settings.underlay_mtu - small.worst_overhead())
    nodes = CHANGES[change](base)
    whole = outcome(base.settings, nodes, cold=True)
    assert outcome(base.settings, nodes, cold=False, base=base) == whole
    valid = change in ("a node joins", "a node leaves", "a node changes its pods",
                       "a node leaves and another takes its name, number and pods")
    assert (whole == "valid") == valid, whole


def test_a_change_is_checked_without_walking_every_node(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of it: one node joining a checked mesh checks that node, not all."""
    base, _ = make_mesh(N, 2)
    new, clash = joiner(base), joiner(base, pod_cidr=str(base.nodes[0].pod_cidr))
    Mesh(settings=base.settings, nodes=base.nodes)
    walked: list[int] = []
    real = Mesh._check_all
    monkeypatch.setattr(Mesh, "_check_all", lambda self: (walked.append(1), real(self))[1])
    Mesh(settings=base.settings, nodes=[*base.nodes, new])
    assert walked == []
    with pytest.raises(ValidationError, match=r"pod_cidr .* overlaps"):
        Mesh(settings=base.settings, nodes=[*base.nodes, clash])
    assert walked == [1]  # refused: checked whole, for the error
    other = MeshSettings(tunnels_per_peer=2, underlay_mtu=1600)
    Mesh(settings=other, nodes=base.nodes)
    assert walked == [1, 1]  # other settings: every node again


def test_addresses_compare_by_family() -> None:
    """192.0.2.1 and ::c000:201 are one integer but two addresses."""
    base, _ = make_mesh(N, 1)
    v4 = base.nodes[0].underlay[0]
    v6 = ipaddress.IPv6Interface((int(v4.ip), 64))
    both = joiner(base, underlay=[str(joiner(base).underlay[0]), str(v6)])
    Mesh(settings=base.settings, nodes=base.nodes)
    assert Mesh(settings=base.settings, nodes=[*base.nodes, both]).nodes[-1] is both
