"""The etcd backend against a real etcd (Debian's etcd-server) on loopback; fake VPPs.

Skipped with the reason when no etcd binary is installed.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vppmesh.agent.datastore.etcd import EtcdStore, RegistrationError
from vppmesh.agent.datastore.membership import DatastoreOptions, LocalNode, MembershipSource
from vppmesh.agent.datastore.records import DatastoreUrl, assemble
from vppmesh.agent.node import NodeOptions
from vppmesh.config import Mesh
from vppmesh.dataplane.state import SA_DIRECTION_BIT, is_owned_sa_id, split_tunnel_instance
from vppmesh.keying.keys import private_key_b64, rotate_private_key
from vppmesh.testing.etcd_server import EtcdServer, running_etcd
from vppmesh.testing.fake_vpp import FakeVpp
from vppmesh.testing.meshes import make_mesh
from vppmesh.testing.wait import wait_for

TTL = 2  # etcd's minimum lease


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with running_etcd() as server:
        yield server


@pytest.fixture
def store(etcd: EtcdServer, request: pytest.FixtureRequest) -> EtcdStore:
    # A prefix per test: tests do not see each other's records.
    name = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)
    return EtcdStore(DatastoreUrl.parse(etcd.url(f"/t/{name}")))


def test_settings_are_stored_once(store: EtcdStore) -> None:
    mesh, _ = make_mesh(1, tunnels=2)
    assert store.seed_settings(mesh.settings)
    other = mesh.settings.model_copy(update={"tunnels_per_peer": 1})
    assert not store.seed_settings(other)
    assert store.settings() == mesh.settings


def test_concurrent_joins_get_distinct_numbers(store: EtcdStore) -> None:
    mesh, _ = make_mesh(6, tunnels=1)
    store.seed_settings(mesh.settings)
    lease = store.grant(30)
    numbers: dict[str, int] = {}
    errors: list[BaseException] = []

    def join(node) -> None:  # type: ignore[no-untyped-def]
        try:
            numbers[node.name] = store.register(node, lease).node.node_number
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=join, args=(n,)) for n in mesh.nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(numbers.values()) == list(range(1, 7))
    snap = store.snapshot()
    assert {v: k for k, v in snap.numbers.items()} == numbers
    membership = assemble(store.settings(snap), snap.records, snap.numbers)
    assert membership.rejected == {} and membership.mesh is not None
    assert len(membership.mesh.nodes) == 6


def test_records_claiming_a_name_or_address_are_refused(store: EtcdStore) -> None:
    mesh, _ = make_mesh(3, tunnels=1)
    n1, n2, n3 = mesh.nodes
    store.seed_settings(mesh.settings)
    lease = store.grant(30)
    store.register(n1, lease)
    impostor = n2.model_copy(update={"name": "node1"})
    with pytest.raises(RegistrationError, match=r"'node1' is registered .* another public key"):
        store.register(impostor, store.grant(30))
    # ... unless it names the registered key as its previous one (a key rotation's host)
    with pytest.raises(RegistrationError, match=r"'node1' is registered .* another public key"):
        store.register(impostor, store.grant(30), previous_key=n3.public_key)
    squatter = n3.model_copy(update={"underlay": n1.underlay})
    with pytest.raises(RegistrationError, match=r"already an address of node node1"):
        store.register(squatter, lease)
    with pytest.raises(Exception, match="belongs to node 'node1'"):
        store.register(n2, lease, requested_number=1)
    snap = store.snapshot()
    assert [r.name for r in snap.records] == ["node1"]
    assert snap.numbers == {1: "node1"}


def test_lease_expiry_removes_the_record_and_the_number_is_kept(store: EtcdStore) -> None:
    mesh, _ = make_mesh(2, tunnels=1)
    store.seed_settings(mesh.settings)
    store.register(mesh.nodes[0], store.grant(30))
    short = store.grant(TTL)
    number = store.register(mesh.nodes[1], short).node.node_number
    assert store.keepalive(short)
    waited = wait_for(lambda: len(store.snapshot().records) == 1, TTL + 5, "lease expiry")
    assert waited >= 0.5
    assert not store.keepalive(short)
    assert store.snapshot().numbers[number] == "node2"
    # Coming back: same number; `down` (deregister) releases it.
    again = store.register(mesh.nodes[1], store.grant(30))
    assert again.node.node_number == number
    assert store.deregister("node2")
    assert number not in store.snapshot().numbers
    # Revoking a lease removes its records at once.
    lease = store.grant(30)
    store.register(mesh.nodes[1], lease)
    store.revoke(lease)
    assert [r.name for r in store.snapshot().records] == ["node1"]


class Member:
    """One node's agent in a thread, with a fake VPP."""

    def __init__(self, store_url: DatastoreUrl, mesh: Mesh, secrets, name: str,  # type: ignore[no-untyped-def]
                 tmp: Path, ttl: int = TTL) -> None:
        node = mesh.node(name)
        key = tmp / f"{name}.key"
        key.write_text(private_key_b64(secrets[name].private_key))
        key.chmod(0o600)
        self.vpp = FakeVpp.with_uplink(node.primary)
        options = NodeOptions(mesh_file=tmp / "unused.yaml", node=name, private_key=key,
                              host_link="none", workers=0, state_dir=tmp)
        ds = DatastoreOptions(url=store_url, lease_ttl=ttl, resync_seconds=30,
                              local=LocalNode(underlay=tuple(node.underlay),
                                              pod_cidr=node.pod_cidr))
        self.agent = MembershipSource(options, ds, api=self.vpp)  # type: ignore[arg-type]
        self.agent.changed.set()
        self.thread = threading.Thread(target=self.agent.run, daemon=True)

    @property
    def number(self) -> int:
        registration = self.agent.registration
        return registration.node.node_number if registration else -1

    def peers(self) -> set[int]:
        return {split_tunnel_instance(t["instance"])[0] for t in self.vpp.tunnels.values()}

    def stop(self) -> None:
        self.agent.stop.set()
        self.agent.changed.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


