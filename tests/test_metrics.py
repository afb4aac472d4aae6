"""Agent metrics without VPP: the fast exposition writes exactly what the client library
writes, counters survive SA replacement, key limits and rekeys are computed from what
VPP and the generation file say, and the endpoint serves what the official parser reads.
The real-VPP metrics test (tests/test_operations_vpp.py) scrapes a live agent."""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from vppmesh.errors import ConfigError
from vppmesh.keying.epochs import GenerationState, PeerGenerations
from vppmesh.ops.metrics import (
    AgentMetrics,
    MeshCollector,
    MetricsServer,
    MetricsTls,
    Observer,
    PeerSample,
    Snapshot,
    TunnelSample,
    families,
    parse_listen,
)
from vppmesh.ops.status import NodeStatus, PeerStatus, SaStatus, TunnelStatus
from vppmesh.testing.meshes import make_mesh
from vppmesh.testing.pki import make_pki


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in families(text) for s in f.samples}


def test_fast_exposition_is_byte_for_byte_the_librarys() -> None:
    collector = MeshCollector()
    collector.update(Snapshot(
        tunnels=(TunnelSample('odd"peer\\name', 0, True, False, 5, 600, 7, 800),
                 TunnelSample("n3", 3, False, True, 0, 0, 2**60, 3)),
        peers=(PeerSample("n2", 3, 1, (0.1, 1 / 3, 1e-9), (True, False)),
               PeerSample("n3", 0, 0, (0, 0, 0), (False, True))),
        esp_errors=(("replay", 3), ("decryption_failed", 0), ("no_matching_tunnel", 1)),
        guard_drops=4))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    assert collector.render() == generate_latest(registry).decode()
    assert collector.text() == collector.render().encode()  # what scrapes are served
    empty = MeshCollector()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(empty)
    assert empty.render() == generate_latest(registry).decode()


def sa(sa_id: int, direction: str, packets: int, seq: int = 0) -> SaStatus:
    return SaStatus(sa_id=sa_id, spi=sa_id, direction=direction, packets=packets,
                    bytes=packets * 100, thread=0, seq=seq)


def status(out: SaStatus, ins: list[SaStatus], up: bool = True) -> NodeStatus:
    tunnel = TunnelStatus(name="ipip1", index=0, src="a", dst="b", admin_up=up,
                          protected=True, sa_out=out, sa_in=ins)
    return NodeStatus(node="node1", vpp_version="26.06", workers=0, host_link=None,
                      peers=[PeerStatus(name="node2", node_number=2, tunnels=[tunnel])],
                      missing_peers=[])


def generations(out: int, since: float) -> GenerationState:
    return GenerationState(peers={"node2": PeerGenerations(
        public_key="k", out=out, out_since=since, floor=0, in_base=0)})


def test_counters_grow_across_rekeys_and_vpp_restarts() -> None:
    mesh, _ = make_mesh(2, key_max_packets=2000, key_max_seconds=100,
                        rekey_interval=0)
    observer = Observer()
    first = observer.snapshot(status(sa(1, "out", 10, seq=10), [sa(2, "in", 20)]), mesh,
                              generations(0, 0.0), None, vpp_pid=7, now=50.0)
    (t,) = first.tunnels
    assert (t.out_packets, t.in_packets, t.out_bytes) == (10, 20, 1000)
    (p,) = first.peers
    assert p.generation == 0 and p.rekeys == 0
    assert p.limits[0] == pytest.approx(10 / 2000) and p.limits[2] == pytest.approx(0.5)
    assert p.limits[1] == pytest.approx(10 * mesh.settings.underlay_mtu
                                        / mesh.settings.key_max_bytes)
    # Rekey: the outbound SA is replaced and starts again at 0; generation 0 -> 1.
    second = observer.snapshot(status(sa(3, "out", 4, seq=4), [sa(2, "in", 25)]), mesh,
                               generations(1, 60.0), None, vpp_pid=7, now=61.0)
    (t,) = second.tunnels
    assert (t.out_packets, t.in_packets) == (14, 25)
    assert second.peers[0].rekeys == 1 and second.peers[0].generation == 1
    assert second.peers[0].limits[0] == pytest.approx(4 / 2000)
    # VPP restarted (new pid): the same SA ids are new SAs; nothing is lost or doubled.
    third = observer.snapshot(status(sa(3, "out", 1), [sa(2, "in", 2)]), mesh,
                              generations(2, 70.0), None, vpp_pid=8, now=71.0)
    (t,) = third.tunnels
    assert (t.out_packets, t.in_packets) == (15, 27)
    assert third.peers[0].rekeys == 2


