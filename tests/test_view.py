"""The local view (vppmesh/dataplane/view.py): computed once per mesh version, refusing bad inputs
before anything is touched, never showing a secret, and reused by a long-running agent."""

from __future__ import annotations

import ipaddress
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

import vppmesh.agent.node
from vppmesh.config import Mesh, dump_mesh
from vppmesh.dataplane.view import build_view
from vppmesh.errors import ConfigError, KeyFileError
from vppmesh.host.uplink import UplinkSpec
from vppmesh.keying.agreement import NoAgreement
from vppmesh.keying.keys import NodeSecrets, private_key_b64, write_secret_file
from vppmesh.testing.fake_vpp import FakeVpp
from vppmesh.testing.meshes import make_mesh


class CountingKey:
    """An X25519 private key that counts its exchanges, by peer public key."""

    def __init__(self, key: X25519PrivateKey, exchanges: Counter[bytes]) -> None:
        self.key = key
        self.exchanges = exchanges

    def exchange(self, peer: X25519PublicKey) -> bytes:
        self.exchanges[peer.public_bytes_raw()] += 1
        return self.key.exchange(peer)

    def public_key(self) -> X25519PublicKey:
        return self.key.public_key()


class Counted:
    """`up` on the fake VPP with the local-node lookups and X25519 exchanges counted."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, peers: int = 4,
                 **options: Any) -> None:
        self.mesh, self.secrets = make_mesh(peers + 1, tunnels=2)
        self.mesh_file = tmp_path / "mesh.yaml"
        self.mesh_file.write_text(dump_mesh(self.mesh))
        key = tmp_path / "node1.key"
        write_secret_file(key, private_key_b64(self.secrets["node1"].private_key))
        self.options = vppmesh.agent.node.NodeOptions(mesh_file=self.mesh_file, node="node1",
                                                      private_key=key, host_link="none", workers=0,
                                                      state_dir=tmp_path, **options)
        self.vpp = FakeVpp.with_uplink(self.mesh.node("node1").primary)
        self.lookups: Counter[str] = Counter()
        self.exchanges: Counter[bytes] = Counter()
        node = Mesh.node
        load = vppmesh.agent.node.load_secrets

        def counting_node(mesh: Mesh, name: str) -> Any:
            self.lookups[name] += 1
            return node(mesh, name)

        def counting_secrets(*args: Any) -> NodeSecrets:
            real = load(*args)
            return NodeSecrets(private_key=CountingKey(real.private_key, self.exchanges),  # type: ignore[arg-type]
                               psk=real.psk)

        monkeypatch.setattr(Mesh, "node", counting_node)
        monkeypatch.setattr(vppmesh.agent.node, "load_secrets", counting_secrets)

    def peer_keys(self) -> Counter[bytes]:
        return Counter({n.public_key_bytes: 1 for n in self.mesh.nodes if n.name != "node1"})


def test_one_up_looks_up_the_local_node_once_and_exchanges_once_per_peer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = Counted(tmp_path, monkeypatch)
    result = vppmesh.agent.node.up(run.options, api=run.vpp,  # type: ignore[arg-type]
                                   agreement=NoAgreement(run.options.clock))
    assert result.changes and len(result.desired.tunnels) == 4 * 2
    assert run.lookups == Counter({"node1": 1})
    assert run.exchanges == run.peer_keys()  # exactly one X25519 per peer, no other


def test_session_keeps_the_view_and_a_joining_peer_costs_one_exchange(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = Counted(tmp_path, monkeypatch)
    full = run.mesh
    run.mesh_file.write_text(dump_mesh(full.model_copy(update={"nodes": full.nodes[:-1]})))
    session = vppmesh.agent.node.Agent(run.options, connect=lambda: run.vpp)  # type: ignore[arg-type,return-value]
    session.run()
    first = session.view()
    assert sum(run.exchanges.values()) == 3
    assert session.run().changes == []
    assert session.view() is first  # the mesh is unchanged: the same view, nothing new
    assert sum(run.exchanges.values()) == 3 and run.lookups["node1"] == 1

    run.mesh_file.write_text(dump_mesh(full))  # node5 joins
    asked: list[Any] = []
    dump = run.vpp.dump

    def spy(name: str, **args: Any) -> list[Any]:
        if name == "sw_interface_dump":
            asked.append(args["sw_if_index"])
        return dump(name, **args)

    run.vpp.dump = spy  # type: ignore[method-assign]
    joined = session.run()
    uplink = next(i for i, f in run.vpp.ifaces.items() if f["name"] == "host-eth0")
    assert asked == [uplink]  # the remembered uplink is read alone, not every interface
    assert {c.target.split()[0] for c in joined.changes if c.kind == "tunnel"} == \
        {"ipip100000500", "ipip100000501"}
    assert run.exchanges == run.peer_keys()  # only the newcomer's
    assert session.view().peer("node2") is first.peer("node2")


def test_wrong_key_is_refused_before_the_nic_or_vpp_is_touched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = Counted(tmp_path, monkeypatch, take_uplink=UplinkSpec(interface="eth9"))
    write_secret_file(run.options.private_key, private_key_b64(X25519PrivateKey.generate()),
                      force=True)

    def taken(*args: Any) -> None:
        raise AssertionError("the NIC was taken over before the key was checked")

    monkeypatch.setattr(vppmesh.agent.node.nic, "ensure", taken)
    with pytest.raises(KeyFileError, match="does not match the public_key of node node1"):
        vppmesh.agent.node.up(run.options, api=run.vpp,  # type: ignore[arg-type]
                              agreement=NoAgreement(run.options.clock))
    with pytest.raises(ConfigError, match="'ghost' is not in the mesh"):
        ghost = vppmesh.agent.node.NodeOptions(mesh_file=run.mesh_file, node="ghost",
                                               private_key=tmp_path / "missing.key")
        vppmesh.agent.node.up(ghost, api=run.vpp, agreement=NoAgreement(ghost.clock))  # type: ignore[arg-type]
    assert sum(run.vpp.counts.values()) == 0


def test_the_view_never_shows_a_secret_and_derives_both_directions() -> None:
    mesh, secrets = make_mesh(3, tunnels=1)
    one = build_view(mesh, "node1", secrets["node1"])
    two = build_view(mesh, "node2", secrets["node2"])
    peer = one.peer("node2")
    assert peer.secret == two.peer("node1").secret
    text = repr(one)
    assert peer.secret.hex() not in text and repr(peer.secret) not in text
    assert "secret" not in repr(peer)
    sent = one.sa_key(peer, outbound=True, tunnel=0, epoch=3)
    assert sent == two.sa_key(two.peer("node1"), outbound=False, tunnel=0, epoch=3)
    assert sent != one.sa_key(peer, outbound=False, tunnel=0, epoch=3)
    assert [p.name for p in one.peers] == ["node2", "node3"]
    assert one.pod_mtu == mesh.pod_mtu()


def test_a_changed_record_gets_a_new_path_and_the_ledger_is_one_per_options(
        tmp_path: Path) -> None:
    mesh, secrets = make_mesh(3, tunnels=1)
    before = build_view(mesh, "node1", secrets["node1"])
    moved = mesh.nodes[2].model_copy(
        update={"underlay": [ipaddress.IPv4Interface("10.0.9.9/12")]})
    after = build_view(mesh.model_copy(update={"nodes": [*mesh.nodes[:2], moved]}), "node1",
                       secrets["node1"], previous=before)
    assert after.peer("node2") is before.peer("node2")
    assert after.peer("node3").path.endpoints[0][1] == moved.underlay[0].ip
    assert after.peer("node3").secret == before.peer("node3").secret

    options = vppmesh.agent.node.NodeOptions(mesh_file=tmp_path / "m.yaml", node="node1",
                                             private_key=tmp_path / "k", state_dir=tmp_path)
    assert options.ledger is options.ledger


def test_a_kept_view_plans_the_same_objects_and_the_index_compares_peer_by_peer() -> None:
    from vppmesh.dataplane.index import DesiredIndex
    from vppmesh.dataplane.plan import plan, plan_by_peer

    mesh, secrets = make_mesh(5, tunnels=2)
    fewer = mesh.model_copy(update={"nodes": mesh.nodes[:-1]})
    before = build_view(fewer, "node1", secrets["node1"])
    desired, parts = plan_by_peer(before, workers=2)
    joined, joined_parts = plan_by_peer(build_view(mesh, "node1", secrets["node1"],
                                                   previous=before), workers=2)
    assert all(joined_parts[p] is parts[p] for p in parts)  # the very same objects
    assert joined == plan(build_view(mesh, "node1", secrets["node1"]), workers=2)
    grouped = DesiredIndex(joined, joined_parts).changed_peers(DesiredIndex(desired, parts))
    assert grouped == {5} == DesiredIndex(joined).changed_peers(DesiredIndex(desired))
    rekeyed, rekeyed_parts = plan_by_peer(before, workers=2, epochs=(0, 1))
    assert DesiredIndex(rekeyed, rekeyed_parts).changed_peers(DesiredIndex(desired, parts)) \
        == {2, 3, 4}
    assert DesiredIndex(joined, joined_parts).sas_of({5}) == DesiredIndex(joined).sas_of({5})


def test_the_pod_mtu_follows_the_peers_that_join_and_leave() -> None:
    """The view takes the pod MTU from its peers' shapes, kept with their views rather
    than taken from every node again: a peer with ESP in UDP joining lowers it for the
    whole mesh, and its leaving raises it again, exactly as the mesh computes it."""
    mesh, secrets = make_mesh(4)
    udp = mesh.nodes[3].model_copy(update={"udp_encap": True})
    plain = Mesh(settings=mesh.settings, nodes=mesh.nodes[:3])
    joined = Mesh(settings=mesh.settings, nodes=[*mesh.nodes[:3], udp])
    first = build_view(plain, "node1", secrets["node1"])
    with_udp = build_view(joined, "node1", secrets["node1"], previous=first)
    left = build_view(plain, "node1", secrets["node1"], previous=with_udp)
    assert first.pod_mtu == plain.pod_mtu() == left.pod_mtu
    assert with_udp.pod_mtu == joined.pod_mtu() < first.pod_mtu