def test_agents_follow_joins_and_expiries(store: EtcdStore, tmp_path: Path) -> None:
    mesh, secrets = make_mesh(3, tunnels=2)
    store.seed_settings(mesh.settings)
    members = [Member(store.url, mesh, secrets, f"node{i}", tmp_path) for i in (1, 2)]
    for m in members:
        m.thread.start()
    try:
        a, b = members  # started together: either may hold number 1
        wait_for(lambda: a.peers() == {b.number} and b.peers() == {a.number}, 15,
                 "node1 and node2 to mesh")
        assert {a.number, b.number} == {1, 2}
        index_before = {i: t["instance"] for i, t in a.vpp.tunnels.items()}
        third = Member(store.url, mesh, secrets, "node3", tmp_path)
        third.thread.start()
        joined = wait_for(lambda: all(m.peers() == {3} | {a.number, b.number} - {m.number}
                                      for m in members), 15, "node3 to join")
        print(f"\njoin: node3 in node1's and node2's VPP {joined * 1000:.0f} ms after start")
        assert {i: t["instance"] for i, t in a.vpp.tunnels.items()
                if split_tunnel_instance(t["instance"])[0] == b.number} == index_before
        # node3's agent stops (crash): its lease expires, everyone removes it.
        third.agent.stop.set()
        third.agent.changed.set()
        third.thread.join(timeout=10)
        stopped = time.monotonic()
        wait_for(lambda: all(3 not in m.peers() for m in members), TTL + 10, "node3 to go")
        print(f"leave: node3 removed {time.monotonic() - stopped:.1f} s after its agent "
              f"stopped (lease TTL {TTL} s)")
        assert a.peers() == {b.number} and b.peers() == {a.number}
        assert {i: t["instance"] for i, t in a.vpp.tunnels.items()} == index_before
    finally:
        for m in members:
            m.stop()


