"""End-to-end: ``python -m benchmarks --quick`` on a real namespace testbed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyroute2 import IPRoute  # type: ignore[import-untyped]

from benchmarks import netns
from benchmarks.contenders.base import Contender
from benchmarks.harness import QUICK_STREAMS, exclusive_run, measure
from benchmarks.models import RunReport
from benchmarks.topology import Topology
from vppmesh.testing.vpp_helpers import vpp_binary

pytestmark = pytest.mark.root


def _missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "iperf3", "ping"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (ensure_packages() installs it)"
    return None


@pytest.mark.skipif(_missing_prerequisite() is not None, reason=str(_missing_prerequisite()))
def test_quick_run_writes_plausible_json_markdown_and_png(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-install", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    jsons = list(tmp_path.glob("*.json"))
    pngs = list(tmp_path.glob("*.png"))
    mds = list(tmp_path.glob("*.md"))
    assert len(jsons) == len(pngs) == len(mds) == 1

    report = RunReport.model_validate(json.loads(jsons[0].read_text()))
    assert report.config.quick
    assert report.config.repeats == 1
    by_name = {c.name: c for c in report.contenders}
    assert all(c.status in ("ok", "skipped") for c in report.contenders), [
        (c.name, c.reason) for c in report.contenders if c.status == "failed"
    ]
    assert all(c.reason for c in report.contenders if c.status == "skipped")

    bare = by_name["bare"]
    assert bare.status == "ok"
    assert [s.streams for s in bare.summary] == list(QUICK_STREAMS)
    if vpp_binary() is not None:
        # With a VPP here, the VPP contenders must run, not skip.
        for name in ("vpp-ipip", "vppmesh", "vppmesh-4t"):
            assert by_name[name].status == "ok", (name, by_name[name].reason)
        assert report.ratio_reference == "vppmesh-4t"
    for c in (c for c in report.contenders if c.status == "ok"):
        assert c.ping is not None and c.ping.received > 0
        assert c.ping.p50_ms is not None and 0 < c.ping.p50_ms < 100
        assert len(c.runs) == len(QUICK_STREAMS)
        for run in c.runs:
            assert run.goodput_bps > 1e6, (c.name, run.streams)
            assert run.bytes_received > 0
            assert run.raw["end"]["sum_received"]["bits_per_second"] == run.goodput_bps
            assert run.machine_cpu_s_per_gb is not None and run.machine_cpu_s_per_gb > 0
            assert run.cpu.iperf_s > 0

    png = pngs[0].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    md = mds[0].read_text()
    assert "| bare | 1 |" in md
    # The run cleans up after itself.
    assert netns.list_namespaces() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")
def test_cleanup_all_recovers_from_a_run_that_died_half_way() -> None:
    with exclusive_run(lambda _msg: None):
        topo = Topology()
        topo.create()
        # What a crash leaves: a daemon inside a namespace, a stray link in the root
        # namespace, a scratch directory with keys.
        daemon = netns.popen_in(topo.a.node_ns, ["sleep", "60"])
        with IPRoute() as ipr:
            ipr.link("add", ifname="vmbstray0", kind="veth", peer={"ifname": "vmbstray1"})
        scratch = netns.make_tempdir("crash")
        (scratch / "n1.key").write_text("not a real key\n")

        removed = netns.cleanup_all()

        assert set(topo.namespaces) <= {r.removeprefix("netns ") for r in removed}
        assert netns.list_namespaces() == []
        assert daemon.wait(timeout=5) != 0
        with IPRoute() as ipr:
            names = [link.get("ifname") for link in ipr.get_links()]
        assert not [n for n in names if str(n).startswith("vmb")]
        assert not scratch.exists()
        assert netns.cleanup_all() == []


class _FailsHalfWay(Contender):
    """Starts a daemon in a node namespace, then fails, like a contender with a bad config."""

    name = "fails-half-way"
    binaries = ("ip", "sleep")

    def __init__(self) -> None:
        self.daemon: subprocess.Popen[bytes] | None = None
        self.teardown_calls = 0

    def setup(self, topo: Topology) -> None:
        self.daemon = netns.popen_in(topo.a.node_ns, ["sleep", "60"])
        raise RuntimeError("bad config")

    def teardown(self, topo: Topology) -> None:
        self.teardown_calls += 1
        netns.stop_process(self.daemon)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")
def test_failing_contender_is_recorded_and_torn_down() -> None:
    contender = _FailsHalfWay()
    with exclusive_run(lambda _msg: None):
        result = measure(
            contender, streams=[1], repeats=1, duration=1, ping_count=5,
            progress=lambda _msg: None,
        )
        assert result.status == "failed"
        assert "bad config" in result.reason
        assert contender.teardown_calls == 1
        assert contender.daemon is not None and contender.daemon.poll() is not None
        assert netns.list_namespaces() == []


@pytest.mark.skipif(_missing_prerequisite() is not None, reason=str(_missing_prerequisite()))
def test_sigterm_mid_run_leaves_nothing_behind(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "--only", "bare", "--no-install",
         "--duration", "20", "--streams", "1", "--repeats", "1", "--out", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        deadline = time.monotonic() + 30
        while len(netns.list_namespaces()) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(netns.list_namespaces()) == 4, "testbed never came up"
        time.sleep(4)  # inside the iperf3 test by now
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert netns.list_namespaces() == []
    assert list(tmp_path.iterdir()) == []
