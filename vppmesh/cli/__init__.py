"""The `vppmesh` command: one command per node to join, inspect and leave the mesh."""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vppmesh import node as agent
from vppmesh.errors import VppMeshError, VppUnavailableError
from vppmesh.vpp.client import DEFAULT_API_SOCKET, VppClient
from vppmesh.watch import start_metrics, watch_loop

if TYPE_CHECKING:
    from vppmesh.lab.testbed import TestbedSpec

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="An encrypted full mesh of Linux hosts over VPP (IPIP + ESP AES-GCM-256).")
testbed_app = typer.Typer(no_args_is_help=True, help="A multi-node mesh on this machine.")
app.add_typer(testbed_app, name="testbed")
uplink_app = typer.Typer(no_args_is_help=True,
                         help="Hand the host's NIC to VPP and give the host its network back.")
app.add_typer(uplink_app, name="uplink")
vm_app = typer.Typer(no_args_is_help=True,
                     help="Run commands in a VM guest with /dev/vhost-net (tap v2 path).")
app.add_typer(vm_app, name="vm")
log = logging.getLogger("vppmesh")

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
    help="VPP's stats socket (default: stats.sock next to the API socket).")]
DEFAULT_MESH = Path("/etc/vppmesh/mesh.yaml")
HOSTNAME = socket.gethostname()
DEFAULT_KEY = Path("/etc/vppmesh/private.key")
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
            uplink: str | None = None, state_dir: Path = DEFAULT_STATE) -> agent.NodeOptions:
    return agent.NodeOptions(mesh_file=mesh, node=node, private_key=key, api_socket=api_socket,
                             host_link=host_link, uplink=uplink,  # type: ignore[arg-type]
                             state_dir=state_dir)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")


@app.command()
def up(
    mesh: MeshOpt = DEFAULT_MESH,
    node: NodeOpt = HOSTNAME,
    key: KeyOpt = DEFAULT_KEY,
    api_socket: SocketOpt = DEFAULT_API_SOCKET,
    host_link: Annotated[str, typer.Option(
        help="How the host joins: auto (tap if /dev/vhost-net exists, else af_packet), tap, "
        "af_packet, none.")] = "auto",
    uplink: Annotated[str | None, typer.Option(
        help="VPP interface carrying the underlay (default: the one holding the primary "
        "address).")] = None,
    watch: Annotated[bool, typer.Option(
        help="Keep running: re-apply when the mesh file changes or VPP restarts.")] = False,
    state_dir: StateOpt = DEFAULT_STATE,
    datastore: DatastoreOpt = None,
    underlay: Annotated[list[str] | None, typer.Option(
        help="With --datastore: an underlay address of this node (ADDR/LEN), once per "
        "tunnel; the first is the primary.")] = None,
    pod_cidr: Annotated[str | None, typer.Option(
        help="With --datastore: this node's pod CIDR.")] = None,
    node_number: Annotated[int | None, typer.Option(
        help="With --datastore: claim this node number (default: keep ours or allocate "
        "the lowest free one).")] = None,
    settings: Annotated[Path | None, typer.Option(
        help="With --datastore: mesh settings (YAML) stored if the datastore has none.")
                        ] = None,
    lease_ttl: Annotated[int, typer.Option(
        help="With --datastore: seconds the record outlives a stopped agent.")] = 30,
    nat_public: Annotated[str | None, typer.Option(
        help="With --datastore: this node is behind NAT; peers reach it at this public "
        "ADDRESS[:PORT] (the port the NAT forwards to its UDP 4500; default 4500), with ESP "
        "in UDP.")] = None,
    udp_encap: Annotated[bool, typer.Option(
        help="With --datastore: ESP in UDP (port 4500) towards and from this node, "
        "without NAT.")] = False,
    take_uplink: Annotated[str | None, typer.Option(
        help="Hand this NIC to VPP first; the host keeps its network through VPP "
        "(`vppmesh uplink take`).")] = None,
    uplink_driver: Annotated[str, typer.Option(
        help="With --take-uplink: af_packet, af_xdp, avf or dpdk.")] = "af_packet",
    crypto_engine: Annotated[str, typer.Option(
        help="VPP crypto engine for AES-GCM-256: auto (the fastest this CPU and VPP build "
        "have, README: Crypto engines), native, ipsecmb or openssl.")] = "auto",
    cni_state_dir: Annotated[Path | None, typer.Option(
        help="With --watch: the CNI plugin's stateDir (/var/lib/cni/vppmesh in "
        "containers/); its pods are re-attached after a VPP restart, and records of pods "
        "whose network namespace is gone are removed. Without it pods are left alone.")
                                     ] = None,
    metrics: Annotated[str | None, typer.Option(
        help="With --watch: serve Prometheus metrics on ADDR:PORT (/metrics), e.g. "
        ":9477.")] = None,
    stats_socket: StatsSocketOpt = None,
) -> None:
    """Bring this node into the mesh (idempotent: a second run changes nothing)."""
    from dataclasses import replace

    opts = replace(options(mesh, node, key, api_socket, host_link, uplink, state_dir),
                   crypto_engine=crypto_engine)
    if cni_state_dir is not None:
        opts = replace(opts, cni_state_dir=cni_state_dir)
    exporter = None
    if metrics is not None:
        if not watch:
            raise fail("--metrics needs --watch: it is served by the running agent")
        try:
            exporter = start_metrics(metrics)
        except VppMeshError as exc:
            raise fail(str(exc)) from None
    if take_uplink is not None:
        from pydantic import ValidationError

        from vppmesh.uplink import UplinkSpec

        try:
            spec = UplinkSpec(interface=take_uplink, driver=uplink_driver)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise fail(f"--take-uplink/--uplink-driver: {exc.errors()[0]['msg']}") from None
        opts = replace(opts, take_uplink=spec)
    if datastore is not None:
        from vppmesh.datastore.agent import follow

        try:
            follow(opts, datastore, watch=watch, underlay=underlay or [], pod_cidr=pod_cidr,
                   node_number=node_number, settings_file=settings, lease_ttl=lease_ttl,
                   metrics=exporter, stats_socket=stats_path(api_socket, stats_socket),
                   nat_public=nat_public, udp_encap=udp_encap)
        except VppMeshError as exc:
            raise fail(str(exc)) from None
        return
    try:
        report_up(agent.up(opts))
    except VppMeshError as exc:
        if not watch:
            raise fail(str(exc)) from None
        log.error("%s", exc)
    if watch:
        watch_loop(opts, exporter, stats_path(api_socket, stats_socket), report=report_up)


