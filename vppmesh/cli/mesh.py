"""A node in the mesh: up, rekey, down, plan, status, verify, keys, startup.conf, attach."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

import vppmesh.agent.node
from vppmesh.agent import presence
from vppmesh.agent.loop import start_metrics, watch_loop
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
    StatsSocketOpt,
    UnitFileOpt,
    fail,
    options,
    stats_path,
)
from vppmesh.dataplane.vpp.client import DEFAULT_API_SOCKET, VppClient
from vppmesh.errors import ConfigError, VppMeshError, VppUnavailableError
from vppmesh.host.unit import UNIT_FILE, Unit
from vppmesh.keying.agreement import NoAgreement

if TYPE_CHECKING:
    from vppmesh.dataplane.startup import MeshSize
    from vppmesh.ops.metrics import MetricsTls

app = typer.Typer()
log = logging.getLogger("vppmesh")


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
    vpp_interface: Annotated[str | None, typer.Option(
        help="With --uplink-driver avf or dpdk: VPP's name of the port the profile gives "
        "it (its devices: port_name, e.g. uplink0).")] = None,
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
    metrics_tls_cert: Annotated[Path | None, typer.Option(
        help="With --metrics: serve HTTPS with this PEM certificate (chain); re-read when "
        "it changes.")] = None,
    metrics_tls_key: Annotated[Path | None, typer.Option(
        help="The certificate's private key (PEM, mode 0600).")] = None,
    metrics_client_ca: Annotated[Path | None, typer.Option(
        help="With --metrics-tls-cert: only scrapers with a certificate signed by this CA "
        "(PEM) are served.")] = None,
    stats_socket: StatsSocketOpt = None,
) -> None:
    """Bring this node into the mesh (idempotent: a second run changes nothing)."""
    from dataclasses import replace

    from vppmesh.agent import hardening

    hardening.forbid_core_dumps()  # before any key (node, PSK, metrics TLS) is read
    opts = replace(options(mesh, node, key, api_socket, host_link, uplink, state_dir),
                   crypto_engine=crypto_engine)
    if cni_state_dir is not None:
        opts = replace(opts, cni_state_dir=cni_state_dir)
    exporter = None
    tls = metrics_tls(metrics, metrics_tls_cert, metrics_tls_key, metrics_client_ca)
    if metrics is not None:
        if not watch:
            raise fail("--metrics needs --watch: it is served by the running agent")
        try:
            exporter = start_metrics(metrics, tls)
        except VppMeshError as exc:
            raise fail(str(exc)) from None
    if take_uplink is not None:
        from pydantic import ValidationError

        from vppmesh.host.uplink import UplinkSpec

        try:
            spec = UplinkSpec(interface=take_uplink, driver=uplink_driver,  # type: ignore[arg-type]
                              vpp_interface=vpp_interface)
        except ValidationError as exc:
            raise fail(f"--take-uplink/--uplink-driver: {exc.errors()[0]['msg']}") from None
        opts = replace(opts, take_uplink=spec)
    elif vpp_interface is not None:
        raise fail("--vpp-interface goes with --take-uplink and --uplink-driver avf|dpdk; "
                   "to name VPP's uplink without a takeover use --uplink (or `uplink:`)", 2)
    with presence.running(state_dir, node) if watch else contextlib.nullcontext():
        if datastore is not None:
            from vppmesh.agent.datastore.membership import follow

            try:
                follow(opts, datastore, watch=watch, underlay=underlay or [],
                       pod_cidr=pod_cidr, node_number=node_number, settings_file=settings,
                       lease_ttl=lease_ttl, metrics=exporter,
                       stats_socket=stats_path(api_socket, stats_socket),
                       nat_public=nat_public, udp_encap=udp_encap)
            except VppMeshError as exc:
                raise fail(str(exc)) from None
            return
        if watch:  # the loop's first run is the first `up`: one run, one path
            watch_loop(opts, exporter, stats_path(api_socket, stats_socket), report=report_up)
            return
        try:
            report_up(vppmesh.agent.node.up(opts, agreement=NoAgreement(opts.clock)))
        except VppMeshError as exc:
            raise fail(str(exc)) from None
        warn_no_agent(state_dir, node)


def warn_no_agent(state_dir: Path, node: str) -> None:
    """Say so when no agent rotates this node's keys (vppmesh/agent/presence.py)."""
    warning = presence.warning(state_dir, node)
    if warning:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)