def test_vpp_error_counters_by_reason() -> None:
    mesh, _ = make_mesh(2)
    errors = {"/err/esp4-decrypt-tun/replay": 10, "/err/esp6-decrypt-tun/replay": 1,
              "/err/esp4-decrypt-tun/decryption_failed": 5,
              "/err/ipsec4-tun-input/no_tunnel": 3, "/err/ipsec4-tun-input/Too Short": 9,
              "/err/ip4-inacl/input ACL hits": 4}
    snap = Observer().snapshot(status(sa(1, "out", 1), []), mesh, generations(0, 0), errors,
                               vpp_pid=1, now=1.0)
    assert dict(snap.esp_errors) == {"replay": 11, "decryption_failed": 5,
                                     "no_matching_tunnel": 3}
    assert snap.guard_drops == 4


def test_forward_secrecy_per_peer_and_direction_from_the_generation_file() -> None:
    """vppmesh_peer_forward_secret: 1 where the generation in use is one the agents
    agreed (ephemeral_out / ephemeral_in), 0 where its keys are the static schedule's."""
    mesh, _ = make_mesh(3)
    state = GenerationState(peers={
        "node2": PeerGenerations(public_key="k", out=2, out_since=0.0, floor=0, in_base=1,
                                 ephemeral_out=[1, 2], ephemeral_in=[1]),
        "node3": PeerGenerations(public_key="k", out=1, out_since=0.0, floor=0, in_base=0,
                                 in_seen=1, ephemeral_out=[1], ephemeral_in=[0]),
        "node4": PeerGenerations(public_key="k", out=0, out_since=0.0, floor=0, in_base=0)})
    snap = Observer().snapshot(status(sa(1, "out", 1), []), mesh, state, None, vpp_pid=1,
                               now=1.0)
    collector = MeshCollector()
    collector.update(snap)
    got = {labels: value for (name, labels), value in samples(collector.text().decode())
           .items() if name == "vppmesh_peer_forward_secret"}
    assert got == {
        (("direction", "outbound"), ("peer", "node2")): 1,
        (("direction", "inbound"), ("peer", "node2")): 1,
        (("direction", "outbound"), ("peer", "node3")): 1,
        (("direction", "inbound"), ("peer", "node3")): 0,  # arriving on 1, agreed only 0
        (("direction", "outbound"), ("peer", "node4")): 0,
        (("direction", "inbound"), ("peer", "node4")): 0}


def test_stalled_agreement_and_stopped_pairs_per_peer() -> None:
    """vppmesh_key_age_seconds, vppmesh_key_agreement_pending_seconds and
    vppmesh_peer_stopped from the generation file: a stalled agreement and a stopped pair
    show, a healthy pair reads 0; both expositions agree."""
    mesh, _ = make_mesh(3)
    state = GenerationState(peers={
        "node2": PeerGenerations(public_key="k", out=2, out_since=100.0, floor=0, in_base=1,
                                 agreeing_since=400.0),
        "node3": PeerGenerations(public_key="k", out=1, out_since=900.0, floor=0, in_base=0,
                                 stopped_since=950.0, stopped_why="key limit")})
    snap = Observer().snapshot(status(sa(1, "out", 1), []), mesh, state, None, vpp_pid=1,
                               now=1000.0)
    collector = MeshCollector()
    collector.update(snap)
    got = {(name, labels): value for (name, labels), value
           in samples(collector.text().decode()).items()
           if name in ("vppmesh_key_age_seconds", "vppmesh_key_agreement_pending_seconds",
                       "vppmesh_peer_stopped")}
    node2, node3 = (("peer", "node2"),), (("peer", "node3"),)
    assert got == {("vppmesh_key_age_seconds", node2): 900,
                   ("vppmesh_key_age_seconds", node3): 100,
                   ("vppmesh_key_agreement_pending_seconds", node2): 600,
                   ("vppmesh_key_agreement_pending_seconds", node3): 0,
                   ("vppmesh_peer_stopped", node2): 0, ("vppmesh_peer_stopped", node3): 1}
    registry = CollectorRegistry()
    registry.register(collector)
    assert collector.render() == generate_latest(registry).decode()


