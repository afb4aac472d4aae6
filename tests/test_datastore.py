"""Datastore membership without etcd: records, conflicts, numbers, incremental reconcile."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

import pytest

from vppmesh.agent.datastore.etcd import RegistrationError
from vppmesh.agent.datastore.membership import LocalNode, MembershipSource, parse_local
from vppmesh.agent.datastore.records import (
    DatastoreUrl,
    Record,
    assemble,
    encode_record,
    free_number,
    membership_change,
    parse_record,
)
from vppmesh.config import Mesh
from vppmesh.dataplane.state import split_tunnel_instance
from vppmesh.dataplane.vpp.client import Request
from vppmesh.errors import ConfigError
from vppmesh.testing.datastore import MemoryStore, agent_options
from vppmesh.testing.fake_vpp import FakeVpp
from vppmesh.testing.meshes import make_mesh


def records_of(mesh: Mesh) -> list[Record]:
    return [Record(name=n.name, value=encode_record(n), create_revision=10 + i)
            for i, n in enumerate(mesh.nodes)]


def numbers_of(mesh: Mesh) -> dict[int, str]:
    return {n.node_number: n.name for n in mesh.nodes}


# ---- URL, records, numbers ---------------------------------------------------------------
def test_url_parsing_and_errors() -> None:
    url = DatastoreUrl.parse("etcd://192.0.2.1:2381/meshes/a")
    assert (url.host, url.port, url.prefix) == ("192.0.2.1", 2381, "/meshes/a")
    assert url.node_key("n1") == "/meshes/a/nodes/n1"
    assert DatastoreUrl.parse("etcd://h").prefix == "/vppmesh"
    for bad, why in [("http://h:2379", "expected etcd://"), ("etcd://h:x", "port"),
                     ("etcd://h/a b", "prefix")]:
        with pytest.raises(ConfigError, match=why):
            DatastoreUrl.parse(bad)


def test_record_validated_by_the_mesh_file_model() -> None:
    mesh, _ = make_mesh(2)
    good = records_of(mesh)[0]
    assert parse_record(good) == mesh.nodes[0]
    broken = good.value.replace(b'"pod_cidr":"10.64.1.0/24"', b'"pod_cidr":"10.64.1.0/31"')
    with pytest.raises(ConfigError, match=r"pod_cidr: .*too small"):
        parse_record(Record(name="node1", value=broken, create_revision=1))
    with pytest.raises(ConfigError, match="stored under its own name"):
        parse_record(Record(name="other", value=good.value, create_revision=1))
    with pytest.raises(ConfigError, match="not JSON"):
        parse_record(Record(name="node1", value=b"{", create_revision=1))
    extra = good.value.replace(b"{", b'{"colour":"red",', 1)
    with pytest.raises(ConfigError, match="colour"):
        parse_record(Record(name="node1", value=extra, create_revision=1))


def test_later_record_claiming_an_address_number_or_key_is_rejected() -> None:
    mesh, _ = make_mesh(3)
    n1, n2, n3 = mesh.nodes
    thief = n3.model_copy(update={"underlay": [n1.underlay[0], n3.underlay[1]]})
    records = records_of(Mesh(settings=mesh.settings, nodes=[n1, n2]))
    records.append(Record(name="node3", value=encode_record(thief), create_revision=99))
    membership = assemble(mesh.settings, records, numbers_of(mesh))
    assert membership.mesh is not None
    assert [n.name for n in membership.mesh.nodes] == ["node1", "node2"]
    assert "already an address of node node1" in membership.rejected["node3"]

    # A number that belongs to another name is refused, whatever the record says.
    sneaky = n3.model_copy(update={"node_number": 2})
    records[-1] = Record(name="node3", value=encode_record(sneaky), create_revision=99)
    membership = assemble(mesh.settings, records, numbers_of(mesh))
    assert "claims node_number 2, which belongs to 'node2'" in membership.rejected["node3"]

    # Same key as node1: the earlier record wins, here the later one is node1's clone.
    clone = n3.model_copy(update={"public_key": n1.public_key})
    records[-1] = Record(name="node3", value=encode_record(clone), create_revision=99)
    membership = assemble(mesh.settings, records, numbers_of(mesh))
    assert "public_key" in membership.rejected["node3"]
    assert membership.has("node1") and not membership.has("node3")


def test_reassembling_decodes_only_changed_records_and_still_rejects_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent assembles every snapshot of a 1000-node mesh: with the last call's
    `known` nodes, a record stored exactly as before is not decoded and validated again,
    while a changed record is, and a changed record that became invalid is rejected with
    its field named (and the mesh-wide checks still see every node)."""
    import vppmesh.agent.datastore.records as records_module

    mesh, _ = make_mesh(6)
    records = records_of(mesh)
    known: dict = {}
    first = assemble(mesh.settings, records, numbers_of(mesh), known)
    parsed: list[str] = []
    real = records_module.parse_record
    monkeypatch.setattr(records_module, "parse_record",
                        lambda r: (parsed.append(r.name), real(r))[1])
    again = assemble(mesh.settings, records, numbers_of(mesh), known)
    assert parsed == [] and again.mesh == first.mesh
    assert all(a is b for a, b in zip(again.mesh.nodes, first.mesh.nodes, strict=True))

    broken = records[2].value.replace(b'"pod_cidr":"10.64.3.0/24"', b'"pod_cidr":"x"')
    assert broken != records[2].value
    records[2] = Record(name="node3", value=broken, create_revision=12)
    membership = assemble(mesh.settings, records, numbers_of(mesh), known)
    assert parsed == ["node3"]
    assert "pod_cidr" in membership.rejected["node3"] and not membership.has("node3")
    clash = mesh.nodes[4].model_copy(update={"pod_cidr": mesh.nodes[0].pod_cidr})
    records[4] = Record(name="node5", value=encode_record(clash), create_revision=14)
    membership = assemble(mesh.settings, records, numbers_of(mesh), known)
    assert parsed == ["node3", "node3", "node5"]  # the invalid one is not kept either
    assert "overlaps" in membership.rejected["node5"]


