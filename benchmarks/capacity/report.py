"""The capacity run as JSON (everything), Markdown (the tables) and PNG (the chart)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from benchmarks.capacity.measure import workers_for_line_rate
from benchmarks.report import _cpu_model
from benchmarks.stats import median

CPU_FLAGS = ("aes", "pclmulqdq", "avx2", "avx512f", "vaes", "vpclmulqdq")
# Targets of the capacity issue, reported (never asserted): path clocks per packet at
# 1400 bytes with one core, and vppmesh against hand-configured VPP with the same crypto.
TARGET_ENCRYPT_CLOCKS = 1200
TARGET_DECRYPT_CLOCKS = 1400
TARGET_HAND_RATIO = 0.95
TARGET_WORKERS_3GHZ = 2.0


def cpu_flags() -> dict[str, bool]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return {f: f in have for f in CPU_FLAGS}
    except OSError:
        pass
    return {}


def machine() -> dict[str, object]:
    return {"cpu_model": _cpu_model(), "cores": os.cpu_count() or 1, "flags": cpu_flags(),
            "kernel": platform.release(), "python": platform.python_version()}


def ratios(per_repeat: list[dict[str, dict[str, float]]],
           pairs: tuple[tuple[str, str], ...], mixes: list[str]) -> dict[str, dict[str, Any]]:
    """a / b delivered Mpps within each repeat, then the median over repeats."""
    out: dict[str, dict[str, Any]] = {}
    for a, b in pairs:
        for mix in mixes:
            values = [r[a][mix] / r[b][mix] for r in per_repeat
                      if mix in r.get(a, {}) and r.get(b, {}).get(mix)]
            if values:
                out.setdefault(f"{a}/{b}", {})[mix] = round(median(values) or 0, 3)
    return out


def core_ratios(samples: dict[str, dict[str, list[dict[str, Any]]]],
                pairs: tuple[tuple[str, str], ...]) -> dict[str, dict[str, Any]]:
    """Per-core capacity of a / b on each side: b's path clocks per packet over a's, within
    each repeat, then the median. Unlike delivered Mpps, which the memif link between
    the two VPPs can bound, this compares what each dataplane costs a core."""
    out: dict[str, dict[str, Any]] = {}
    for a, b in pairs:
        for mix in samples.get(a, {}):
            for side in ("encrypt", "decrypt"):
                values = [sb[side]["path_clocks_per_packet"] / sa[side]["path_clocks_per_packet"]
                          for sa, sb in zip(samples[a][mix], samples.get(b, {}).get(mix, []),
                                            strict=False)
                          if sa.get(side) and sb.get(side)]
                if values:
                    out.setdefault(f"{a}/{b}", {})[f"{mix} {side}"] = round(
                        median(values) or 0, 3)
    return out


def projection(result: dict[str, Any]) -> dict[str, Any]:
    """Workers for 40G line rate (36.3 Gbit/s goodput, one direction) at 1400 bytes."""
    ghz = (result.get("vpp") or {}).get("tsc_ghz")
    pair = (result.get("pair") or {}).get("vppmesh-4t", {}).get("1400") or \
        (result.get("pair") or {}).get("vppmesh-1t", {}).get("1400")
    rows = [r for r in result.get("encrypt_only") or [] if "1400" in r["mixes"]]
    best = min(rows, key=lambda r: r["mixes"]["1400"]["encrypt_path_clocks"] or 1e12,
               default=None)
    out: dict[str, Any] = {"assumptions": "one direction of 36.3 Gbit/s TCP goodput at "
                           "pod MTU 1440 (3.27 Mpps); path clocks at 1400 bytes; NIC "
                           "driver cost not included", "tsc_ghz": ghz}
    for label, enc, dec in (
            ("pair", pair and pair.get("encrypt_path_clocks"),
             pair and pair.get("decrypt_path_clocks")),
            ("encrypt_only_best", best and best["mixes"]["1400"]["encrypt_path_clocks"], None)):
        if not enc:
            continue
        row: dict[str, Any] = {"encrypt_clocks": enc, "decrypt_clocks": dec}
        for tag, clock in (("at_tsc", ghz), ("at_3ghz", 3.0)):
            if clock:
                row[f"encrypt_workers_{tag}"] = round(workers_for_line_rate(enc, clock), 2)
                if dec:
                    row[f"decrypt_workers_{tag}"] = round(workers_for_line_rate(dec, clock), 2)
        if best is not None and label == "encrypt_only_best":
            row["engine"] = best["engine"]
            row["workers"] = best["workers"]
        out[label] = row
    return out


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def markdown(result: dict[str, Any]) -> str:
    m, vpp, cfg = result["machine"], result.get("vpp") or {}, result["config"]
    flags = ", ".join(f for f, on in m["flags"].items() if on)
    crypto = vpp.get("crypto") or {}
    lines = [
        f"# Capacity run {result['run_id']}", "",
        f"- Machine: {m['cpu_model']}, {m['cores']} cores ({flags}); VPP clock "
        f"{_fmt(vpp.get('tsc_ghz'), 3)} GHz; kernel {m['kernel']}",
        f"- VPP {vpp.get('version', '?')}; AES-GCM-256 engine {crypto.get('active')} "
        f"(native variant {crypto.get('native_variant') or 'not logged'}; engines "
        f"{', '.join(crypto.get('engines', []))}); vppmesh chose "
        f"{vpp.get('vppmesh_engine', crypto.get('active'))}",
        f"- {cfg['repeats']} repeat(s), {cfg['window_s']} s windows, medians. Sizes are inner "
        "IP bytes; IMIX = 7x64 : 4x570 : 1x1400. Path clocks = clocks per delivered "
        "packet of every node but the generator, memif and the sink (a NIC driver "
        "replaces those).", ""]
    if "pair" in result:
        lines += ["## Two VPPs, one core each, memif between them", "",
                  "| contender | size | delivered Mpps | inner Gbit/s | encrypt path clk/pkt "
                  "| decrypt path clk/pkt |", "|---|---|---:|---:|---:|---:|"]
        for name, by_mix in result["pair"].items():
            for mix, s in by_mix.items():
                lines.append(f"| {name} | {mix} | {_fmt(s['mpps'], 3)} | "
                             f"{_fmt(s['inner_gbps'])} | {_fmt(s['encrypt_path_clocks'], 0)} | "
                             f"{_fmt(s['decrypt_path_clocks'], 0)} |")
        if result.get("ratios"):
            lines += ["", "Ratios of delivered Mpps within each repeat (median):", "",
                      "| ratio | " + " | ".join(cfg["mixes"]) + " |",
                      "|---|" + "---:|" * len(cfg["mixes"])]
            for key, by_mix in result["ratios"].items():
                lines.append(f"| {key} | " + " | ".join(_fmt(by_mix.get(x), 3)
                                                        for x in cfg["mixes"]) + " |")
        if result.get("core_ratios"):
            cols = [f"{m} {side}" for m in cfg["mixes"] for side in ("encrypt", "decrypt")]
            lines += ["", "Per-core capacity ratios (the other's path clocks / this one's, "
                      "within each repeat, median):", "",
                      "| ratio | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
            for key, by_col in result["core_ratios"].items():
                lines.append(f"| {key} | " + " | ".join(_fmt(by_col.get(c), 3)
                                                        for c in cols) + " |")
        top = result["pair"].get("vppmesh-4t", {}).get("1400") or {}
        for side in ("encrypt", "decrypt"):
            nodes = list((top.get(f"{side}_nodes") or {}).items())[:8]
            if nodes:
                lines += ["", f"vppmesh-4t, 1400 bytes, {side} side, clocks per packet by "
                          "node: " + ", ".join(f"{n} {_fmt(c, 0)}" for n, c in nodes)]
    if result.get("encrypt_only"):
        lines += ["", "## Encrypt only: one VPP, vppmesh-4t into a sink", "",
                  "| workers | engine | size | Mpps | inner Gbit/s | encrypt path clk/pkt | "
                  "SA placement |", "|---:|---|---|---:|---:|---:|---|"]
        for row in result["encrypt_only"]:
            placement = row.get("placement") or {}
            where = "ok" if placement.get("all_ok") else "WRONG" if placement else "-"
            for mix, s in row["mixes"].items():
                lines.append(f"| {row['workers']} | {row['engine']} | {mix} | "
                             f"{_fmt(s['mpps'], 3)} | {_fmt(s['inner_gbps'])} | "
                             f"{_fmt(s['encrypt_path_clocks'], 0)} | {where} |")
    proj = result.get("projection") or {}
    if any(k in proj for k in ("pair", "encrypt_only_best")):
        lines += ["", "## Projection: workers for 40G line rate", "",
                  f"{proj['assumptions']}.", ""]
        for label, row in proj.items():
            if isinstance(row, dict):
                lines.append(
                    f"- {label}: encrypt {_fmt(row.get('encrypt_clocks'), 0)} clk/pkt → "
                    f"{_fmt(row.get('encrypt_workers_at_tsc'))} workers at the VPP clock, "
                    f"{_fmt(row.get('encrypt_workers_at_3ghz'))} at 3 GHz"
                    + (f"; decrypt {_fmt(row.get('decrypt_clocks'), 0)} clk/pkt → "
                       f"{_fmt(row.get('decrypt_workers_at_3ghz'))} at 3 GHz"
                       if row.get("decrypt_clocks") else "")
                    + (f" (engine {row['engine']}, W={row['workers']})"
                       if row.get("engine") else ""))
        lines += ["", f"Targets (reported, not asserted): encrypt ≤ {TARGET_ENCRYPT_CLOCKS}, "
                  f"decrypt ≤ {TARGET_DECRYPT_CLOCKS} clk/pkt at 1400 bytes; vppmesh ≥ "
                  f"{TARGET_HAND_RATIO} x hand-configured; ≤ {TARGET_WORKERS_3GHZ:g} workers "
                  "at 3 GHz."]
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = []
    if result.get("pair"):
        panels.append(("two VPPs over memif: delivered Mpps", {
            name: {mix: s["mpps"] or 0 for mix, s in by_mix.items()}
            for name, by_mix in result["pair"].items()}))
    if result.get("encrypt_only"):
        panels.append(("encrypt only (vppmesh-4t): Mpps", {
            f"W={r['workers']} {r['engine']}": {mix: s["mpps"] or 0
                                                for mix, s in r["mixes"].items()}
            for r in result["encrypt_only"]}))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (title, data) in zip(axes[0], panels, strict=True):
        mixes = sorted({m for v in data.values() for m in v})
        width = 0.8 / max(len(mixes), 1)
        for i, mix in enumerate(mixes):
            xs = [j + i * width for j in range(len(data))]
            ax.bar(xs, [v.get(mix, 0) for v in data.values()], width, label=f"{mix} B")
        ax.set_xticks([j + width * (len(mixes) - 1) / 2 for j in range(len(data))])
        ax.set_xticklabels(list(data), rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("Mpps")
        ax.legend(fontsize=8)
    fig.suptitle(f"vppmesh capacity, run {result['run_id']} ({result['machine']['cpu_model']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(result: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{result['run_id']}-capacity"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    paths[1].write_text(markdown(result))
    png = stem.with_suffix(".png")
    if chart(result, png):
        paths.append(png)
    return paths
