"""``python -m benchmarks.storm``: a vppmesh mesh on the namespace testbed under pod traffic
(100 pps pings with sequence numbers and a TCP stream with a marker payload across every
pair) for `--minutes`, under a seeded fault schedule: agent and VPP kills, a peer leaving,
torn mesh files, link loss, netem, the channel blocked, replays and spoofs, clock steps
(`--datastore`: the membership in etcd, with etcd restarts and torn records).

Measured, per fault kind and for the whole run: the pods' outage, lost pings, TCP stalls,
the time until every pair is on agreed keys again; the underlay captured the whole time
and checked for anything in clear; each agent's RSS and descriptors and each VPP's SAs
and heap over time. Exit 1 on any clear packet, any pair not back on agreed keys within
RECOVERY_BOUND after the last fault, or any key used past key_max_seconds.
Root and a VPP (VPPMESH_VPP) are needed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.capacity.report import machine
from benchmarks.report import DEFAULT_RESULTS_DIR
from benchmarks.storm import analysis, schedule
from benchmarks.storm.rig import OUTSIDE, PING_INTERVAL, Storm, log

RECOVERY_BOUND = 120.0  # seconds after a fault ends for every pair to be on agreed keys
WARMUP = 20.0
MIN_OBSERVE = 10.0  # seconds each fault is watched after it is undone
KEY_AGE_SLACK = 10.0  # the agent's poll and our sampling, beyond key_max_seconds
LISTED_GAP = 5  # pings: shorter gaps are only counted in the JSON


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.storm",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true",
                        help="about 5 minutes: one round of a representative subset")
    parser.add_argument("--seed", type=int, default=None,
                        help="the fault schedule's seed (printed; default: random)")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--key-max-seconds", type=int, default=60)
    parser.add_argument("--nat", choices=("none", "masquerade", "masquerade-random",
                                          "static"), default="none",
                        help="the last node behind a NAT router of this kind (testbed "
                        "--nat); adds the nat_flush fault (conntrack -F)")
    parser.add_argument("--datastore", action="store_true",
                        help="membership in etcd (agents `up --watch --datastore`): "
                        "peer_leave deletes the record, torn_record replaces torn_write, "
                        "adds etcd_restart")
    parser.add_argument("--schedule-only", action="store_true",
                        help="print the schedule and exit (no root needed)")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/vppmesh-storm"),
                        help="where pings, TCP logs, the capture and agent logs go")
    parser.add_argument("--notes", default="")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS_DIR)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    minutes = args.minutes if not args.quick else \
        schedule.DATASTORE_QUICK_MINUTES if args.datastore else 5.0
    faults = schedule.build(seed, minutes=minutes, nodes=args.nodes, quick=args.quick,
                            key_max_seconds=args.key_max_seconds, nat=args.nat != "none",
                            datastore=args.datastore)
    print(f"storm seed {seed}: {len(faults)} faults over {minutes:g} min "
          f"(replay: --seed {seed}{' --quick' if args.quick else ''}"
          f"{f' --nat {args.nat}' if args.nat != 'none' else ''}"
          f"{' --datastore' if args.datastore else ''})", flush=True)
    for fault in faults:
        print(f"  t+{fault.planned_at:.0f} s  {fault.describe()}", flush=True)
    if args.schedule_only:
        return 0
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    work = args.work / run_id
    work.mkdir(parents=True, exist_ok=True)
    storm = Storm(nodes=args.nodes, work=work, key_max_seconds=args.key_max_seconds,
                  nat=args.nat, datastore=args.datastore)
    records: list[dict[str, Any]] = []
    recovery: float | None = None
    t0 = end = time.time()
    try:
        storm.build()
        settled = storm.wait_agreed(180)
        log(f"every pair on agreed keys after {settled} s" if settled is not None
            else "not every pair on agreed keys after 180 s: storming anyway")
        storm.heap_start = storm.heap_sample()
        storm.start_capture()
        storm.start_traffic()
        storm.start_samplers()
        t0 = time.time()
        time.sleep(WARMUP)
        base = time.time()
        for fault in faults:
            wait = base + fault.planned_at - time.time()
            if wait > 0:
                time.sleep(wait)
            record: dict[str, Any] = {**fault.__dict__, "description": fault.describe()}
            records.append(record)
            log(f"fault: {fault.describe()}")
            try:
                storm.apply(fault, record)
            except Exception as exc:  # recorded; the storm goes on
                record["error"] = f"{type(exc).__name__}: {exc}"
                record.setdefault("restored", time.time())
                log(f"  failed to apply: {record['error']}")
            time.sleep(MIN_OBSERVE)
            exited = storm.check_agents()
            if exited:
                record["agents_exited"] = exited
            took = storm.wait_agreed(RECOVERY_BOUND)
            storm.note_agent_log(fault, record)
            log(f"  every pair agreed {took if took is None else round(took, 1)} s after "
                "observing")
        last = records[-1]["restored"] if records else time.time()
        left = RECOVERY_BOUND - (time.time() - last)
        took = storm.wait_agreed(max(left, 1.0))
        recovery = None if took is None else time.time() - last
        time.sleep(15)
        end = time.time()
    finally:
        storm.stop_samplers()
        storm.teardown()
    result = analyse(storm, records, seed=seed, minutes=minutes, quick=args.quick, t0=t0,
                     end=end, recovery=recovery, run_id=run_id, notes=args.notes,
                     command=" ".join(["python -m benchmarks.storm",
                                       *(argv if argv is not None else sys.argv[1:])]))
    analysis.write_results(args.out, result)
    return 1 if result["failures"] else 0


def analyse(storm: Storm, records: list[dict[str, Any]], *, seed: int, minutes: float,
            quick: bool, t0: float, end: float, recovery: float | None, run_id: str,
            notes: str, command: str) -> dict[str, Any]:
    log("analysing: pings, TCP logs, the capture")
    gaps: dict[str, list[analysis.Gap]] = {}
    sent = lost = 0
    for pair, (_, path) in storm.pings.items():
        replies = analysis.ping_replies(path.read_text(errors="replace"))
        gaps[pair] = analysis.ping_gaps(replies)
        if replies:
            sent += replies[-1][0] - replies[0][0] + 1
            lost += sum(g.lost for g in gaps[pair])
    stalls: list[dict[str, Any]] = []
    for node in storm.bed.nodes:
        path = storm.work / f"tcp-{node.name}.jsonl"
        if path.exists():
            for stall in analysis.tcp_stalls(path.read_text().splitlines()):
                stall["dst"] = node.name
                stalls.append(stall)
    analysis.attribute(records, gaps, stalls, storm.key_samples, PING_INTERVAL, end)
    nodes = analysis.underlay_addresses(storm.bed.nodes)
    capture = analysis.check_capture(storm.capture_path, nodes, {OUTSIDE}, records) \
        if storm.capture_path.exists() else {"counts": {}, "clear": [], "other_examples": []}
    over = [{"t": s["t"], "pair": p, "age": v["age"]} for s in storm.key_samples
            for p, v in s["pairs"].items()
            if v["age"] is not None and v["age"] > storm.key_max_seconds + KEY_AGE_SLACK]
    failures = []
    if capture["clear"]:
        first = capture["clear"][0]
        failures.append(f"{capture['counts'].get('clear', 0)} frames in clear on the underlay "
                        f"(first at {first['t']:.3f}, after {first['after']})")
    if recovery is None:
        failures.append(f"not every pair back on agreed keys within {RECOVERY_BOUND:.0f} s "
                        "after the last fault")
    if over:
        failures.append(f"{len(over)} samples of a key older than key_max_seconds "
                        f"({storm.key_max_seconds} s) + {KEY_AGE_SLACK:.0f} s (worst "
                        f"{max(o['age'] for o in over):.0f} s, pair {over[0]['pair']})")
    all_gaps = [g for pair in gaps.values() for g in pair]
    return {
        "run_id": run_id, "command": command, "seed": seed, "minutes": minutes, "quick": quick,
        "nodes": len(storm.bed.nodes), "tunnels": storm.spec.tunnels,
        "membership": "etcd" if getattr(storm, "datastore", False) else "mesh file",
        "key_max_seconds": storm.key_max_seconds, "recovery_bound_s": RECOVERY_BOUND,
        "machine": machine(), "notes": notes, "work_dir": str(storm.work),
        "t0": t0, "end": end, "failures": failures,
        "recovery_after_last_fault_s": recovery,
        "faults": records, "per_kind": analysis.per_kind(records),
        "whole_run": {
            "pings_sent": sent, "pings_lost": lost,
            "loss_percent": 100.0 * lost / sent if sent else 0.0,
            "longest_gap_s": max((g.seconds(PING_INTERVAL) for g in all_gaps), default=0.0),
            "tcp_stalls": len(stalls),
            "tcp_stall_worst_s": max((s["seconds"] for s in stalls), default=0.0),
            "keys_over_limit": len(over)},
        # Gaps of a few pings (netem's loss) are counted above, not listed.
        "capture": capture, "ping_gaps": {p: [{**g.__dict__, "seconds": g.seconds(
            PING_INTERVAL)} for g in gs if g.lost >= LISTED_GAP] for p, gs in gaps.items()},
        "tcp_stalls": stalls, "key_samples": storm.key_samples,
        "agent_samples": storm.agent_samples, "vpp_samples": storm.vpp_samples,
        "metric_samples": storm.metric_samples, "injections": storm.injections,
        "metrics": metrics_totals(storm.metric_samples),
        "leaks": leaks(storm.agent_samples, storm.vpp_samples, t0,
                       getattr(storm, "heap_start", {}), getattr(storm, "heap_end", {})),
    }


def metrics_totals(samples: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Each counter series summed over the nodes and over each agent's lives (a restarted
    agent counts from 0 again: the last value of each life)."""
    totals: dict[str, float] = {}
    for node_samples in samples.values():
        last: dict[tuple[int, str], float] = {}
        for sample in node_samples:
            for series, value in sample["values"].items():
                last[(sample["life"], series)] = value
        for (_, series), value in last.items():
            if "_total" in series or series.startswith("vppmesh_esp_errors"):
                totals[series] = totals.get(series, 0.0) + value
    return dict(sorted(totals.items()))


