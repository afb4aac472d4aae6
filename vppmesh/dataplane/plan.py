"""plan(): the pure function from a node's view of the mesh (view.LocalView) to its
desired state.

No I/O happens here, so the result depends only on the inputs: `vppmesh plan` is an
exact dry run and every property of the mesh can be unit-tested on large meshes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from vppmesh.config import Node
from vppmesh.dataplane.index import PeerObjects
from vppmesh.dataplane.state import (
    DesiredState,
    HostLinkSpec,
    RouteSpec,
    SaSpec,
    TunnelSpec,
    node_mac,
    sa_id_for,
    tunnel_instance,
)
from vppmesh.dataplane.view import AgreedKeys, LocalView, PeerView
from vppmesh.host.endpoints import segmentation_offload
from vppmesh.keying.epochs import PeerKeying
from vppmesh.keying.keys import spi_for

HOST_LINUX_IFNAME = "vppmesh0"
PLANNED_PER_PEER = 4  # kept plans of one peer (generations in use, worker counts)
HOST_VETH_PEER = "vppmesh0-vpp"
# What is not for the mesh leaves the mesh VRF through the host (HostLinkSpec.vpp_routes).
DEFAULT_ROUTE = ipaddress.IPv4Network("0.0.0.0/0")


@dataclass(frozen=True)
class HostOptions:
    """How this node's own Linux host joins the mesh (decided from the machine, not here)."""

    kind: Literal["tap", "af_packet", "none"] = "af_packet"
    netns: str | None = None
    queues: int = 1


def host_link(view: LocalView, options: HostOptions) -> HostLinkSpec | None:
    if options.kind == "none":
        return None
    local = view.node
    vpp_ifname = HOST_VETH_PEER if options.kind == "af_packet" else HOST_LINUX_IFNAME
    return HostLinkSpec(
        kind=options.kind,
        tag="vppmesh:host",
        linux_ifname=HOST_LINUX_IFNAME,
        vpp_ifname=vpp_ifname,
        address=f"{local.mesh_address}/32",  # type: ignore[arg-type]
        linux_mac=node_mac(local.node_number, 2),
        vpp_mac=node_mac(local.node_number, 1),
        netns=options.netns,
        # Its own pod CIDR too: the host (a kubelet's probes) reaches local pods
        # through VPP, which holds a /32 route per attached pod.
        routes=(local.pod_cidr, *(peer.node.pod_cidr for peer in view.peers)),
        queues=options.queues,
        offloads=segmentation_offload(view.settings.gso, options.kind),
        vpp_routes=(DEFAULT_ROUTE,),
    )


def drop_routes(local: Node) -> tuple[ipaddress.IPv4Network, ...]:
    """The node's own pod CIDR, dropped in the mesh VRF.

    An address of it that no pod holds (a pod just deleted, a scan, pods not yet attached
    again after a VPP restart) would otherwise take the default route to the host, whose
    route for the pod CIDR leads back into VPP: each packet would bounce between them
    until its TTL runs out. Less specific than the pods' /32s and more specific than the
    default route, the drop route ends it in VPP at once.
    """
    return (local.pod_cidr,)


def plan(view: LocalView, **options: Any) -> DesiredState:
    """Everything the VPP of the view's node should hold to join the mesh (plan_by_peer,
    whose keyword options it takes)."""
    return plan_by_peer(view, **options)[0]


