"""ESP SAs, their worker binding, and tunnel protection."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import SecretBytes

from vppmesh.dataplane.state import SaSpec
from vppmesh.dataplane.vpp.client import Request, VppApi
from vppmesh.dataplane.vpp.interfaces import NO_INTERFACE, NOT_FOUND

PROTO_ESP = 50
CRYPTO_AES_GCM_256 = 9
INTEG_NONE = 0
FLAG_USE_ESN = 0x1
FLAG_USE_ANTI_REPLAY = 0x2
# IPSEC_API_SAD_FLAG_UDP_ENCAP: ESP in UDP (RFC 3948) from udp_src_port to udp_dst_port.
FLAG_UDP_ENCAP = 0x10
SA_FLAGS = FLAG_USE_ESN | FLAG_USE_ANTI_REPLAY
ALL_SAS = 0xFFFFFFFF
# thread_index VPP reports for an SA bound to no worker: 0 (the main thread) when VPP has
# no workers, else ~0 of its 16-bit thread index.
NO_WORKER_THREAD = 0
UNBOUND_THREAD = 0xFFFF


@dataclass(frozen=True)
class SaState:
    """An SA as VPP reports it: its content, counters' position and owning thread."""

    spec: SaSpec
    flags: int
    crypto_algorithm: int
    thread_index: int
    seq_outbound: int
    last_seq_inbound: int
    stat_index: int


def sa_flags(sa: SaSpec) -> int:
    return SA_FLAGS | (FLAG_UDP_ENCAP if sa.udp_encap else 0)


def add_sa(sa: SaSpec) -> Request:
    """Transport-mode SA: the IPIP tunnel supplies the outer header (one header only).

    With UDP encapsulation VPP's ESP encrypt inserts the UDP header between that outer
    header (IPv4 or IPv6) and ESP, and sets the outer protocol to UDP. Inbound, tunnel
    protection has VPP take UDP/4500 to its ESP input whatever the SA flags say; the
    ports matter only for what we send.
    """
    key = sa.key.get_secret_value()
    return Request("ipsec_sad_entry_add_v2", {"entry": {
        "sad_id": sa.sa_id,
        "spi": sa.spi,
        "protocol": PROTO_ESP,
        "crypto_algorithm": CRYPTO_AES_GCM_256,
        "crypto_key": {"length": len(key), "data": key},
        "integrity_algorithm": INTEG_NONE,
        "integrity_key": {"length": 0, "data": b""},
        "flags": sa_flags(sa),
        "salt": sa.salt,
        "udp_src_port": sa.udp_src_port,
        "udp_dst_port": sa.udp_dst_port,
        "anti_replay_window_size": sa.anti_replay_window,
    }}, f"SA {sa.sa_id:#x}")


def del_sa(sa_id: int) -> Request:
    return Request("ipsec_sad_entry_del", {"id": sa_id}, f"SA {sa_id:#x}", tolerate=NOT_FOUND)


def bind_sa(sa_id: int, worker: int) -> Request:
    """Pin an SA's crypto to one worker, so the tunnels of a peer spread over all workers."""
    return Request("ipsec_sad_bind", {"sa_id": sa_id, "worker": worker},
                   f"SA {sa_id:#x} to worker {worker}")


def swap32(value: int) -> int:
    """VPP stores the salt as given (network order) but byte-swaps it again when dumping."""
    return int.from_bytes(value.to_bytes(4, "big"), "little")


def dump_sas(api: VppApi) -> list[SaState]:
    result = []
    for d in api.dump("ipsec_sa_v5_dump", sa_id=ALL_SAS):
        e = d.entry
        key = bytes(e.crypto_key.data[: e.crypto_key.length])
        result.append(SaState(
            spec=SaSpec(sa_id=e.sad_id, spi=e.spi, key=SecretBytes(key),
                        salt=swap32(e.salt),
                        anti_replay_window=e.anti_replay_window_size,
                        udp_encap=bool(e.flags & FLAG_UDP_ENCAP),
                        udp_src_port=e.udp_src_port, udp_dst_port=e.udp_dst_port),
            flags=int(e.flags), crypto_algorithm=int(e.crypto_algorithm),
            thread_index=d.thread_index, seq_outbound=d.seq_outbound,
            last_seq_inbound=d.last_seq_inbound, stat_index=d.stat_index,
        ))
    return result


def installed_sa(sa: SaSpec, stat_index: int) -> SaState:
    """What a dump reports for an SA just added: not bound yet, no packets yet.

    plan() leaves `worker` unset only when VPP has no workers.
    """
    thread = NO_WORKER_THREAD if sa.worker is None else UNBOUND_THREAD
    return SaState(spec=sa, flags=sa_flags(sa), crypto_algorithm=CRYPTO_AES_GCM_256,
                   thread_index=thread, seq_outbound=0, last_seq_inbound=0,
                   stat_index=stat_index)


def protect(sw_if_index: int, sa_out: int, sa_in: tuple[int, ...], what: str = "") -> Request:
    return Request("ipsec_tunnel_protect_update", {"tunnel": {
        "sw_if_index": sw_if_index, "nh": "0.0.0.0", "sa_out": sa_out,
        "n_sa_in": len(sa_in), "sa_in": list(sa_in),
    }}, what)


def unprotect(sw_if_index: int, what: str = "") -> Request:
    return Request("ipsec_tunnel_protect_del", {"sw_if_index": sw_if_index, "nh": "0.0.0.0"},
                   what, tolerate=NOT_FOUND)


def dump_protections(api: VppApi) -> dict[int, tuple[int, tuple[int, ...]]]:
    """{tunnel sw_if_index: (outbound SA id, inbound SA ids)}."""
    return {d.tun.sw_if_index: (d.tun.sa_out, tuple(d.tun.sa_in))
            for d in api.dump("ipsec_tunnel_protect_dump", sw_if_index=NO_INTERFACE)}


def set_async_mode(enable: bool) -> Request:
    return Request("ipsec_set_async_mode", {"async_enable": enable}, "async crypto")