def test_channel_counters_drops_by_reason_sessions_and_up(tmp_path: Path) -> None:
    """The channel's counters from a real Secrecy whose endpoint is a real Channel fed a
    handshake, one message and hostile datagrams, through Loop.measured: every
    drop reason present (0 when none), and the totals never fall when the endpoint is
    replaced (its counters start again)."""
    from collections import Counter as Tally

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from vppmesh.agent.loop import Loop
    from vppmesh.agent.secrecy import Secrecy
    from vppmesh.channel import messages as m
    from vppmesh.channel import session as s
    from vppmesh.channel.endpoint import ChannelEndpoint
    from vppmesh.channel.noise import public_bytes
    from vppmesh.keying.keys import NodeSecrets

    keys = {1: X25519PrivateKey.generate(), 2: X25519PrivateKey.generate()}
    where = {1: ("192.0.2.1", 4501), 2: ("192.0.2.2", 4501)}

    def channel(me: int, other: int) -> s.Channel:
        return s.Channel(me, NodeSecrets(keys[me], bytes(32)),
                         [s.PeerConfig(other, public_bytes(keys[other]), where[other])],
                         boot_id=me)

    def endpoint(ours: s.Channel) -> ChannelEndpoint:
        transport = SimpleNamespace(drops=Tally(), sent=0, received=0, send_errors=0,
                                    keepalives=0)
        return ChannelEndpoint(ours, transport, {})  # type: ignore[arg-type]

    peer, ours = channel(1, 2), channel(2, 1)
    ((_, init),) = peer.tick(1000.0).datagrams
    ((_, response), *_) = ours.receive(1000.0, where[1], init).datagrams
    peer.receive(1000.0, where[2], response)
    ((_, message),) = peer.send(1001.0, 2, m.Keepalive()).datagrams
    ((_, later),) = peer.send(1001.0, 2, m.Keepalive()).datagrams
    ours.receive(1001.0, where[1], message)
    ours.receive(1001.0, where[1], message)  # replayed
    ours.receive(1001.0, where[1], later[:-1] + bytes([later[-1] ^ 1]))  # forged
    ours.receive(1001.0, where[1], message[:3])  # truncated
    clock = SimpleNamespace(now=1001.0)
    secrecy = Secrecy(tmp_path / "channel.sock", clock=lambda: clock.now)
    metrics = AgentMetrics()
    loop = Loop(SimpleNamespace(secrecy=secrecy, client=None),  # type: ignore[arg-type]
                     SimpleNamespace(), metrics=metrics)  # type: ignore[arg-type]
    result = SimpleNamespace(pod_report=None, mesh=None, downgraded_peers=[], stopped_peers={},
                             blocked_peers=[])

    def channel_samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        loop.measured(result, 0.01, restarted=False)  # type: ignore[arg-type]
        return {key: value for key, value in samples(metrics.exposition().decode()).items()
                if key[0].startswith("vppmesh_channel_") and not key[0].endswith("_created")}

    assert channel_samples() == {  # no channel: no punt registration
        ("vppmesh_channel_up", ()): 0, ("vppmesh_channel_sessions", ()): 0,
        **{("vppmesh_channel_psk_sessions", (("psk", r),)): 0
           for r in ("current", "next", "previous")},
        **{("vppmesh_channel_key_sessions", (("key", r),)): 0 for r in ("current", "previous")},
        ("vppmesh_channel_previous_key_unvouched_total", ()): 0,
        ("vppmesh_channel_handshakes_total", ()): 0,
        ("vppmesh_channel_messages_sent_total", ()): 0,
        ("vppmesh_channel_messages_received_total", ()): 0,
        ("vppmesh_channel_nat_keepalives_total", ()): 0,
        **{("vppmesh_channel_path_datagrams_total", (("path", p),)): 0
           for p in ("underlay", "tunnel")},
        ("vppmesh_channel_nat_probes_total", ()): 0,
        **{("vppmesh_channel_dropped_total", (("reason", r.value),)): 0 for r in m.Drop}}
    secrecy.endpoint = endpoint(ours)
    secrecy.endpoint.transport.drops[m.Drop.OVERSIZED] = 2  # dropped before the session
    first = channel_samples()
    assert first[("vppmesh_channel_up", ())] == 1
    assert first[("vppmesh_channel_sessions", ())] == 1
    assert first[("vppmesh_channel_psk_sessions", (("psk", "current"),))] == 1
    assert first[("vppmesh_channel_psk_sessions", (("psk", "next"),))] == 0
    assert first[("vppmesh_channel_key_sessions", (("key", "current"),))] == 1
    assert first[("vppmesh_channel_key_sessions", (("key", "previous"),))] == 0
    assert first[("vppmesh_channel_handshakes_total", ())] == 1
    assert first[("vppmesh_channel_messages_received_total", ())] == 1
    assert first[("vppmesh_channel_messages_sent_total", ())] == ours.stats["sent"]
    dropped = {labels[0][1]: value for (name, labels), value in first.items()
               if name == "vppmesh_channel_dropped_total"}
    assert dropped == {**{r.value: 0 for r in m.Drop},
                       "oversized": 2, "replay": 1, "auth": 1, "truncated": 1}
    assert channel_samples() == first  # nothing new: nothing counted twice
    clock.now += s.REJECT_AFTER  # the peer's agent went quiet: its session expired
    assert channel_samples()[("vppmesh_channel_sessions", ())] == 0
    clock.now = 1001.0

    secrecy.endpoint = endpoint(channel(2, 1))  # a new endpoint: its counters start at 0
    secrecy.endpoint.channel.receive(1002.0, where[1], message[:3])
    after = channel_samples()
    assert after[("vppmesh_channel_sessions", ())] == 0
    assert after[("vppmesh_channel_dropped_total", (("reason", "truncated"),))] == 2
    assert after[("vppmesh_channel_dropped_total", (("reason", "replay"),))] == 1
    assert after[("vppmesh_channel_handshakes_total", ())] == 1