def test_too_few_addresses_for_the_settings_is_rejected() -> None:
    mesh, _ = make_mesh(2, tunnels=2)
    short = mesh.nodes[1].model_copy(update={"underlay": mesh.nodes[1].underlay[:1]})
    records = [records_of(mesh)[0], Record(name="node2", value=encode_record(short),
                                           create_revision=50)]
    membership = assemble(mesh.settings, records, numbers_of(mesh))
    assert "tunnels_per_peer=2" in membership.rejected["node2"]


def test_number_allocation() -> None:
    assert free_number({}, "a") == 1
    assert free_number({1: "a", 2: "b", 4: "c"}, "d") == 3
    assert free_number({1: "a", 7: "d"}, "d") == 7  # a returning node keeps its number
    assert free_number({1: "a"}, "b", requested=5) == 5
    with pytest.raises(ConfigError, match="belongs to node 'a'"):
        free_number({1: "a"}, "b", requested=1)


def test_local_record_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="--underlay"):
        parse_local([], "198.18.1.0/24", None, None)
    with pytest.raises(ConfigError, match=r"--underlay: .*ADDR/LEN"):
        parse_local(["192.0.2.300/24"], "198.18.1.0/24", None, None)
    with pytest.raises(ConfigError, match="--pod-cidr"):
        parse_local(["192.0.2.1/24"], "198.18.1.5/24", None, None)


def test_membership_change() -> None:
    mesh, _ = make_mesh(3)
    two = Mesh(settings=mesh.settings, nodes=mesh.nodes[:2])
    change = membership_change(two, mesh)
    assert (change.joined, change.left, change.changed) == (("node3",), (), ())
    assert str(membership_change(mesh, two)) == "-node3"
    assert membership_change(mesh, mesh).empty


# ---- incremental reconcile through the agent ---------------------------------------------
class RecordingVpp(FakeVpp):
    """FakeVpp that also keeps every state-changing request, to see what was touched."""

    READS = ("show_version", "show_threads", "control_ping", "classify_table_by_interface",
             "classify_table_info")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[Request] = []

    def call(self, request: Request) -> Any:
        if request.name not in self.READS:
            self.requests.append(request)
        return super().call(request)


