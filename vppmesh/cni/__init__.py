"""vppmesh-cni: a CNI plugin (spec 1.0, with 1.1's STATUS and GC) that puts pods on the mesh.

A container runtime runs it with CNI_COMMAND and the other CNI_* variables set and the
network configuration on stdin. ADD asks the IPAM plugin (host-local) for an address and
attaches the pod's namespace to this node's VPP like every other endpoint
(vppmesh/host/endpoints.py): a tap v2 (GSO/GRO, one queue pair per VPP worker) where
/dev/vhost-net exists, else a veth taken by VPP with af_packet. The pod gets the address
as a /32, the mesh MTU and a default route through VPP's gateway 169.254.0.1.

Pod interfaces carry the tag `vppmesh:pod:cni-<hash>`; `vppmesh up` touches only its own
gateway, host link, tunnels and their routes, so re-running it (or restarting the agent)
leaves every attached pod in place. An attachment record per pod (store.py) lets DEL and
GC undo exactly what ADD made.

The package: this module is the entry point (environment, stdin, JSON out), commands.py
runs ADD, CHECK, DEL, GC and STATUS, models.py validates what the runtime hands over,
ipam.py delegates to the IPAM plugin, store.py keeps the attachment records, and
reattach.py is the agent's side: it puts the pods back after a VPP restart.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from vppmesh.cni.models import LATEST_VERSION, SUPPORTED_VERSIONS, CniEnv, NetConf, parse_netconf

log = logging.getLogger("vppmesh.cni")


def version_reply(raw: bytes) -> dict[str, Any]:
    try:
        asked = json.loads(raw or b"{}").get("cniVersion", LATEST_VERSION)
    except (ValueError, AttributeError):
        asked = LATEST_VERSION
    version = asked if asked in SUPPORTED_VERSIONS else LATEST_VERSION
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}


def setup_logging(conf: NetConf | None) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setLevel(logging.WARNING)
        stderr.setFormatter(logging.Formatter("vppmesh-cni: %(levelname)s %(message)s"))
        log.addHandler(stderr)
    if conf is not None and conf.log_file is not None:
        try:
            conf.log_file.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(conf.log_file)
        except OSError as exc:
            log.warning("cannot open logFile %s: %s", conf.log_file, exc)
            return
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)


def run(environ: dict[str, str], stdin: bytes) -> tuple[int, dict[str, Any] | None]:
    """One plugin invocation: (exit code, JSON for stdout)."""
    version = LATEST_VERSION
    try:
        env = CniEnv.from_environ(environ)
        if env.command == "VERSION":
            return 0, version_reply(stdin)
        version = version_reply(stdin)["cniVersion"]  # errors answer in the asked version
        conf = parse_netconf(stdin)
        version = conf.cni_version
        setup_logging(conf)
        from vppmesh.cni.commands import Plugin  # loads VPP's API and netlink: not for VERSION

        plugin = Plugin(conf, env, environ)
        if env.command == "ADD":
            return 0, plugin.add()
        if env.command == "DEL":
            plugin.delete()
        elif env.command == "CHECK":
            plugin.check()
        elif env.command == "GC":
            plugin.gc()
        elif env.command == "STATUS":
            plugin.status()
        return 0, None
    except Exception as exc:
        from vppmesh.cni.commands import as_cni_error

        error = as_cni_error(exc)
        log.error("%s failed: %s%s", environ.get("CNI_COMMAND", "?"), error.msg,
                  f" ({error.details})" if error.details else "")
        return 1, error.to_json(version)


def main() -> None:
    """Console entry point (`vppmesh-cni`)."""
    setup_logging(None)
    stdin = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    code, output = run(dict(os.environ), stdin)
    if output is not None:
        sys.stdout.write(json.dumps(output) + "\n")
        sys.stdout.flush()
    sys.exit(code)
