"""avf: VPP 26.06's native iavf device driver (the vpp-drivers package) takes the NIC
from the profile's `devices:` when VPP starts."""

from __future__ import annotations

from vppmesh.host.uplink.base import NicInVpp


class Avf(NicInVpp):
    name = "avf"