def leaks(agents: dict[str, list[dict[str, Any]]], vpps: dict[str, list[dict[str, Any]]],
          t0: float, heap_start: dict[str, int], heap_end: dict[str, int]) -> dict[str, Any]:
    """Per agent its longest life (a restarted agent starts over): RSS and descriptors
    (first, last, least-squares slope) and RSS growth from that life's minute 5 (start-up
    growth is not a leak); per VPP its SAs and its heap before the traffic and after it
    (a VPP killed in between starts over)."""
    out: dict[str, Any] = {"agents": {}, "vpp": {}}
    for node, samples in agents.items():
        lives: dict[int, list[dict[str, Any]]] = {}
        for sample in samples:
            lives.setdefault(sample["life"], []).append(sample)
        life = max(lives.values(), key=lambda ss: ss[-1]["t"] - ss[0]["t"], default=[])
        rss = [(s["t"], s["rss_kib"]) for s in life]
        fds = [(s["t"], float(s["fds"])) for s in life]
        rss_slope, fd_slope = analysis.slope(rss), analysis.slope(fds)
        out["agents"][node] = {
            "samples": len(life), "lives": samples[-1]["life"] if samples else 0,
            "rss_start_mib": rss[0][1] / 1024 if rss else None,
            "rss_end_mib": rss[-1][1] / 1024 if rss else None,
            "life_minutes": (rss[-1][0] - rss[0][0]) / 60 if rss else None,
            "rss_growth_percent": analysis.growth_percent(rss, rss[0][0] + 300)
            if rss else None,
            "rss_slope_kib_min": rss_slope * 60 if rss_slope is not None else None,
            "fds_start": int(fds[0][1]) if fds else None,
            "fds_end": int(fds[-1][1]) if fds else None,
            "fds_slope_min": fd_slope * 60 if fd_slope is not None else None}
    for node, samples in vpps.items():
        sas = [(s["t"], float(s["sas"])) for s in samples]
        sa_slope = analysis.slope(sas)
        out["vpp"][node] = {
            "sas_start": int(sas[0][1]) if sas else None,
            "sas_end": int(sas[-1][1]) if sas else None,
            "sas_slope_min": sa_slope * 60 if sa_slope is not None else None,
            "dump_worst_s": max((s.get("dump_s", 0.0) for s in samples), default=None),
            "heap_start_mib": heap_start[node] / 2**20 if node in heap_start else None,
            "heap_end_mib": heap_end[node] / 2**20 if node in heap_end else None}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
