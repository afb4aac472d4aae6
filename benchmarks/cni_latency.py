"""``python -m benchmarks.cni_latency``: how long vppmesh-cni's commands take against a real VPP.

A 2-node testbed is built, `vppmesh up` runs on both nodes, and the plugin is run as a
container runtime runs it (CNI_* variables, configuration on stdin, host-local IPAM) for a
number of pods in turn: ADD, a ping to the other node's pod, CHECK, DEL. Prints a table
and writes JSON (needs root and VPP; `VPPMESH_VPP` names the binary).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.report import machine_info
from vppmesh.lab.testbed import Testbed, TestbedSpec, in_ns, sh

CNI_PATH = Path("/usr/lib/cni")


def plugin_command() -> list[str]:
    script = Path(sys.executable).parent / "vppmesh-cni"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vppmesh.cni"]


def invoke(bed: Testbed, command: str, conf: dict[str, Any], container: str,
           netns: str) -> tuple[float, int, str]:
    """(seconds, exit code, stdout) of one plugin run in node n1's namespace."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
           "CNI_CONTAINERID": container, "CNI_IFNAME": "eth0", "CNI_PATH": str(CNI_PATH),
           "CNI_NETNS": f"/var/run/netns/{netns}", "CNI_ARGS": "IgnoreUnknown=1"}
    started = time.monotonic()
    done = subprocess.run(["ip", "netns", "exec", bed.nodes[0].netns, *plugin_command()],
                          input=json.dumps(conf), env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    return time.monotonic() - started, done.returncode, done.stdout


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": statistics.median(ordered) * 1000,
            "p90_ms": ordered[max(0, int(len(ordered) * 0.9) - 1)] * 1000,
            "max_ms": ordered[-1] * 1000}


def measure(pods: int, prefix: str, base: Path) -> dict[str, Any]:
    bed = Testbed(TestbedSpec(prefix=prefix, base_dir=base, nodes=2, tunnels=1, pods=1))
    bed.up()
    times: dict[str, list[float]] = {"VERSION": [], "ADD": [], "CHECK": [], "DEL": []}
    try:
        node = bed.nodes[0]
        conf: dict[str, Any] = {
            "cniVersion": "1.0.0", "name": "vppmesh", "type": "vppmesh-cni",
            "apiSocket": str(node.instance.api_socket), "mesh": str(bed.mesh_file),
            "node": node.name, "stateDir": str(base / "cni-state"),
            "ipam": {"type": "host-local", "dataDir": str(base / "ipam")}}
        target = str(bed.nodes[1].pod_address(0))
        for i in range(pods):
            netns, container = f"{prefix}c{i}", f"bench{i:04d}"
            sh("ip", "netns", "add", netns)
            seconds, code, out = invoke(bed, "VERSION", conf, container, netns)
            times["VERSION"].append(seconds)
            seconds, code, out = invoke(bed, "ADD", conf, container, netns)
            if code != 0:
                raise RuntimeError(f"ADD failed: {out}")
            times["ADD"].append(seconds)
            if in_ns(netns, "ping", "-c", "1", "-W", "2", target, check=False).returncode:
                raise RuntimeError(f"pod {container} cannot reach {target}")
            check = {**conf, "prevResult": json.loads(out)}
            seconds, code, out = invoke(bed, "CHECK", check, container, netns)
            if code != 0:
                raise RuntimeError(f"CHECK failed: {out}")
            times["CHECK"].append(seconds)
            seconds, code, out = invoke(bed, "DEL", conf, container, netns)
            if code != 0:
                raise RuntimeError(f"DEL failed: {out}")
            times["DEL"].append(seconds)
            sh("ip", "netns", "del", netns)
    finally:
        bed.down(quiet=True)
    return {"pods": pods, "attachment": "tap" if Path("/dev/vhost-net").exists()
            else "af_packet", "machine": machine_info().model_dump(mode="json"),
            "load_average": os.getloadavg(),
            "commands": {k: summary(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cni_latency",
                                     description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--pods", type=int, default=10, help="pods attached in turn")
    parser.add_argument("--prefix", default="vmcl-", help="testbed namespace prefix")
    parser.add_argument("--base-dir", type=Path, default=Path("/run/vppmesh-cni-latency"))
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    result = measure(args.pods, args.prefix, args.base_dir)
    print(f"vppmesh-cni, {result['pods']} pods, {result['attachment']} attachment")
    print(f"{'command':8} {'median ms':>10} {'p90 ms':>8} {'max ms':>8}")
    for command, s in result["commands"].items():
        print(f"{command:8} {s['median_ms']:10.0f} {s['p90_ms']:8.0f} {s['max_ms']:8.0f}")
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