def test_endpoint_serves_what_the_official_parser_reads() -> None:
    metrics = AgentMetrics()
    metrics.reconcile_seconds.observe(0.12)
    metrics.pods_attached.set(3)
    metrics.mesh.update(Snapshot(
        tunnels=(TunnelSample("node2", 0, True, True, 5, 500, 6, 600),),
        peers=(PeerSample("node2", 2, 1, (0.5, 0.1, 0.2)),),
        esp_errors=(("replay", 2),), guard_drops=0))
    server = MetricsServer(metrics, ("127.0.0.1", 0)).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics",
                                    timeout=5) as reply:
            assert reply.headers["Content-Type"].startswith("text/plain")
            text = reply.read().decode()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=5)
    finally:
        server.stop()
    got = samples(text)
    tunnel = (("direction", "out"), ("peer", "node2"), ("tunnel", "0"))
    assert got[("vppmesh_tunnel_packets_total", tunnel)] == 5
    assert got[("vppmesh_tunnel_protected", (("peer", "node2"), ("tunnel", "0")))] == 1
    assert got[("vppmesh_key_limit_used_ratio", (("limit", "packets"), ("peer", "node2")))] \
        == 0.5
    assert got[("vppmesh_esp_errors_total", (("reason", "replay"),))] == 2
    assert got[("vppmesh_reconcile_duration_seconds_count", ())] == 1
    assert got[("vppmesh_pods_attached", ())] == 3
    names = {f.name for f in families(text)}
    for name in ("vppmesh_reconcile_errors", "vppmesh_vpp_restarts",
                 "vppmesh_vpp_recovery_seconds", "vppmesh_rekeys",
                 "vppmesh_guard_dropped_packets", "vppmesh_key_generation"):
        assert name in names, name
    # Conventions: every name prefixed; counters end in _total.
    for f in families(text):
        assert f.name.startswith("vppmesh_")
        if f.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in f.samples)


