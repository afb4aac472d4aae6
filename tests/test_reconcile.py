"""reconcile() against a stateful fake VPP: converge, idempotence, ownership, failures."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from vppmesh.agent.node import NodeOptions, down
from vppmesh.dataplane.plan import HostOptions, plan
from vppmesh.dataplane.reconcile import Reconciler, ReusedKeyError, diff, empty_observed, reconcile
from vppmesh.dataplane.teardown import teardown
from vppmesh.dataplane.view import build_view
from vppmesh.dataplane.vpp import interfaces, ipip, routes
from vppmesh.errors import ConfigError, VppApiError
from vppmesh.host import guard
from vppmesh.host import link as host
from vppmesh.keying.ledger import KeyLedger
from vppmesh.testing.fake_vpp import FakeVpp
from vppmesh.testing.meshes import make_mesh


def setup(n: int = 3, tunnels: int = 2, workers: int = 0, node: str = "node1"):
    mesh, secrets = make_mesh(n, tunnels)
    desired = plan(build_view(mesh, node, secrets[node]), workers=workers,
                   host=HostOptions(kind="none"))
    vpp = FakeVpp.with_uplink(mesh.node(node).primary, workers=workers)
    return mesh, secrets, desired, vpp


def test_up_programs_everything_then_changes_nothing() -> None:
    _, _, desired, vpp = setup(workers=2)
    changes = reconcile(vpp, desired)
    assert changes
    assert len(vpp.tunnels) == len(desired.tunnels)
    assert set(vpp.sas) == {s.sa_id for s in desired.sas}
    assert len(vpp.protections) == len(desired.tunnels)
    table = vpp.routes[desired.table_id]
    for route in desired.routes:
        assert len(table[str(route.prefix)]) == len(route.tunnels)
    # Every tunnel is up, protected, in the mesh VRF, unnumbered to the gateway.
    for index in vpp.tunnels:
        assert vpp.ifaces[index]["flags"] & 1
        assert index in vpp.protections
        assert vpp.table_of[index] == desired.table_id
        assert vpp.unnumbered[index] == next(i for i, f in vpp.ifaces.items()
                                             if f["tag"] == "vppmesh:gateway")
    assert {sa["thread"] for sa in vpp.sas.values()} == {1, 2}
    # Extra underlay addresses were added to the uplink.
    assert len(vpp.addresses[1]) == 2
    sent = vpp.messages_sent
    assert reconcile(vpp, desired) == []
    assert vpp.messages_sent - sent < 15  # dumps only


def test_down_removes_only_what_vppmesh_owns() -> None:
    mesh, _, desired, vpp = setup()
    # The operator's own objects.
    vpp.call(interfaces.create_loopback("02:00:00:00:00:09"))

    operator_tunnel = vpp.call(ipip.add_tunnel(7, "10.1.1.1", "10.1.1.2")).sw_if_index
    reconcile(vpp, desired)
    removed = teardown(vpp, desired.table_id, tuple(mesh.node("node1").underlay[1:]))
    assert removed
    assert vpp.owned_objects() == {"tunnels": 0, "sas": 0, "tagged": 0, "protections": 0}
    assert operator_tunnel in vpp.tunnels
    assert sum(1 for f in vpp.ifaces.values() if f["dev_type"] == "Loopback") == 1
    assert desired.table_id not in vpp.tables
    assert vpp.addresses[1] == [str(mesh.node("node1").primary)]


def test_down_keeps_the_operators_routes_and_tables() -> None:
    _, _, desired, vpp = setup()
    reconcile(vpp, desired)
    # An operator's route in the mesh table, through their own interface.
    own = vpp.call(interfaces.create_loopback("02:00:00:00:00:0a")).sw_if_index
    vpp.call(routes.route(desired.table_id, ipaddress.IPv4Network("10.9.0.0/16"), [own], True))
    removed = teardown(vpp, desired.table_id, (), desired.drop_routes)
    assert f"kept table {desired.table_id}: 1 route(s) in it are not vppmesh's" in removed
    assert f"route {desired.drop_routes[0]}" in removed
    assert desired.table_id in vpp.tables
    assert set(vpp.routes[desired.table_id]) == {"10.9.0.0/16"}
    assert vpp.owned_objects() == {"tunnels": 0, "sas": 0, "tagged": 0, "protections": 0}


def test_down_keeps_a_mesh_table_vppmesh_did_not_create() -> None:
    _, _, desired, vpp = setup()
    vpp.call(routes.table(desired.table_id, True, name=""))  # made by the operator first
    reconcile(vpp, desired)
    removed = teardown(vpp, desired.table_id, (), desired.drop_routes)
    assert any(line.startswith(f"kept table {desired.table_id}: vppmesh did not create")
               for line in removed)
    assert desired.table_id in vpp.tables
    assert vpp.routes[desired.table_id] == {}


def test_down_without_the_mesh_file_finds_the_table_by_its_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "remove_link", lambda name, netns=None: False)
    _, _, desired, vpp = setup()
    reconcile(vpp, desired)
    guard.ensure(vpp, 1, 4)
    options = NodeOptions(mesh_file=tmp_path / "gone.yaml", node="node1",
                          private_key=tmp_path / "key", state_dir=tmp_path)
    removed = down(options, api=vpp)  # type: ignore[arg-type]
    assert f"table {desired.table_id}" in removed
    assert desired.table_id not in vpp.tables
    assert vpp.owned_objects() == {"tunnels": 0, "sas": 0, "tagged": 0, "protections": 0}
    assert any(line.startswith("plain IPIP guard") for line in removed)


def test_failure_half_way_leaves_nothing_unprotected_and_next_run_converges() -> None:
    _, _, desired, vpp = setup()
    vpp.fail_on["ipsec_tunnel_protect_update"] = -1
    with pytest.raises(VppApiError, match="ipsec_tunnel_protect_update"):
        reconcile(vpp, desired)
    # Tunnels exist but none is up: nothing can leave unencrypted.
    assert vpp.tunnels
    assert not any(vpp.ifaces[i]["flags"] & 1 for i in vpp.tunnels)
    reconcile(vpp, desired)
    assert all(vpp.ifaces[i]["flags"] & 1 for i in vpp.tunnels)
    assert len(vpp.protections) == len(vpp.tunnels)
    assert reconcile(vpp, desired) == []


def test_peer_leaving_touches_only_its_objects() -> None:
    mesh, secrets, desired, vpp = setup(n=4)
    reconcile(vpp, desired)
    before = {i: dict(t) for i, t in vpp.tunnels.items()}
    smaller = mesh.model_copy(update={"nodes": mesh.nodes[:3]})
    desired2 = plan(build_view(smaller, "node1", secrets["node1"]), host=HostOptions(kind="none"))
    changes = reconcile(vpp, desired2)
    assert all("#4" in str(c) or "ipip1000004" in str(c) or "10.64.4.0" in str(c)
               or c.kind == "sa" for c in changes)
    kept = {i for i, t in before.items() if t["instance"] // 100 % 1000000 != 4}
    assert kept <= set(vpp.tunnels)
    assert len(vpp.tunnels) == 2 * 2
    assert str(mesh.node("node4").pod_cidr) not in vpp.routes[desired.table_id]


def test_changed_peer_key_replaces_its_sas_without_duplicates() -> None:
    mesh, secrets, desired, vpp = setup(n=2, tunnels=1)
    reconcile(vpp, desired)
    desired2 = plan(build_view(mesh, "node1", secrets["node1"]), host=HostOptions(kind="none"),
                    epochs=(1,))
    changes = reconcile(vpp, desired2)
    assert any(c.kind == "sa" and c.action == "create" for c in changes)
    assert set(vpp.sas) == {s.sa_id for s in desired2.sas}
    assert reconcile(vpp, desired2) == []


def test_ledger_refuses_to_reinstall_an_outbound_key(tmp_path: Path) -> None:
    mesh, _, desired, vpp = setup(n=2)
    ledger = KeyLedger(tmp_path / "used.json")
    reconcile(vpp, desired, ledger=ledger)
    assert (tmp_path / "used.json").stat().st_mode & 0o077 == 0
    fresh = FakeVpp.with_uplink(mesh.node("node1").primary)  # "VPP restarted"
    with pytest.raises(ReusedKeyError, match="repeat AES-GCM nonces"):
        reconcile(fresh, desired, ledger=ledger)
    assert fresh.owned_objects()["sas"] == 0  # nothing half-applied


def test_missing_uplink_is_a_clear_error() -> None:
    _, _, desired, _ = setup()
    with pytest.raises(ConfigError, match="no VPP interface holding the primary"):
        reconcile(FakeVpp(), desired)


def test_dry_run_changes_nothing() -> None:
    _, _, desired, vpp = setup()
    changes = reconcile(vpp, desired, dry_run=True)
    assert changes and not vpp.tunnels and not vpp.sas


def test_host_link_default_route_is_installed_once_and_repaired() -> None:
    mesh, secrets = make_mesh(2)
    api = FakeVpp.with_uplink(mesh.node("node1").primary)
    desired = plan(build_view(mesh, "node1", secrets["node1"]), host=HostOptions(kind="af_packet"))
    reconcile(api, desired)
    table = api.routes[desired.table_id]
    host_index = next(i for i, f in api.ifaces.items() if f["tag"] == desired.host.tag)  # type: ignore[union-attr]
    assert table["0.0.0.0/0"] == (host_index,)
    assert reconcile(api, desired) == []
    del table["0.0.0.0/0"]  # someone removed it: the next run puts it back
    assert [c.kind for c in reconcile(api, desired)] == ["host-link"]
    assert api.routes[desired.table_id]["0.0.0.0/0"] == (host_index,)


def test_own_pod_cidr_is_dropped_in_vpp_once_kept_and_repaired() -> None:
    """A packet to an address of the node's pod CIDR that no pod holds must die in VPP,
    not take the default route to the host, which would send it back into VPP."""
    mesh, secrets = make_mesh(3)
    view = build_view(mesh, "node1", secrets["node1"])
    desired = plan(view, host=HostOptions(kind="af_packet"))
    own = mesh.node("node1").pod_cidr
    assert desired.drop_routes == (own,)
    # `vppmesh plan` without a VPP shows it.
    planned = diff(desired, empty_observed(desired)).changes()
    assert f"+ route {own} drop" in [str(c) for c in planned]
    api = FakeVpp.with_uplink(mesh.node("node1").primary)
    changes = reconcile(api, desired)
    assert [str(c) for c in changes].count(f"+ route {own} drop") == 1
    table = api.routes[desired.table_id]
    assert table[str(own)] == ()  # a drop route: no interface
    assert reconcile(api, desired) == []
    assert reconcile(api, desired, dry_run=True) == []

    # A long-running agent keeps it: a peer leaving changes only that peer's objects.
    agent = Reconciler(api)
    assert agent.reconcile(desired) == []
    smaller = plan(build_view(mesh.model_copy(update={"nodes": mesh.nodes[:2]}), "node1",
                              secrets["node1"]), host=HostOptions(kind="af_packet"))
    assert agent.reconcile(smaller)
    assert agent.last_scope == {3}
    assert table[str(own)] == ()
    assert agent.reconcile(smaller) == []

    # Removed behind the agent's back: a full run puts it back, and only it.
    del table[str(own)]
    assert [str(c) for c in agent.reconcile(smaller, full=True)] == [f"+ route {own} drop"]
    assert table[str(own)] == ()


def test_down_removes_the_drop_route() -> None:
    mesh, _, desired, vpp = setup()
    reconcile(vpp, desired)
    own = ipaddress.IPv4Network(mesh.node("node1").pod_cidr)
    assert routes.dump_table(vpp, desired.table_id)[1] >= {own}
    removed = teardown(vpp, desired.table_id, (), desired.drop_routes)
    assert f"route {own}" in removed
    assert desired.table_id not in vpp.tables
