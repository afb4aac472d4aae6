"""plan(): deterministic, complete and consistent between the two ends of every pair."""

from __future__ import annotations

import pytest

from vppmesh.dataplane.plan import HostOptions, plan
from vppmesh.dataplane.state import is_owned_sa_id, is_owned_tunnel_instance
from vppmesh.dataplane.view import build_view
from vppmesh.testing.meshes import make_mesh


@pytest.mark.parametrize("n", [2, 3, 100])
def test_plan_shape(n: int) -> None:
    mesh, secrets = make_mesh(n, tunnels=2)
    desired = plan(build_view(mesh, "node1", secrets["node1"]), workers=2)
    peers = n - 1
    assert len(desired.tunnels) == peers * 2
    assert len(desired.sas) == peers * 2 * 2
    assert len(desired.routes) == peers
    assert len({t.instance for t in desired.tunnels}) == len(desired.tunnels)
    assert len({s.sa_id for s in desired.sas}) == len(desired.sas)
    assert all(is_owned_tunnel_instance(t.instance) for t in desired.tunnels)
    assert all(is_owned_sa_id(s.sa_id) for s in desired.sas)
    # Tunnel i runs from local address i to peer address i; every route has N paths.
    local = mesh.node("node1")
    for t in desired.tunnels:
        peer = next(p for p in mesh.nodes if p.node_number == t.peer_number)
        assert t.src == local.underlay[t.index].ip and t.dst == peer.underlay[t.index].ip
    assert all(len(r.tunnels) == 2 for r in desired.routes)
    # SA i of each peer is bound to worker i mod W.
    assert {s.worker for s in desired.sas if s.tunnel == 1} == {1}
    assert desired.mtu == 1440


def test_plan_is_deterministic() -> None:
    mesh, secrets = make_mesh(5)
    view = build_view(mesh, "node3", secrets["node3"])
    assert plan(view) == plan(build_view(mesh, "node3", secrets["node3"]))


def test_two_ends_of_each_tunnel_agree() -> None:
    mesh, secrets = make_mesh(3, tunnels=2)
    states = {n.name: plan(build_view(mesh, n.name, secrets[n.name])) for n in mesh.nodes}
    for a in mesh.nodes:
        for b in mesh.nodes:
            if a is b:
                continue
            out_a = {(s.tunnel, s.spi): s for s in states[a.name].sas
                     if s.direction == "out" and s.peer_number == b.node_number}
            in_b = {(s.tunnel, s.spi): s for s in states[b.name].sas
                    if s.direction == "in" and s.peer_number == a.node_number}
            assert out_a.keys() == in_b.keys()
            for k, sa in out_a.items():
                assert sa.key.get_secret_value() == in_b[k].key.get_secret_value()
                assert sa.salt == in_b[k].salt


def test_rekey_window_accepts_two_epochs_sends_newest() -> None:
    mesh, secrets = make_mesh(2, tunnels=1)
    desired = plan(build_view(mesh, "node1", secrets["node1"]), epochs=(4, 5))
    tunnel = desired.tunnels[0]
    assert len(tunnel.sa_in) == 2
    out = next(s for s in desired.sas if s.sa_id == tunnel.sa_out)
    assert out.epoch_bits == 5


def test_host_link_routes_every_pod_cidr() -> None:
    mesh, secrets = make_mesh(4)
    desired = plan(build_view(mesh, "node2", secrets["node2"]), host=HostOptions(kind="af_packet"))
    assert desired.host is not None
    # Peers' pods, and its own (reached through VPP's per-pod /32 routes).
    assert set(desired.host.routes) == {n.pod_cidr for n in mesh.nodes}
    assert desired.host.address.ip == mesh.node("node2").mesh_address
    assert plan(build_view(mesh, "node2", secrets["node2"]),
                host=HostOptions(kind="none")).host is None


def test_what_is_not_for_the_mesh_leaves_the_mesh_vrf_through_the_host() -> None:
    """Pods reach their node, Services, DNS and the outside through the host: VPP's only
    route towards the host beyond its /32 is the default, less specific than every pod
    CIDR, so mesh traffic never takes it."""
    mesh, secrets = make_mesh(3)
    desired = plan(build_view(mesh, "node1", secrets["node1"]), host=HostOptions(kind="af_packet"))
    assert desired.host is not None
    (default,) = desired.host.vpp_routes
    assert default.prefixlen == 0
    assert all(r.prefix.prefixlen > 0 for r in desired.routes)


def test_large_segments_only_for_tap_endpoints() -> None:
    mesh, secrets = make_mesh(2, gso=True)
    tap = plan(build_view(mesh, "node1", secrets["node1"]), host=HostOptions(kind="tap"))
    assert tap.gso and tap.host is not None and tap.host.offloads
    veth = plan(build_view(mesh, "node1", secrets["node1"]), host=HostOptions(kind="af_packet"))
    assert not veth.gso and veth.host is not None and not veth.host.offloads
    off, _ = make_mesh(2)  # the default: Linux segments
    assert not plan(build_view(off, "node1", secrets["node1"]), host=HostOptions(kind="tap")).gso