@pytest.mark.parametrize(("value", "expected"), [
    (":9477", ("0.0.0.0", 9477)), ("127.0.0.1:80", ("127.0.0.1", 80)),
    ("[::1]:9477", ("::1", 9477))])
def test_listen_addresses(value: str, expected: Any) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["9477", "host:", "host:http", ":70000"])
def test_bad_listen_address_names_the_option(value: str) -> None:
    with pytest.raises(ConfigError, match="--metrics"):
        parse_listen(value)


def test_busy_port_is_a_clear_error() -> None:
    first = MetricsServer(AgentMetrics(), ("127.0.0.1", 0))
    try:
        with pytest.raises(ConfigError, match="cannot listen"):
            MetricsServer(AgentMetrics(), ("127.0.0.1", first.port))
    finally:
        first.server.server_close()


def test_scrape_benchmark_runs_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.metrics_scrape import main

    assert main(["--peers", "3", "--tunnels", "2", "--rounds", "3"]) == 0
    out = capsys.readouterr().out
    assert "3 peers x 2 tunnels:" in out
    for what in ("exposition", "text at each snapshot", "scrape", "library generate_latest",
                 "snapshot"):
        assert what in out, what


def scripted_session(outcomes: list[Any], ticks: list[float],
                     failures: dict[str, Exception], pods: Any) -> type:
    """A stand-in for node.Agent under watch.watch_loop: each run takes the next of
    `outcomes` (one named in `failures` raises that error, any other succeeds with
    `pods`), notes its time in `ticks`; the last one ends the loop (KeyboardInterrupt).
    Like the Agent, it tells its hooks once that VPP is gone, until a run succeeds.
    Its Secrecy is never attached: no VPP to punt the channel."""
    from vppmesh.errors import VppUnavailableError

    class ScriptedSession:
        client = None

        def __init__(self, options: Any, **kwargs: Any) -> None:
            self.secrecy = kwargs["secrecy"]
            self.hooks: list[Any] = []
            self.gone = False

        def close(self) -> None:
            pass

        def run(self) -> Any:
            ticks.append(time.monotonic())
            outcome = outcomes.pop(0)
            if outcome in failures:
                error = failures[outcome]
                if isinstance(error, VppUnavailableError) and not self.gone:
                    self.gone = True
                    for hook in self.hooks:
                        hook.on_vpp_gone(str(error))
                raise error
            self.gone = False
            if not outcomes:
                raise KeyboardInterrupt  # end of the script
            return SimpleNamespace(vpp_pid=len(ticks), seconds=0.01, changes=[], notes=[],
                                   downgraded_peers=[], stopped_peers={}, blocked_peers=[],
                                   pod_report=pods, mesh=None)

    return ScriptedSession


def test_watch_loop_knocks_fast_while_vpp_is_away_and_counts_the_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watch loop (watch.watch_loop) with a Agent whose VPP goes away for two polls:
    it retries at WATCH_VPP_RETRY_SECONDS instead of the 2 s poll, and the metrics count
    one restart with its unavailability and recovery time."""
    from vppmesh.agent import loop as watch
    from vppmesh.agent import node
    from vppmesh.cni.reattach import PodReport
    from vppmesh.errors import VppUnavailableError

    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text("")
    outcomes: list[Any] = ["ok", "gone", "gone", "ok", "ok"]
    ticks: list[float] = []

    monkeypatch.setattr(node, "Agent", scripted_session(
        outcomes, ticks, {"gone": VppUnavailableError("VPP stopped answering")},
        PodReport(attached=2, reattached=["a", "b"])))
    monkeypatch.setattr(watch, "WATCH_POLL_SECONDS", 1.0)
    monkeypatch.setattr(watch, "give_back_uplinks", lambda opts: None)
    metrics = AgentMetrics()
    options = node.NodeOptions(mesh_file=mesh_file, node="n1", private_key=tmp_path / "k")
    with pytest.raises(KeyboardInterrupt):
        watch.watch_loop(options, metrics)
    gaps = [b - a for a, b in pairwise(ticks)]
    assert gaps[0] >= 0.9  # a normal poll interval
    assert all(g < 0.6 for g in gaps[1:3])  # VPP away: knocking every 0.25 s
    assert gaps[3] >= 0.9  # back to normal
    got = samples(metrics.exposition().decode())
    assert got[("vppmesh_vpp_restarts_total", ())] == 1
    assert got[("vppmesh_vpp_up", ())] == 1
    assert 0.2 < got[("vppmesh_vpp_unavailable_seconds", ())] < 1.5
    assert got[("vppmesh_pod_reattachments_total", ())] == 4  # 2 per successful poll
    assert got[("vppmesh_channel_up", ())] == 0  # the loop's Secrecy never met a VPP


def test_snapshots_are_spaced_by_their_cost() -> None:
    """A snapshot at most every 5 s, and never more than 1/20 of the agent's time."""
    metrics = AgentMetrics()
    assert metrics.snapshot_due(100.0)
    assert not metrics.snapshot_due(104.0) and metrics.snapshot_due(105.0)
    metrics.snapshot_cost = 1.0  # a 1000-peer VPP's dumps
    assert not metrics.snapshot_due(124.0) and metrics.snapshot_due(125.0)