def metrics_tls(metrics: str | None, cert: Path | None, key: Path | None,
                client_ca: Path | None) -> MetricsTls | None:
    """The endpoint's TLS options, or None for plain HTTP; a half-given set fails."""
    if cert is None and key is None and client_ca is None:
        return None
    if metrics is None:
        raise fail("--metrics-tls-cert, --metrics-tls-key and --metrics-client-ca go with "
                   "--metrics ADDR:PORT", 2)
    if cert is None or key is None:
        raise fail("--metrics-tls-cert and --metrics-tls-key go together: give the "
                   "certificate and its private key (--metrics-client-ca needs both)", 2)
    from vppmesh.ops.metrics import MetricsTls

    return MetricsTls(cert=cert, key=key, client_ca=client_ca)


def agent_now(state_dir: Path, node: str) -> float:
    """Now on the node's agent clock (vppmesh/agent/clock.py), which the generation file's
    times are on: a wall clock stepped since boot does not age a key by the step."""
    from vppmesh.agent.clock import AgentClock

    return AgentClock(state_dir / f"{node}.clock.json")()


def report_up(result: vppmesh.agent.node.UpResult) -> None:
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
    stopped = {n: why for n, why in result.stopped_peers.items() if why != "window"}
    if stopped:
        listed = ", ".join(f"{n} ({why})" for n, why in stopped.items())
        typer.secho(f"fail closed: no agreed key towards {listed} (forward_secrecy: "
                    "required); their traffic is dropped until the agents agree one",
                    fg=typer.colors.RED, err=True)
    if result.downgraded_peers:
        typer.secho(f"forward secrecy lost: {', '.join(result.downgraded_peers)} moved to "
                    "static keys (forward_secrecy: preferred; the agents could not agree)",
                    fg=typer.colors.YELLOW, err=True)


@app.command()
def rekey(
    mesh: MeshOpt = DEFAULT_MESH,
    node: NodeOpt = HOSTNAME,
    key: KeyOpt = DEFAULT_KEY,
    api_socket: SocketOpt = DEFAULT_API_SOCKET,
    state_dir: StateOpt = DEFAULT_STATE,
    datastore: DatastoreOpt = None,
    timeout: Annotated[float, typer.Option(
        help="Seconds to wait for every peer to move (with a running agent).")] = 30.0,
) -> None:
    """Move every outbound key of this node to its next generation, now.

    With the agent running (`up --watch`), it is asked over its control socket: it
    agrees the next generation with every peer's agent, and this prints per peer the
    generation reached once the peer installed it and the agent sends on it, or why
    not at the timeout (exit status 1). Without an agent: a one-shot run steps the pairs
    on static keys (make-before-break: the peers already accept the next generation)
    and leaves pairs on agreed keys to their agents.
    """
    from vppmesh.agent import control

    if not 0 < timeout <= control.MAX_TIMEOUT:
        raise fail(f"--timeout {timeout:g}: give seconds in (0, {control.MAX_TIMEOUT:g}]", 2)
    opts = options(mesh, node, key, api_socket, state_dir=state_dir)
    path = control.socket_path(opts)
    try:
        answer = control.request(path, {"request": "rekey", "timeout": timeout},
                                 timeout + 10)
    except control.NoAgent:
        typer.echo(f"no agent answers on {path}: one-shot rekey (pairs on agreed keys are "
                   "left to their agents)")
        rekey_once(opts, datastore)
        return
    except VppMeshError as exc:
        raise fail(str(exc)) from None
    if "error" in answer:
        raise fail(f"the agent refused the rekey: {answer['error']}")
    peers = answer.get("peers", [])
    for peer in peers:
        if peer["moved"]:
            how = "" if peer["agreed"] else " (static key: no session with its agent)"
            typer.echo(f"{peer['peer']}: generation {peer['from']} -> {peer['to']}{how}")
        else:
            typer.echo(f"{peer['peer']}: generation {peer['from']}, not moved: "
                       f"{peer['reason']}")
    moved = sum(1 for p in peers if p["moved"])
    typer.echo(f"node {node}: {moved} of {len(peers)} peer(s) moved in "
               f"{answer.get('seconds', 0):.2f} s")
    if not answer.get("ok"):
        raise fail("not every peer moved; the agent keeps the request and moves them as "
                   "soon as it may")