def touched(vpp: RecordingVpp, tunnel_index_to_peer: dict[int, int]) -> dict[str, set[int]]:
    """Which peer numbers each kind of request touched (sw_if_index / SA id / instance)."""
    out: dict[str, set[int]] = {}
    for req in vpp.requests:
        args = req.args
        peer: int | None = None
        if "entry" in args:
            peer = (args["entry"]["sad_id"] >> 8) & 0xFFFF
        elif req.name in ("ipsec_sad_entry_del",):
            peer = (args["id"] >> 8) & 0xFFFF
        elif req.name == "ipsec_sad_bind":
            peer = (args["sa_id"] >> 8) & 0xFFFF
        elif req.name == "ipip_add_tunnel":
            peer = split_tunnel_instance(args["tunnel"]["instance"])[0]
        elif "tunnel" in args:
            peer = tunnel_index_to_peer.get(args["tunnel"]["sw_if_index"], -1)
        elif req.name == "ip_route_add_del":
            peer = int(ipaddress.IPv4Network(args["route"]["prefix"]).network_address
                       .packed[2])  # make_mesh: node k's pod CIDR is 10.64.k.0/24
        elif "unnumbered_sw_if_index" in args:
            peer = tunnel_index_to_peer.get(args["unnumbered_sw_if_index"], -1)
        elif "sw_if_index" in args:
            peer = tunnel_index_to_peer.get(args["sw_if_index"], -1)
        if req.name in ("ipsec_set_async_mode", "cli_inband"):
            continue  # a global setting, and the crypto handler read: sent on every run
        out.setdefault(req.name, set()).add(peer if peer is not None else -1)
    return out


def tunnel_peers(vpp: FakeVpp) -> dict[int, int]:
    return {i: split_tunnel_instance(t["instance"])[0] for i, t in vpp.tunnels.items()}


def test_join_and_leave_touch_only_that_peer(tmp_path: Path) -> None:
    mesh, secrets = make_mesh(4, tunnels=2)
    store = MemoryStore(mesh.settings)
    for node in mesh.nodes[1:3]:
        store.put(node)
    local = mesh.nodes[0]
    vpp = RecordingVpp.with_uplink(local.primary)
    options, ds = agent_options(tmp_path, secrets, "node1", LocalNode(
        underlay=tuple(local.underlay), pod_cidr=local.pod_cidr, node_number=1))
    member = MembershipSource(options, ds, store=store, api=vpp)  # type: ignore[arg-type]
    first = member.sync()
    assert first is not None and first.changes
    assert sorted({p for p in tunnel_peers(vpp).values()}) == [2, 3]
    before_tunnels = dict(tunnel_peers(vpp))
    before_sas = {sa_id: dict(sa) for sa_id, sa in vpp.sas.items()}
    assert member.sync().changes == []  # type: ignore[union-attr]

    # node4 joins: only its SAs, tunnels and route are created; nothing else is touched.
    vpp.requests.clear()
    store.put(mesh.nodes[3])
    joined = member.sync()
    assert joined is not None and joined.changes
    assert all(c.action == "create" or c.kind in ("tunnel", "route") for c in joined.changes)
    peers = tunnel_peers(vpp)
    assert {i: p for i, p in peers.items() if p != 4} == before_tunnels
    for sa_id, sa in before_sas.items():
        assert vpp.sas[sa_id] == sa
    hit = touched(vpp, peers)
    assert hit, "nothing was sent"
    assert all(p == {4} for p in hit.values()), hit
    assert not {"ipip_del_tunnel", "ipsec_sad_entry_del", "ipsec_tunnel_protect_del"} & set(hit)

    # node4 leaves (record gone): only its objects are removed.
    vpp.requests.clear()
    index_to_peer = tunnel_peers(vpp)
    store.drop("node4")
    left = member.sync()
    assert left is not None and {c.action for c in left.changes} == {"delete"}
    assert tunnel_peers(vpp) == before_tunnels
    hit = touched(vpp, index_to_peer)
    assert all(p == {4} for p in hit.values()), hit
    assert {"ipip_del_tunnel", "ipsec_sad_entry_del"} <= set(hit)
    assert set(vpp.sas) == set(before_sas)