def test_restart_within_the_ttl_is_invisible(store: EtcdStore, tmp_path: Path) -> None:
    mesh, secrets = make_mesh(2, tunnels=1)
    store.seed_settings(mesh.settings)
    first = Member(store.url, mesh, secrets, "node1", tmp_path, ttl=10)
    first.thread.start()
    wait_for(lambda: first.agent.applied is not None, 10, "node1 to register")
    record = next(r for r in store.snapshot().records if r.name == "node1")
    key = (tmp_path / "node1.key").read_text()
    first.stop()
    again = Member(store.url, mesh, secrets, "node1", tmp_path, ttl=10)
    again.vpp = first.vpp
    again.agent.api = first.vpp
    again.thread.start()
    try:
        wait_for(lambda: again.agent.applied is not None, 10, "node1 to come back")
        again_record = next(r for r in store.snapshot().records if r.name == "node1")
        assert again_record.create_revision == record.create_revision  # taken back
        assert again_record.value == record.value  # same key: peers' SAs stay as they are
        assert (tmp_path / "node1.key").read_text() == key
        assert again_record.lease == again.agent.registration.lease.id  # type: ignore[union-attr]
    finally:
        again.stop()


def test_tls_with_client_certificates(tmp_path: Path) -> None:
    from vppmesh.agent.datastore.etcd import DatastoreError
    from vppmesh.errors import ConfigError

    with running_etcd(tls=True) as server:
        url = DatastoreUrl.parse(server.url("/tls"))
        assert url.tls and url.ca is not None and str(url).startswith("etcds://")
        store = EtcdStore(url)
        mesh, _ = make_mesh(1, tunnels=1)
        assert store.seed_settings(mesh.settings)
        assert store.register(mesh.nodes[0], store.grant(30)).node.node_number == 1
        # Without the client certificate etcd refuses the connection.
        anonymous = EtcdStore(DatastoreUrl.parse(f"etcds://127.0.0.1:{server.port}/tls"
                                                 f"?ca={server.tls.ca}"))  # type: ignore[union-attr]
        with pytest.raises(DatastoreError, match="is etcd running and reachable"):
            anonymous.snapshot()
        with pytest.raises(ConfigError, match="both cert= and key="):
            DatastoreUrl.parse(f"etcds://127.0.0.1/x?cert={server.tls.client_cert}")  # type: ignore[union-attr]
        with pytest.raises(ConfigError, match="only etcds:// URLs take options"):
            DatastoreUrl.parse(f"etcd://127.0.0.1/x?ca={server.tls.ca}")  # type: ignore[union-attr]


def test_agents_recover_from_an_etcd_restart(tmp_path: Path) -> None:
    from vppmesh.testing.etcd_server import free_port

    ports = (free_port(), free_port())
    data = tmp_path / "etcd"
    mesh, secrets = make_mesh(3, tunnels=1)
    with running_etcd(data_dir=data, ports=ports) as server:
        url = DatastoreUrl.parse(server.url("/restart"))
        EtcdStore(url).seed_settings(mesh.settings)
        members = [Member(url, mesh, secrets, f"node{i}", tmp_path, ttl=10) for i in (1, 2)]
        for m in members:
            m.thread.start()
        wait_for(lambda: all(len(m.peers()) == 1 for m in members), 15, "two nodes meshed")
    try:
        time.sleep(1.0)  # etcd is down: the agents keep VPP as it is
        assert all(len(m.peers()) == 1 for m in members)
        with running_etcd(data_dir=data, ports=ports):
            third = Member(url, mesh, secrets, "node3", tmp_path, ttl=10)
            third.thread.start()
            # The broken watch streams are noticed and re-armed: no wait for the
            # periodic resync (30 s here).
            took = wait_for(lambda: all(len(m.peers()) == 2 for m in members), 20,
                            "node3 seen after the restart")
            print(f"\njoin seen {took:.1f} s after etcd came back and node3 started")
            third.stop()
    finally:
        for m in members:
            m.stop()


def generation_of(sa_id: int) -> int:
    return (sa_id >> 24) & 0xF


