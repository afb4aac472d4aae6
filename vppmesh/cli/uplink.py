"""`vppmesh uplink`: hand the host's NIC to VPP, and give it back."""

from __future__ import annotations

from typing import Annotated

import typer

from vppmesh.cli.common import DEFAULT_STATE, SocketOpt, StateOpt, fail, option_errors
from vppmesh.dataplane.vpp.client import DEFAULT_API_SOCKET, VppClient
from vppmesh.errors import VppMeshError, VppUnavailableError

app = typer.Typer(no_args_is_help=True,
                  help="Hand the host's NIC to VPP and give the host its network back.")


@app.command("take")
def uplink_take(
    interface: Annotated[str, typer.Option(help="The host's NIC (Linux name).")],
    driver: Annotated[str, typer.Option(help="af_packet, af_xdp, avf or dpdk.")] = "af_packet",
    vpp_interface: Annotated[str | None, typer.Option(
        help="avf/dpdk: VPP's name of the port given in startup.conf.")] = None,
    address: Annotated[list[str] | None, typer.Option(
        help="VPP's own underlay address on the uplink (ADDR/LEN), repeatable.")] = None,
    host_link: Annotated[str, typer.Option(help="auto, tap or veth.")] = "auto",
    queues: int = 1,
    api_socket: SocketOpt = DEFAULT_API_SOCKET,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Give VPP the NIC; the host keeps its name, MAC, MTU, addresses and routes.

    avf/dpdk: run it before VPP starts (it then only saves the NIC's Linux configuration),
    and again, or `vppmesh up --take-uplink`, once VPP has the port.
    """
    from pydantic import ValidationError

    from vppmesh.host import uplink

    try:
        spec = uplink.UplinkSpec(interface=interface, driver=driver,  # type: ignore[arg-type]
                                 vpp_interface=vpp_interface,
                                 vpp_addresses=tuple(address or ()),  # type: ignore[arg-type]
                                 host_link=host_link, queues=queues)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise fail("uplink take: " + option_errors(exc, {"vpp_addresses": "address"}), 2) from None
    try:
        client = VppClient(api_socket).connect()
    except VppUnavailableError as exc:
        if not uplink.driver_for(spec).nic_in_vpp:
            raise fail(str(exc)) from None
        # avf/dpdk: VPP binds the NIC when it starts; its Linux configuration is saved now.
        try:
            uplink.save(spec, state_dir)
        except VppMeshError as exc:
            raise fail(str(exc)) from None
        typer.echo(f"VPP is not running: {interface}'s Linux configuration is saved to "
                   f"{uplink.state_file(state_dir, interface)}; start VPP with the profile "
                   f"that gives it the NIC as {vpp_interface}, then run `vppmesh up "
                   f"--take-uplink {interface} --uplink-driver {driver} --vpp-interface "
                   f"{vpp_interface}` (or this command again)")
        return
    try:
        with client:
            saved = uplink.take(client, spec, state_dir)
            bvi = uplink.bvi_name(client)
    except VppMeshError as exc:
        raise fail(str(exc)) from None
    if saved.host_link == "veth":
        typer.echo("no /dev/vhost-net here: the host link is a veth pair (af_packet in VPP)")
    typer.echo(f"{interface}: now driven by VPP ({driver}); host link {saved.host_link}; "
               f"VPP's addresses are on {bvi} (use --uplink {bvi} with `vppmesh up`); saved "
               f"to {uplink.state_file(state_dir, interface)}")


@app.command("restore")
def uplink_restore(
    interface: Annotated[str | None, typer.Option(
        help="The NIC to give back (default: every one saved).")] = None,
    all_saved: Annotated[bool, typer.Option(
        "--all", help="Every NIC saved in the state directory (the default; say it in "
        "units and scripts).")] = False,
    api_socket: SocketOpt = DEFAULT_API_SOCKET,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Give the NIC back to Linux exactly as it was (works with VPP stopped, too).

    VPP's systemd drop-in (`vppmesh install-unit`) runs `uplink restore --all` whenever
    VPP stops; with nothing saved it has nothing to do and says so.
    """
    from contextlib import nullcontext

    from vppmesh.host import uplink

    if interface and all_saved:
        raise fail("uplink restore: --interface names one NIC, --all means every saved one: "
                   "give one of them", 2)
    names = [interface] if interface else uplink.saved_uplinks(state_dir)
    try:
        client = VppClient(api_socket).connect()
    except VppUnavailableError:
        client = None
    try:
        with uplink.locked(state_dir) if state_dir.is_dir() else nullcontext():
            for name in names:
                for line in uplink.restore(client, state_dir, name):
                    typer.echo(f"- {line}")
    except VppMeshError as exc:
        raise fail(str(exc)) from None
    finally:
        if client is not None:
            client.close()
    typer.echo(f"restored {len(names)} uplink(s)")
