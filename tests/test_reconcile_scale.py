"""Reconcile cost at scale, counted on the fake: a one-peer change costs the same messages
and compares the same objects whatever the size of the mesh, and the state the
Reconciler remembers always matches what a fresh dump of VPP says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vppmesh.config import Mesh
from vppmesh.dataplane.index import DesiredIndex, possible_sa_ids, possible_tunnel_instances
from vppmesh.dataplane.plan import HostOptions, plan
from vppmesh.dataplane.reconcile import Reconciler, observe
from vppmesh.dataplane.state import DesiredState, sa_id_for, tunnel_instance
from vppmesh.dataplane.view import build_view
from vppmesh.errors import VppApiError
from vppmesh.keying.keys import NodeSecrets
from vppmesh.keying.ledger import KeyLedger
from vppmesh.testing.fake_vpp import FakeVpp
from vppmesh.testing.meshes import make_mesh
from vppmesh.testing.observed import summary

DUMPS = {"sw_interface_dump", "ipip_tunnel_dump", "ipsec_sa_v5_dump",
         "ipsec_tunnel_protect_dump", "ip_unnumbered_dump", "ip_table_dump",
         "ip_route_dump", "ip_address_dump"}


def desired_for(mesh: Mesh, secrets: dict[str, NodeSecrets], peers: int | None = None,
                workers: int = 0, **kw: Any) -> DesiredState:
    """node1's desired state towards its first `peers` peers (all of them by default)."""
    if peers is not None:
        mesh = mesh.model_copy(update={"nodes": mesh.nodes[:peers + 1]})
    return plan(build_view(mesh, "node1", secrets["node1"]), workers=workers,
                host=HostOptions(kind="none"), **kw)


def converge(size: int, tunnels: int = 2, workers: int = 0
             ) -> tuple[Mesh, dict[str, NodeSecrets], FakeVpp, Reconciler]:
    """node1 programmed with `size` peers; the mesh file holds one more, to join."""
    mesh, secrets = make_mesh(size + 2, tunnels)
    vpp = FakeVpp.with_uplink(mesh.node("node1").primary, workers=workers)
    reconciler = Reconciler(vpp)
    reconciler.reconcile(desired_for(mesh, secrets, size, workers=workers))
    return mesh, secrets, vpp, reconciler


def one_peer_change(size: int) -> dict[str, dict[str, int]]:
    """Messages of: one peer joining, then one leaving, on a mesh of `size` peers."""
    mesh, secrets, vpp, reconciler = converge(size)
    joined = desired_for(mesh, secrets)
    left = desired_for(mesh.model_copy(update={"nodes": [
        n for n in mesh.nodes if n.name != "node2"]}), secrets)
    result = {}
    for name, desired in (("join", joined), ("leave", left)):
        vpp.counts.clear()
        changes = reconciler.reconcile(desired)
        assert changes
        assert reconciler.last_scope is not None and len(reconciler.last_scope) == 1
        result[name] = dict(vpp.counts)
    # And the remembered state is exactly what VPP holds.
    assert summary(reconciler._observed) == summary(observe(vpp, left))  # type: ignore[arg-type]
    return result


def test_one_peer_change_costs_the_same_messages_at_10_and_1000_peers() -> None:
    small, large = one_peer_change(10), one_peer_change(1000)
    assert small == large
    # No dumps at all: the change is diffed against the remembered state.
    assert not DUMPS & (small["join"].keys() | small["leave"].keys())
    # Joining with 2 tunnels: 4 SAs, 2 tunnels (create, table, unnumbered, MTU,
    # protection, up), one route. Leaving removes the same.
    assert small["join"] == {"ipsec_sad_entry_add_v2": 4, "ipip_add_tunnel": 2,
                             "sw_interface_set_table": 2, "sw_interface_set_unnumbered": 2,
                             "sw_interface_set_mtu": 2, "ipsec_tunnel_protect_update": 2,
                             "sw_interface_set_flags": 2, "ip_route_add_del": 1}
    assert small["leave"] == {"ip_route_add_del": 1, "sw_interface_set_flags": 2,
                              "ipsec_tunnel_protect_del": 2, "ipip_del_tunnel": 2,
                              "ipsec_sad_entry_del": 4}