def sa_keys(vpp: FakeVpp, direction: str, peer: int) -> dict[tuple[int, int], object]:
    """{(generation, tunnel): key} of the SAs towards (out) or from (in) one peer."""
    out_bit = direction == "out"
    return {(generation_of(i), (i >> 4) & 0xF): sa["entry"]["crypto_key"]
            for i, sa in vpp.sas.items() if is_owned_sa_id(i)
            and bool(i & SA_DIRECTION_BIT) == out_bit and (i >> 8) & 0xFFFF == peer}


def sending_generations(vpp: FakeVpp) -> set[int]:
    """The generations of the outbound SAs that protect the tunnels now."""
    return {generation_of(sa_out) for sa_out, _ in vpp.protections.values()}


def pair_keys_match(a: Member, b: Member) -> bool:
    """Every key a sends under is one b accepts, and the other way round."""
    return all(
        {(g, t) for g, t in sa_keys(x.vpp, "out", y.number) if g in sending_generations(x.vpp)}
        <= set(sa_keys(y.vpp, "in", x.number)) and all(
            sa_keys(y.vpp, "in", x.number).get(gt) == key
            for gt, key in sa_keys(x.vpp, "out", y.number).items())
        for x, y in ((a, b), (b, a)))


def test_rejoin_after_leaving_steps_a_generation_under_the_same_key(
        store: EtcdStore, tmp_path: Path) -> None:
    """Peers removed the leaver's SAs; on its return they send under their next generation.

    The key stays the node's identity; the used-key ledgers would refuse (and the
    agents log) any outbound key installed a second time.
    """
    mesh, secrets = make_mesh(2, tunnels=1)
    store.seed_settings(mesh.settings)
    first = Member(store.url, mesh, secrets, "node1", tmp_path, ttl=30)
    first.thread.start()
    try:
        leaver = Member(store.url, mesh, secrets, "node2", tmp_path)
        leaver.thread.start()
        wait_for(lambda: len(first.peers()) == 1 and pair_keys_match(first, leaver), 15,
                 "node2 to join")
        key = (tmp_path / "node2.key").read_text()
        record = next(r for r in store.snapshot().records if r.name == "node2")
        (before,) = sending_generations(first.vpp)
        assert sending_generations(leaver.vpp) == {before}
        leaver.stop()
        wait_for(lambda: not first.peers(), TTL + 10, "node2's lease to expire")
        assert sa_keys(first.vpp, "out", leaver.number) == {}  # its outbound key is burnt
        back = Member(store.url, mesh, secrets, "node2", tmp_path)
        back.vpp = leaver.vpp  # the agent was gone, its VPP kept running
        back.agent.api = leaver.vpp
        back.thread.start()
        try:
            wait_for(lambda: len(first.peers()) == 1 and sending_generations(first.vpp)
                     == {before + 1}, 15, "node1 to send to node2 again, one generation on")
            assert pair_keys_match(first, back)
            # node2's VPP kept its SAs: it goes on under the generation it was sending on.
            assert sending_generations(back.vpp) == {before}
            assert (tmp_path / "node2.key").read_text() == key
            again = next(r for r in store.snapshot().records if r.name == "node2")
            assert again.value == record.value  # same record: same key, same number
            assert first.agent.blocked == [] and back.agent.blocked == []
        finally:
            back.stop()
    finally:
        first.stop()


