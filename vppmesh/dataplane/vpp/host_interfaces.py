"""Interfaces that connect Linux to VPP: tap v2 (virtio) and af_packet on a veth."""

from __future__ import annotations

from typing import Any

from vppmesh.dataplane.vpp.client import Request, VppApi
from vppmesh.dataplane.vpp.interfaces import NOT_FOUND, RX_MODE_ADAPTIVE, set_rx_mode

AF_PACKET_MODE_ETHERNET = 1
AF_PACKET_FLAG_QDISC_BYPASS = 1
AF_PACKET_FLAG_CKSUM_GSO = 2
TAP_FLAG_GSO = 1
TAP_FLAG_PERSIST = 4
TAP_FLAG_ATTACH = 8
TAP_FLAG_GRO_COALESCE = 32
TAP_FLAG_CONSISTENT_QP = 256
# An interface dump's dev_type for a tap v2: "tap" since VPP moved taps into the tap
# plugin (26.06: plugins/tap/tap.c, VNET_DEVICE_CLASS (tap_device_class) .name = "tap"),
# "virtio" before, when taps were virtio devices in vnet.
TAP_DEV_TYPES = ("tap", "virtio")


def attachment_kind(dev_type: str) -> str:
    """How an endpoint found in an interface dump is attached: "tap" or "af_packet"."""
    return "tap" if dev_type in TAP_DEV_TYPES else "af_packet"


def create_af_packet(host_if_name: str, mac: str, queues: int = 1,
                     offloads: bool = False) -> Request:
    """af_packet; with offloads, checksum/GSO metadata (large segments) cross the veth."""
    return Request("af_packet_create_v3", {
        "mode": AF_PACKET_MODE_ETHERNET, "hw_addr": mac, "use_random_hw_addr": False,
        "host_if_name": host_if_name, "rx_frame_size": 0, "tx_frame_size": 0,
        "rx_frames_per_block": 0, "tx_frames_per_block": 0,
        "flags": AF_PACKET_FLAG_QDISC_BYPASS | (AF_PACKET_FLAG_CKSUM_GSO if offloads else 0),
        "num_rx_queues": queues, "num_tx_queues": queues,
    }, f"af_packet {host_if_name}")


def delete_af_packet(host_if_name: str) -> Request:
    return Request("af_packet_delete", {"host_if_name": host_if_name},
                   f"af_packet {host_if_name}", tolerate=NOT_FOUND)


def dump_af_packet(api: VppApi) -> dict[str, int]:
    """{Linux interface name: sw_if_index}."""
    return {d.host_if_name: d.sw_if_index for d in api.dump("af_packet_dump")}


def create_tap(host_if_name: str, mac: str, host_mac: str, mtu: int, queues: int,
               netns: str | None, tag: str, *, gso: bool = True, persist: bool = False,
               attach: bool = False) -> Request:
    """Tap v2 with one queue pair per worker; with `gso`, GSO and GRO coalescing.

    Without `gso` the tap negotiates no offload at all, so Linux hands VPP only
    MTU-sized frames with complete checksums: nothing downstream (an IPIP tunnel
    without the gso feature, an af_packet NIC) ever sees a large segment.

    `persist` keeps the Linux end (with its addresses and routes) when VPP dies, and
    `attach` takes such a leftover end over instead of failing on its name; Calico/VPP's
    vpplink (CreateOrAttachTapV2) does the same for its pods. VPP's tap_delete_v2
    clears the persist flag first (plugins/tap/tap.c, tap_free), so a deleted tap goes.
    """
    flags = TAP_FLAG_CONSISTENT_QP
    if gso:
        flags |= TAP_FLAG_GSO | TAP_FLAG_GRO_COALESCE
    if persist:
        flags |= TAP_FLAG_PERSIST
    if attach:
        flags |= TAP_FLAG_ATTACH
    return Request("tap_create_v3", {
        "id": 0xFFFFFFFF, "use_random_mac": False, "mac_address": mac,
        "num_rx_queues": queues, "num_tx_queues": queues,
        "tx_ring_sz": 1024, "rx_ring_sz": 1024,
        "host_mtu_set": True, "host_mtu_size": mtu,
        "host_mac_addr_set": True, "host_mac_addr": host_mac,
        "tap_flags": flags,
        "host_namespace_set": netns is not None, "host_namespace": netns or "",
        "host_if_name_set": True, "host_if_name": host_if_name, "tag": tag,
    }, f"tap {host_if_name}")


def tap_rx_mode(sw_if_index: int, what: str) -> Request:
    """Adaptive receive on an endpoint's tap, as Calico/VPP gives its pods.

    VPP polls a tap's queues by default (af_packet waits on interrupts already), and a
    worker with one polling queue never sleeps: in a VM guest, two idle VPPs with
    polling taps made other work 5.7 times slower (docs/vm.md). Adaptive polls while
    packets keep coming, so a busy endpoint loses nothing.
    """
    return set_rx_mode(sw_if_index, RX_MODE_ADAPTIVE, what)


def delete_tap(sw_if_index: int) -> Request:
    return Request("tap_delete_v2", {"sw_if_index": sw_if_index}, f"tap {sw_if_index}",
                   tolerate=NOT_FOUND)


def dump_taps(api: VppApi) -> dict[int, Any]:
    """{sw_if_index: tap details (tap_flags, host_if_name, host_namespace, ...)}."""
    return {d.sw_if_index: d for d in api.dump("sw_interface_tap_v2_dump",
                                               sw_if_index=0xFFFFFFFF)}
