"""IPAM delegation: run the configured IPAM plugin (host-local) the way a runtime would.

The delegate gets the same CNI_* environment and the network configuration on stdin; its
JSON result or error comes back on stdout. With a mesh file and a host-local section
without ranges, the range is filled in from this node's pod CIDR (skipping the node's own
mesh address, the CIDR's first host).
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from vppmesh.cni.models import ERR_IPAM, CniError, IpamResult

IPAM_TIMEOUT = 60.0


def host_local_ranges(pod_cidr: ipaddress.IPv4Network) -> list[list[dict[str, str]]]:
    """One range over the pod CIDR, from its second host (the first is the node's)."""
    return [[{"subnet": str(pod_cidr), "rangeStart": str(pod_cidr.network_address + 2),
              "rangeEnd": str(pod_cidr.broadcast_address - 1)}]]


def effective_ipam(ipam: dict[str, Any] | None,
                   pod_cidr: ipaddress.IPv4Network | None) -> dict[str, Any]:
    """The IPAM section handed to the delegate."""
    section = dict(ipam or {"type": "host-local"})
    section.setdefault("type", "host-local")
    if section["type"] == "host-local" and "ranges" not in section and "subnet" not in section:
        if pod_cidr is None:
            raise CniError(7, "invalid network configuration: ipam: host-local needs `ranges` "
                           "(or give `mesh` so this node's pod CIDR is used)")
        section["ranges"] = host_local_ranges(pod_cidr)
    return section


def find_plugin(plugin: str, cni_path: tuple[Path, ...]) -> Path:
    for directory in cni_path:
        candidate = directory / plugin
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(ERR_IPAM, f"IPAM plugin {plugin!r} not found in CNI_PATH",
                   f"searched {':'.join(map(str, cni_path)) or '(empty)'}; install it "
                   "(Debian: containernetworking-plugins) or fix ipam.type")


def common_version(plugin: Path, wanted: str, environ: dict[str, str]) -> str:
    """`wanted`, or the newest version the delegate knows below it (Debian's host-local
    1.1 stops at CNI 1.0.0; the IPAM result reads the same in every version we accept)."""
    if wanted != "1.1.0":
        return wanted
    try:
        done = subprocess.run([str(plugin)], input=json.dumps({"cniVersion": wanted}).encode(),
                              env={**environ, "CNI_COMMAND": "VERSION"}, capture_output=True,
                              timeout=IPAM_TIMEOUT, check=False)
        supported = json.loads(done.stdout).get("supportedVersions", [])
    except (OSError, ValueError, AttributeError, subprocess.TimeoutExpired):
        return wanted
    return wanted if wanted in supported or "1.0.0" not in supported else "1.0.0"


def run_ipam(command: str, conf: dict[str, Any], environ: dict[str, str],
             cni_path: tuple[Path, ...]) -> dict[str, Any] | None:
    """Run the delegate; its result (ADD) or None; its error becomes ours."""
    plugin = find_plugin(conf["ipam"]["type"], cni_path)
    env = {**environ, "CNI_COMMAND": command}
    conf = {**conf, "cniVersion": common_version(plugin, conf["cniVersion"], environ)}
    try:
        done = subprocess.run([str(plugin)], input=json.dumps(conf).encode(), env=env,
                              capture_output=True, timeout=IPAM_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CniError(ERR_IPAM, f"IPAM plugin {plugin} could not run", str(exc)) from None
    out = done.stdout.strip()
    if done.returncode != 0:
        try:
            err = json.loads(out)
            code, msg = int(err.get("code", ERR_IPAM)), str(err.get("msg", ""))
            details = str(err.get("details", ""))
        except (ValueError, AttributeError):
            code, msg, details = ERR_IPAM, out.decode(errors="replace"), ""
        raise CniError(code, f"IPAM ({plugin.name}) {command} failed: {msg}",
                       details or done.stderr.decode(errors="replace").strip())
    if command != "ADD":
        return None
    try:
        result = json.loads(out)
    except ValueError:
        raise CniError(ERR_IPAM, f"IPAM plugin {plugin.name} returned no JSON result",
                       out.decode(errors="replace")[:500]) from None
    if not isinstance(result, dict):
        raise CniError(ERR_IPAM, f"IPAM plugin {plugin.name} returned a non-object result")
    return result


def parse_ipam_result(result: dict[str, Any]) -> IpamResult:
    try:
        return IpamResult.model_validate(result)
    except ValueError as exc:
        raise CniError(ERR_IPAM, "the IPAM result is not a CNI result", str(exc)) from None