def test_vpp_restart_is_healed_by_a_generation_step(store: EtcdStore, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """node1's VPP loses its SAs: node1 sends under its next generation, which node2
    already accepts; node2 changes nothing, no key and no record changes."""
    mesh, secrets = make_mesh(2, tunnels=2)
    store.seed_settings(mesh.settings)
    a = Member(store.url, mesh, secrets, "node1", tmp_path, ttl=30)
    b = Member(store.url, mesh, secrets, "node2", tmp_path, ttl=30)
    for m in (a, b):
        m.thread.start()
    try:
        wait_for(lambda: a.peers() == {b.number} and b.peers() == {a.number}
                 and pair_keys_match(a, b), 15, "mesh")
        key = (tmp_path / "node1.key").read_text()
        records = {r.name: r.value for r in store.snapshot().records}
        (before,) = sending_generations(a.vpp)
        caplog.set_level(logging.INFO, logger="vppmesh.agent.datastore")
        b_state = copy.deepcopy((b.vpp.tunnels, b.vpp.sas, b.vpp.protections))
        # node1's VPP restarts: empty, same uplink.
        fresh = FakeVpp.with_uplink(mesh.node("node1").primary)
        a.vpp = fresh
        a.agent.api = fresh
        a.agent.changed.set()
        wait_for(lambda: a.peers() == {b.number} and len(fresh.protections) == 2, 15,
                 "node1 meshed again")
        assert sending_generations(fresh) == {before + 1}
        assert pair_keys_match(a, b)
        # node2 held node1's next generation already: its VPP is exactly as it was.
        assert (b.vpp.tunnels, b.vpp.sas, b.vpp.protections) == b_state
        assert (tmp_path / "node1.key").read_text() == key
        assert {r.name: r.value for r in store.snapshot().records} == records
        assert a.agent.blocked == []
        assert any(r.name == "vppmesh.agent.datastore" and r.getMessage() ==
                   f"node2: outbound generation {before} -> {before + 1} (key already used "
                   "(VPP lost its SAs))" for r in caplog.records), caplog.text
    finally:
        for m in (a, b):
            m.stop()


def test_a_rotated_key_takes_its_record_over_with_the_previous_key(store: EtcdStore) -> None:
    """A node key rotation in datastore mode: the agent restarted with its new key (and
    KEY.previous) registers under its name; the record moves to the new key, and a
    host that does not name the registered key as its previous one is still refused."""
    mesh, _ = make_mesh(2, tunnels=1)
    n1, n2 = mesh.nodes
    store.seed_settings(mesh.settings)
    store.register(n1, store.grant(30))
    rotated = n1.model_copy(update={"public_key": n2.public_key})
    with pytest.raises(RegistrationError, match="another public key"):
        store.register(rotated, store.grant(30))
    store.register(rotated, store.grant(30), previous_key=n1.public_key)
    membership = assemble(store.settings(store.snapshot()), store.snapshot().records,
                          store.snapshot().numbers)
    assert membership.mesh is not None
    assert membership.mesh.node("node1").public_key == n2.public_key


def test_a_key_rotated_on_disk_moves_the_record_without_an_agent_restart(
        store: EtcdStore, tmp_path: Path) -> None:
    """`vppmesh keygen --rotate` while the datastore agent runs: the agent registers its
    record again under the new key at its next run, under the same lease (no second one for
    the keepalive to miss), and the peer follows: its tunnels to the node stay."""
    mesh, secrets = make_mesh(2, tunnels=1)
    store.seed_settings(mesh.settings)
    members = [Member(store.url, mesh, secrets, f"node{i}", tmp_path) for i in (1, 2)]
    for m in members:
        m.thread.start()
    try:
        a, b = members
        wait_for(lambda: a.peers() == {b.number} and b.peers() == {a.number}, 15,
                 "node1 and node2 to mesh")
        lease = a.agent.registration.lease.id  # type: ignore[union-attr]
        old = next(r for r in store.snapshot().records if r.name == "node1").value
        new_key = rotate_private_key(tmp_path / "node1.key")
        a.agent.changed.set()

        def moved() -> bool:
            record = next(r for r in store.snapshot().records if r.name == "node1")
            return record.value != old and new_key in record.value.decode()

        wait_for(moved, 15, "node1's record to carry its new key")
        record = next(r for r in store.snapshot().records if r.name == "node1")
        assert record.lease == lease == a.agent.registration.lease.id  # type: ignore[union-attr]
        assert b.peers() == {a.number} and a.peers() == {b.number}
    finally:
        for m in members:
            m.stop()
