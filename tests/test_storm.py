"""The storm benchmark's pure parts (no VPP, no root): the seeded fault schedule, the ping
gap finder, the TCP stall finder, the underlay capture's classifier and the report."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.storm import analysis, schedule
from benchmarks.storm.__main__ import analyse, leaks
from vppmesh.lab.testbed import Testbed, TestbedSpec

NODES = {"192.0.2.11", "192.0.2.21", "192.0.2.31"}


# ---- the schedule ------------------------------------------------------------------------
def test_the_same_seed_gives_the_same_fault_sequence() -> None:
    first = schedule.build(42, minutes=30, nodes=4)
    assert first == schedule.build(42, minutes=30, nodes=4)
    assert first != schedule.build(43, minutes=30, nodes=4)
    assert schedule.build(42, minutes=5, nodes=4, quick=True) == \
        schedule.build(42, minutes=5, nodes=4, quick=True)


def test_a_default_run_has_every_kind_several_times() -> None:
    for seed in range(5):
        faults = schedule.build(seed, minutes=30, nodes=4, key_max_seconds=60)
        kinds = [f.kind for f in faults]
        assert {k: kinds.count(k) for k in schedule.KINDS if kinds.count(k) < 2} == {}
        assert all(1 <= f.node <= 4 for f in faults)
        starts = [f.planned_at for f in faults]
        assert starts == sorted(starts) and starts[-1] < 30 * 60
        assert all(f.duration > 60 for f in faults if f.kind == "channel_drop"), \
            "the channel must stay dropped for longer than key_max_seconds"
        assert {abs(f.param) for f in faults if f.kind == "clock_step"} == {600.0}


def test_quick_runs_one_round_of_the_representative_kinds_in_about_five_minutes() -> None:
    faults = schedule.build(1, minutes=5, nodes=4, quick=True)
    assert sorted(f.kind for f in faults) == sorted(schedule.QUICK_KINDS)
    last = faults[-1]
    assert last.planned_at + last.duration + schedule.SETTLE <= 5 * 60 + 30


# ---- pings and TCP -------------------------------------------------------------------------
PING = """PING 198.18.2.10 (198.18.2.10) 56(84) bytes of data.
[1000.000000] 64 bytes from 198.18.2.10: icmp_seq=1 ttl=62 time=1.1 ms
[1000.010000] 64 bytes from 198.18.2.10: icmp_seq=2 ttl=62 time=1.0 ms
[1000.020000] 64 bytes from 198.18.2.10: icmp_seq=3 ttl=62 time=1.0 ms
[1001.530000] 64 bytes from 198.18.2.10: icmp_seq=154 ttl=62 time=1.2 ms
[1001.540000] 64 bytes from 198.18.2.10: icmp_seq=155 ttl=62 time=1.2 ms
[1001.540500] 64 bytes from 198.18.2.10: icmp_seq=155 ttl=62 time=1.2 ms (DUP!)
[1001.560000] 64 bytes from 198.18.2.10: icmp_seq=157 ttl=62 time=1.2 ms
From 198.18.2.1 icmp_seq=158 Destination Host Unreachable