def test_scoped_diff_looks_up_only_the_changed_peers_objects(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Count the observed objects a one-peer diff reads: independent of mesh size."""
    import vppmesh.dataplane.reconcile as reconcile_module

    def lookups(size: int) -> int:
        mesh, secrets, _, reconciler = converge(size)
        seen = {"n": 0}
        real = reconcile_module.Scope.of_peers.__func__  # type: ignore[attr-defined]

        def counting(cls: Any, peers: set[int], *args: Any, **kw: Any) -> Any:
            scope = real(cls, peers, *args, **kw)
            seen["n"] += sum(len(x) for x in (scope.sas, scope.tunnels, scope.routes,
                                              scope.seen_sas, scope.seen_tunnels,
                                              scope.seen_routes))
            return scope

        monkeypatch.setattr(reconcile_module.Scope, "of_peers", classmethod(counting))
        reconciler.reconcile(desired_for(mesh, secrets, size - 1))  # the last peer leaves
        monkeypatch.undo()
        return seen["n"]

    assert lookups(10) == lookups(1000) > 0


def test_reconciler_skips_everything_when_nothing_changed() -> None:
    mesh, secrets, vpp, reconciler = converge(20)
    sent = vpp.messages_sent
    assert reconciler.reconcile(desired_for(mesh, secrets, 20)) == []
    assert vpp.messages_sent == sent
    assert reconciler.last_scope == set()


def test_full_run_after_vpp_changed_behind_the_agents_back() -> None:
    mesh, secrets, vpp, reconciler = converge(5)
    victim = next(i for i, t in vpp.tunnels.items() if t["instance"] == tunnel_instance(3, 0))
    vpp.ifaces[victim]["flags"] = 0  # someone took a tunnel down
    desired = desired_for(mesh, secrets, 5)
    assert reconciler.reconcile(desired) == []  # the remembered state cannot know
    changes = reconciler.reconcile(desired, full=True)
    assert [str(c) for c in changes] == [f"~ tunnel ipip{tunnel_instance(3, 0)} (finish setup)"]
    assert vpp.ifaces[victim]["flags"] & 1


def test_key_change_of_one_peer_replaces_only_its_sas_and_keeps_cache_exact() -> None:
    mesh, secrets, vpp, reconciler = converge(6, workers=2)
    rekeyed = desired_for(mesh, secrets, 6, workers=2, epochs=(0, 1))
    # Only peer 4's objects take the new epoch: the other peers keep theirs.
    old = DesiredIndex(desired_for(mesh, secrets, 6, workers=2))
    new_index = DesiredIndex(rekeyed)
    others = [p for p in range(2, 8) if p != 4]
    mixed = rekeyed.model_copy(update={
        "sas": (*old.sas_of(others).values(), *new_index.sas_of([4]).values()),
        "tunnels": (*old.tunnels_of(others).values(), *new_index.tunnels_of([4]).values()),
    })
    changes = reconciler.reconcile(mixed)
    assert reconciler.last_scope == {4}
    assert {c.kind for c in changes} <= {"sa", "protection", "tunnel"}
    assert sa_id_for("out", 4, 0, 1) in vpp.sas and sa_id_for("out", 4, 0, 0) not in vpp.sas
    assert sa_id_for("out", 3, 0, 0) in vpp.sas
    assert summary(reconciler._observed) == summary(observe(vpp, mixed))  # type: ignore[arg-type]
    assert Reconciler(vpp).reconcile(mixed) == []


def test_node_wide_change_makes_a_full_run() -> None:
    mesh, secrets, vpp, reconciler = converge(4)
    smaller_mtu = mesh.model_copy(update={"settings": mesh.settings.model_copy(
        update={"pod_mtu": 1300})})
    changes = reconciler.reconcile(desired_for(smaller_mtu, secrets, 4))
    assert reconciler.last_scope is None  # compared everything
    assert len([c for c in changes if c.kind == "tunnel"]) == 8
    assert all(vpp.ifaces[i]["mtu"] == 1300 for i in vpp.tunnels)


def test_failure_in_an_incremental_run_dumps_and_starts_over_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    mesh, secrets, vpp, reconciler = converge(5)
    grown = desired_for(mesh, secrets, 6)
    # A single refusal: the run dumps VPP, starts over and converges.
    vpp.fail_on["ipsec_tunnel_protect_update"] = -1
    assert reconciler.reconcile(grown)
    assert reconciler.last_scope is None
    assert Reconciler(vpp).reconcile(grown) == []

    # A lasting refusal: the error reaches the caller, and no tunnel is up unprotected.
    rekeyed = desired_for(mesh, secrets, epochs=(0, 1))
    monkeypatch.setattr(vpp, "m_ipsec_tunnel_protect_update",
                        lambda tunnel: type("Reply", (), {"retval": -1})())
    with pytest.raises(VppApiError, match="ipsec_tunnel_protect_update"):
        reconciler.reconcile(rekeyed)
    assert all(i in vpp.protections for i in vpp.tunnels if vpp.ifaces[i]["flags"] & 1)
    monkeypatch.undo()
    reconciler.reconcile(rekeyed)
    assert all(vpp.ifaces[i]["flags"] & 1 and i in vpp.protections for i in vpp.tunnels)
    assert Reconciler(vpp).reconcile(rekeyed) == []


def test_another_process_changing_vpp_meanwhile_is_caught(tmp_path: Path) -> None:
    """`vppmesh rekey` runs its own reconcile while `up --watch` remembers the old state."""
    mesh, secrets, vpp, reconciler = converge(5)
    ledger = KeyLedger(tmp_path / "used.json")
    rekeyed = desired_for(mesh, secrets, 5, epochs=(0, 1))
    Reconciler(vpp).reconcile(rekeyed, ledger=ledger)  # the other process
    # The watch agent plans the same and would install the same outbound keys again:
    # the ledger stops that, and the agent finds them already in VPP instead.
    assert reconciler.reconcile(rekeyed, ledger=ledger) == []
    assert reconciler.last_scope is None
    assert summary(reconciler._observed) == summary(observe(vpp, rekeyed))  # type: ignore[arg-type]


def test_batch_error_names_the_first_failed_object_and_counts_the_rest() -> None:
    _, _, vpp, _ = converge(3)
    from vppmesh.dataplane.vpp import ipsec

    missing = [sa_id_for("out", 9, t, 0) for t in range(3)]
    with pytest.raises(VppApiError) as err:
        vpp.call_many([ipsec.bind_sa(s, 0) for s in missing])
    text = str(err.value)
    assert f"SA {missing[0]:#x} to worker 0" in text
    assert "and 2 more in the same batch" in text


def test_identifier_ranges_cover_every_object_of_a_peer() -> None:
    mesh, secrets = make_mesh(3, 4)
    desired = desired_for(mesh, secrets, epochs=(14, 15))
    for peer in (2, 3):
        ids = set(possible_sa_ids(peer))
        instances = set(possible_tunnel_instances(peer))
        assert {s.sa_id for s in desired.sas if s.peer_number == peer} <= ids
        assert {t.instance for t in desired.tunnels if t.peer_number == peer} <= instances
    assert not set(possible_sa_ids(2)) & set(possible_sa_ids(3))


def test_every_peer_changing_at_once_is_diffed_in_one_pass_and_converges() -> None:
    mesh, secrets, vpp, reconciler = converge(40, workers=2)
    rekeyed = desired_for(mesh, secrets, 40, workers=2, epochs=(0, 1))
    changes = reconciler.reconcile(rekeyed)
    assert reconciler.last_scope is not None and len(reconciler.last_scope) == 40
    assert sum(1 for c in changes if c.kind == "sa" and c.action == "create") == 40 * 2 * 2
    assert summary(reconciler._observed) == summary(observe(vpp, rekeyed))  # type: ignore[arg-type]
    assert Reconciler(vpp).reconcile(rekeyed) == []
