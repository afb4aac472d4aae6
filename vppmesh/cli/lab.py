"""Test and demo tools on this machine: bench, demo, `vppmesh testbed` and `vppmesh vm`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vppmesh.cli.common import fail, option_errors
from vppmesh.errors import VppMeshError

if TYPE_CHECKING:
    from vppmesh.lab.testbed import TestbedSpec

app = typer.Typer()
testbed_app = typer.Typer(no_args_is_help=True, help="A multi-node mesh on this machine.")
vm_app = typer.Typer(no_args_is_help=True,
                     help="Run commands in a VM guest with /dev/vhost-net (tap v2 path).")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """Side-by-side iperf3 benchmark (vppmesh, plain VPP IPIP, tinc, WireGuard, kernel).

    Options are those of `python -m benchmarks` (try `vppmesh bench --help-bench`).
    """
    try:
        from benchmarks.__main__ import main as bench_main
    except ModuleNotFoundError:  # benchmarks/ is not installed with the package
        raise fail("vppmesh bench runs from a checkout of the repository: run it from the "
                   "checkout's root (or `python -m benchmarks` there)", 2) from None

    args = ["--help" if a == "--help-bench" else a for a in ctx.args]
    raise typer.Exit(bench_main(args))


@testbed_app.command("up")
def testbed_up(
    nodes: int = 3, tunnels: int = 4, pods: int = 1,
    workers: Annotated[int, typer.Option(help="VPP workers per node.")] = 0,
    underlay: Annotated[str, typer.Option(
        help="veth: af_packet uplinks on a bridge; memif: two nodes joined by a memif "
             "link, VPP to VPP")] = "veth",
    underlay_family: Annotated[str, typer.Option(
        help="ipv4, ipv6, or mixed (node 1 IPv4, node 2 both, the others IPv6 first): "
        "the family of the nodes' underlay addresses.")] = "ipv4",
    nat: Annotated[str, typer.Option(
        help="none, static, masquerade or masquerade-random: put the last node behind a "
        "NAT router (static: UDP port 14500 forwarded to its 4500; masquerade: outgoing "
        "only; masquerade-random: outgoing only, to a random port in 20000-30000).")
    ] = "none",
    attachment: Annotated[str, typer.Option(
        help="Host link and pods: af_packet, tap (needs /dev/vhost-net) or auto (tap where "
        "/dev/vhost-net exists).")] = "auto",
    gso: Annotated[bool, typer.Option(
        help="settings.gso: large TCP segments between tap endpoints and VPP.")] = False,
) -> None:
    """Build N nodes (a VPP each) with pods, and run `vppmesh up` on each.

    For the tap v2 path on a machine without /dev/vhost-net, run it in a VM guest:
    `vppmesh vm run -- vppmesh testbed up --attachment tap ...` (docs/vm.md).
    """
    from vppmesh.lab.testbed import Testbed

    spec = testbed_spec(nodes=nodes, tunnels=tunnels, pods=pods, workers=workers,
                        underlay=underlay, underlay_family=underlay_family, nat=nat,
                        attachment=attachment, gso=gso)
    try:
        bed = Testbed(spec)
    except VppMeshError as exc:
        raise fail(str(exc), 2) from None
    try:
        bed.up(progress=lambda msg: typer.echo(f"... {msg}", err=True))
    except VppMeshError as exc:
        raise fail(str(exc), 2) from None
    typer.echo(json.dumps(bed.status(), indent=2))


def testbed_spec(**fields: object) -> TestbedSpec:
    """A TestbedSpec from command-line options; a bad one fails naming the option."""
    from pydantic import ValidationError

    from vppmesh.lab.testbed import TestbedSpec

    try:
        return TestbedSpec(**fields)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise fail("testbed: " + option_errors(exc), 2) from None


@testbed_app.command("down")
def testbed_down() -> None:
    """Remove every namespace, link and VPP of the testbed (also after a crash)."""
    from vppmesh.lab.testbed import DEFAULT_BASE, DEFAULT_PREFIX, destroy

    removed = destroy(DEFAULT_PREFIX, DEFAULT_BASE, quiet=True)
    typer.echo(f"removed {len(removed)} object(s)")


@testbed_app.command("status")
def testbed_status() -> None:
    """Nodes, namespaces and sockets of the running testbed."""
    from vppmesh.lab.testbed import Testbed

    try:
        typer.echo(json.dumps(Testbed.load().status(), indent=2))
    except VppMeshError as exc:
        raise fail(str(exc)) from None


@app.command()
def demo(
    nodes: int = 3, tunnels: int = 4, seconds: int = 5, streams: int = 8,
    keep: Annotated[bool, typer.Option(help="Leave the testbed running afterwards.")] = False,
    workers: Annotated[int, typer.Option(help="VPP workers per node.")] = 0,
    attachment: Annotated[str, typer.Option(
        help="Host link and pods: af_packet, tap (needs /dev/vhost-net) or auto (tap where "
        "/dev/vhost-net exists).")] = "auto",
    gso: Annotated[bool, typer.Option(
        help="settings.gso: large TCP segments between tap endpoints and VPP.")] = False,
    vm: Annotated[bool, typer.Option(
        "--vm", help="Run it in a VM guest with /dev/vhost-net (docs/vm.md), where auto "
        "attaches the endpoints as tap v2.")] = False,
) -> None:
    """A small encrypted mesh on this machine, with iperf3 across every node pair.

    `--vm` runs it in a VM guest with tap v2 endpoints, e.g. `vppmesh demo --vm --nodes 2
    --workers 2 --gso` (the same as `vppmesh vm run -- vppmesh demo --attachment tap ...`).
    """
    from vppmesh.lab.demo import render, run_demo
    from vppmesh.lab.testbed import find_vpp, require_root

    if vm:
        from vppmesh.lab import vm as guest

        command = [sys.executable, "-m", "vppmesh", "demo", "--nodes", str(nodes),
                   "--tunnels", str(tunnels), "--seconds", str(seconds), "--streams",
                   str(streams), "--workers", str(workers), "--attachment",
                   attachment,
                   "--gso" if gso else "--no-gso"]
        try:
            env = {"VPPMESH_VPP": str(guest.find_guest_vpp())}
            raise typer.Exit(guest.run(command, guest.GuestSpec(cpus=max(2, workers + 2),
                                                                env=env)))
        except VppMeshError as exc:
            raise fail(str(exc), 2) from None
    spec = testbed_spec(nodes=nodes, tunnels=tunnels, pods=1, workers=workers,
                        attachment=attachment, gso=gso)
    try:
        require_root()
        find_vpp()
        results = run_demo(spec, seconds=seconds, streams=streams, keep=keep)
    except VppMeshError as exc:
        raise fail(str(exc), 2) from None
    typer.echo(render(results))
    if not all(r.ping_ok and r.gbits > 0 for r in results):
        raise fail("some pair did not carry traffic")


@vm_app.command("check")
def vm_check() -> None:
    """What a guest would boot with (kernel, qemu, virtme-ng, VPP), or what is missing."""
    from vppmesh.lab import vm

    reason = vm.missing()
    if reason is not None:
        raise fail(reason, 2)
    typer.echo(f"kernel {vm.find_kernel()} (vhost_net), {vm.find_qemu()}, {vm.find_vng()}")
    try:
        typer.echo(f"VPP for the guest: {vm.find_guest_vpp()}")
    except VppMeshError as exc:
        raise fail(str(exc), 2) from None


@vm_app.command("run", context_settings={"allow_extra_args": True,
                                         "ignore_unknown_options": True})
def vm_run(
    ctx: typer.Context,
    cpus: Annotated[int, typer.Option(help="vCPUs: VPP pins main + workers to them.")] = 4,
    memory: Annotated[str, typer.Option(help="Guest memory (qemu -m).")] = "4G",
    rwdir: Annotated[list[Path] | None, typer.Option(
        help="A host directory the guest may write (repeatable).")] = None,
) -> None:
    """Boot a guest sharing this machine's filesystem and run a command in it, as root.

    `vppmesh vm run -- vppmesh demo --nodes 2 --attachment tap --gso --workers 2`; the
    VPP is $VPPMESH_VM_VPP, else $VPPMESH_VPP or `vpp` on PATH (docs/vm.md).
    """
    from vppmesh.lab import vm

    command = list(ctx.args)
    if not command:
        raise fail("give the command to run in the guest after --")
    if command[0] == "vppmesh":
        command = [sys.executable, "-m", "vppmesh", *command[1:]]
    try:
        env = {"VPPMESH_VPP": str(vm.find_guest_vpp())}
    except VppMeshError:
        env = {}  # a command that needs no VPP
    try:
        code = vm.run(command, vm.GuestSpec(cpus=cpus, memory=memory,
                                            rwdirs=tuple(rwdir or ()), env=env))
    except VppMeshError as exc:
        raise fail(str(exc), 2) from None
    raise typer.Exit(code)