--- 198.18.2.10 ping statistics ---
160 packets transmitted, 6 received, 96% packet loss, time 1600ms
"""


def test_the_gap_finder_reads_ping_output() -> None:
    replies = analysis.ping_replies(PING)
    assert [seq for seq, _ in replies] == [1, 2, 3, 154, 155, 157]
    gaps = analysis.ping_gaps(replies)
    assert [(g.first_seq, g.last_seq, g.lost) for g in gaps] == [(4, 153, 150), (156, 156, 1)]
    assert gaps[0].start == 1000.02 and gaps[0].end == 1001.53
    assert abs(gaps[0].seconds(0.01) - 1.51) < 1e-9


def test_replies_held_up_and_delivered_late_count_as_an_outage() -> None:
    """A link down for 12 s: the requests sent just before are held and answered when it
    comes back (time=12000 ms), so no sequence number is missing there; the pod heard
    nothing for 12 s all the same."""
    text = "\n".join([
        "[100.00] 64 bytes from x: icmp_seq=1 ttl=1 time=1 ms",
        "[100.01] 64 bytes from x: icmp_seq=2 ttl=1 time=1 ms",
        "[112.01] 64 bytes from x: icmp_seq=3 ttl=1 time=12000 ms",
        "[112.01] 64 bytes from x: icmp_seq=4 ttl=1 time=11990 ms",
        "[112.02] 64 bytes from x: icmp_seq=9 ttl=1 time=1 ms",
        "[112.03] 64 bytes from x: icmp_seq=10 ttl=1 time=1 ms"])
    gaps = analysis.ping_gaps(analysis.ping_replies(text))
    assert [(g.lost, round(g.seconds(0.01), 2)) for g in gaps] == [(0, 12.0), (4, 0.05)]


def test_the_gap_finder_follows_icmp_seq_past_its_wrap() -> None:
    text = "\n".join(f"[{i / 100}] 64 bytes from x: icmp_seq={s} ttl=1 time=1 ms"
                     for i, s in enumerate([65534, 65535, 1, 2]))
    assert [g.lost for g in analysis.ping_gaps(analysis.ping_replies(text))] == [1]


def test_tcp_stalls_are_the_silences_longer_than_a_second_per_source() -> None:
    lines = [json.dumps(e) for e in (
        {"src": "n1", "connect": 9.0}, {"src": "n1", "t": 10.0}, {"src": "n2", "t": 10.1},
        {"src": "n1", "t": 10.2}, {"src": "n2", "t": 13.1}, {"src": "n1", "t": 11.1},
        {"src": "n1", "t": 12.5})] + ["not json"]
    stalls = analysis.tcp_stalls(lines)
    assert [(s["src"], s["start"], s["end"]) for s in stalls] == \
        [("n2", 10.1, 13.1), ("n1", 11.1, 12.5)]


# ---- the capture ----------------------------------------------------------------------------
def ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    header = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    total = sum(struct.unpack(">10H", header))
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return header[:10] + struct.pack(">H", ~total & 0xFFFF) + header[12:] + payload


def ether(packet: bytes, ethertype: int = 0x0800) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + ethertype.to_bytes(2, "big") + packet


def udp(sport: int, dport: int, body: bytes) -> bytes:
    return struct.pack(">HHHH", sport, dport, 8 + len(body), 0) + body


A, B = "192.0.2.11", "192.0.2.21"
ESP = ether(ipv4(A, B, 50, bytes(range(8)) + b"\xc6\x12" * 40))  # 198.18 in ciphertext
CHANNEL = ether(ipv4(A, B, 17, udp(4501, 4501, b"\x02\x03" + bytes(69))))
ESP_UDP = ether(ipv4(A, B, 17, udp(4500, 4500, b"\x01\x00\x00\x07" + bytes(36))))
POD_ICMP = ether(ipv4("198.18.1.10", "198.18.2.10", 1, b"\x08\x00" + bytes(62)))
MARKER_TCP = ether(ipv4(A, B, 6, bytes(20) + analysis.MARKER + b" n1 xxxx"))
IPIP = ether(ipv4(A, B, 4, ipv4("198.18.1.10", "198.18.2.10", 1, bytes(8))))
OTHER = ether(ipv4(A, B, 17, udp(53, 53, bytes(20))))
SPOOF = ether(ipv4("192.0.2.200", B, 50, bytes(40)))
UNREACH = ether(ipv4(B, A, 1, b"\x03\x03\x00\x00" + bytes(4) +
                     ipv4(A, B, 17, udp(4501, 4501, bytes(8)))))


def test_the_classifier_accepts_esp_and_the_channel_and_flags_anything_in_clear() -> None:
    def kind(frame: bytes) -> str:
        return analysis.classify(frame, NODES, {"192.0.2.200"})

    assert kind(ESP) == "esp"
    assert kind(CHANNEL) == "channel"
    assert kind(ESP_UDP) == "esp_udp"
    assert kind(UNREACH) == "unreachable"
    assert kind(ether(b"\x00" * 28, 0x0806)) == "arp"
    assert kind(SPOOF) == "injected"
    assert kind(OTHER) == "other"
    assert kind(POD_ICMP) == "clear"
    assert kind(MARKER_TCP) == "clear"
    assert kind(IPIP) == "clear"
    assert kind(MARKER_TCP[:60]) == "other"  # cut before the marker: headers only


NAT_PUBLIC = "192.0.2.250"  # the testbed's NAT router, which the NAT node's traffic leaves from


def test_the_nat_nodes_esp_in_udp_and_channel_are_classified_and_clear_still_fails() -> None:
    """Captured from a NAT run: the NAT node's ESP-in-UDP goes from the router's public
    address and its port (56885) to a peer's UDP 4500, and the channel rides that flow
    behind the non-ESP marker (four zero bytes)."""
    bed = Testbed(TestbedSpec(nodes=4, nat="masquerade"))
    nodes = analysis.underlay_addresses(bed.nodes)
    assert NAT_PUBLIC in nodes and "192.0.2.11" in nodes

    def kind(frame: bytes) -> str:
        return analysis.classify(frame, nodes, {"192.0.2.200"})

    esp = b"\x80\x00\x01\x12" + (1).to_bytes(4, "big") + b"\xc6\x12" * 40
    pod = ipv4("198.18.1.10", "198.18.4.10", 1, b"\x08\x00" + bytes(30))
    assert kind(ether(ipv4(A, NAT_PUBLIC, 17, udp(4500, 56885, esp)))) == "esp_udp"
    assert kind(ether(ipv4(NAT_PUBLIC, A, 17, udp(56885, 4500, esp)))) == "esp_udp"
    assert kind(ether(ipv4(NAT_PUBLIC, A, 17, udp(56885, 4500, b"\xff")))) == "esp_udp"
    handshake = b"\0\0\0\0" + b"\x02\x03\x00\x01" + bytes(67)
    assert kind(ether(ipv4(A, NAT_PUBLIC, 17, udp(4500, 56885, handshake)))) == "channel"
    assert kind(ether(ipv4(NAT_PUBLIC, A, 17, udp(56885, 4500, handshake)))) == "channel"
    assert kind(ether(ipv4(NAT_PUBLIC, A, 17, udp(40123, 4501, bytes(71))))) == "channel"
    # Anything in clear inside that UDP is still a failure: the marker, a pod's packet
    # bare, behind the non-ESP marker or behind an ESP header (a null cipher).
    marker = analysis.MARKER + b" n4 0001"
    assert kind(ether(ipv4(NAT_PUBLIC, A, 17, udp(56885, 4500, marker)))) == "clear"
    assert kind(ether(ipv4(NAT_PUBLIC, A, 17, udp(56885, 4500, pod)))) == "clear"
    assert kind(ether(ipv4(NAT_PUBLIC, A, 17, udp(56885, 4500, bytes(4) + pod)))) == "clear"
    assert kind(ether(ipv4(NAT_PUBLIC, A, 17, udp(56885, 4500, esp[:8] + pod)))) == "clear"
    assert kind(ether(ipv4(A, B, 50, esp[:8] + pod))) == "clear"
    assert kind(ether(ipv4(NAT_PUBLIC, A, 17, udp(56885, 53, bytes(20))))) == "other"


def write_pcap(path: Path, frames: list[tuple[float, bytes]]) -> None:
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 128, 1)
    for at, frame in frames:
        data = frame[:128]
        out += struct.pack("<IIII", int(at), round(at % 1 * 1e6), len(data), len(frame))
        out += data
    path.write_bytes(out)


def test_a_pod_address_in_the_capture_is_reported_with_the_fault_before_it(
        tmp_path: Path) -> None:
    pcap = tmp_path / "u.pcap"
    write_pcap(pcap, [(100.0, ESP), (101.0, CHANNEL), (105.5, POD_ICMP), (106.0, ESP)])
    faults = [{"kind": "agent_kill", "node": 2, "started": 99.0},
              {"kind": "vpp_kill", "node": 3, "started": 104.0}, {"kind": "netem", "node": 1}]
    found = analysis.check_capture(pcap, NODES, set(), faults)
    assert found["counts"] == {"esp": 2, "channel": 1, "clear": 1}
    assert found["clear"][0]["t"] == 105.5
    assert found["clear"][0]["after"] == "vpp_kill n3 at 104.0"


# ---- analysis and the report ---------------------------------------------------------------
def fake_storm(tmp_path: Path, frames: list[tuple[float, bytes]]) -> SimpleNamespace:
    spec = TestbedSpec(nodes=2, tunnels=2, pods=1)
    ping = tmp_path / "ping.txt"
    ping.write_text(PING)
    (tmp_path / "tcp-n2.jsonl").write_text(
        "\n".join(json.dumps({"src": "n1", "t": t}) for t in (1000.0, 1000.2, 1002.0)))
    capture = tmp_path / "underlay.pcap"
    write_pcap(capture, frames)
    keys = [{"t": 999.0 + i, "pairs": {"n1-n2": {"agreed": i != 2, "stopped": False,
                                                 "age": 10.0 + i}}} for i in range(8)]
    agent = [{"t": 990.0 + 10 * i, "rss_kib": 50000 + i, "fds": 20, "life": 1}
             for i in range(5)]
    vpp = [{"t": 990.0 + 10 * i, "sas": 8, "dump_s": 0.01} for i in range(5)]
    return SimpleNamespace(
        bed=Testbed(spec), spec=spec, pings={"n1->n2": (None, ping)}, work=tmp_path,
        key_samples=keys, capture_path=capture, key_max_seconds=60,
        agent_samples={"n1": agent}, vpp_samples={"n1": vpp}, metric_samples={},
        injections=[], heap_start={"n1": 1 << 20}, heap_end={"n1": 3 << 19})


def run_analysis(storm: SimpleNamespace, recovery: float | None) -> dict:
    records = [{"kind": "link_down", "node": 1, "duration": 1.0, "param": 0.0,
                "planned_at": 0.0, "description": "link_down on n1 for 1 s",
                "started": 1000.01, "restored": 1001.0}]
    return analyse(storm, records, seed=7, minutes=5, quick=True, t0=990.0,  # type: ignore[arg-type]
                   end=1010.0, recovery=recovery, run_id="20260101T000000Z", notes="",
                   command="python -m benchmarks.storm --quick --seed 7")


def test_the_report_has_the_json_the_table_and_the_timeline(tmp_path: Path) -> None:
    storm = fake_storm(tmp_path, [(1000.0, ESP), (1000.5, CHANNEL)])
    result = run_analysis(storm, recovery=3.0)
    assert result["failures"] == []
    row = result["per_kind"]["link_down"]  # the gap at 1000.02-1001.53 is its own
    assert row["count"] == 1 and row["outage_s"]["worst"] == 1.51
    assert row["pings_lost"]["worst"] == 151.0 and row["tcp_stalls"]["worst"] == 1.0
    assert row["agreed_after_s"]["worst"] == 1.0  # the sample at 1002 after 1001
    out = tmp_path / "results"
    stem = analysis.write_results(out, result)
    assert stem.name == "20260101T000000Z-storm"
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["seed"] == 7 and data["capture"]["counts"] == {"esp": 1, "channel": 1}
    table = stem.with_suffix(".md").read_text()
    assert "| link_down | 1 | 1.5 | 1.5 | 151 | 151 | 1 | 1.0 | 1.0 | 0 |" in table
    assert "Verdict: **PASS**" in table
    assert "| n1 | 8 | 8 | 0.00 | 1.0 | 1.5 |" in table
    png = stem.with_suffix(".png")
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 0
    else:
        assert not png.exists()


def test_a_clear_packet_or_a_pair_not_back_fails_the_run(tmp_path: Path) -> None:
    storm = fake_storm(tmp_path, [(1000.0, ESP), (1000.7, POD_ICMP)])
    result = run_analysis(storm, recovery=None)
    assert len(result["failures"]) == 2
    assert "1 frames in clear" in result["failures"][0]
    assert "link_down n1 at 1000.0" in result["failures"][0]
    assert "not every pair back" in result["failures"][1]
    storm = fake_storm(tmp_path, [(1000.0, ESP)])
    storm.key_samples[-1]["pairs"]["n1-n2"]["age"] = 75.0  # key_max_seconds 60, slack 10
    result = run_analysis(storm, recovery=1.0)
    assert len(result["failures"]) == 1
    assert "key older than key_max_seconds" in result["failures"][0]


def test_agent_rss_is_judged_over_its_longest_life_from_that_lifes_minute_5() -> None:
    """A restarted agent starts over: its short last life's start-up growth is not a leak
    (the 30-minute run showed +78 % for an agent restarted 8 minutes before the end).
    The longest life counts, from its own minute 5."""
    long_life = [{"t": 100.0 + 60 * i, "rss_kib": 80_000 + (20_000 if i == 0 else i),
                  "fds": 10, "life": 1} for i in range(20)]
    short_life = [{"t": 1400.0 + 60 * i, "rss_kib": 50_000 + 10_000 * i, "fds": 10,
                   "life": 2} for i in range(4)]
    found = leaks({"n1": long_life + short_life}, {}, 0.0, {}, {})["agents"]["n1"]
    assert found["life_minutes"] == 19.0
    assert found["rss_growth_percent"] is not None and found["rss_growth_percent"] < 0.1
    assert found["lives"] == 2


def test_nat_variant_adds_conntrack_flushes_and_leaves_the_plain_schedule_as_it_was() -> None:
    plain = schedule.build(11, minutes=30, nodes=4)
    assert plain == schedule.build(11, minutes=30, nodes=4, nat=False)
    assert not any(f.kind == "nat_flush" for f in plain)
    nat = schedule.build(11, minutes=30, nodes=4, nat=True)
    assert nat == schedule.build(11, minutes=30, nodes=4, nat=True)  # replayed by seed
    flushes = [f for f in nat if f.kind == "nat_flush"]
    assert len(flushes) >= 2 and all(f.duration == 0.0 for f in flushes)
    assert flushes[0].describe() == "nat_flush on the NAT router"


def test_datastore_variant_restarts_etcd_several_times_and_replays_from_its_seed() -> None:
    plain = schedule.build(11, minutes=30, nodes=4)
    assert plain == schedule.build(11, minutes=30, nodes=4, datastore=False)
    assert not any(f.kind in schedule.DATASTORE_KINDS for f in plain)
    for quick, minutes in ((False, 30.0), (True, schedule.DATASTORE_QUICK_MINUTES)):
        ds = schedule.build(5, minutes=minutes, nodes=4, quick=quick, datastore=True)
        assert ds == schedule.build(5, minutes=minutes, nodes=4, quick=quick, datastore=True)
        assert ds != schedule.build(6, minutes=minutes, nodes=4, quick=quick, datastore=True)
        kinds = [f.kind for f in ds]
        assert "torn_write" not in kinds and "torn_record" in kinds and "peer_leave" in kinds
        restarts = [f for f in ds if f.kind == "etcd_restart"]
        assert len(restarts) >= 2 and all(5 <= f.duration <= 20 for f in restarts)
        assert {f.param for f in restarts} <= {9.0, 15.0}
        last = ds[-1]
        assert last.planned_at + last.duration + schedule.SETTLE <= minutes * 60 + 30
    quick = schedule.build(5, minutes=schedule.DATASTORE_QUICK_MINUTES, nodes=4, quick=True,
                           datastore=True)
    assert sorted(f.kind for f in quick) == sorted(schedule.DATASTORE_QUICK_KINDS)
    assert [f.describe() for f in quick if f.kind == "etcd_restart"] == [
        "etcd_restart on etcd for 6 s, SIGKILL", "etcd_restart on etcd for 9 s, SIGKILL"]


# ---- the pods, as users run them --------------------------------------------------------
def test_pods_are_added_by_the_cni_plugin_where_their_agent_reattaches_them(
        tmp_path: Path, monkeypatch: object) -> None:
    """Each pod's network configuration is one the plugin accepts, keeps its records in
    the directory its agent re-attaches from (`--cni-state-dir`) and hands host-local a
    range of exactly the address the pings and streams aim at."""
    from benchmarks.storm import rig
    from vppmesh.cni.ipam import effective_ipam
    from vppmesh.cni.models import NetConf

    storm = rig.Storm(nodes=4, work=tmp_path, base_dir=tmp_path / "bed")
    assert storm.spec.pods == 0  # no `vppmesh attach`: it keeps no record to re-attach from
    node = storm.bed.nodes[1]
    conf = NetConf.model_validate(rig.pod_netconf(storm.bed, node, tmp_path))
    assert conf.unknown_keys() == {} and conf.attachment == storm.spec.attachment
    ranges = effective_ipam(conf.ipam.model_dump(mode="json"), node.pod_cidr)["ranges"]
    assert ranges == [[{"subnet": "198.18.2.0/24", "rangeStart": "198.18.2.10",
                        "rangeEnd": "198.18.2.10"}]]
    assert str(node.pod_address(0)) == "198.18.2.10"

    started: list[list[str]] = []
    monkeypatch.setattr(rig.subprocess, "Popen",  # type: ignore[attr-defined]
                        lambda args, **_: started.append(args) or SimpleNamespace(pid=1))
    rig.Agent(storm.bed, node, tmp_path).start()
    args = started[0]
    assert args[args.index("--cni-state-dir") + 1] == str(conf.state_dir)


def test_an_add_is_retried_while_the_plugin_says_try_again_and_its_address_checked(
        tmp_path: Path, monkeypatch: object) -> None:
    """As a runtime: ADD again after code 11 (the agent has not made the mesh yet), fail on
    any other error, and refuse an address the traffic would not reach."""
    import subprocess

    from benchmarks.storm import rig
    from vppmesh.testing import vpp_helpers

    storm = rig.Storm(nodes=2, work=tmp_path, base_dir=tmp_path / "bed")
    node = storm.bed.nodes[0]
    answers: list[tuple[int, dict[str, object]]] = []
    calls: list[dict[str, object]] = []

    def run_cni(host_ns: str, command: str, conf: dict[str, object], **kw: object
                ) -> subprocess.CompletedProcess[str]:
        calls.append({"host_ns": host_ns, "command": command, **kw})
        code, out = answers.pop(0)
        return subprocess.CompletedProcess([], code, json.dumps(out), "")

    monkeypatch.setattr(vpp_helpers, "run_cni", run_cni)  # type: ignore[attr-defined]
    monkeypatch.setattr(rig, "sh", lambda *a, **k: None)  # type: ignore[attr-defined]
    monkeypatch.setattr(rig, "in_ns", lambda *a, **k: None)  # type: ignore[attr-defined]
    monkeypatch.setattr(rig.time, "sleep", lambda _s: None)  # type: ignore[attr-defined]
    ok = {"cniVersion": "1.0.0", "ips": [{"address": "198.18.1.10/32"}]}
    answers += [(11, {"code": 11, "msg": "not in the mesh"})] * 2 + [(0, ok)]
    storm.add_pod(node)
    assert len(calls) == 3 and storm.pods == {"n1": ok}
    assert calls[0] == {"host_ns": node.netns, "command": "ADD",
                        "container": rig.pod_container(node), "netns": node.pod_netns(0),
                        "pod": node.pod_name(0)}
    answers += [(7, {"code": 7, "msg": "invalid network configuration"})]
    with pytest.raises(RuntimeError, match="invalid network configuration"):
        storm.add_pod(node)
    answers += [(0, {"ips": [{"address": "198.18.1.2/32"}]})]
    with pytest.raises(RuntimeError, match=r"gave 198\.18\.1\.2, not 198\.18\.1\.10"):
        storm.add_pod(node)


def test_a_vpp_fault_is_only_a_supervisors_restart_and_the_outage_counts_from_the_fault(
        tmp_path: Path) -> None:
    """After a VPP kill (and a VPP stopped with its agent) the rig restarts VPP as systemd
    would and attaches nothing itself: the agent re-attaches the pods. The fault's window,
    where its ping gap is looked for, opens before the kill."""
    from benchmarks.storm import rig
    from benchmarks.storm.schedule import Fault

    storm = rig.Storm(nodes=2, work=tmp_path, base_dir=tmp_path / "bed")
    done: list[tuple[str, float]] = []

    class Bed(SimpleNamespace):
        def kill_vpp(self, node: object, sig: int) -> None:
            done.append(("kill_vpp", time.time()))

        def restart_vpp(self, node: object) -> None:
            done.append(("restart_vpp", time.time()))

        def run_vppmesh(self, *a: object, **k: object) -> None:
            done.append(("vppmesh " + str(a[1]), time.time()))

    storm.bed = Bed(nodes=storm.bed.nodes, underlay_ns="ul")  # type: ignore[assignment]

    class Agent(SimpleNamespace):
        def signal(self, sig: int) -> None:
            done.append(("agent stopped", time.time()))

        def start(self) -> None:
            done.append(("agent started", time.time()))

    for name in ("n1", "n2"):
        storm.agents[name] = Agent(log=tmp_path / f"agent-{name}.log")  # type: ignore[assignment]
    (tmp_path / "agent-n2.log").write_text("before\n")
    record: dict[str, object] = {}
    storm.apply(Fault("vpp_kill", 2, 0.0), record)
    assert [what for what, _ in done] == ["kill_vpp", "restart_vpp"]
    assert record["started"] <= done[0][1] <= record["restored"]  # type: ignore[operator]
    with (tmp_path / "agent-n2.log").open("a") as f:
        f.write("VPP is back (pid 7): 1 pod(s) re-attached\n")
    storm.note_agent_log(Fault("vpp_kill", 2, 0.0), record)
    assert record["agent_log"] == ["VPP is back (pid 7): 1 pod(s) re-attached"]
    done.clear()
    storm.apply(Fault("vpp_agent_stop", 1, 0.0), {})
    assert [what for what, _ in done] == ["agent stopped", "kill_vpp", "restart_vpp",
                                          "agent started"]
