"""Runs the contenders one after another on a fresh topology each and collects results.

Teardown always runs (``finally``), and every ``vmb`` namespace, link and scratch file is
swept before the first and after the last contender, so an interrupted run leaves
nothing behind and a crashed one is cleaned up by the next.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import contenders as registry
from benchmarks import cpu, netns
from benchmarks.contenders.base import Contender
from benchmarks.iperf import IperfError, run_iperf, run_ping
from benchmarks.models import ContenderResult, IperfRun, PingStats, RunConfig, RunReport
from benchmarks.packages import ensure_packages
from benchmarks.report import machine_info
from benchmarks.stats import compute_ratios, summarize
from benchmarks.topology import Topology

ProgressFn = Callable[[str], None]

DEFAULT_STREAMS: tuple[int, ...] = (1, 4, 8)
DEFAULT_REPEATS = 3
DEFAULT_DURATION = 5.0
DEFAULT_PING_COUNT = 200
QUICK_STREAMS: tuple[int, ...] = (1, 4)
QUICK_REPEATS = 1
QUICK_DURATION = 3.0
QUICK_PING_COUNT = 100
REACH_TIMEOUT = 20.0
LOCK_PATH = Path("/run/lock/vmb-bench.lock")


def stderr_progress() -> ProgressFn:
    """Progress lines on stderr, stamped with seconds since the run started."""
    t0 = time.monotonic()

    def emit(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return emit


@contextlib.contextmanager
def exclusive_run(progress: ProgressFn) -> Iterator[None]:
    """Serialise benchmark runs on this machine: they share namespace names and CPUs."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_PATH, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("another benchmark run holds the lock; waiting")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_one_test(
    contender: Contender, topo: Topology, streams: int, repeat: int, duration: float
) -> IperfRun:
    """One iperf3 test with CPU measured from just before the client to after the server
    exits; retried once, since a single failed connect on a loaded machine is not a
    property of the contender."""
    last: Exception | None = None
    for _attempt in range(2):
        meter = cpu.CpuMeter(contender.cpu_pids)
        try:
            summary, raw = run_iperf(
                topo, streams=streams, duration=duration, on_client_start=meter.start
            )
        except IperfError as exc:
            last = exc
            time.sleep(1.0)
            continue
        sample = meter.stop()
        return IperfRun(
            streams=streams,
            repeat=repeat,
            duration_s=summary.duration_s,
            goodput_bps=summary.goodput_bps,
            sent_bps=summary.sent_bps,
            retransmits=summary.retransmits,
            bytes_received=summary.bytes_received,
            cpu=sample,
            machine_cpu_s_per_gb=cpu.per_gb(sample.machine_busy_s, summary.bytes_received),
            attributed_cpu_s_per_gb=cpu.per_gb(sample.attributed_s, summary.bytes_received),
            raw=raw,
        )
    raise IperfError(f"iperf3 failed twice: {last}")


def measure(
    contender: Contender,
    *,
    streams: Sequence[int],
    repeats: int,
    duration: float,
    ping_count: int,
    progress: ProgressFn,
) -> ContenderResult:
    """Set up, measure and tear down one contender; never raises for the contender's own
    failures, which are recorded in the result instead."""
    name = contender.name
    try:
        ok, reason = contender.available()
    except Exception as exc:  # an availability check that crashes means "cannot run here"
        ok, reason = False, f"availability check failed: {exc.__class__.__name__}: {exc}"
    if not ok:
        progress(f"{name}: skipped ({reason})")
        return ContenderResult(
            name=name, description=contender.description, status="skipped", reason=reason
        )
    result = ContenderResult(name=name, description=contender.description, status="ok")
    topo = contender.make_topology()
    owner = os.getpid()
    try:
        result.versions = contender.versions()
        netns.cleanup_all()
        t0 = time.monotonic()
        progress(f"{name}: setting up")
        topo.create()
        contender.setup(topo)
        if not topo.pod_reachable(REACH_TIMEOUT):
            raise RuntimeError(f"pod2 not reachable from pod1 {REACH_TIMEOUT:g}s after setup")
        result.setup_s = time.monotonic() - t0
        result.details = contender.details()
        result.background_busy_fraction = cpu.measure_background()
        ping = run_ping(topo, count=ping_count)
        result.ping = PingStats(
            sent=ping.sent, received=ping.received, rtts_ms=ping.rtts_ms,
            p50_ms=ping.p50_ms, p99_ms=ping.p99_ms,
        )
        progress(f"{name}: ready in {result.setup_s:.1f}s; ping p50 {ping.p50_ms or 0:.3f} ms, "
                 f"p99 {ping.p99_ms or 0:.3f} ms ({ping.received}/{ping.sent})")
        # Repeats are the outer loop so slow drift of the machine spreads over all
        # stream counts instead of biasing one.
        for rep in range(repeats):
            for n in streams:
                run = _run_one_test(contender, topo, n, rep, duration)
                result.runs.append(run)
                progress(
                    f"{name}: -P {n} repeat {rep + 1}/{repeats}: "
                    f"{run.goodput_bps / 1e9:.3f} Gbit/s, retr {run.retransmits}, "
                    f"{run.machine_cpu_s_per_gb or 0:.2f} CPU-s/GB machine, "
                    f"{run.attributed_cpu_s_per_gb or 0:.2f} attributed"
                )
    except Exception as exc:  # a broken contender must not stop the others
        result.status = "failed"
        result.reason = f"{exc.__class__.__name__}: {exc}"
        progress(f"{name}: FAILED: {result.reason}")
        print(traceback.format_exc(), file=sys.stderr, end="")
    finally:
        # A forked helper (pyroute2 forks) that unwinds this stack must not tear down
        # what the parent is still using.
        if os.getpid() == owner:
            try:
                contender.teardown(topo)
            except Exception as exc:  # report, then still destroy the topology
                progress(f"{name}: teardown error: {exc}")
            topo.destroy()
    result.summary = summarize(result.runs)
    return result


