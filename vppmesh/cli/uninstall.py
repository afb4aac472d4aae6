"""`vppmesh uninstall`: take vppmesh off this host (vppmesh/host/uninstall.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vppmesh.cli.common import (
    DEFAULT_KEY,
    DEFAULT_MESH,
    DEFAULT_STATE,
    HOSTNAME,
    DatastoreOpt,
    KeyOpt,
    MeshOpt,
    NodeOpt,
    SocketOpt,
    StateOpt,
    UnitFileOpt,
    fail,
    options,
)
from vppmesh.dataplane.vpp.client import DEFAULT_API_SOCKET
from vppmesh.errors import VppMeshError
from vppmesh.host.unit import UNIT_FILE, Unit

app = typer.Typer()


@app.command()
def uninstall(
    mesh: MeshOpt = DEFAULT_MESH,
    node: NodeOpt = HOSTNAME,
    key: KeyOpt = DEFAULT_KEY,
    api_socket: SocketOpt = DEFAULT_API_SOCKET,
    state_dir: StateOpt = DEFAULT_STATE,
    datastore: DatastoreOpt = None,
    unit_file: UnitFileOpt = UNIT_FILE,
    startup_conf: Annotated[Path, typer.Option(
        help="VPP's startup.conf: named if `vppmesh render-startup` wrote it, removed "
        "with --purge.")] = Path("/etc/vpp/startup.conf"),
    purge: Annotated[bool, typer.Option(
        help="Also remove the node's key and state directory (ledger, key generations), "
        "the mesh file, the PSK and a rendered startup.conf.")] = False,
) -> None:
    """Take vppmesh off this host: the service (stopped, disabled, its unit file gone),
    any other agent of this node, the mesh in VPP and Linux (`down`: a taken NIC goes
    back to the host); prints what it removed and what it left. Run it again: it says
    there is nothing left.

    The node's key and state stay unless --purge: with both, a reinstalled node keeps its
    identity and its key generations, so it never reuses a key.
    """
    import vppmesh.agent.node
    from vppmesh.host.uninstall import program_hint
    from vppmesh.host.uninstall import uninstall as run_uninstall

    opts = options(mesh, node, key, api_socket, state_dir=state_dir)

    def down(opts: vppmesh.agent.node.NodeOptions) -> list[str]:
        if datastore is None:
            return vppmesh.agent.node.down(opts)
        from vppmesh.agent.datastore.membership import leave
        from vppmesh.agent.datastore.records import DatastoreUrl
        from vppmesh.errors import ConfigError

        try:
            return leave(opts, DatastoreUrl.parse(datastore))
        except ConfigError:  # no record left to name the addresses: what VPP says goes
            return vppmesh.agent.node.down(opts)

    try:
        done = run_uninstall(opts, Unit(unit_file), purge=purge, startup_conf=startup_conf,
                             down=down, program=program_hint())
    except VppMeshError as exc:
        raise fail(f"{exc}; uninstall stopped there (no key or state was removed): fix "
                   "it and run it again") from None
    for line in done.removed:
        typer.echo(f"- {line}")
    for line in done.left:
        typer.echo(f"left: {line}")
    if done.removed:
        typer.echo(f"node {node}: removed {len(done.removed)} thing(s) of vppmesh")
    else:
        typer.echo(f"node {node}: nothing of vppmesh left to remove on this host")
