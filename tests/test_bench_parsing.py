"""Parsing and statistics of the benchmark harness, on outputs recorded on a real testbed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import contenders as registry
from benchmarks import cpu, netns
from benchmarks.contenders.tinc import cipher_settings, parse_tinc_version
from benchmarks.harness import pick_reference
from benchmarks.iperf import IperfError, client_argv, load_iperf_json, parse_iperf, parse_ping
from benchmarks.models import (
    ContenderResult,
    CpuSample,
    IperfRun,
    MachineInfo,
    PingStats,
    RunConfig,
    RunReport,
)
from benchmarks.report import render_markdown, render_png
from benchmarks.stats import compute_ratios, median, percentile, ratio, summarize

DATA = Path(__file__).parent / "data"


def _load(name: str) -> str:
    return (DATA / name).read_text()


# --- iperf3 -----------------------------------------------------------------------------


def test_iperf_single_stream_recorded_result() -> None:
    s = parse_iperf(load_iperf_json(_load("iperf3_bare_P1.json")))
    assert s.streams == 1
    assert s.goodput_bps == pytest.approx(10320533959.601505)
    assert s.sent_bps == pytest.approx(10352664054.177408)
    assert s.retransmits == 4459
    assert s.bytes_received == 2580676608
    assert s.duration_s == pytest.approx(2.000421)


def test_iperf_four_streams_sums_not_first_stream() -> None:
    data = load_iperf_json(_load("iperf3_bare_P4.json"))
    s = parse_iperf(data)
    assert s.streams == 4
    assert s.goodput_bps == pytest.approx(11290263789.02618)
    assert s.retransmits == 2498
    # The sum must exceed any single stream's share.
    per_stream = [st["receiver"]["bits_per_second"] for st in data["end"]["streams"]]
    assert len(per_stream) == 4
    assert s.goodput_bps > max(per_stream)


def test_iperf_error_json_raises_with_iperf_message() -> None:
    with pytest.raises(IperfError, match="Connection refused"):
        load_iperf_json(_load("iperf3_error.json"))


@pytest.mark.parametrize("text", ["", "iperf3: error - unable to connect", "[1, 2]"])
def test_iperf_unusable_output_raises(text: str) -> None:
    with pytest.raises(IperfError):
        load_iperf_json(text)


def test_iperf_without_tcp_sums_raises() -> None:
    data = json.loads(_load("iperf3_bare_P1.json"))
    del data["end"]["sum_received"]
    with pytest.raises(IperfError, match="sum_received"):
        parse_iperf(data)


def test_iperf_missing_retransmits_is_none_not_zero() -> None:
    data = json.loads(_load("iperf3_bare_P1.json"))
    del data["end"]["sum_sent"]["retransmits"]
    assert parse_iperf(data).retransmits is None


def test_client_argv_asks_for_json_streams_and_duration() -> None:
    argv = client_argv("203.0.113.129", streams=8, duration=5, omit=1)
    assert argv[0] == "iperf3"
    assert argv[argv.index("--client") + 1] == "203.0.113.129"
    assert argv[argv.index("--parallel") + 1] == "8"
    assert argv[argv.index("--time") + 1] == "5"
    assert argv[argv.index("--omit") + 1] == "1"
    assert "--json" in argv


# --- ping -------------------------------------------------------------------------------


def test_ping_recorded_output() -> None:
    r = parse_ping(_load("ping_pod.txt"))
    assert (r.sent, r.received) == (20, 20)
    assert len(r.rtts_ms) == 20
    assert r.rtts_ms[0] == pytest.approx(0.064)
    assert min(r.rtts_ms) <= r.p50_ms <= r.p99_ms <= max(r.rtts_ms)  # type: ignore[operator]


def test_ping_loss_and_duplicates() -> None:
    out = "\n".join(
        [
            "PING 203.0.113.129 (203.0.113.129) 56(84) bytes of data.",
            "64 bytes from 203.0.113.129: icmp_seq=1 ttl=62 time=1.00 ms",
            "64 bytes from 203.0.113.129: icmp_seq=1 ttl=62 time=9.00 ms (DUP!)",
            "64 bytes from 203.0.113.129: icmp_seq=3 ttl=62 time=3.00 ms",
            "64 bytes from 203.0.113.129: icmp_seq=4 ttl=62 time=2.00 ms",
            "",
            "--- 203.0.113.129 ping statistics ---",
            "5 packets transmitted, 3 received, +1 duplicates, 40% packet loss, time 41ms",
        ]
    )
    r = parse_ping(out)
    assert (r.sent, r.received) == (5, 3)
    assert r.rtts_ms == [1.0, 3.0, 2.0]
    assert r.p50_ms == pytest.approx(2.0)


def test_ping_without_summary_is_an_error() -> None:
    with pytest.raises(ValueError, match="transmitted"):
        parse_ping("connect: Network is unreachable\n")


# --- statistics -------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_median_skips_missing_values() -> None:
    assert median([3, None, 1, 2]) == 2.0
    assert median([1.0, 2.0]) == 1.5
    assert median([None, None]) is None
    assert median([]) is None


def test_ratio_guards_division() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(3.0, 0.0) is None
    assert ratio(None, 2.0) is None


def _sample(machine: float = 1.0, attributed: float = 0.8) -> CpuSample:
    return CpuSample(
        wall_s=1.0, machine_busy_s=machine, machine_capacity_s=2.0, iperf_s=attributed,
        attributed_s=attributed,
    )


def _run(streams: int, gbps: float, retr: int | None, cpu_per_gb: float, rep: int = 0) -> IperfRun:
    nbytes = int(gbps * 1e9 / 8)
    return IperfRun(
        streams=streams, repeat=rep, duration_s=1.0, goodput_bps=gbps * 1e9,
        sent_bps=gbps * 1e9, retransmits=retr, bytes_received=nbytes, cpu=_sample(),
        machine_cpu_s_per_gb=cpu_per_gb, attributed_cpu_s_per_gb=cpu_per_gb / 2, raw={},
    )


def test_summarize_takes_medians_per_stream_count() -> None:
    runs = [
        _run(4, 9.0, 30, 0.5), _run(1, 1.0, 10, 3.0), _run(1, 5.0, 50, 1.0, 1),
        _run(1, 2.0, None, 2.0, 2),
    ]
    out = summarize(runs)
    assert [s.streams for s in out] == [1, 4]
    one = out[0]
    assert one.runs == 3
    assert one.median_gbps == pytest.approx(2.0)
    assert one.median_retransmits == pytest.approx(30.0)  # median of 10 and 50; None skipped
    assert one.median_machine_cpu_s_per_gb == pytest.approx(2.0)
    assert one.median_attributed_cpu_s_per_gb == pytest.approx(1.0)
    assert out[1].median_gbps == pytest.approx(9.0)


def _contender(name: str, status: str, runs: list[IperfRun]) -> ContenderResult:
    return ContenderResult(
        name=name, status=status, reason="" if status == "ok" else "why not",  # type: ignore[arg-type]
        runs=runs, summary=summarize(runs),
        ping=PingStats(sent=10, received=10, rtts_ms=[0.1] * 10, p50_ms=0.1, p99_ms=0.1)
        if runs else None,
    )


def test_ratios_reference_over_each_other_same_streams_only() -> None:
    results = [
        _contender("ref", "ok", [_run(1, 8.0, 0, 1.0), _run(4, 10.0, 0, 0.5)]),
        _contender("other", "ok", [_run(1, 2.0, 0, 4.0)]),
        _contender("gone", "skipped", []),
    ]
    ratios = compute_ratios(results, "ref")
    assert len(ratios) == 1
    r = ratios[0]
    assert (r.reference, r.other, r.streams) == ("ref", "other", 1)
    assert r.goodput == pytest.approx(4.0)
    assert r.machine_cpu_s_per_gb == pytest.approx(0.25)
    assert compute_ratios(results, "gone") == []


def test_pick_reference_prefers_requested_then_registry_then_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    results = [
        _contender("a", "ok", [_run(1, 1.0, 0, 1.0)]),
        _contender("b", "ok", [_run(1, 1.0, 0, 1.0)]),
        _contender("c", "skipped", []),
    ]
    monkeypatch.setattr(registry, "RATIO_REFERENCES", ["c", "b"])
    assert pick_reference(results, None) == "b"
    assert pick_reference(results, "a") == "a"
    assert pick_reference(results, "c") is None
    monkeypatch.setattr(registry, "RATIO_REFERENCES", [])
    assert pick_reference(results, None) == "a"


# --- CPU accounting ---------------------------------------------------------------------

PROC_STAT_BEFORE = """cpu  1000 10 500 8000 40 5 25 3 0 0
cpu0 500 5 250 4000 20 2 12 1 0 0
intr 12345
"""
PROC_STAT_AFTER = """cpu  1300 10 600 8400 50 7 43 4 0 0
cpu0 650 5 300 4200 25 3 21 2 0 0
"""


def test_proc_stat_busy_excludes_idle_iowait_steal() -> None:
    before = cpu.parse_proc_stat(PROC_STAT_BEFORE)
    after = cpu.parse_proc_stat(PROC_STAT_AFTER)
    assert before.busy == 1000 + 10 + 500 + 5 + 25
    # user +300, system +100, irq +2, softirq +18; idle/iowait/steal do not count.
    assert cpu.busy_seconds(before, after, hz=100) == pytest.approx(4.2)
    assert cpu.busy_fraction(before, after) == pytest.approx(420 / (420 + 400 + 10 + 1))
    with pytest.raises(ValueError):
        cpu.busy_seconds(after, before, hz=100)


def test_proc_stat_without_cpu_line_is_an_error() -> None:
    with pytest.raises(ValueError):
        cpu.parse_proc_stat("intr 1 2 3\n")


def test_pid_stat_with_spaces_and_parens_in_comm() -> None:
    fields = ["S"] + ["0"] * 10 + ["150", "50", "30", "20"] + ["0"] * 30
    line = "4242 (tinc d) (x)) " + " ".join(fields)
    comm, seconds = cpu.parse_pid_stat(line, hz=100)
    assert comm == "tinc d) (x)"
    assert seconds == pytest.approx(2.5)


def test_per_gb() -> None:
    assert cpu.per_gb(3.0, 2 * 10**9) == pytest.approx(1.5)
    assert cpu.per_gb(3.0, 0) is None


def test_cpu_meter_sees_a_child_burning_cpu() -> None:
    """The iperf3 share is the rusage of reaped children; a busy child must show up."""
    meter = cpu.CpuMeter()
    meter.start()
    subprocess.run(
        [sys.executable, "-c", "import time\nt=time.process_time()\n"
         "while time.process_time()-t<0.3: pass"],
        check=True,
    )
    sample = meter.stop()
    assert sample.iperf_s >= 0.25
    assert sample.attributed_s >= sample.iperf_s
    assert sample.machine_busy_s >= 0.25
    assert sample.wall_s >= 0.3


# --- report ----------------------------------------------------------------------------


def _report() -> RunReport:
    return RunReport(
        run_id="20250101T000000Z",
        started_at="2025-01-01T00:00:00+00:00",
        finished_at="2025-01-01T00:01:00+00:00",
        machine=MachineInfo(
            hostname="h", kernel="6.1", cpu_model="Test CPU", cpu_count=2, os_release="x",
            python="3.11",
        ),
        config=RunConfig(streams=[1, 4], repeats=1, duration_s=3, quick=True, ping_count=10),
        contenders=[
            _contender("alpha", "ok", [_run(1, 8.0, 12, 1.3), _run(4, 9.5, 40, 0.75)]),
            _contender("xfrm", "skipped", []),
        ],
    )


def test_markdown_has_one_row_per_stream_count_and_lists_skipped() -> None:
    md = render_markdown(_report())
    rows = [line for line in md.splitlines() if line.startswith("| alpha") or
            line.startswith("|  | 4")]
    assert rows[0].split("|")[2:7] == [" 1 ", " 8.000 ", " 12 ", " 1.30 ", " 0.65 "]
    assert rows[1].split("|")[2:4] == [" 4 ", " 9.500 "]
    assert "**xfrm** (skipped): why not" in md


def test_png_is_written(tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    render_png(_report(), path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 5000


def test_report_json_round_trips() -> None:
    report = _report()
    again = RunReport.model_validate_json(report.model_dump_json())
    assert again == report


# --- registry and names -------------------------------------------------------------------


def test_registry_has_the_non_vpp_contenders_with_unique_names() -> None:
    names = [c.name for c in registry.all_contenders()]
    assert len(names) == len(set(names))
    assert {"bare", "tinc", "wireguard-go", "xfrm"} <= set(names)
    assert [c.name for c in registry.select(registry.all_contenders(), ["tinc"])] == ["tinc"]
    with pytest.raises(ValueError, match="nope"):
        registry.select(registry.all_contenders(), ["nope"])


def test_broken_contender_module_is_reported_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "MODULES", ["bare", "does_not_exist"])
    found = registry.all_contenders()
    assert [c.name for c in found] == ["bare", "does_not_exist"]
    ok, reason = found[1].available()
    assert not ok
    assert "import failed" in reason


def test_helpers_refuse_names_outside_the_prefix() -> None:
    with pytest.raises(ValueError):
        netns.check_ns_name("vmt-n1")
    with pytest.raises(ValueError):
        netns.check_ns_name("vmb-")
    with pytest.raises(ValueError):
        netns.check_link_name("eth0")
    with pytest.raises(ValueError):
        netns.check_link_name("vmb-much-too-long0")
    assert netns.ns_argv("vmb-n1", ["ip", "a"]) == ["ip", "netns", "exec", "vmb-n1", "ip", "a"]


def test_tinc_version_and_cipher_choice() -> None:
    assert parse_tinc_version("tinc version 1.0.36\nCopyright") == (1, 0, 36)
    assert parse_tinc_version("tinc version 1.1pre18") == (1, 1, 0)
    assert parse_tinc_version("garbage") is None
    assert cipher_settings((1, 0, 36)) == {
        "Cipher": "aes-256-cbc", "Digest": "sha256", "MACLength": "32",
    }
    assert cipher_settings((1, 1, 0)) == {}
