"""`vppmesh uninstall`: take vppmesh off a host, and say what is left and why.

The order is what makes it work. The service goes first (disabled and stopped, its unit
file removed): its agent would put back what `down` removes, and its Restart=always
would start again an agent that merely exited. Then any other agent of this node is
stopped (presence.stop_agent), then `down` takes the mesh out of VPP and Linux and gives
a taken NIC back to the host. Every step finds out whether there is anything to do, so a
second run changes nothing and says there is nothing left.

The node's key and its state directory (the used-key ledger, the key generations, the
agent clock) stay unless `purge`, and they go together: a pair's static keys derive from
the two nodes' keys and the key generation, and the ledger and the generation file are
what keeps this node from ever installing one outbound key twice (ledger.py: GCM nonces
would repeat). A node reinstalled with both goes on from the generations it had; a node
that kept its key without its state could reuse keys. So: keep both if the node may come
back with the same identity, purge both otherwise (it then comes back with a new key).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vppmesh.agent import node, presence
from vppmesh.errors import VppMeshError, VppUnavailableError
from vppmesh.host.unit import Unit, systemctl

# What the render-startup's startup.conf holds that FD.io's does not: the channel's punt
# socket (startup.py). Only such a file is named as vppmesh's.
RENDERED_MARK = "punt { socket "
# vpp.service drop-ins vppmesh installs beside its own unit (install-unit: the one that
# gives a taken NIC back whenever VPP stops), in systemd's directory.
VPP_DROP_INS = "vpp.service.d/vppmesh*.conf"


@dataclass
class Uninstalled:
    removed: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)


def state_files(state_dir: Path, node: str) -> list[Path]:
    """The node's files in the state directory: ledger, generations, clock, handshakes,
    lock, agent and datastore records (and their half-written .tmp); the taken NICs'
    records (uplink-IFNAME.json) and their lock."""
    if not state_dir.is_dir():
        return []
    return sorted(p for p in state_dir.iterdir()
                  if p.name.startswith((f"{node}.", "uplink-", "uplink.")))


def uninstall(options: node.NodeOptions, unit: Unit, *, purge: bool, startup_conf: Path,
              down: Callable[[node.NodeOptions], list[str]] | None = None,
              program: str = "") -> Uninstalled:
    """Take vppmesh off this host (see the module). `down` takes the mesh out of VPP
    (node.down; the datastore's leave with --datastore). VppMeshError when a step fails:
    nothing after it is done (no state is purged while VPP may still hold its keys)."""
    from vppmesh.agent.control import socket_path

    done = Uninstalled()
    # 1. The service, and whatever vppmesh put beside it in systemd's directory.
    drop_ins = sorted(unit.path.parent.glob(VPP_DROP_INS))
    for drop_in in drop_ins:
        drop_in.unlink()
        done.removed.append(f"drop-in {drop_in}")
    if drop_ins:
        _remove_if_empty(drop_ins[0].parent, done)
    if unit.installed():
        unit.disable_now()
        unit.remove()  # and systemd reloaded: the drop-ins' removal with it
        done.removed.append(f"service {unit.name}: stopped, disabled, unit file {unit.path}")
    elif drop_ins:
        systemctl("daemon-reload")
    overrides = unit.path.with_name(f"{unit.name}.d")
    if overrides.is_dir():
        done.left.append(f"{overrides}: overrides of the removed unit (not vppmesh's; "
                         f"`rm -r {overrides}`)")
    # 2. Any other agent of this node (run by hand, or under another supervisor).
    path = socket_path(options)
    found = presence.live_agent(path, options.state_dir, options.node)
    if found is not None:
        done.removed += presence.stop_agent(found, path, options.state_dir, options.node)
    # 3. The mesh out of VPP and Linux, the NIC back to the host.
    done.removed += _down(options, down or node.down)
    # 4. The key and the state, together or not at all.
    _key_and_state(options, purge, done)
    # 5. What vppmesh did not make but wrote, and the program itself.
    _startup_conf(startup_conf, purge, done)
    done.left.append(f"vppmesh itself: {program}" if program else "vppmesh itself")
    return done


def _down(options: node.NodeOptions, down: Callable[[node.NodeOptions], list[str]]
          ) -> list[str]:
    try:
        return down(options)
    except VppUnavailableError:
        pass
    # VPP is not running: nothing of the mesh is in it (a VPP that starts again starts
    # empty); the NIC and the host link are Linux's to give back.
    from vppmesh.dataplane.plan import HOST_LINUX_IFNAME, HOST_VETH_PEER
    from vppmesh.host import link as linux
    from vppmesh.host.uplink import release_all

    removed = [f"NIC: {line}" for line in release_all(options.state_dir)]
    for name in (HOST_VETH_PEER, HOST_LINUX_IFNAME):
        if linux.remove_link(name):
            removed.append(f"linux link {name}")
    return removed


def _key_and_state(options: node.NodeOptions, purge: bool, done: Uninstalled) -> None:
    from vppmesh.host.uplink import saved_uplinks

    files = state_files(options.state_dir, options.node)
    taken = {f"uplink-{name}.json" for name in saved_uplinks(options.state_dir)}
    stuck = [p for p in files if p.name in taken]
    if stuck:  # an avf/dpdk NIC bound to VPP's driver while VPP is away: keep its record
        done.left += [f"{p}: the NIC it names is still VPP's; start VPP and run uninstall "
                      "again, or `vppmesh uplink restore`" for p in stuck]
        files = [p for p in files if p not in stuck]
    key = options.private_key
    if not purge:
        kept = [str(p) for p in ([key] if key.exists() else []) + files]
        if kept:
            done.left.append(f"the node's key and state ({', '.join(kept)}): kept so that "
                             "a reinstalled node keeps its identity and never reuses a key "
                             "generation; --purge removes them together")
        config = [str(p) for p in _mesh_config(options) if p.exists()]
        if config:
            done.left.append(f"the mesh's configuration ({', '.join(config)}): --purge "
                             "removes it")
        return
    config = _mesh_config(options)  # read before the mesh file goes
    for path in [key, *files, *config]:
        if path.exists():
            path.unlink()
            done.removed.append(f"file {path}")
    for directory in dict.fromkeys([options.state_dir, *(p.parent for p in [key, *config])]):
        _remove_if_empty(directory, done)


def _mesh_config(options: node.NodeOptions) -> list[Path]:
    """The mesh file and the PSK it names (the same on every node: copied here)."""
    from vppmesh.config import load_mesh

    try:
        psk = load_mesh(options.mesh_file).settings.psk_file
    except VppMeshError:
        psk = None
    return [options.mesh_file, *([psk] if psk is not None else [])]


def _startup_conf(path: Path, purge: bool, done: Uninstalled) -> None:
    try:
        rendered = RENDERED_MARK in path.read_text()
    except OSError:
        return
    if not rendered:
        return
    if purge:
        path.unlink()
        done.removed.append(f"file {path} (rendered by render-startup)")
        done.left.append("VPP has no startup.conf now and will not start without one: "
                         "`apt-get install --reinstall -o Dpkg::Options::=--force-confmiss "
                         "vpp` puts FD.io's back")
    else:
        done.left.append(f"{path}: rendered by `vppmesh render-startup`, VPP's configuration "
                         "(--purge removes it)")


def _remove_if_empty(directory: Path, done: Uninstalled) -> None:
    try:
        directory.rmdir()
    except FileNotFoundError:
        return
    except OSError:
        others = sorted(p.name for p in directory.iterdir())
        done.left.append(f"{directory}: holds {', '.join(others)} (not removed)")
        return
    done.removed.append(f"directory {directory}")


def program_hint() -> str:
    """How to remove this vppmesh (it is running: not deleted here)."""
    if sys.prefix != sys.base_prefix:  # a virtualenv, as the quick start makes
        link = Path("/usr/local/bin/vppmesh")
        extra = f" {link}" if link.is_symlink() and \
            str(link.resolve()).startswith(str(Path(sys.prefix).resolve())) else ""
        return f"remove its virtualenv: rm -rf {sys.prefix}{extra}"
    return f"remove the package: {sys.executable} -m pip uninstall vppmesh"
