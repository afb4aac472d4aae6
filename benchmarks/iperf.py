"""Running iperf3 and ping between the pods, and parsing what they print."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks import netns
from benchmarks.stats import percentile
from benchmarks.topology import Topology

IPERF_PORT = 5201


class IperfError(RuntimeError):
    """iperf3 did not produce a usable result; the message says why."""


@dataclass(frozen=True)
class IperfSummary:
    """The numbers we keep from one iperf3 JSON result."""

    streams: int
    duration_s: float
    goodput_bps: float
    sent_bps: float
    retransmits: int | None
    bytes_received: int


@dataclass(frozen=True)
class PingResult:
    """Per-packet RTTs of one ping run."""

    sent: int
    received: int
    rtts_ms: list[float]

    @property
    def p50_ms(self) -> float | None:
        """Median RTT."""
        return percentile(self.rtts_ms, 50)

    @property
    def p99_ms(self) -> float | None:
        """99th-percentile RTT."""
        return percentile(self.rtts_ms, 99)


def load_iperf_json(text: str) -> dict[str, Any]:
    """Decode iperf3 ``--json`` output, turning its error reports into :class:`IperfError`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        snippet = text.strip()[:200] or "<empty>"
        raise IperfError(f"iperf3 printed no valid JSON ({exc.msg}): {snippet}") from None
    if not isinstance(data, dict):
        raise IperfError("iperf3 JSON is not an object")
    if data.get("error"):
        raise IperfError(f"iperf3 failed: {data['error']}")
    return data


def parse_iperf(data: dict[str, Any]) -> IperfSummary:
    """Goodput (receiver side), retransmits and bytes from a decoded iperf3 TCP result."""
    end = data.get("end") or {}
    received = end.get("sum_received")
    sent = end.get("sum_sent")
    if not isinstance(received, dict) or not isinstance(sent, dict):
        raise IperfError("iperf3 JSON has no end.sum_received/sum_sent (not a TCP test?)")
    test_start = (data.get("start") or {}).get("test_start") or {}
    streams = int(test_start.get("num_streams") or len(end.get("streams") or []) or 1)
    retrans = sent.get("retransmits")
    return IperfSummary(
        streams=streams,
        duration_s=float(received.get("seconds") or 0.0),
        goodput_bps=float(received["bits_per_second"]),
        sent_bps=float(sent.get("bits_per_second") or 0.0),
        retransmits=int(retrans) if retrans is not None else None,
        bytes_received=int(received.get("bytes") or 0),
    )


def _wait_listening(ns: str, port: int, server: subprocess.Popen[Any], timeout: float) -> None:
    """Block until the iperf3 server accepts connections, so the client never races it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            err = server.stderr.read() if server.stderr else ""
            raise IperfError(f"iperf3 server exited early (rc={server.returncode}): {err}")
        proc = netns.run_in(ns, ["ss", "-Hltn", f"sport = :{port}"], check=False)
        if proc.stdout.strip():
            return
        time.sleep(0.05)
    raise IperfError(f"iperf3 server not listening on port {port} after {timeout}s")


def client_argv(
    server_ip: str, *, streams: int, duration: float, port: int = IPERF_PORT, omit: int = 0
) -> list[str]:
    """The iperf3 client command line (kept separate so it can be recorded and tested)."""
    argv = [
        "iperf3", "--client", server_ip, "--port", str(port), "--json",
        "--parallel", str(streams), "--time", f"{duration:g}", "--connect-timeout", "3000",
    ]
    if omit:
        argv += ["--omit", str(omit)]
    return argv


def run_iperf(
    topo: Topology,
    *,
    streams: int,
    duration: float,
    port: int = IPERF_PORT,
    omit: int = 0,
    on_client_start: Callable[[], None] | None = None,
) -> tuple[IperfSummary, dict[str, Any]]:
    """One TCP test pod1 -> pod2; returns the summary and the full JSON.

    The server runs with ``--one-off`` so it exits (and is reaped, for CPU accounting)
    with the test. ``on_client_start`` is called right before the client starts.
    """
    server = netns.popen_in(
        topo.b.pod_ns,
        ["iperf3", "--server", "--one-off", "--port", str(port), "--bind", topo.b.pod_ip],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_listening(topo.b.pod_ns, port, server, timeout=10.0)
        if on_client_start is not None:
            on_client_start()
        client = netns.run_in(
            topo.a.pod_ns,
            client_argv(topo.b.pod_ip, streams=streams, duration=duration, port=port, omit=omit),
            check=False,
            timeout=duration + omit + 30,
        )
        data = load_iperf_json(client.stdout)
        if client.returncode != 0:
            raise IperfError(f"iperf3 client rc={client.returncode}: {client.stderr.strip()}")
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            netns.stop_process(server)
        return parse_iperf(data), data
    finally:
        netns.stop_process(server)
        if server.stderr:
            server.stderr.close()


_RTT_RE = re.compile(r"\bicmp_seq=(\d+)\b.*\btime[=<]([\d.]+) ms")
_SUMMARY_RE = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")


def parse_ping(output: str) -> PingResult:
    """Per-packet RTTs and the transmitted/received counts of iputils ping output."""
    rtts: list[float] = []
    seen: set[int] = set()
    for line in output.splitlines():
        m = _RTT_RE.search(line)
        if m and "DUP!" not in line:
            seq = int(m.group(1))
            if seq not in seen:
                seen.add(seq)
                rtts.append(float(m.group(2)))
    summary = _SUMMARY_RE.search(output)
    if summary is None:
        raise ValueError("ping output has no 'packets transmitted' summary")
    return PingResult(sent=int(summary.group(1)), received=int(summary.group(2)), rtts_ms=rtts)


def run_ping(topo: Topology, count: int = 200, interval: float = 0.01) -> PingResult:
    """Unloaded RTT pod1 -> pod2; sub-0.2 s intervals need root, which the harness has."""
    proc = netns.run_in(
        topo.a.pod_ns,
        ["ping", "-n", "-c", str(count), "-i", f"{interval:g}", "-W", "1", topo.b.pod_ip],
        check=False,
        timeout=count * max(interval, 0.001) + 15,
    )
    result = parse_ping(proc.stdout)
    if result.received == 0:
        raise IperfError(f"ping pod1 -> pod2 got no replies: {proc.stderr.strip()}")
    return result


def tool_version(argv: Sequence[str]) -> str:
    """First line of a tool's version output, or why there is none."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
        )
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc.__class__.__name__})"
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else "unknown"
