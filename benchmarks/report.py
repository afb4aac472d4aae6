"""Writing a run: raw JSON for later analysis, a Markdown table and a PNG chart for people."""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

from benchmarks.iperf import tool_version
from benchmarks.models import ContenderResult, MachineInfo, RunReport

DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def machine_info() -> MachineInfo:
    """Describe this machine and the measuring tools."""
    return MachineInfo(
        hostname=socket.gethostname(),
        kernel=platform.release(),
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count() or 1,
        os_release=_os_release(),
        python=platform.python_version(),
        tools={
            "iperf3": tool_version(["iperf3", "--version"]),
            "ping": tool_version(["ping", "-V"]),
        },
        tcp_congestion_control=_read_sysctl("net/ipv4/tcp_congestion_control"),
    )


def _read_sysctl(key: str) -> str:
    """A sysctl of the root namespace (new namespaces start from its TCP defaults)."""
    try:
        return Path("/proc/sys", key).read_text().strip()
    except OSError:
        return "unknown"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_markdown(report: RunReport) -> str:
    """The human summary: one row per contender and stream count, then what was skipped."""
    m, cfg = report.machine, report.config
    lines = [
        f"# Benchmark run {report.run_id}",
        "",
        f"- Machine: {m.cpu_model}, {m.cpu_count} CPUs, kernel {m.kernel}, {m.os_release}",
        f"- Tools: {m.tools.get('iperf3', '?')}; {m.tools.get('ping', '?')}; "
        f"TCP congestion control {m.tcp_congestion_control}",
        f"- Config: streams {', '.join(map(str, cfg.streams))}; {cfg.repeats} repeat(s); "
        f"{cfg.duration_s:g} s per test; ping {cfg.ping_count} packets"
        + ("; quick" if cfg.quick else ""),
        "- Traffic: TCP pod1 -> pod2 (iperf3), medians over repeats. "
        "CPU-s/GB: machine = whole-machine busy time from /proc/stat; attributed = "
        "iperf3 + contender processes + ksoftirqd. GB = 10^9 bytes received.",
        "",
        "| Contender | Streams | Goodput Gbit/s | Retransmits | CPU-s/GB machine "
        "| CPU-s/GB attributed | Ping p50 ms | Ping p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    measured = [c for c in report.contenders if c.summary]
    for c in measured:
        for i, s in enumerate(c.summary):
            # Ping is measured once per contender, so it is shown on its first row only.
            p50 = _fmt(c.ping.p50_ms, 3) if c.ping and i == 0 else ""
            p99 = _fmt(c.ping.p99_ms, 3) if c.ping and i == 0 else ""
            lines.append(
                f"| {c.name if i == 0 else ''} | {s.streams} | {_fmt(s.median_gbps, 3)} "
                f"| {_fmt(s.median_retransmits, 0)} | {_fmt(s.median_machine_cpu_s_per_gb)} "
                f"| {_fmt(s.median_attributed_cpu_s_per_gb)} | {p50} | {p99} |"
            )
    if report.ratios:
        lines += [
            "",
            f"## Ratios: {report.ratio_reference} ÷ other (same run)",
            "",
            "| Other | Streams | Goodput ratio | CPU-s/GB ratio (machine) |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {r.other} | {r.streams} | {_fmt(r.goodput)} | {_fmt(r.machine_cpu_s_per_gb)} |"
            for r in report.ratios
        ]
    not_measured = [c for c in report.contenders if c.status != "ok"]
    if not_measured:
        lines += ["", "## Skipped or failed", ""]
        lines += [f"- **{c.name}** ({c.status}): {c.reason}" for c in not_measured]
    lines += ["", "## Contenders", ""]
    for c in report.contenders:
        if c.status == "skipped":
            continue
        facts = [f"{k}: {v}" for k, v in {**c.versions, **c.details}.items()]
        if c.background_busy_fraction is not None:
            facts.append(f"machine busy before start: {c.background_busy_fraction:.0%}")
        lines.append(f"- **{c.name}**: {c.description}. " + "; ".join(facts))
    return "\n".join(lines) + "\n"


def render_png(report: RunReport, path: Path) -> None:
    """Grouped bars of goodput and machine CPU-s/GB per contender and stream count."""
    # Imported here so that the headless backend is chosen before pyplot loads.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured: list[ContenderResult] = [c for c in report.contenders if c.summary]
    streams = sorted({s.streams for c in measured for s in c.summary})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.8 / max(1, len(streams))
    for ax, title, attr in (
        (axes[0], "Goodput (Gbit/s, higher is better)", "median_gbps"),
        (axes[1], "CPU-seconds per GB, whole machine (lower is better)",
         "median_machine_cpu_s_per_gb"),
    ):
        for j, n in enumerate(streams):
            values = []
            for c in measured:
                s = next((x for x in c.summary if x.streams == n), None)
                v = getattr(s, attr) if s is not None else None
                values.append(v if v is not None else 0.0)
            xs = [i + (j - (len(streams) - 1) / 2) * width for i in range(len(measured))]
            bars = ax.bar(xs, values, width=width, label=f"-P {n}")
            # Labels keep the small bars readable next to the unencrypted ceiling.
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(measured)), [c.name for c in measured], rotation=20)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(title="streams", fontsize=8)
    skipped = [c.name for c in report.contenders if c.status != "ok"]
    caption = f"run {report.run_id} on {report.machine.cpu_model}, {report.machine.cpu_count} CPUs"
    if skipped:
        caption += f"; not measured: {', '.join(skipped)}"
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(report: RunReport, out_dir: Path) -> dict[str, Path]:
    """Write ``<run_id>.json``, ``.md`` and ``.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / f"{report.run_id}.json",
        "markdown": out_dir / f"{report.run_id}.md",
        "png": out_dir / f"{report.run_id}.png",
    }
    paths["json"].write_text(report.model_dump_json(indent=1) + "\n")
    paths["markdown"].write_text(render_markdown(report))
    render_png(report, paths["png"])
    return paths