def rekey_once(opts: vppmesh.agent.node.NodeOptions, datastore: str | None) -> None:
    """`rekey` without an agent: one `up` that marks every peer for a rekey."""
    try:
        result = vppmesh.agent.node.up(opts, rekey=True,
                                       mesh=vppmesh.agent.node.datastore_mesh(datastore),
                                       agreement=NoAgreement(opts.clock))
    except VppMeshError as exc:
        raise fail(str(exc)) from None
    report_up(result)
    warn_no_agent(opts.state_dir, opts.node)
    if result.rekey_pending:
        typer.echo(f"rekey deferred towards {', '.join(result.rekey_pending)}: pairs on agreed "
                   "keys are rekeyed by the running agents over their channel; others have not "
                   "yet surely moved to the current generation (no traffic both ways seen "
                   "for 2 x rekey_grace); the agent rekeys them as soon as it may")


AGENT_RUNS = 4  # `down`'s exit status when a live agent would undo it


@app.command()
def down(
    mesh: MeshOpt = DEFAULT_MESH,
    node: NodeOpt = HOSTNAME,
    api_socket: SocketOpt = DEFAULT_API_SOCKET,
    state_dir: StateOpt = DEFAULT_STATE,
    datastore: DatastoreOpt = None,
    stop_agent: Annotated[bool, typer.Option(
        help="Stop this node's running agent first: the service through systemd "
        "(`systemctl stop`), else by a stop request on its control socket.")] = False,
    force: Annotated[bool, typer.Option(
        help="Remove the mesh even though an agent runs (it puts it back at its next "
        "poll).")] = False,
    unit_file: UnitFileOpt = UNIT_FILE,
) -> None:
    """Remove everything vppmesh created in VPP and Linux (an operator's config stays).

    A running agent (`up --watch`, the service) would put it all back at its next poll,
    so `down` refuses (exit status 4) while one answers on its control socket, unless
    --stop-agent (stop it first) or --force. With --datastore, the node's record and
    number claim are deleted first, so every other node removes its tunnels to this one
    at once.
    """
    opts = options(mesh, node, DEFAULT_KEY, api_socket, state_dir=state_dir)
    if stop_agent and force:
        raise fail("--stop-agent or --force, not both", 2)
    guard_agent(opts, stop=stop_agent, force=force, unit=Unit(unit_file))
    try:
        if datastore is not None:
            from vppmesh.agent.datastore.membership import leave
            from vppmesh.agent.datastore.records import DatastoreUrl

            removed = leave(opts, DatastoreUrl.parse(datastore))
        else:
            removed = vppmesh.agent.node.down(opts)
    except VppMeshError as exc:
        raise fail(str(exc)) from None
    for line in removed:
        typer.echo(f"- {line}")
    typer.echo(f"node {node}: removed {len(removed)} object(s)")


def guard_agent(opts: vppmesh.agent.node.NodeOptions, *, stop: bool, force: bool,
                unit: Unit) -> None:
    """Before `down`: no agent of this node may be left running to undo it (see down)."""
    from vppmesh.agent.control import socket_path

    path = socket_path(opts)
    try:
        found = presence.live_agent(path, opts.state_dir, opts.node)
        if found is None:
            return
        if force:
            typer.secho(f"warning: {found.describe()}: it puts back what down removes at "
                        "its next poll, within seconds (--force)", fg=typer.colors.YELLOW,
                        err=True)
            return
        if not stop:
            raise fail(f"{found.describe()}; it would put back what down removes at its "
                       f"next poll. Stop it first: `systemctl stop {unit.name}` (and "
                       f"`systemctl disable {unit.name}` if it must not come back at boot), "
                       "or `vppmesh down --stop-agent`; --force removes it anyway. Nothing "
                       "was removed", AGENT_RUNS)
        for line in presence.stop_agent(found, path, opts.state_dir, opts.node, unit):
            typer.echo(f"* {line}")
    except VppMeshError as exc:
        raise fail(f"{exc}; nothing was removed") from None


