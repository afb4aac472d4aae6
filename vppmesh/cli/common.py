"""What the command modules share: the options of every node command, and helpers."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

import vppmesh.agent.node
from vppmesh.validation import describe, option_name

if TYPE_CHECKING:
    from pydantic import ValidationError

MeshOpt = Annotated[Path, typer.Option("--mesh", envvar="VPPMESH_MESH",
                                       help="The mesh file shared by every node.")]
NodeOpt = Annotated[str, typer.Option("--node", envvar="VPPMESH_NODE",
                                      help="This node's name in the mesh file.")]
KeyOpt = Annotated[Path, typer.Option("--key", envvar="VPPMESH_KEY",
                                      help="This node's private key file (0600).")]
StateOpt = Annotated[Path, typer.Option("--state-dir", envvar="VPPMESH_STATE_DIR",
                                         help="Where the key ledger and generations live.")]
DEFAULT_STATE = Path("/var/lib/vppmesh")
SocketOpt = Annotated[Path, typer.Option("--api-socket", envvar="VPPMESH_API_SOCKET",
                                         help="VPP's binary API socket.")]
StatsSocketOpt = Annotated[Path | None, typer.Option(
    help="VPP's stats socket (default: stats.sock next to the API socket); `up --watch` "
    "reads the SAs' packet counts there between its full runs.")]
DEFAULT_MESH = Path("/etc/vppmesh/mesh.yaml")
HOSTNAME = socket.gethostname()
DEFAULT_KEY = Path("/etc/vppmesh/private.key")
UnitFileOpt = Annotated[Path, typer.Option(
    "--unit-file", envvar="VPPMESH_UNIT_FILE",
    help="The agent's systemd unit file (install-unit's --out).")]
DatastoreOpt = Annotated[str | None, typer.Option(
    "--datastore", envvar="VPPMESH_DATASTORE",
    help="Membership from etcd instead of the mesh file: etcd://HOST:PORT/PREFIX (port "
    "2379 and prefix /vppmesh by default).")]


def stats_path(api_socket: Path, stats_socket: Path | None) -> Path:
    return stats_socket or api_socket.parent / "stats.sock"


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def options(mesh: Path, node: str, key: Path, api_socket: Path, host_link: str = "auto",
            uplink: str | None = None,
            state_dir: Path = DEFAULT_STATE) -> vppmesh.agent.node.NodeOptions:
    return vppmesh.agent.node.NodeOptions(mesh_file=mesh, node=node, private_key=key,
                                          api_socket=api_socket,
                                          host_link=host_link,  # type: ignore[arg-type]
                                          uplink=uplink, state_dir=state_dir)


def option_errors(exc: ValidationError, renames: dict[str, str] | None = None) -> str:
    """A model's validation errors, each naming the command-line option it is about."""
    return describe(exc, name=option_name(renames))
