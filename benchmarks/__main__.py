"""``python -m benchmarks``: measure the contenders and write JSON, Markdown and PNG."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from benchmarks import contenders as registry
from benchmarks import harness
from benchmarks.report import DEFAULT_RESULTS_DIR, render_markdown, write_all


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("stream counts must be >= 1")
    return values


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line; defaults come from the harness so both stay in step."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Throughput, RTT and CPU-per-GB of vppmesh and other encrypted overlays "
        "on a two-node namespace testbed (needs root).",
    )
    p.add_argument("--quick", action="store_true",
                   help=f"1 repeat, streams {harness.QUICK_STREAMS}, "
                        f"{harness.QUICK_DURATION:g} s tests")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help=f"repeats per stream count (default {harness.DEFAULT_REPEATS})")
    p.add_argument("--streams", type=_csv_ints, default=None,
                   help="parallel iperf3 streams, comma-separated (default 1,4,8)")
    p.add_argument("--duration", type=float, default=None,
                   help=f"seconds per iperf3 test (default {harness.DEFAULT_DURATION:g})")
    p.add_argument("--only", default=None, help="comma-separated contender names")
    p.add_argument("--ratio-ref", default=None,
                   help="contender the ratios are relative to (default: first preferred)")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS_DIR,
                   help="directory for the JSON, Markdown and PNG files")
    p.add_argument("--no-install", action="store_true",
                   help="do not apt-get install missing packages")
    p.add_argument("--list", action="store_true",
                   help="list contenders and whether they can run, then exit")
    return p


_MAIN_PID = os.getpid()


def _terminate(signum: int, _frame: FrameType | None) -> None:
    """Turn SIGTERM into SystemExit so every ``finally`` (teardown, cleanup) still runs.

    Only in this process: pyroute2 forks helpers that inherit the handler and are ended
    with SIGTERM; unwinding the copied stack there would run our cleanup from inside
    the helper and delete the namespaces the run is still using.
    """
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 1 if any contender failed (skipped ones are fine)."""
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    progress = harness.stderr_progress()
    everything = registry.all_contenders()
    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    try:
        chosen = registry.select(everything, only)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        if not args.no_install:
            harness.install_packages(chosen, progress)
        for c in chosen:
            ok, reason = c.available()
            print(f"{c.name:16} {'available' if ok else 'unavailable: ' + reason}")
        return 0
    report = harness.run(
        chosen,
        streams=args.streams,
        repeats=args.repeats,
        duration=args.duration,
        quick=args.quick,
        progress=progress,
        ratio_reference=args.ratio_ref,
        only=only,
        install=not args.no_install,
    )
    paths = write_all(report, args.out)
    sys.stdout.write(render_markdown(report))
    for kind, path in paths.items():
        progress(f"wrote {kind}: {path}")
    return 1 if any(c.status == "failed" for c in report.contenders) else 0


if __name__ == "__main__":
    sys.exit(main())
