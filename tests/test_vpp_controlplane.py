"""The pipelined control plane against one real VPP: 200 peers x 4 tunnels programmed,
then every object checked with dumps; one peer joining and leaving from the remembered
state; batch errors and a failure half-way through a pipelined reconcile.

Skipped with the reason when no VPP binary is found or when not root.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretBytes

from benchmarks.controlplane import give_uplink, plan_for, synthetic_mesh, with_nodes
from vppmesh.agent.node import Agent, NodeOptions
from vppmesh.config import dump_mesh
from vppmesh.dataplane.reconcile import Reconciler, observe
from vppmesh.dataplane.state import GATEWAY_TAG, SaSpec, is_owned_sa_id, is_owned_tunnel_instance
from vppmesh.dataplane.vpp import host_interfaces, interfaces, ipip, ipsec, routes
from vppmesh.dataplane.vpp.client import Request, VppClient
from vppmesh.errors import VppApiError
from vppmesh.keying.keys import private_key_b64, write_secret_file
from vppmesh.lab.testbed import in_ns, single_vpp
from vppmesh.ops import verify
from vppmesh.testing import vpp_helpers
from vppmesh.testing.observed import summary
from vppmesh.testing.vpp_helpers import record_raw_replies, require_vpp

pytestmark = [pytest.mark.vpp]
NETNS = "vmc-it"
RUN_DIR = Path("/run/vppmesh-vmc/itest")
PEERS = 200
TUNNELS = 4


@pytest.fixture(scope="module")
def api() -> Iterator[VppClient]:
    require_vpp()
    with single_vpp(NETNS, RUN_DIR) as instance, \
            VppClient(instance.api_socket, timeout=30).connect() as client:
        yield client


@pytest.fixture(scope="module")
def mesh():  # type: ignore[no-untyped-def]
    return synthetic_mesh(PEERS, TUNNELS)


@pytest.fixture(scope="module")
def programmed(api: VppClient, mesh) -> Reconciler:  # type: ignore[no-untyped-def]
    full, secrets = mesh
    give_uplink(api, full.node("n1").primary)
    reconciler = Reconciler(api)
    desired = plan_for(with_nodes(full, full.nodes[:-1]), secrets, 0)
    changes = reconciler.reconcile(desired)
    assert len(changes) > PEERS * TUNNELS * 3
    return reconciler


def test_every_object_of_200_peers_is_in_vpp_and_correct(
        api: VppClient, programmed: Reconciler, mesh) -> None:  # type: ignore[no-untyped-def]
    full, secrets = mesh
    desired = plan_for(with_nodes(full, full.nodes[:-1]), secrets, 0)
    ifaces = {i.sw_if_index: i for i in interfaces.dump_interfaces(api)}
    gateway = next(i for i in ifaces.values() if i.tag == GATEWAY_TAG)
    tunnels = {t.instance: t for t in ipip.dump_tunnels(api)
               if is_owned_tunnel_instance(t.instance)}
    sas = {s.spec.sa_id: s for s in ipsec.dump_sas(api) if is_owned_sa_id(s.spec.sa_id)}
    protections = ipsec.dump_protections(api)
    unnumbered = interfaces.dump_unnumbered(api)
    table = routes.dump_routes(api, desired.table_id)

    assert len(tunnels) == PEERS * TUNNELS and len(sas) == 2 * PEERS * TUNNELS
    for want in desired.sas:
        seen = sas[want.sa_id]
        assert seen.spec.same_content(want), f"SA {want.sa_id:#x}"
        assert seen.flags == ipsec.SA_FLAGS
        assert seen.crypto_algorithm == ipsec.CRYPTO_AES_GCM_256
    for want in desired.tunnels:
        seen_tunnel = tunnels[want.instance]
        index = seen_tunnel.sw_if_index
        assert (seen_tunnel.src, seen_tunnel.dst) == (want.src, want.dst)
        assert ifaces[index].admin_up and ifaces[index].mtu == desired.mtu, want.name
        assert unnumbered[index] == gateway.sw_if_index
        out, inbound = protections[index]
        assert out == want.sa_out and sorted(inbound) == sorted(want.sa_in)
    for want in desired.routes:
        paths = table[want.prefix]
        assert sorted(paths) == sorted(tunnels[i].sw_if_index for i in want.tunnels)
    # What the Reconciler remembers is exactly what the dumps say.
    assert summary(programmed._observed) == summary(observe(api, desired))  # type: ignore[arg-type]
    assert Reconciler(api).reconcile(desired, dry_run=True) == []


def test_one_peer_joins_and_leaves_without_dumps(
        api: VppClient, programmed: Reconciler, mesh) -> None:  # type: ignore[no-untyped-def]
    full, secrets = mesh
    joined = plan_for(full, secrets, 0)
    left = plan_for(with_nodes(full, [n for n in full.nodes if n.name != "n2"]), secrets, 0)
    for desired, peer in ((joined, PEERS + 2), (left, 2)):
        before = api.messages_sent
        changes = programmed.reconcile(desired)
        assert programmed.last_scope == {peer}
        assert changes
        # Only the peer's own messages: SAs, tunnels, protection, admin, one route.
        assert api.messages_sent - before <= 2 * TUNNELS + 6 * TUNNELS + 1
        assert Reconciler(api).reconcile(desired, dry_run=True) == []
    assert summary(programmed._observed) == summary(observe(api, left))  # type: ignore[arg-type]


def test_fast_decoders_match_vpp_papi_on_every_dump(
        api: VppClient, programmed: Reconciler, mesh,  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch) -> None:
    full, secrets = mesh
    channel = vpp_helpers.channel_of(api)
    raws = record_raw_replies(channel, monkeypatch)
    observe(api, plan_for(full, secrets, 0))
    kinds = {type(channel.reference_decode(r)).__name__ for r in raws}
    assert {"ipsec_sa_v5_details", "ip_route_details", "sw_interface_details",
            "ipip_tunnel_details", "ipsec_tunnel_protect_details"} <= kinds
    vpp_helpers.assert_decodes_like_papi(channel, raws)


def every_request_kind(desired) -> list[Request]:  # type: ignore[no-untyped-def]
    """One of each request the controller builds (from vppmesh/dataplane/vpp/*)."""
    tunnel, net, ip = desired.tunnels[0], desired.routes[0].prefix, desired.routes[0].prefix[1]
    return [
        ipsec.add_sa(desired.sas[0]), ipsec.del_sa(5), ipsec.bind_sa(1, 0),
        ipsec.protect(3, 1, (2, 3)), ipsec.unprotect(3), ipsec.set_async_mode(True),
        ipip.add_tunnel(tunnel.instance, tunnel.src, tunnel.dst), ipip.del_tunnel(4),
        interfaces.set_admin(3, True), interfaces.set_mtu(3, 1440),
        interfaces.set_table(3, 1717), interfaces.set_unnumbered(3, 2),
        interfaces.set_tag(3, GATEWAY_TAG), interfaces.address(3, desired.uplink_addresses[0],
                                                               True),
        interfaces.create_loopback("02:fe:00:00:00:00"), interfaces.delete_loopback(3),
        interfaces.gso_feature(3, True), interfaces.set_rx_mode(3, interfaces.RX_MODE_ADAPTIVE),
        routes.table(1717, True),
        routes.route(1717, net, [3, 4, 5, 6], True), routes.route(1717, net, [], False),
        routes.route(1717, ipaddress.ip_network(f"{ip}/32"), [3], True, nexthop=ip),
        routes.neighbor(3, ip, "02:fe:00:01:00:02", True),
        host_interfaces.create_af_packet("eth0", "02:fe:ee:00:00:01"),
        host_interfaces.delete_af_packet("eth0"),
        host_interfaces.create_tap("vppmesh0", "02:fe:00:01:00:01", "02:fe:00:01:00:02",
                                   1440, 2, "ns", "vppmesh:host"),
        Request("cli_inband", {"cmd": "show version"}),
        verify.pcap_on(1, "/tmp/vppmesh.pcap", 100), verify.pcap_off(),
    ]


def test_compiled_encoders_give_vpp_papis_bytes_for_every_request(
        api: VppClient, mesh) -> None:  # type: ignore[no-untyped-def]
    full, secrets = mesh
    channel = vpp_helpers.channel_of(api)
    requests = every_request_kind(plan_for(full, secrets, 0))
    vpp_helpers.assert_encodes_like_papi(channel, requests)
    compiled = sum(channel.message_type(r.name).encoder is not None for r in requests)
    assert compiled >= 20  # all but the few with variable-length strings


def test_receive_modes_are_as_the_fake_keeps_them(api: VppClient) -> None:
    """af_packet starts in interrupt mode, takes polling and interrupt, and refuses adaptive
    (endpoint taps get adaptive: docs/vm.md runs those)."""
    def mode() -> str:
        return vpp_helpers.rx_modes(api, "host-vmcrx0")[0]

    in_ns(NETNS, "ip", "link", "add", "vmcrx0", "type", "veth", "peer", "name", "vmcrx1")
    index = api.call(host_interfaces.create_af_packet("vmcrx0", "02:fe:00:00:0e:01")).sw_if_index
    try:
        assert mode() == "interrupt"
        api.call(interfaces.set_rx_mode(index, interfaces.RX_MODE_POLLING, "rx"))
        assert mode() == "polling"
        with pytest.raises(VppApiError, match="sw_interface_set_rx_mode") as refused:
            api.call(interfaces.set_rx_mode(index, interfaces.RX_MODE_ADAPTIVE, "rx"))
        assert refused.value.retval == -9
        api.call(interfaces.set_rx_mode(index, interfaces.RX_MODE_INTERRUPT, "rx"))
        assert mode() == "interrupt"
    finally:
        api.call(host_interfaces.delete_af_packet("vmcrx0"))


def test_a_failed_request_in_a_batch_is_named_and_the_batch_is_complete(
        api: VppClient) -> None:
    missing = [0x4FFF_0000 + i for i in range(3)]
    with pytest.raises(VppApiError) as err:
        api.call_many([ipsec.bind_sa(s, 0) for s in missing])
    assert f"SA {missing[0]:#x}" in str(err.value)
    assert "2 more in the same batch" in str(err.value)
    # No reply of that batch is left behind: the next call gets its own answer.
    assert api.call(Request("show_version", {}, "version")).version


def test_key_bytes_never_reach_an_error(api: VppClient) -> None:
    key = bytes(range(32))
    sa = SaSpec(sa_id=0x4FFF_0100, spi=0x0100_FFFF, key=SecretBytes(key), salt=1,
                anti_replay_window=64)
    bad = ipsec.add_sa(sa)
    bad.args["entry"]["spi"] = "not a number"  # cannot be encoded
    with pytest.raises(VppApiError) as err:
        api.call_many([bad])
    text = str(err.value) + repr(err.value)
    assert "could not be encoded" in text and f"SA {sa.sa_id:#x}" in text
    assert key.hex() not in text and repr(key) not in text and str(list(key)) not in text


def test_failure_half_way_leaves_new_tunnels_down_and_next_run_converges(
        api: VppClient, mesh) -> None:  # type: ignore[no-untyped-def]
    full, secrets = mesh
    extra = [n for n in full.nodes if n.name != "n2"]
    desired = plan_for(with_nodes(full, extra[:50]), secrets, 0)  # a fresh start below
    Reconciler(api).reconcile(desired)
    # An operator's tunnel holds the same ends as one the mesh wants next: VPP refuses
    # the mesh's tunnel, in the middle of a pipelined batch.
    grown = plan_for(with_nodes(full, extra[:60]), secrets, 0)
    clash = grown.tunnels[-2]
    operator = api.call(ipip.add_tunnel(7, clash.src, clash.dst)).sw_if_index
    with pytest.raises(VppApiError, match=f"ipip_add_tunnel.*{clash.name}"):
        Reconciler(api).reconcile(grown)
    ifaces = {i.sw_if_index: i for i in interfaces.dump_interfaces(api)}
    protections = ipsec.dump_protections(api)
    new_peers = {t.peer_number for t in grown.tunnels} - {t.peer_number for t in desired.tunnels}
    created = [t for t in ipip.dump_tunnels(api)
               if is_owned_tunnel_instance(t.instance) and t.instance // 100 % 1_000_000
               in new_peers]
    assert created, "the other tunnels of the batch were created"
    for tunnel in created:
        assert not ifaces[tunnel.sw_if_index].admin_up, "an unprotected tunnel is up"
        assert tunnel.sw_if_index not in protections
    api.call(ipip.del_tunnel(operator, "ipip7"))
    Reconciler(api).reconcile(grown)
    assert Reconciler(api).reconcile(grown, dry_run=True) == []
    held = {ipaddress.ip_network(p) for p in routes.dump_routes(api, grown.table_id)}
    assert {r.prefix for r in grown.routes} <= held


def test_watch_session_applies_a_joining_peer_from_the_mesh_file(
        api: VppClient, mesh, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    full, secrets = mesh
    nodes = [n for n in full.nodes if n.name != "n2"]
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(dump_mesh(with_nodes(full, nodes[:60])))
    key = tmp_path / "n1.key"
    write_secret_file(key, private_key_b64(secrets.private_key))
    options = NodeOptions(mesh_file=mesh_file, node="n1", private_key=key,
                          api_socket=RUN_DIR / "api.sock", host_link="none", workers=0,
                          state_dir=tmp_path)
    session = Agent(options)
    try:
        session.run()  # dumps, and finishes whatever the last test left
        mesh_file.write_text(dump_mesh(with_nodes(full, nodes[:61])))
        result = session.run()
        assert {c.target.split()[0] for c in result.changes if c.kind == "tunnel"} == \
            {f"ipip{t.instance}" for t in result.desired.tunnels
             if t.peer_number == nodes[60].node_number}
        # Only the joining peer was compared and applied, from the remembered state.
        assert session._reconciler is not None
        assert session._reconciler.last_scope == {nodes[60].node_number}
        assert Reconciler(api).reconcile(result.desired, dry_run=True) == []
    finally:
        session.close()