def test_cli_metrics_option_errors_name_the_option() -> None:
    from typer.testing import CliRunner

    from vppmesh.cli import app

    runner = CliRunner()
    once = runner.invoke(app, ["up", "--metrics", ":9477"])
    assert once.exit_code == 1 and "--metrics needs --watch" in once.output
    bad = runner.invoke(app, ["up", "--watch", "--metrics", "9477"])
    assert bad.exit_code == 1 and "--metrics: '9477' is not ADDR:PORT" in bad.output


# ---- HTTPS and client certificates ----------------------------------------------------

def _scrape(port: int, pki: SimpleNamespace, *, client_cert: bool) -> tuple[int, int]:
    """(HTTP status, serial of the server's certificate) of one HTTPS scrape."""
    import http.client
    import ssl

    from cryptography import x509

    context = ssl.create_default_context(cafile=str(pki.ca))
    if client_cert:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    try:
        connection.request("GET", "/metrics")
        der = connection.sock.getpeercert(binary_form=True)
        reply = connection.getresponse()
        body = reply.read().decode()
        assert reply.status != 200 or "vppmesh_pods_attached" in body
        return reply.status, x509.load_der_x509_certificate(der).serial_number
    finally:
        connection.close()


def test_https_endpoint_serves_only_clients_with_a_certificate_from_the_ca(
        tmp_path: Path) -> None:
    import ssl

    pki = make_pki(tmp_path)
    tls = MetricsTls(cert=pki.cert, key=pki.key, client_ca=pki.ca)
    server = MetricsServer(AgentMetrics(), ("127.0.0.1", 0), tls).start()
    try:
        assert _scrape(server.port, pki, client_cert=True) == (200, 1)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            _scrape(server.port, pki, client_cert=False)
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
        # The endpoint still serves after refusing those.
        assert _scrape(server.port, pki, client_cert=True)[0] == 200
    finally:
        server.stop()


