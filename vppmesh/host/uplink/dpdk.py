"""dpdk: VPP's dpdk plugin takes the NIC from the profile's `dpdk_devices:` when VPP
starts."""

from __future__ import annotations

from vppmesh.host.uplink.base import NicInVpp


class Dpdk(NicInVpp):
    name = "dpdk"
