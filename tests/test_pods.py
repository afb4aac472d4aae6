"""Pods after a VPP restart (vppmesh/cni/reattach.py), against the fake VPP: every recorded
pod is put back as ADD made it, a healthy node is only looked at, and the record of a pod
whose network namespace is gone is collected. The Linux side is stubbed here; the real-VPP
restart test (tests/test_operations_vpp.py) drives all of it for real."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from vppmesh.cni import reattach
from vppmesh.cni.commands import pod_names, spec_of
from vppmesh.cni.models import Attachment
from vppmesh.cni.store import AttachmentStore
from vppmesh.host import endpoints
from vppmesh.host import link as linux
from vppmesh.testing.cni import fake_ipam, meshed
from vppmesh.testing.fake_vpp import FakeVpp
from vppmesh.testing.meshes import make_mesh


def record(container: str, index: int, netns: str, **fields: Any) -> Attachment:
    name, vpp_ifname = pod_names(container, "eth0")
    return Attachment(network="vppmesh", container_id=container, ifname="eth0", netns=netns,
                      name=name, address=ipaddress.IPv4Address(f"10.64.1.{index}"),
                      kind="af_packet", node_number=1, pod_index=index,
                      vpp_ifname=vpp_ifname, mesh_table=1717, mtu=1440, **fields)


class Linux:
    """Stand-in for the host side: records what the re-attach asked Linux to do."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, problems: list[str]) -> None:
        self.calls: list[tuple[str, str]] = []
        self.problems = problems
        monkeypatch.setattr(linux, "ensure_veth", lambda linux_ifname, vpp_ifname, **kw:
                            self.calls.append(("ensure_veth", vpp_ifname)))
        monkeypatch.setattr(linux, "configure_linux_side", lambda spec, mtu, **kw:
                            self.calls.append(("configure", spec.vpp_ifname)))
        monkeypatch.setattr(linux, "linux_side_problems", lambda spec, mtu, **kw:
                            list(self.problems))
        monkeypatch.setattr(linux, "remove_link", lambda name, netns=None:
                            self.calls.append(("remove_link", name)) is None)


@pytest.fixture
def store(tmp_path: Path) -> AttachmentStore:
    return AttachmentStore(tmp_path / "cni")


def test_restarted_vpp_gets_every_pod_back_as_add_made_it(
        store: AttachmentStore, monkeypatch: pytest.MonkeyPatch) -> None:
    host = Linux(monkeypatch, problems=[])
    records = [record("aaa", 7, "/proc/self/ns/net"), record("bbb", 8, "/proc/self/ns/net")]
    for r in records:
        store.save(r)
    vpp = meshed()
    report = reattach.reattach(vpp, store.directory)
    assert sorted(report.reattached) == sorted(
        f"{r.container_id}/eth0 ({r.address})" for r in records)
    assert report.attached == 2 and not report.repaired and not report.collected
    for r in records:  # what CHECK looks at in VPP
        assert endpoints.vpp_side_problems(vpp, spec_of(r), table_id=1717, mtu=1440) == []
    # The veth outlived VPP: ensured (a no-op when there), the pod's namespace untouched.
    assert [c for c in host.calls if c[0] == "configure"] == []
    assert sorted(c[1] for c in host.calls if c[0] == "ensure_veth") == \
        sorted(r.vpp_ifname for r in records)

    # A second pass on a healthy node only looks.
    before = vpp.counts.copy()
    again = reattach.reattach(vpp, store.directory)
    assert again.attached == 2 and not again.reattached
    assert all(name.endswith("_dump") for name in vpp.counts - before)

    # VPP restarts again: the same pods come back the same way.
    vpp = meshed()
    assert len(reattach.reattach(vpp, store.directory).reattached) == 2
    assert endpoints.vpp_side_problems(vpp, spec_of(records[0]), table_id=1717, mtu=1440) == []