def plan_by_peer(
    view: LocalView,
    *,
    workers: int = 0,
    host: HostOptions | None = None,
    epochs: tuple[int, ...] | None = None,
    uplink: str | None = None,
    keying: Mapping[str, PeerKeying] | None = None,
    agreed: Mapping[str, AgreedKeys] | None = None,
) -> tuple[DesiredState, dict[int, PeerObjects]]:
    """Everything the VPP of the view's node should hold to join the mesh, and each
    peer's part of it by node number (a Reconciler compares two plans peer by peer).

    `keying` gives, per peer, the key generation to send on and those to accept
    (vppmesh.keying.epochs decides them); a peer missing from it has no usable key and gets no
    tunnels, SAs or route at all, so its traffic is dropped (fail closed). Without
    `keying`, every peer uses `epochs` (the newest outbound), by default the mesh's
    key_epoch. `agreed` gives a peer's keys that are not the static schedule's (its
    generations agreed over the agents' channel).
    """
    local = view.node
    settings = view.settings
    count = settings.tunnels_per_peer
    live_epochs = tuple(sorted(set(epochs or (settings.key_epoch,))))
    if keying is None:
        default = PeerKeying(outbound=live_epochs[-1], inbound=live_epochs)
        keying = {peer.name: default for peer in view.peers}
    peers = [peer for peer in view.peers if peer.name in keying]

    sas: list[SaSpec] = []
    tunnels: list[TunnelSpec] = []
    routes: list[RouteSpec] = []
    by_peer: dict[int, PeerObjects] = {}
    node_wide = (local.name, local.node_number, count, settings.anti_replay_window, workers)
    windows: dict[tuple[int, ...], tuple[int, ...]] = {}  # most peers share theirs
    for peer in view.peers:
        if peer.name not in keying:
            # No key may be used towards it (fail closed): no SA, no tunnel, and its pod
            # CIDR dropped in VPP. Without the drop route its pods' packets would take the
            # default route to the host, whose route for the pod range leads back into
            # VPP: they would bounce until their TTL ran out.
            drop = RouteSpec(prefix=peer.node.pod_cidr, tunnels=())
            by_peer[peer.node.node_number] = PeerObjects(sas=(), tunnels=(), route=drop)
            routes.append(drop)
    for peer in peers:
        peer_keying = keying[peer.name]
        inbound = peer_keying.inbound
        in_epochs = windows.get(inbound)
        if in_epochs is None:
            in_epochs = windows[inbound] = tuple(sorted(set(inbound)))
        out_epoch = peer_keying.outbound
        peer_agreed = agreed.get(peer.name) if agreed is not None else None
        # The same inputs give the same objects: a kept view hands them to the next plan,
        # and the reconcile sees an unchanged peer's objects as the very same ones.
        inputs = (node_wide, out_epoch, in_epochs,
                  peer_agreed.revision if peer_agreed is not None else None)
        objects = peer.planned.get(inputs)
        if objects is None:
            if len({e & 0xF for e in in_epochs}) != len(in_epochs):
                raise ValueError(f"inbound generations {in_epochs} of {peer.name} share SPIs")
            objects = peer_objects(view, peer, workers, out_epoch, in_epochs, peer_agreed)
            if len(peer.planned) >= PLANNED_PER_PEER:
                peer.planned.clear()
            peer.planned[inputs] = objects
        by_peer[peer.node.node_number] = objects
        sas += objects.sas
        tunnels += objects.tunnels
        routes.append(objects.route)

    desired = DesiredState(
        node=local.name,
        table_id=settings.mesh_table_id,
        mtu=view.pod_mtu,
        # Segmentation in VPP (the `gso` feature on every tunnel) serves tap endpoints.
        gso=segmentation_offload(settings.gso, (host or HostOptions()).kind),
        uplink=uplink or local.uplink,
        uplink_addresses=tuple(local.underlay),
        sas=tuple(sas),
        tunnels=tuple(tunnels),
        routes=tuple(routes),
        # Every peer's pod CIDR stays routed into VPP, also for a peer without a usable
        # key: its packets must die in VPP, not leave by the host's default route.
        host=host_link(view, host or HostOptions()),
        drop_routes=drop_routes(local),
        channel_address=ipaddress.IPv4Interface(f"{local.channel_address}/32"),
    )
    return desired, by_peer


def peer_objects(view: LocalView, peer: PeerView, workers: int, out_epoch: int,
                 in_epochs: tuple[int, ...], agreed: AgreedKeys | None = None) -> PeerObjects:
    """One peer's SAs, tunnels and route, for one outbound and some inbound generations
    (keys from `agreed` where it has them, else the static schedule)."""
    local = view.node
    keys = agreed.keys if agreed is not None else {}
    settings = view.settings
    number = peer.node.node_number
    pair = peer.path
    sas: list[SaSpec] = []
    tunnels: list[TunnelSpec] = []
    for index in range(settings.tunnels_per_peer):
        worker = index % workers if workers > 0 else None
        sa_in: list[int] = []
        for epoch in in_epochs:
            inbound = keys.get((False, index, epoch))
            sa_id = sa_id_for("in", number, index, epoch, agreed=inbound is not None)
            inbound = inbound or view.sa_key(peer, outbound=False, tunnel=index, epoch=epoch)
            sas.append(SaSpec(
                sa_id=sa_id, spi=spi_for(number, index, epoch), key=inbound.key,
                salt=inbound.salt, anti_replay_window=settings.anti_replay_window,
                worker=worker,
            ))
            sa_in.append(sa_id)
        outbound = keys.get((True, index, out_epoch))
        sa_out = sa_id_for("out", number, index, out_epoch, agreed=outbound is not None)
        outbound = outbound or view.sa_key(peer, outbound=True, tunnel=index, epoch=out_epoch)
        sas.append(SaSpec(
            sa_id=sa_out, spi=spi_for(local.node_number, index, out_epoch),
            key=outbound.key, salt=outbound.salt,
            anti_replay_window=settings.anti_replay_window, worker=worker,
            udp_encap=pair.udp_encap, udp_dst_port=pair.dst_port(index),
        ))
        src, dst = pair.endpoints[index]
        tunnels.append(TunnelSpec(
            instance=tunnel_instance(number, index), src=src, dst=dst, sa_out=sa_out,
            sa_in=tuple(sa_in),
        ))
    route = RouteSpec(prefix=peer.node.pod_cidr, tunnels=tuple(t.instance for t in tunnels))
    return PeerObjects(sas=tuple(sas), tunnels=tuple(tunnels), route=route)
