"""`python -m benchmarks.capacity`: vppmesh's encryption capacity per core.

Runs every contender on the two-VPP memif harness at each size mix, then vppmesh alone
encrypting into a sink with W = 0, 1 (2, 4 where the cores exist) workers and each
crypto engine VPP has; writes <run id>-capacity.json, .md and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.capacity import report, traffic
from benchmarks.capacity.measure import Sample, measure, summarize, tsc_ghz
from benchmarks.capacity.rig import CONTENDERS, EncryptOnly, HarnessError, Pair, Setup, cpu_cores
from benchmarks.report import DEFAULT_RESULTS_DIR
from vppmesh.dataplane.vpp import crypto, system
from vppmesh.dataplane.vpp.client import VppApi
from vppmesh.lab.testbed import TestbedError, find_vpp

ENCRYPT_ONLY_CONTENDER = "vppmesh-4t"
RATIOS = (("vppmesh-1t", "ipsec-hand"), ("vppmesh-4t", "wireguard"),
          ("vppmesh-1t", "ipip"), ("vppmesh-4t", "vppmesh-1t"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.capacity", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="1 repeat, 1400 bytes, 1 s windows, the active crypto engine only")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--window", type=float, default=None, help="seconds counted per sample")
    p.add_argument("--mixes", default=None, help="comma list of 64, imix, 1400")
    p.add_argument("--only", default=None, help=f"comma list of {', '.join(CONTENDERS)}")
    p.add_argument("--workers", default=None,
                   help="encrypt-only worker counts (default 0, 1, 2, 4 as cores allow)")
    p.add_argument("--engines", default=None,
                   help="encrypt-only crypto engines (default: every engine VPP has for "
                        "aes-256-gcm; --quick: VPP's choice)")
    p.add_argument("--pair-engine", default=None,
                   help="crypto engine for AES-GCM on the two-VPP harness (default: vppmesh's "
                        "auto choice, for every contender)")
    p.add_argument("--no-pair", action="store_true", help="skip the two-VPP harness")
    p.add_argument("--no-encrypt-only", action="store_true", help="skip encrypt-only")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS_DIR)
    return p.parse_args(argv)


def default_workers() -> list[int]:
    """W=0 always; W workers need W cores besides the main thread's."""
    return [w for w in (0, 1, 2, 4) if w == 0 or w + 1 <= cpu_cores()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        find_vpp()
    except TestbedError as exc:
        print(f"capacity: {exc}", file=sys.stderr)
        return 2
    names = args.only.split(",") if args.only else list(CONTENDERS)
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        print(f"capacity: unknown contender(s) {', '.join(unknown)}; known: "
              f"{', '.join(CONTENDERS)}", file=sys.stderr)
        return 2
    workers = ([int(w) for w in args.workers.split(",")] if args.workers
               else default_workers())
    try:
        return run(args, names, workers)
    except HarnessError as exc:
        print(f"capacity: harness failure: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, names: list[str], workers: list[int]) -> int:
    repeats = args.repeats or (1 if args.quick else 3)
    window = args.window or (1.0 if args.quick else 3.0)
    warmup = 0.5 if args.quick else 1.0
    mixes = [traffic.MIXES[m] for m in (args.mixes or ("1400" if args.quick else
                                                       "64,imix,1400")).split(",")]
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    started = time.monotonic()
    result: dict[str, object] = {
        "run_id": run_id, "kind": "capacity", "machine": report.machine(),
        "config": {"repeats": repeats, "window_s": window, "warmup_s": warmup,
                   "mixes": [m.name for m in mixes], "contenders": names,
                   "encrypt_only_workers": workers, "quick": args.quick,
                   "pair_engine": args.pair_engine or "auto"},
    }
    pair_samples: dict[str, dict[str, list[Sample]]] = {n: {} for n in names}
    per_repeat: list[dict[str, dict[str, float]]] = []
    vpp_info: dict[str, object] = {}
    if not args.no_pair:
        for repeat in range(repeats):
            rates: dict[str, dict[str, float]] = {}
            for name in names:
                print(f"[pair {repeat + 1}/{repeats}] {name}", file=sys.stderr)
                with Pair(CONTENDERS[name], engine=args.pair_engine) as setup:
                    describe_vpp(setup.sender, vpp_info,
                                 vppmesh=name.startswith("vppmesh"))
                    for mix in mixes:
                        sample = measured(name, setup, mix, window=window, warmup=warmup)
                        pair_samples[name].setdefault(mix.name, []).append(sample)
                        rates.setdefault(name, {})[mix.name] = sample.mpps
            per_repeat.append(rates)
        result["pair"] = {n: {m: summarize(s).as_dict() for m, s in by_mix.items()}
                          for n, by_mix in pair_samples.items()}
        result["pair_samples"] = {n: {m: [x.as_dict() for x in s] for m, s in by_mix.items()}
                                  for n, by_mix in pair_samples.items()}
        result["ratios"] = report.ratios(per_repeat, RATIOS, [m.name for m in mixes])
        result["core_ratios"] = report.core_ratios(result["pair_samples"], RATIOS)  # type: ignore[arg-type]
    if not args.no_encrypt_only:
        result["encrypt_only"] = encrypt_only(workers, mixes, args, repeats, window, warmup,
                                              vpp_info)
    result["vpp"] = vpp_info
    result["projection"] = report.projection(result)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    paths = report.write(result, args.out)
    print(report.markdown(result))
    print("\n".join(f"wrote {p}" for p in paths), file=sys.stderr)
    return 0


def measured(label: str, setup: Setup, mix: traffic.SizeMix, *, window: float,
             warmup: float) -> Sample:
    """measure(), with a harness failure naming the contender and the mix."""
    try:
        return measure(setup, mix, window=window, warmup=warmup)
    except HarnessError as exc:
        raise HarnessError(f"{label} at {mix.name}: {exc}") from exc


def describe_vpp(api: VppApi, info: dict[str, object], *,
                 vppmesh: bool = False) -> crypto.CryptoState:
    """Fill in what the JSON says of VPP (version, clock, crypto engines; the engine
    vppmesh runs on) once, with one read of the crypto state per call."""
    state = crypto.read_state(api)
    if "version" not in info:
        info |= {"version": system.version(api), "tsc_ghz": tsc_ghz(api),
                 "crypto": state.as_dict()}
    if vppmesh:
        info.setdefault("vppmesh_engine", state.active)
    return state


def encrypt_only(workers: list[int], mixes: list[traffic.SizeMix], args: argparse.Namespace,
                 repeats: int, window: float, warmup: float,
                 vpp_info: dict[str, object]) -> list[dict[str, object]]:
    contender = CONTENDERS[ENCRYPT_ONLY_CONTENDER]
    engines: list[str | None]
    if args.engines:
        engines = list(args.engines.split(","))
    elif args.quick:
        engines = [None]
    else:
        with EncryptOnly(contender, workers=0) as setup:
            state = describe_vpp(setup.sender, vpp_info)
            engines = [None, *[e for e in (state.handlers.candidates if state.handlers else ())
                               if e != state.active]]
    rows = []
    for w in workers:
        for engine in engines:
            samples: dict[str, list[Sample]] = {}
            placement: object = None
            active: str | None = None
            for repeat in range(repeats):
                print(f"[encrypt-only {repeat + 1}/{repeats}] W={w} engine={engine or 'auto'}",
                      file=sys.stderr)
                with EncryptOnly(contender, workers=w, engine=engine) as setup:
                    placement = setup.notes.get("placement")
                    active = describe_vpp(setup.sender, vpp_info).active
                    for mix in mixes:
                        samples.setdefault(mix.name, []).append(measured(
                            f"encrypt-only W={w}", setup, mix, window=window, warmup=warmup))
            rows.append({"contender": contender.name, "workers": w,
                         "engine": active, "requested_engine": engine or "auto",
                         "placement": placement,
                         "mixes": {m: summarize(s).as_dict() for m, s in samples.items()},
                         "samples": {m: [x.as_dict() for x in s] for m, s in samples.items()}})
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