def test_pod_side_is_repaired_only_where_it_differs(
        store: AttachmentStore, monkeypatch: pytest.MonkeyPatch) -> None:
    host = Linux(monkeypatch, problems=["interface eth0 is missing in netns x"])
    store.save(record("aaa", 7, "/proc/self/ns/net"))
    report = reattach.reattach(meshed(), store.directory)
    assert report.repaired == report.reattached and len(report.repaired) == 1
    assert ("configure", record("aaa", 7, "/").vpp_ifname) in host.calls


def test_record_of_a_vanished_pod_is_collected_and_its_address_released(
        store: AttachmentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = Linux(monkeypatch, problems=[])
    plugins = tmp_path / "bin"
    plugins.mkdir()
    fake_ipam(plugins, "{}")
    alive = record("aaa", 7, "/proc/self/ns/net")
    gone = record("bbb", 8, str(tmp_path / "no-such-netns"),
                  ipam={"type": "host-local", "dataDir": "/x"})
    vpp = meshed()
    store.save(gone)
    reattach.reattach(vpp, store.directory, (plugins,))  # gone already: collected at once
    assert store.all() == []
    sent = json.loads((plugins / "stdin.json").read_text())
    assert sent["ipam"] == {"type": "host-local", "dataDir": "/x"}
    env = (plugins / "env.txt").read_text().splitlines()
    assert "CNI_COMMAND=DEL" in env and "CNI_CONTAINERID=bbb" in env
    assert ("remove_link", gone.vpp_ifname) in host.calls

    # A pod attached while its namespace existed, then gone: VPP side removed too.
    store.save(alive)
    store.save(gone.model_copy(update={"netns": "/proc/self/ns/net"}))
    assert len(reattach.reattach(vpp, store.directory, (plugins,)).reattached) == 2
    store.save(gone)
    report = reattach.reattach(vpp, store.directory, (plugins,))
    assert report.collected == [f"bbb/eth0 ({gone.address})"] and report.attached == 1
    assert [r.container_id for r in store.all()] == ["aaa"]
    tags = endpoints.find_tagged(vpp, spec_of(alive).tag, spec_of(gone).tag)
    assert set(tags) == {spec_of(alive).tag}
    assert str(gone.address) + "/32" not in {str(p) for p in vpp.routes[1717]}


def test_no_mesh_yet_leaves_pods_for_the_next_pass(
        store: AttachmentStore, monkeypatch: pytest.MonkeyPatch) -> None:
    Linux(monkeypatch, problems=[])
    store.save(record("aaa", 7, "/proc/self/ns/net"))
    empty = FakeVpp.with_uplink(ipaddress.IPv4Interface("10.0.0.17/12"))
    report = reattach.reattach(empty, store.directory)
    assert report.failed and not report.reattached and store.all()


def test_no_records_no_vpp_calls(tmp_path: Path) -> None:
    vpp = meshed()
    before = vpp.counts.copy()
    assert reattach.reattach(vpp, tmp_path / "absent") == reattach.PodReport()
    assert vpp.counts == before


def test_netns_paths_and_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert reattach.netns_exists("/proc/self/ns/net")
    assert not reattach.netns_exists(str(tmp_path / "gone"))
    monkeypatch.setattr(reattach, "NETNS_DIR", tmp_path)
    (tmp_path / "web").touch()
    assert reattach.netns_exists("web") and not reattach.netns_exists("db")


def test_datastore_agent_reattaches_pods_on_a_new_vpp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`up --watch --datastore` does what node.Agent does: pods come back on the first
    sync with a (new) VPP connection, and are not looked at on every sync."""
    from vppmesh.agent.datastore.membership import LocalNode, MembershipSource
    from vppmesh.testing.datastore import MemoryStore, agent_options

    Linux(monkeypatch, problems=[])
    mesh, secrets = make_mesh(2)
    store = AttachmentStore(tmp_path / "cni")
    pod = record("aaa", 7, "/proc/self/ns/net")
    store.save(pod)
    datastore = MemoryStore(mesh.settings)
    datastore.put(mesh.nodes[1])
    local = mesh.nodes[0]
    options, ds = agent_options(tmp_path, secrets, "node1", LocalNode(
        underlay=tuple(local.underlay), pod_cidr=local.pod_cidr, node_number=1),
        cni_state_dir=store.directory)
    vpp = FakeVpp.with_uplink(local.primary)
    member = MembershipSource(options, ds, store=datastore, api=vpp)  # type: ignore[arg-type]
    first = member.sync()
    assert first is not None and first.pod_report is not None
    assert len(first.pod_report.reattached) == 1
    assert endpoints.vpp_side_problems(vpp, spec_of(pod), table_id=1717, mtu=1440) == []
    assert member.sync().pod_report is None  # type: ignore[union-attr]
    member.session.close()  # VPP went away; a new one answers
    member.api = FakeVpp.with_uplink(local.primary)
    again = member.sync()
    assert again is not None and again.pod_report is not None
    assert len(again.pod_report.reattached) == 1


def test_watch_session_reattaches_pods_after_a_reconnect(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """node.Agent (`up --watch` with a mesh file): pods come back on the first run with
    a new connection (a restarted VPP), and are not looked at on every poll."""
    from vppmesh.agent.node import Agent, NodeOptions
    from vppmesh.config import dump_mesh
    from vppmesh.keying.keys import private_key_b64, write_secret_file

    Linux(monkeypatch, problems=[])
    mesh, secrets = make_mesh(2)
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(dump_mesh(mesh))
    key = tmp_path / "node1.key"
    write_secret_file(key, private_key_b64(secrets["node1"].private_key))
    store = AttachmentStore(tmp_path / "cni")
    pod = record("aaa", 7, "/proc/self/ns/net")
    store.save(pod)
    options = NodeOptions(mesh_file=mesh_file, node="node1", private_key=key,
                          host_link="none", workers=0, state_dir=tmp_path,
                          cni_state_dir=store.directory)
    vpps = [FakeVpp.with_uplink(mesh.node("node1").primary) for _ in range(2)]
    session = Agent(options, connect=lambda: vpps.pop(0))  # type: ignore[arg-type,return-value]
    first = session.run()
    assert first.pod_report is not None and len(first.pod_report.reattached) == 1
    assert session.run().pod_report is None  # within full_every: not looked at
    session.close()  # the watch loop does this when VPP stops answering
    restarted = session.run()
    assert restarted.pod_report is not None and len(restarted.pod_report.reattached) == 1
    assert endpoints.vpp_side_problems(session.client, spec_of(pod),  # type: ignore[arg-type]
                                       table_id=1717, mtu=1440) == []


def test_datastore_agent_fills_the_metrics(tmp_path: Path) -> None:
    """With --metrics, `up --watch --datastore` records each sync and takes snapshots
    from VPP, as the file-based watch loop does."""
    from vppmesh.agent.datastore.membership import LocalNode, MembershipSource
    from vppmesh.ops.metrics import AgentMetrics
    from vppmesh.testing.datastore import MemoryStore, agent_options

    mesh, secrets = make_mesh(3)
    datastore = MemoryStore(mesh.settings)
    for node in mesh.nodes[1:]:
        datastore.put(node)
    local = mesh.nodes[0]
    options, ds = agent_options(tmp_path, secrets, "node1", LocalNode(
        underlay=tuple(local.underlay), pod_cidr=local.pod_cidr, node_number=1))
    metrics = AgentMetrics()
    member = MembershipSource(options, ds, store=datastore,  # type: ignore[arg-type]
                             api=FakeVpp.with_uplink(local.primary), metrics=metrics)
    result = member.sync()
    assert result is not None
    member.loop.measured(result, 0.25, restarted=True)
    snap = metrics.mesh.snapshot
    assert {t.peer for t in snap.tunnels} == {"node2", "node3"} and len(snap.tunnels) == 4
    assert all(t.up and t.protected for t in snap.tunnels)
    assert {p.peer for p in snap.peers} == {"node2", "node3"}
    text = metrics.exposition().decode()
    assert "vppmesh_vpp_restarts_total 1.0" in text
    assert "vppmesh_vpp_recovery_seconds 0.25" in text