def test_https_without_client_ca_serves_any_client(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    server = MetricsServer(AgentMetrics(), ("127.0.0.1", 0),
                           MetricsTls(cert=pki.cert, key=pki.key)).start()
    try:
        assert server.scheme == "https"
        assert _scrape(server.port, pki, client_cert=False) == (200, 1)
    finally:
        server.stop()


def test_a_rotated_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = MetricsTls(cert=pki.cert, key=pki.key, reload_seconds=0.0)
    server = MetricsServer(AgentMetrics(), ("127.0.0.1", 0), tls).start()
    try:
        assert _scrape(server.port, pki, client_cert=False)[1] == 1
        # A rotation that does not load (certificate and key from different pairs)
        # keeps the previous certificate.
        (tmp_path / "renewed").mkdir()
        renewed = make_pki(tmp_path / "renewed", serial=2)
        pki.cert.write_bytes(renewed.cert.read_bytes())
        assert _scrape(server.port, pki, client_cert=False)[1] == 1
        # Both files of the new pair: served from the next connection on. The CA changed
        # too, so the client trusts the new one.
        pki.key.write_bytes(renewed.key.read_bytes())
        assert _scrape(server.port, renewed, client_cert=False)[1] == 2
    finally:
        server.stop()


@pytest.mark.parametrize(("change", "expected"), [
    (lambda pki: pki.key.chmod(0o644), "--metrics-tls-key: .* has mode 0644.*chmod 600"),
    (lambda pki: pki.key.unlink(), "--metrics-tls-key: cannot read"),
    (lambda pki: pki.cert.write_text("not a certificate"),
     "--metrics-tls-cert/--metrics-tls-key: cannot load"),
    (lambda pki: pki.ca.write_text("not a CA"), "--metrics-client-ca: cannot load"),
])
def test_bad_tls_files_are_named(tmp_path: Path, change: Any, expected: str) -> None:
    pki = make_pki(tmp_path)
    change(pki)
    with pytest.raises(ConfigError, match=expected):
        MetricsTls(cert=pki.cert, key=pki.key, client_ca=pki.ca).context()


@pytest.mark.parametrize(("args", "expected"), [
    (["--metrics-tls-cert", "c.pem"], "go with --metrics ADDR:PORT"),
    (["--metrics", "127.0.0.1:0", "--metrics-tls-cert", "c.pem"], "go together"),
    (["--metrics", "127.0.0.1:0", "--metrics-client-ca", "ca.pem"], "go together"),
])
def test_tls_options_given_by_halves_fail_before_anything_starts(args: list[str],
                                                                 expected: str) -> None:
    from typer.testing import CliRunner

    from vppmesh.cli import app

    result = CliRunner().invoke(app, ["up", "--watch", *args])
    assert result.exit_code == 2, result.output
    assert expected in result.output


@pytest.mark.parametrize("wait", [30.0, 0.0])
def test_watch_loop_waits_for_the_uplink_of_a_vpp_just_met(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        wait: float) -> None:
    """A restarted VPP may answer before its uplink is configured: the loop's runs on it
    fail with "no VPP interface holding the primary underlay address". Within UPLINK_WAIT
    of VPP's return that is waited for as VPP itself is (knocking fast, said once, no
    failed reconcile counted: a restart looked like a failing agent); past it (wait 0) it
    is an error, logged and counted, and the loop polls at its normal pace."""
    from vppmesh.agent import loop as watch
    from vppmesh.agent import node
    from vppmesh.cni.reattach import PodReport
    from vppmesh.errors import UplinkMissingError, VppUnavailableError

    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text("")
    outcomes: list[Any] = ["ok", "gone", "no uplink", "no uplink", "ok", "ok"]
    ticks: list[float] = []

    monkeypatch.setattr(node, "Agent", scripted_session(
        outcomes, ticks, {"gone": VppUnavailableError("VPP stopped answering"),
                          "no uplink": UplinkMissingError(
                              "no VPP interface holding the primary underlay address "
                              "192.0.2.1/24")},
        PodReport(attached=0, reattached=[])))
    monkeypatch.setattr(watch, "WATCH_POLL_SECONDS", 1.0)
    monkeypatch.setattr(watch, "UPLINK_WAIT", wait)
    monkeypatch.setattr(watch, "give_back_uplinks", lambda opts: None)
    metrics = AgentMetrics()
    options = node.NodeOptions(mesh_file=mesh_file, node="n1", private_key=tmp_path / "k")
    with caplog.at_level(logging.INFO, logger="vppmesh"), pytest.raises(KeyboardInterrupt):
        watch.watch_loop(options, metrics)
    gaps = [b - a for a, b in pairwise(ticks)]
    got = samples(metrics.exposition().decode())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    said = [r for r in caplog.records if "no uplink yet" in r.getMessage()]
    if wait:
        assert all(g < 0.6 for g in gaps[1:4])  # knocking fast until the uplink is there
        assert got.get(("vppmesh_reconcile_errors_total", ()), 0) == 0
        assert not errors and len(said) == 1
        assert got[("vppmesh_vpp_restarts_total", ())] == 1
    else:
        assert got[("vppmesh_reconcile_errors_total", ())] == 2
        assert len(errors) == 2 and not said
