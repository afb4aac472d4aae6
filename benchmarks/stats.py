"""Medians, percentiles and ratios.

Medians rather than means because one noisy repeat on a shared 2-core machine should not
move the result; ratios only ever compare contenders of the same run.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

from benchmarks.models import ContenderResult, IperfRun, Ratio, StreamSummary


def median(values: Iterable[float | int | None]) -> float | None:
    """Median of the values that are present; ``None`` when there are none."""
    present = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not present:
        return None
    return float(statistics.median(present))


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Percentile with linear interpolation between closest ranks (numpy's default)."""
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile out of range: {pct}")
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * pct / 100
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or ``None`` when either is missing or the divisor is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def summarize(runs: Sequence[IperfRun]) -> list[StreamSummary]:
    """One summary per stream count, in ascending stream order."""
    out: list[StreamSummary] = []
    for streams in sorted({r.streams for r in runs}):
        group = [r for r in runs if r.streams == streams]
        gbps = median(r.goodput_bps / 1e9 for r in group)
        out.append(
            StreamSummary(
                streams=streams,
                runs=len(group),
                median_gbps=gbps if gbps is not None else 0.0,
                median_retransmits=median(r.retransmits for r in group),
                median_machine_cpu_s_per_gb=median(r.machine_cpu_s_per_gb for r in group),
                median_attributed_cpu_s_per_gb=median(
                    r.attributed_cpu_s_per_gb for r in group
                ),
            )
        )
    return out


def compute_ratios(contenders: Sequence[ContenderResult], reference: str) -> list[Ratio]:
    """Reference ÷ every other measured contender, per stream count both measured.

    A goodput ratio above 1 means the reference moved more data; a CPU-per-GB ratio
    below 1 means the reference spent less CPU per byte.
    """
    by_name = {c.name: c for c in contenders if c.status == "ok"}
    ref = by_name.get(reference)
    if ref is None:
        return []
    ref_summary = {s.streams: s for s in ref.summary}
    out: list[Ratio] = []
    for other in by_name.values():
        if other.name == reference:
            continue
        for s in other.summary:
            r = ref_summary.get(s.streams)
            if r is None:
                continue
            out.append(
                Ratio(
                    reference=reference,
                    other=other.name,
                    streams=s.streams,
                    goodput=ratio(r.median_gbps, s.median_gbps),
                    machine_cpu_s_per_gb=ratio(
                        r.median_machine_cpu_s_per_gb, s.median_machine_cpu_s_per_gb
                    ),
                )
            )
    return out