def report_up(result: agent.UpResult) -> None:
    for note in result.notes:
        typer.echo(f"* {note}")
    for change in result.changes:
        typer.echo(str(change))
    engine = f", crypto {result.crypto_engine}" if result.crypto_engine else ""
    typer.echo(f"node {result.desired.node}: {len(result.changes)} change(s) in "
               f"{result.seconds * 1000:.0f} ms, {len(result.desired.tunnels)} tunnel(s), "
               f"host link {result.host_link}, pod MTU {result.desired.mtu}{engine}")
    if result.blocked_peers:
        typer.secho(f"fail closed: no usable key towards {', '.join(result.blocked_peers)}; "
                    "their traffic is dropped", fg=typer.colors.RED, err=True)


@app.command()
def rekey(
    mesh: MeshOpt = DEFAULT_MESH,
    node: NodeOpt = HOSTNAME,
    key: KeyOpt = DEFAULT_KEY,
    api_socket: SocketOpt = DEFAULT_API_SOCKET,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Move every outbound key of this node to its next generation, now.

    Make-before-break: the peers already accept the next generation; the old outbound SAs
    go once the tunnels are re-protected. A step the peers could not yet follow is
    deferred and taken by the next `up` (or the running `up --watch`).
    """
    opts = options(mesh, node, key, api_socket, state_dir=state_dir)
    try:
        result = agent.up(opts, rekey=True)
    except VppMeshError as exc:
        raise fail(str(exc)) from None
    report_up(result)
    if result.rekey_pending:
        typer.echo(f"rekey deferred towards {', '.join(result.rekey_pending)}: they have not "
                   "yet surely moved to the current generation (no traffic both ways seen "
                   "for 2 x rekey_grace); the agent rekeys them as soon as they have")


@app.command()
def down(
    mesh: MeshOpt = DEFAULT_MESH,
    node: NodeOpt = HOSTNAME,
    api_socket: SocketOpt = DEFAULT_API_SOCKET,
    state_dir: StateOpt = DEFAULT_STATE,
    datastore: DatastoreOpt = None,
) -> None:
    """Remove everything vppmesh created in VPP and Linux (an operator's config stays).

    With --datastore, the node's record and number claim are deleted first, so every
    other node removes its tunnels to this one at once.
    """
    opts = options(mesh, node, DEFAULT_KEY, api_socket, state_dir=state_dir)
    try:
        if datastore is not None:
            from vppmesh.datastore.agent import leave
            from vppmesh.datastore.records import DatastoreUrl

            removed = leave(opts, DatastoreUrl.parse(datastore))
        else:
            removed = agent.down(opts)
    except VppMeshError as exc:
        raise fail(str(exc)) from None
    for line in removed:
        typer.echo(f"- {line}")
    typer.echo(f"node {node}: removed {len(removed)} object(s)")


@app.command()
def plan(
    mesh: MeshOpt = DEFAULT_MESH,
    node: NodeOpt = HOSTNAME,
    key: KeyOpt = DEFAULT_KEY,
    api_socket: SocketOpt = DEFAULT_API_SOCKET,
    workers: Annotated[int | None, typer.Option(
        help="Worker count to plan for when VPP is not running.")] = None,
    datastore: DatastoreOpt = None,
) -> None:
    """Dry run: the ordered changes `up` would make (everything, when VPP is not running)."""
    opts = options(mesh, node, key, api_socket)
    try:
        mesh_obj, secrets = agent.load_inputs(opts, agent.datastore_mesh(datastore))
        try:
            client = VppClient(api_socket).connect()
        except VppUnavailableError:
            client = None
        if client is None:
            from vppmesh.reconcile import diff, empty_observed

            desired = agent.desired_state(opts, mesh_obj, secrets, workers or 0)
            changes = diff(desired, empty_observed(desired)).changes()
            typer.echo(f"(VPP not reachable at {api_socket}: planning against an empty VPP)")
        else:
            with client:
                changes = agent.up(opts, dry_run=True, api=client, mesh=mesh_obj).changes
    except VppMeshError as exc:
        raise fail(str(exc)) from None
    for change in changes:
        typer.echo(str(change))
    typer.echo(f"{len(changes)} change(s)")


@app.command()
def status(
    mesh: MeshOpt = DEFAULT_MESH,
    node: NodeOpt = HOSTNAME,
    api_socket: SocketOpt = DEFAULT_API_SOCKET,
    stats_socket: StatsSocketOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    datastore: DatastoreOpt = None,
) -> None:
    """Peers, tunnels, protection and per-SA counters, from VPP itself."""
    from vppmesh.config import load_mesh
    from vppmesh.status import collect, render_table

    try:
        mesh_obj = agent.datastore_mesh(datastore) or load_mesh(mesh)
        with VppClient(api_socket).connect() as client:
            result = collect(client, mesh_obj, node, stats_path(api_socket, stats_socket),
                             with_crypto=True)
    except VppMeshError as exc:
        raise fail(str(exc)) from None
    typer.echo(result.model_dump_json(indent=2) if as_json else render_table(result))
    if result.missing_peers or not all(p.healthy for p in result.peers):
        raise typer.Exit(3)


@app.command()
def verify(
    mesh: MeshOpt = DEFAULT_MESH,
    node: NodeOpt = HOSTNAME,
    api_socket: SocketOpt = DEFAULT_API_SOCKET,
    stats_socket: StatsSocketOpt = None,
    capture: Annotated[bool, typer.Option(
        help="Also record the uplink with VPP's pcap trace and check that only ESP between "
        "node addresses carries mesh traffic.")] = False,
    seconds: Annotated[float, typer.Option(min=0.5, max=60.0,
                                           help="Length of the observation window.")] = 3.0,
    probes: Annotated[bool, typer.Option(
        help="Ping every peer's host link during the window, so there is traffic.")] = True,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Prove that this node's mesh traffic is encrypted: tunnels, SA counters, capture."""
    from vppmesh.config import load_mesh
    from vppmesh.verify import render
    from vppmesh.verify import verify as run_verify

    try:
        mesh_obj = load_mesh(mesh)
        mesh_obj.node(node)
        with VppClient(api_socket).connect() as client:
            report = run_verify(client, mesh_obj, node,
                                stats_socket=stats_path(api_socket, stats_socket),
                                seconds=seconds, capture=capture, probes=probes)
    except VppMeshError as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps({**report.model_dump(mode="json"), "ok": report.ok,
                               "verdict": report.verdict}, indent=2))
    else:
        typer.echo(render(report))
    if not report.ok:
        raise typer.Exit(3)


@app.command()
def keygen(
    key: KeyOpt = DEFAULT_KEY,
    force: Annotated[bool, typer.Option(help="Replace an existing key file.")] = False,
) -> None:
    """Write a new X25519 private key (mode 0600) and print its public key."""
    from vppmesh.keys import generate_private_key

    try:
        typer.echo(generate_private_key(key, force=force))
    except VppMeshError as exc:
        raise fail(str(exc)) from None


@app.command()
def pubkey(key: KeyOpt = DEFAULT_KEY) -> None:
    """Print the public key of a private key file (for the mesh file)."""
    from vppmesh.keys import load_secrets

    try:
        typer.echo(load_secrets(key, None).public_key_b64())
    except VppMeshError as exc:
        raise fail(str(exc)) from None


@app.command("render-startup")
def render_startup(
    profile: Annotated[str, typer.Option(help="Profile name in vpp-startup/, or a path.")
                       ] = "testbed",
    runtime_dir: Annotated[Path, typer.Option(help="VPP's runtime directory (sockets, log, "
                                              "pid file).")] = Path("/run/vpp"),
    name: Annotated[str, typer.Option(help="Instance name (shared-memory prefix).")] = "vpp",
    workers: Annotated[int | None, typer.Option(help="Override the profile's workers.")
                       ] = None,
    out: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
) -> None:
    """Write a VPP startup.conf from a profile (workers, crypto engines, buffers, pages)."""
    from vppmesh.startup import Instance, load_profile, render

    try:
        text = render(load_profile(profile), Instance(name=name, runtime_dir=runtime_dir),
                      workers=workers)
    except VppMeshError as exc:
        raise fail(str(exc)) from None
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        typer.echo(f"wrote {out}")


@app.command()
def attach(
    name: Annotated[str, typer.Option(help="Endpoint (pod) name, unique on this node.")],
    netns: Annotated[str, typer.Option(help="The pod's network namespace.")],
    address: Annotated[str, typer.Option(help="The pod's address (in this node's pod CIDR).")],
    index: Annotated[int, typer.Option(help="Small unique pod number (stable MACs).")] = 0,
    attachment: Annotated[str, typer.Option(
        help="auto (tap v2 if /dev/vhost-net exists, else af_packet), tap or af_packet.")
                          ] = "auto",
    queues: Annotated[int, typer.Option(
        help="Tap queue pairs (default: VPP's worker count).")] = 0,
    mesh: MeshOpt = DEFAULT_MESH,
    node: NodeOpt = HOSTNAME,
    api_socket: SocketOpt = DEFAULT_API_SOCKET,
) -> None:
    """Attach a network namespace (a pod) to this node's mesh: a tap v2 or veth/af_packet."""
    from vppmesh import host as linux
    from vppmesh.config import load_mesh
    from vppmesh.endpoints import attach as attach_endpoint
    from vppmesh.endpoints import pod_spec
    from vppmesh.vpp import system

    try:
        mesh_obj = load_mesh(mesh)
        local = mesh_obj.node(node)
        ip = ipaddress.IPv4Address(address)
        if ip not in local.pod_cidr or ip == local.mesh_address:
            raise fail(f"--address {ip} is not a pod address of {node} (pod_cidr "
                       f"{local.pod_cidr}, {local.mesh_address} is the host's)")
        if attachment not in ("auto", "tap", "af_packet"):
            raise fail(f"--attachment {attachment}: use auto, tap or af_packet")
        kind = attachment
        if kind == "auto":
            kind = "tap" if linux.tap_supported() else "af_packet"
        elif kind == "tap" and not linux.tap_supported():
            raise fail("--attachment tap needs /dev/vhost-net (modprobe vhost_net); use "
                       "auto or af_packet")
        with VppClient(api_socket).connect() as client:
            if kind == "tap" and queues < 1:
                queues = max(1, system.worker_count(client))
            spec = pod_spec(name=name, netns=netns, address=ip,
                            node_number=local.node_number, pod_index=index, kind=kind,
                            queues=max(1, queues), offloads=mesh_obj.settings.gso)
            attach_endpoint(client, spec, table_id=mesh_obj.settings.mesh_table_id,
                            mtu=mesh_obj.pod_mtu())
    except VppMeshError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"attached {name} ({ip}) in netns {netns} ({kind}"
               f"{f', {spec.queues} queue pair(s)' if kind == 'tap' else ''})")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """Side-by-side iperf3 benchmark (vppmesh, plain VPP IPIP, tinc, WireGuard, kernel).

    Options are those of `python -m benchmarks` (try `vppmesh bench --help-bench`).
    """
    from benchmarks.__main__ import main as bench_main

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
        help="none, static or masquerade: put the last node behind a NAT router "
        "(static: UDP port 14500 forwarded to its 4500; masquerade: outgoing only).")
    ] = "none",
    attachment: Annotated[str, typer.Option(
        help="Host link and pods: af_packet, tap (needs /dev/vhost-net) or auto.")
                          ] = "af_packet",
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
        raise fail("testbed: " + "; ".join(
            (f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: " if e["loc"]
             else "") + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()), 2) from None


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
        help="Host link and pods: af_packet, tap (needs /dev/vhost-net) or auto.")
                          ] = "af_packet",
    gso: Annotated[bool, typer.Option(
        help="settings.gso: large TCP segments between tap endpoints and VPP.")] = False,
    vm: Annotated[bool, typer.Option(
        "--vm", help="Run it in a VM guest with /dev/vhost-net (docs/vm.md); the "
        "endpoints are then tap v2 unless --attachment says otherwise.")] = False,
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
                   "tap" if attachment == "af_packet" else attachment,
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