def test_conflicting_local_record_is_refused_before_vpp_is_touched(tmp_path: Path) -> None:
    mesh, secrets = make_mesh(2, tunnels=1)
    store = MemoryStore(mesh.settings)
    store.put(mesh.nodes[0])
    vpp = RecordingVpp.with_uplink(mesh.nodes[1].primary)
    # node2 claims node1's pod CIDR.
    options, ds = agent_options(tmp_path, secrets, "node2", LocalNode(
        underlay=tuple(mesh.nodes[1].underlay), pod_cidr=mesh.nodes[0].pod_cidr))
    member = MembershipSource(options, ds, store=store, api=vpp)  # type: ignore[arg-type]
    with pytest.raises(RegistrationError, match="conflicts"):
        member.sync()
    assert vpp.requests == []
    assert store.revoked == [4242]  # the lease granted for the refused record is given up


# ---- command line ----------------------------------------------------------------------
def test_cli_help_and_clear_errors(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vppmesh.cli import app

    runner = CliRunner()
    for command in (["up"], ["down"], ["plan"], ["status"], ["uplink", "take"],
                    ["uplink", "restore"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, result.output
    base = ["up", "--node", "n1", "--key", str(tmp_path / "k"), "--state-dir", str(tmp_path)]
    no_watch = runner.invoke(app, [*base, "--datastore", "etcd://127.0.0.1:1/x"])
    assert no_watch.exit_code == 1 and "--datastore needs --watch" in no_watch.output
    bad_url = runner.invoke(app, [*base, "--watch", "--datastore", "http://127.0.0.1"])
    assert bad_url.exit_code == 1 and "expected etcd://" in bad_url.output
    no_cidr = runner.invoke(app, [*base, "--watch", "--datastore", "etcd://127.0.0.1:1/x",
                                  "--underlay", "192.0.2.1/24"])
    assert no_cidr.exit_code == 1 and "--pod-cidr" in no_cidr.output


def test_an_unreachable_datastore_is_said_once_and_is_no_failed_reconcile(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """etcd restarting: the loop's steps fail while it is away. That is logged once (and its
    end once), shown by vppmesh_mesh_source_up, and not counted as failed reconciles (an
    etcd outage looked like a broken agent: an ERROR line and a counted error every
    second); VPP keeps what it has."""
    from prometheus_client.parser import text_string_to_metric_families

    from vppmesh.agent.datastore.etcd import DatastoreError
    from vppmesh.ops.metrics import AgentMetrics

    def samples(text: str) -> dict[tuple[str, tuple[()]], float]:
        return {(s.name, ()): s.value for f in text_string_to_metric_families(text)
                for s in f.samples if not s.labels}

    mesh, secrets = make_mesh(2, 1)
    store = MemoryStore(mesh.settings)
    for node in mesh.nodes[1:]:
        store.put(node)
    options, ds = agent_options(tmp_path, secrets, "node1", LocalNode(
        underlay=tuple(mesh.node("node1").underlay), pod_cidr=mesh.node("node1").pod_cidr))
    vpp = FakeVpp.with_uplink(mesh.node("node1").primary)
    metrics = AgentMetrics()
    member = MembershipSource(options, ds, store=store, api=vpp,  # type: ignore[arg-type]
                             metrics=metrics)
    assert member.loop.step() is not None
    tunnels = dict(vpp.tunnels)
    snapshot = store.snapshot

    def away() -> None:
        raise DatastoreError("etcd at 127.0.0.1:2379: /kv/range failed (ConnectionFailedError)")

    store.snapshot = away  # type: ignore[method-assign]
    with caplog.at_level(logging.DEBUG, logger="vppmesh"):
        for _ in range(5):
            assert member.loop.step() is None
        got = samples(metrics.exposition().decode())
        assert got[("vppmesh_mesh_source_up", ())] == 0
        store.snapshot = snapshot  # type: ignore[method-assign]
        assert member.loop.step() is not None
    assert vpp.tunnels == tunnels
    got = samples(metrics.exposition().decode())
    assert got[("vppmesh_mesh_source_up", ())] == 1
    assert got.get(("vppmesh_reconcile_errors_total", ()), 0) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING and "etcd" in
            r.getMessage()]
    assert len(loud) == 1 and "asking again" in loud[0].getMessage()
    assert sum("answers again" in r.getMessage() for r in caplog.records) == 1
