"""memif: a shared-memory Ethernet link between two VPPs on one host.

The capacity benchmark joins two VPPs with it instead of a NIC: unlike af_packet on a
veth it costs a few tens of clocks per packet, so what is measured is the encryption
path, not the link.
"""

from __future__ import annotations

from pathlib import Path

from vppmesh.dataplane.vpp.client import Request

ROLE_MASTER = 0
ROLE_SLAVE = 1
MODE_ETHERNET = 0


def add_socket(socket_id: int, path: Path) -> Request:
    """Register a socket file under `socket_id` (0 is VPP's default /run/vpp/memif.sock)."""
    return Request("memif_socket_filename_add_del_v2", {
        "is_add": True, "socket_id": socket_id, "socket_filename": str(path),
    }, f"memif socket {path}")


def create(socket_id: int, interface_id: int, master: bool, mac: str,
           queues: int = 1, ring_size: int = 2048, zero_copy: bool = False) -> Request:
    """One end of a memif link; the master owns the shared memory, the slave connects."""
    return Request("memif_create_v2", {
        "role": ROLE_MASTER if master else ROLE_SLAVE, "mode": MODE_ETHERNET,
        "rx_queues": queues, "tx_queues": queues, "id": interface_id,
        "socket_id": socket_id, "ring_size": ring_size, "buffer_size": 2048,
        "no_zero_copy": not zero_copy, "use_dma": False, "hw_addr": mac, "secret": "",
    }, f"memif {socket_id}/{interface_id}")