@uplink_app.command("take")
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
    """Give VPP the NIC; the host keeps its name, MAC, MTU, addresses and routes."""
    from pydantic import ValidationError

    from vppmesh import uplink

    try:
        spec = uplink.UplinkSpec(interface=interface, driver=driver,  # type: ignore[arg-type]
                                 vpp_interface=vpp_interface,
                                 vpp_addresses=tuple(address or ()),  # type: ignore[arg-type]
                                 host_link=host_link, queues=queues)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise fail("testbed: " + "; ".join(
            (f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: " if e["loc"]
             else "") + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()), 2) from None
    try:
        with VppClient(api_socket).connect() as client:
            saved = uplink.take(client, spec, state_dir)
            bvi = uplink.bvi_name(client)
    except VppMeshError as exc:
        raise fail(str(exc)) from None
    if saved.host_link == "veth":
        typer.echo("no /dev/vhost-net here: the host link is a veth pair (af_packet in VPP)")
    typer.echo(f"{interface}: now driven by VPP ({driver}); host link {saved.host_link}; "
               f"VPP's addresses are on {bvi} (use --uplink {bvi} with `vppmesh up`); saved "
               f"to {uplink.state_file(state_dir, interface)}")


@uplink_app.command("restore")
def uplink_restore(
    interface: Annotated[str | None, typer.Option(
        help="The NIC to give back (default: every one saved).")] = None,
    api_socket: SocketOpt = DEFAULT_API_SOCKET,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Give the NIC back to Linux exactly as it was (works with VPP stopped, too)."""
    from vppmesh import uplink

    names = [interface] if interface else uplink.saved_uplinks(state_dir)
    try:
        client = VppClient(api_socket).connect()
    except VppUnavailableError:
        client = None
    try:
        for name in names:
            for line in uplink.restore(client, state_dir, name):
                typer.echo(f"- {line}")
    except VppMeshError as exc:
        raise fail(str(exc)) from None
    finally:
        if client is not None:
            client.close()
    typer.echo(f"restored {len(names)} uplink(s)")


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
