"""The `vppmesh` command: one command per node to join, inspect and leave the mesh.

The commands live by concern: mesh.py (this node in the mesh), uplink.py (`vppmesh
uplink`), service.py and uninstall.py (the agent as a service, and taking it all off a
host), lab.py (bench, demo, `vppmesh testbed`, `vppmesh vm`); common.py holds the
options and helpers they share. The agent's work is in the vppmesh modules they call.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from vppmesh.cli import lab, mesh, service, uninstall, uplink

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="An encrypted full mesh of Linux hosts over VPP (IPIP + ESP AES-GCM-256).")
# In the order of `vppmesh --help`: the commands, then the groups.
app.add_typer(mesh.app)
app.add_typer(service.app)
app.add_typer(uninstall.app)
app.add_typer(lab.app)
app.add_typer(lab.testbed_app, name="testbed")
app.add_typer(uplink.app, name="uplink")
app.add_typer(lab.vm_app, name="vm")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