def install_packages(contenders: Sequence[Contender], progress: ProgressFn) -> None:
    """Install what the contenders need; failures only show up as skipped contenders."""
    if os.geteuid() != 0:
        return
    report = ensure_packages([p for c in contenders for p in c.packages], progress)
    if report.error:
        progress(f"package installation incomplete: {report.error}")


def pick_reference(results: Sequence[ContenderResult], wanted: str | None) -> str | None:
    """The contender the ratios are relative to: the one asked for, else the first
    preferred one that was measured, else the first measured one."""
    measured = [r.name for r in results if r.status == "ok" and r.summary]
    if wanted is not None:
        return wanted if wanted in measured else None
    for name in registry.RATIO_REFERENCES:
        if name in measured:
            return name
    return measured[0] if measured else None


def run(
    contenders: Sequence[Contender],
    streams: Sequence[int] | None = None,
    repeats: int | None = None,
    duration: float | None = None,
    quick: bool = False,
    progress: ProgressFn | None = None,
    *,
    ping_count: int | None = None,
    ratio_reference: str | None = None,
    only: list[str] | None = None,
    install: bool = False,
) -> RunReport:
    """Measure every contender (skipping unavailable ones) and return the run's report.

    ``quick`` means 1 repeat, streams (1, 4) and 3-second tests unless given explicitly.
    ``install`` first apt-get installs the Debian packages the contenders declare.
    """
    emit = progress or stderr_progress()
    if install:
        install_packages(contenders, emit)
    streams = tuple(streams or (QUICK_STREAMS if quick else DEFAULT_STREAMS))
    repeats = repeats or (QUICK_REPEATS if quick else DEFAULT_REPEATS)
    duration = duration or (QUICK_DURATION if quick else DEFAULT_DURATION)
    ping_count = ping_count or (QUICK_PING_COUNT if quick else DEFAULT_PING_COUNT)
    if repeats < 1 or duration <= 0 or not streams or min(streams) < 1:
        raise ValueError("repeats >= 1, duration > 0 and streams >= 1 are required")
    started = datetime.now(UTC)
    config = RunConfig(
        streams=list(streams), repeats=repeats, duration_s=duration, quick=quick,
        ping_count=ping_count, only=only,
    )
    results: list[ContenderResult] = []
    is_root = os.geteuid() == 0
    owner = os.getpid()
    lock = exclusive_run(emit) if is_root else contextlib.nullcontext()
    with lock:
        try:
            if is_root:
                leftovers = netns.cleanup_all()
                if leftovers:
                    emit(f"removed leftovers of an earlier run: {', '.join(leftovers)}")
            for contender in contenders:
                results.append(
                    measure(
                        contender, streams=streams, repeats=repeats, duration=duration,
                        ping_count=ping_count, progress=emit,
                    )
                )
        finally:
            if is_root and os.getpid() == owner:
                netns.cleanup_all()
    reference = pick_reference(results, ratio_reference)
    return RunReport(
        run_id=started.strftime("%Y%m%dT%H%M%SZ") + ("-quick" if quick else ""),
        started_at=started.isoformat(),
        finished_at=datetime.now(UTC).isoformat(),
        machine=machine_info(),
        config=config,
        contenders=results,
        ratio_reference=reference,
        ratios=compute_ratios(results, reference) if reference else [],
    )
