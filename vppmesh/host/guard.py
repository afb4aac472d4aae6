"""The uplink guard: plain (unencrypted) IP-in-IP arriving from the underlay is dropped.

VPP 26.06 protects an IPIP tunnel's *ESP* path: ESP goes ipsec4-tun-input ->
esp4-decrypt-tun -> ip4-input on the tunnel interface, never through ipip4-input. But
tunnel protection adds nothing on ipip4-input, so a plain IPIP packet whose outer
addresses are a peer's and ours (trivially spoofed by anyone on the underlay) is
decapsulated and delivered into the mesh VRF, to the pods. Measured on the testbed: a
spoofed ICMP reached a pod.

Nothing in the mesh ever sends plain IPIP on the underlay (every tunnel packet is ESP),
so an input ACL on the uplink drops every packet whose IP protocol (IPv4) or next header
(IPv6) is 4 (IPv4-in-IP) or 41 (IPv6-in-IP). Decrypted tunnel traffic is not affected:
it re-enters ip4-input on the tunnel interface, not on the uplink. Dropped packets count
under ip4-inacl / ip6-inacl in `show errors`.
"""

from __future__ import annotations

from vppmesh.dataplane.reconcile import Change
from vppmesh.dataplane.vpp import classify, interfaces
from vppmesh.dataplane.vpp.client import VppApi
from vppmesh.errors import ConfigError

IPIP_PROTOCOLS = (4, 41)
# Offset of the protocol / next-header byte in the IPv4 / IPv6 header.
PROTOCOL_OFFSET = {4: 9, 6: 6}


def mask(version: int) -> bytes:
    m = bytearray(classify.VECTOR_BYTES)
    m[PROTOCOL_OFFSET[version]] = 0xFF
    return bytes(m)


def match(version: int, protocol: int) -> bytes:
    m = bytearray(classify.VECTOR_BYTES)
    m[PROTOCOL_OFFSET[version]] = protocol
    return bytes(m)


def _bound_table(api: VppApi, uplink: int, version: int) -> int:
    reply = api.call(classify.tables_of(uplink))
    return int(reply.ip4_table_id if version == 4 else reply.ip6_table_id)


def ensure(api: VppApi, uplink: int, version: int, *, dry_run: bool = False) -> list[Change]:
    """Bind the guard table to the uplink unless it is there already (idempotent)."""
    current = _bound_table(api, uplink, version)
    if current != classify.NO_TABLE:
        info = api.call(classify.table_info(current))
        if bytes(info.mask[: info.mask_length]) == mask(version) and \
                info.active_sessions == len(IPIP_PROTOCOLS):
            return []
        raise ConfigError(
            f"the uplink already has an IPv{version} input ACL (classify table {current}) "
            "that is not vppmesh's guard against plain IPIP; remove it (`set interface "
            "input acl intfc <uplink> ... del`) or chain your rules after vppmesh's")
    change = Change("create", "guard", f"drop plain IP-in-IP (IPv{version}) on the uplink")
    if dry_run:
        return [change]
    what = "plain IPIP guard"
    table = api.call(classify.add_table(mask(version), what)).new_table_index
    api.call_many([classify.deny_session(table, match(version, p), what)
                   for p in IPIP_PROTOCOLS])
    api.call(classify.set_input_acl(uplink, **{f"ip{version}": table}, what=what))  # type: ignore[arg-type]
    return [change]


def remove(api: VppApi, uplink: int, version: int) -> list[str]:
    current = _bound_table(api, uplink, version)
    if current == classify.NO_TABLE:
        return []
    info = api.call(classify.table_info(current))
    if bytes(info.mask[: info.mask_length]) != mask(version):
        return []  # not ours
    api.call(classify.set_input_acl(uplink, **{f"ip{version}": current},  # type: ignore[arg-type]
                                    enable=False, what="plain IPIP guard"))
    api.call(classify.del_table(current, mask(version), "plain IPIP guard"))
    return [f"plain IPIP guard (classify table {current})"]


def remove_everywhere(api: VppApi) -> list[str]:
    """The guard off every interface that carries it (`down` without a mesh file)."""
    removed: list[str] = []
    for iface in interfaces.dump_interfaces(api):
        if iface.dev_type not in interfaces.NOT_AN_UPLINK:
            for version in (4, 6):
                removed += remove(api, iface.sw_if_index, version)
    return removed
