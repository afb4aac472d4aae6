"""Result records of a benchmark run, written as JSON so later runs can be compared."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
BYTES_PER_GB = 1e9


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MachineInfo(_Model):
    """What the numbers were measured on; ratios are only meaningful on one machine."""

    hostname: str
    kernel: str
    cpu_model: str
    cpu_count: int
    os_release: str
    python: str
    tools: dict[str, str] = Field(default_factory=dict)
    #: Retransmit counts depend on it, so it is recorded with every run.
    tcp_congestion_control: str = ""


class CpuSample(_Model):
    """CPU spent while one iperf3 test ran.

    ``machine_busy_s`` is the whole machine (user+nice+system+irq+softirq of /proc/stat),
    which counts every kernel path the packets took but also any unrelated load.
    ``attributed_s`` counts only the iperf3 processes, the contender's processes and the
    ksoftirqd threads, which is robust to unrelated load but misses softirq work that
    interrupted other processes.
    """

    wall_s: float
    machine_busy_s: float
    machine_capacity_s: float
    iperf_s: float
    contender_s: dict[str, float] = Field(default_factory=dict)
    ksoftirqd_s: float = 0.0
    attributed_s: float


class IperfRun(_Model):
    """One iperf3 test (pod1 -> pod2) with its CPU cost."""

    streams: int
    repeat: int
    duration_s: float
    goodput_bps: float
    sent_bps: float
    retransmits: int | None
    bytes_received: int
    cpu: CpuSample
    machine_cpu_s_per_gb: float | None
    attributed_cpu_s_per_gb: float | None
    raw: dict[str, Any]


class PingStats(_Model):
    """Unloaded round-trip times pod1 -> pod2."""

    sent: int
    received: int
    rtts_ms: list[float]
    p50_ms: float | None
    p99_ms: float | None


class StreamSummary(_Model):
    """Medians over the repeats of one stream count."""

    streams: int
    runs: int
    median_gbps: float
    median_retransmits: float | None
    median_machine_cpu_s_per_gb: float | None
    median_attributed_cpu_s_per_gb: float | None


class ContenderResult(_Model):
    """Everything measured for one contender, or why it was not measured."""

    name: str
    description: str = ""
    status: Literal["ok", "skipped", "failed"]
    reason: str = ""
    versions: dict[str, str] = Field(default_factory=dict)
    details: dict[str, str] = Field(default_factory=dict)
    setup_s: float | None = None
    background_busy_fraction: float | None = None
    ping: PingStats | None = None
    runs: list[IperfRun] = Field(default_factory=list)
    summary: list[StreamSummary] = Field(default_factory=list)


class Ratio(_Model):
    """``reference`` divided by ``other`` for one stream count, within one run."""

    reference: str
    other: str
    streams: int
    goodput: float | None
    machine_cpu_s_per_gb: float | None


class RunConfig(_Model):
    """The knobs a run was started with."""

    streams: list[int]
    repeats: int
    duration_s: float
    quick: bool
    ping_count: int
    only: list[str] | None = None


class RunReport(_Model):
    """One benchmark run: the unit that is written to ``benchmarks/results``."""

    schema_version: int = SCHEMA_VERSION
    run_id: str
    started_at: str
    finished_at: str
    machine: MachineInfo
    config: RunConfig
    contenders: list[ContenderResult]
    ratio_reference: str | None = None
    ratios: list[Ratio] = Field(default_factory=list)