@app.command()
def plan(
    mesh: MeshOpt = DEFAULT_MESH,
    node: NodeOpt = HOSTNAME,
    key: KeyOpt = DEFAULT_KEY,
    api_socket: SocketOpt = DEFAULT_API_SOCKET,
    workers: Annotated[int | None, typer.Option(
        help="Worker count to plan for when VPP is not running.")] = None,
    datastore: DatastoreOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Dry run: the ordered changes `up` would make (everything, when VPP is not running),
    and whether each pair's keys are agreed by the agents (forward secret) or static."""
    from vppmesh.ops.status import key_secrecy, secrecy_summary

    opts = options(mesh, node, key, api_socket, state_dir=state_dir)
    try:
        view = vppmesh.agent.node.local_view(opts, vppmesh.agent.node.datastore_mesh(datastore))
        secrecy = key_secrecy(state_dir, node, (p.name for p in view.peers))
        try:
            client = VppClient(api_socket).connect()
        except VppUnavailableError:
            client = None
        if client is None:
            from vppmesh.dataplane.reconcile import diff, empty_observed

            desired = vppmesh.agent.node.desired_state(opts, view, workers or 0)
            changes = diff(desired, empty_observed(desired)).changes()
            typer.echo(f"(VPP not reachable at {api_socket}: planning against an empty VPP)")
        else:
            with client:
                changes = vppmesh.agent.node.up(opts, dry_run=True, api=client, view=view,
                                                agreement=NoAgreement(opts.clock)).changes
    except VppMeshError as exc:
        raise fail(str(exc)) from None
    for change in changes:
        typer.echo(str(change))
    typer.echo(f"{len(changes)} change(s)")
    if secrecy:
        typer.echo(secrecy_summary(secrecy))


@app.command()
def status(
    mesh: MeshOpt = DEFAULT_MESH,
    node: NodeOpt = HOSTNAME,
    api_socket: SocketOpt = DEFAULT_API_SOCKET,
    stats_socket: StatsSocketOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    datastore: DatastoreOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Peers, tunnels, protection and per-SA counters, from VPP itself; per peer whether
    its keys are agreed by the agents (ephemeral: forward secret) or static."""
    from vppmesh.config import load_mesh
    from vppmesh.ops.status import collect, key_secrecy, render_table

    try:
        mesh_obj = vppmesh.agent.node.datastore_mesh(datastore) or load_mesh(mesh)
        secrecy = key_secrecy(state_dir, node, (p.name for p in mesh_obj.peers_of(node)))
        with VppClient(api_socket).connect() as client:
            result = collect(client, mesh_obj, node, stats_path(api_socket, stats_socket),
                             with_crypto=True, secrecy=secrecy, now=agent_now(state_dir, node))
    except VppMeshError as exc:
        raise fail(str(exc)) from None
    typer.echo(result.model_dump_json(indent=2) if as_json else render_table(result))
    warn_no_agent(state_dir, node)
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
    require_forward_secrecy: Annotated[bool, typer.Option(
        help="Fail unless every pair runs on keys agreed by the two nodes' agents "
        "(ephemeral both ways: forward secret); by default the key kind is only "
        "reported.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    datastore: DatastoreOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Prove that this node's mesh traffic is encrypted: tunnels, SA counters, capture;
    and report whether each pair's keys are forward secret."""
    from vppmesh.config import load_mesh
    from vppmesh.ops.status import key_secrecy, nat_ports
    from vppmesh.ops.verify import render
    from vppmesh.ops.verify import verify as run_verify

    try:
        mesh_obj = vppmesh.agent.node.datastore_mesh(datastore) or load_mesh(mesh)
        secrecy = key_secrecy(state_dir, node, (p.name for p in mesh_obj.peers_of(node)))
        with VppClient(api_socket).connect() as client:
            report = run_verify(client, mesh_obj, node,
                                stats_socket=stats_path(api_socket, stats_socket),
                                seconds=seconds, capture=capture, probes=probes,
                                secrecy=secrecy,
                                require_forward_secrecy=require_forward_secrecy,
                                nat_ports=nat_ports(state_dir, node),
                                now=agent_now(state_dir, node))
    except VppMeshError as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps({**report.model_dump(mode="json"), "ok": report.ok,
                               "verdict": report.verdict}, indent=2))
    else:
        typer.echo(render(report))
    warn_no_agent(state_dir, node)
    if not report.ok:
        raise typer.Exit(3)


@app.command()
def keygen(
    key: KeyOpt = DEFAULT_KEY,
    psk: Annotated[Path | None, typer.Option(
        help="Instead: write a new pre-shared key (32 random bytes, base64, mode 0600) to "
        "this file, the mesh's settings.psk_file; copy it to every node.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing key file.")] = False,
    rotate: Annotated[bool, typer.Option(
        help="Rotate this node's key without an outage: the current key moves to "
        "KEY.previous (still answered while peers learn the new one) and a new key takes "
        "its place; prints the new public key, for the mesh file (docs/operations.md).")
                      ] = False,
) -> None:
    """Write a new X25519 private key (mode 0600) and print its public key; with --psk,
    a new PSK file instead (nothing printed: it is a secret)."""
    from vppmesh.keying.keys import (
        generate_private_key,
        generate_psk,
        key_previous_file,
        rotate_private_key,
    )

    try:
        if rotate:
            if psk is not None or force:
                raise fail("--rotate takes neither --psk nor --force: it keeps the current "
                           "key as KEY.previous")
            typer.echo(rotate_private_key(key))
            typer.echo(f"the previous key is kept in {key_previous_file(key)}: publish the "
                       "new public key above in the mesh file of every node, then remove "
                       "it once `vppmesh status` shows no peer on the previous key", err=True)
            return
        if psk is not None:
            generate_psk(psk, force=force)
            typer.echo(f"wrote {psk}: copy it to every node (the same PSK everywhere, mode "
                       "0600), and name it in the mesh file's settings.psk_file", err=True)
            return
        typer.echo(generate_private_key(key, force=force))
    except VppMeshError as exc:
        raise fail(str(exc)) from None


@app.command()
def pubkey(key: KeyOpt = DEFAULT_KEY) -> None:
    """Print the public key of a private key file (for the mesh file)."""
    from vppmesh.keying.keys import load_secrets

    try:
        typer.echo(load_secrets(key, None).public_key_b64())
    except VppMeshError as exc:
        raise fail(str(exc)) from None


def mesh_size(peers: int | None, tunnels: int | None, mesh: Path | None) -> MeshSize | None:
    """The mesh render-startup sizes VPP for: --peers/--tunnels, or the mesh file's nodes
    (all but this one) and tunnels_per_peer; None when neither is given."""
    from vppmesh.config import MeshSettings, load_mesh
    from vppmesh.dataplane.startup import MeshSize

    if mesh is not None:
        if peers is not None or tunnels is not None:
            raise ConfigError("--mesh gives the peers and tunnels: give either --mesh or "
                              "--peers/--tunnels")
        loaded = load_mesh(mesh)
        return MeshSize(peers=max(0, len(loaded.nodes) - 1),
                        tunnels=loaded.settings.tunnels_per_peer)
    if peers is None:
        if tunnels is not None:
            raise ConfigError("--tunnels sizes VPP for a mesh of --peers peers: give "
                              "--peers too")
        return None
    return MeshSize(peers=peers, tunnels=MeshSettings().tunnels_per_peer
                    if tunnels is None else tunnels)


@app.command("render-startup")
def render_startup(
    profile: Annotated[str, typer.Option(
        help="Profile name (`vppmesh render-startup --list`), or a path.")] = "testbed",
    runtime_dir: Annotated[Path, typer.Option(help="VPP's runtime directory (sockets, log, "
                                              "pid file).")] = Path("/run/vpp"),
    name: Annotated[str, typer.Option(help="Instance name (shared-memory prefix).")] = "vpp",
    workers: Annotated[int | None, typer.Option(help="Override the profile's workers.")
                       ] = None,
    pci: Annotated[list[str] | None, typer.Option(
        help="The NIC VPP drives (xl710-avf, bare-metal-dpdk): its PCI address, e.g. "
        "0000:3b:02.0 (`lspci -D`); repeat for more ports (uplink0, uplink1, ...).")] = None,
    cores: Annotated[str | None, typer.Option(
        help="Cores to pin VPP to, e.g. 1-3: the main thread on the first, one worker on "
        "each of the others.")] = None,
    main_core: Annotated[int | None, typer.Option(
        help="The core of VPP's main thread (without --cores).")] = None,
    no_hugepage_check: Annotated[bool, typer.Option(
        help="Write the file even if this host has fewer hugepages than it needs.")
                                 ] = False,
    no_host_check: Annotated[bool, typer.Option(
        help="Render for another machine: check neither cores nor hugepages here.")
                             ] = False,
    out: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
    list_profiles: Annotated[bool, typer.Option(
        "--list", help="List the profiles found, and where, instead.")] = False,
    coredump: Annotated[bool | None, typer.Option(
        "--coredump/--no-coredump", help="Let VPP write full core files (default: the "
        "profile's full_coredump, off in every shipped profile). A core file holds every "
        "live ESP key.")] = None,
    peers: Annotated[int | None, typer.Option(
        help="Size VPP's main heap and stats segment for a mesh of this many peers (the "
        "largest it will grow to): the profile's sizes are raised where it needs more.")
                     ] = None,
    tunnels: Annotated[int | None, typer.Option(
        help="Tunnels per peer of that mesh (settings.tunnels_per_peer; default 1).")
                       ] = None,
    mesh: Annotated[Path | None, typer.Option(
        help="Instead of --peers/--tunnels: the mesh file, its nodes but this one and its "
        "tunnels_per_peer.")] = None,
) -> None:
    """Write a VPP startup.conf from a profile (workers, crypto engines, buffers, pages),
    with this machine's NIC and cores, sized for a mesh (--peers, --tunnels or --mesh);
    say how many hugepages it needs and refuse when the host has fewer (a VPP without them
    does not start)."""
    import os

    from vppmesh.dataplane.startup import (
        COREDUMP_WARNING,
        Instance,
        available_profiles,
        check_cores,
        customize,
        fit_to_mesh,
        hugepages,
        load_profile,
        render,
    )

    if list_profiles:
        for found, path in available_profiles().items():
            typer.echo(f"{found:<18} {load_profile(str(path)).description}  ({path})")
        return
    if cores is not None and workers is not None:
        raise fail("--cores sets the workers too (one on each core after the first): give "
                   "--cores or --workers", 2)
    if workers is not None and workers < 0:
        raise fail(f"--workers {workers}: give 0 or more", 2)
    try:
        loaded = customize(load_profile(profile), pci=pci, cores=cores, main_core=main_core,
                           workers=workers)
        size = mesh_size(peers, tunnels, mesh)
        if size is not None:
            loaded = fit_to_mesh(loaded, size, workers)
        if not no_host_check:
            check_cores(loaded, workers, os.cpu_count() or 1)
        text = render(loaded, Instance(name=name, runtime_dir=runtime_dir), workers=workers,
                      coredump=coredump)
        pages = hugepages(loaded)
    except VppMeshError as exc:
        raise fail(str(exc), 2) from None
    if pages is not None:
        typer.echo(pages.describe(), err=True)
        if not pages.enough and not (no_hugepage_check or no_host_check):
            raise fail(f"this host has {pages.total} hugepages of {pages.page_kb} kB, the "
                       f"startup.conf needs {pages.needed}: VPP would not start. Reserve "
                       f"them: {pages.fix()}; or pass --no-hugepage-check (nothing was "
                       "written)")
        if pages.enough and pages.free < pages.needed:
            typer.secho(f"warning: only {pages.free} of them are free now (a running VPP "
                        "holds its own until it stops)", fg=typer.colors.YELLOW, err=True)
    if loaded.full_coredump if coredump is None else coredump:
        typer.secho(f"warning: {COREDUMP_WARNING}", fg=typer.colors.YELLOW, err=True)
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
    from vppmesh.config import load_mesh
    from vppmesh.dataplane.vpp import system
    from vppmesh.host import link as linux
    from vppmesh.host.endpoints import attach as attach_endpoint
    from vppmesh.host.endpoints import pod_spec

    try:
        mesh_obj = load_mesh(mesh)
        local = mesh_obj.node(node)
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            raise fail(f"--address {address!r} is not an IPv4 address; give a pod address "
                       f"of {node}, e.g. the first host of its pod_cidr {local.pod_cidr}",
                       2) from None
        if ip not in local.pod_cidr or ip == local.mesh_address:
            raise fail(f"--address {ip} is not a pod address of {node} (pod_cidr "
                       f"{local.pod_cidr}, {local.mesh_address} is the host's)")
        if attachment not in ("auto", "tap", "af_packet"):
            raise fail(f"--attachment {attachment}: use auto, tap or af_packet")
        kind = vppmesh.agent.node.resolve_host_kind(attachment)  # type: ignore[arg-type]
        if kind == "tap" and not linux.tap_supported():
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
