"""Is this VPP one vppmesh works with? Its version, and the API messages vppmesh uses.

vppmesh encodes its requests with the definitions VPP hands out at connect, so a VPP whose
messages changed would not fail at connect but later, half-way through a reconcile, with
an encoding error or (worse) a field that now means something else. Like Calico/VPP,
which compares the CRCs of its generated bindings with VPP's at start, the client checks
at every connect, from what the handshake already carried (VPP's message table, names
with CRCs) plus one `show_version`:

- the VPP release must be one vppmesh is tested with (TESTED_RELEASES); another one is
  refused with the versions to use, unless VPPMESH_UNTESTED_VPP=1 accepts the risk;
- every message in CRCS that this VPP has must carry the CRC recorded here. A message
  VPP lacks is not an error at connect: its plugin may simply not be loaded (af_xdp,
  memif), and the request that needs it says so when it is made.

CRCS is the set of messages the code in vppmesh/ sends, with their replies and details
messages, as VPP 26.06 defines them; tests/test_compat.py checks that it covers every
message the code names and regenerates it from VPP's .api.json files
(`python -m vppmesh.dataplane.vpp.compat /usr/share/vpp/api [NEW_MESSAGE ...]` prints the table).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from vppmesh.errors import VppMeshError

# Releases (major.minor) every real-VPP test ran against.
TESTED_RELEASES = ("26.06",)
UNTESTED_ENV = "VPPMESH_UNTESTED_VPP"

CRCS: dict[str, str] = {
    "af_packet_create_v3": "0xb3a809d4",
    "af_packet_create_v3_reply": "0x5383d31f",
    "af_packet_delete": "0x863fa648",
    "af_packet_delete_reply": "0xe8d4e804",
    "af_packet_details": "0x58c7c042",
    "af_packet_dump": "0x51077d14",
    "af_xdp_create_v3": "0xcf4b1827",
    "af_xdp_create_v3_reply": "0x5383d31f",
    "af_xdp_delete": "0xf9e6675e",
    "af_xdp_delete_reply": "0xe8d4e804",
    "bridge_domain_add_del_v2": "0x600b7170",
    "bridge_domain_add_del_v2_reply": "0xfcb1e980",
    "classify_add_del_session": "0xf20879f0",
    "classify_add_del_session_reply": "0xe8d4e804",
    "classify_add_del_table": "0x6849e39e",
    "classify_add_del_table_reply": "0x05486349",
    "classify_table_by_interface": "0xf9e6675e",
    "classify_table_by_interface_reply": "0xed4197db",
    "classify_table_info": "0x0cca2cd9",
    "classify_table_info_reply": "0x4a573c0e",
    "cli_inband": "0xf8377302",
    "cli_inband_reply": "0x05879051",
    "control_ping": "0x51077d14",
    "control_ping_reply": "0xf6b0b8ca",
    "create_loopback_instance": "0xd36a3ee2",
    "create_loopback_instance_reply": "0x5383d31f",
    "crypto_set_handler": "0xce9ad00d",
    "crypto_set_handler_reply": "0xe8d4e804",
    "delete_loopback": "0xf9e6675e",
    "delete_loopback_reply": "0xe8d4e804",
    "feature_gso_enable_disable": "0x5501adee",
    "feature_gso_enable_disable_reply": "0xe8d4e804",
    "input_acl_set_interface": "0xde7ad708",
    "input_acl_set_interface_reply": "0xe8d4e804",
    "ip_address_details": "0xee29b797",
    "ip_address_dump": "0x2d033de4",
    "ip_neighbor_add_del": "0x0607c257",
    "ip_neighbor_add_del_reply": "0x1992deab",
    "ip_neighbor_details": "0xe29d79f0",
    "ip_neighbor_dump": "0xd817a484",
    "ip_route_add_del": "0xb8ecfe0d",
    "ip_route_add_del_reply": "0x1992deab",
    "ip_route_details": "0xbda8f315",
    "ip_route_dump": "0xb9d2e09e",
    "ip_table_add_del": "0x0ffdaec0",
    "ip_table_add_del_reply": "0xe8d4e804",
    "ip_table_details": "0xc79fca0f",
    "ip_table_dump": "0x51077d14",
    "ip_unnumbered_details": "0xcc59bd42",
    "ip_unnumbered_dump": "0xf9e6675e",
    "ipip_add_tunnel": "0x2ac399f5",
    "ipip_add_tunnel_reply": "0x5383d31f",
    "ipip_del_tunnel": "0xf9e6675e",
    "ipip_del_tunnel_reply": "0xe8d4e804",
    "ipip_tunnel_details": "0xd31cb34e",
    "ipip_tunnel_dump": "0xf9e6675e",
    "ipsec_sa_v5_details": "0x3cfecfbd",
    "ipsec_sa_v5_dump": "0x2076c2f4",
    "ipsec_sad_bind": "0x0649c0d9",
    "ipsec_sad_bind_reply": "0xe8d4e804",
    "ipsec_sad_entry_add_v2": "0x9611297a",
    "ipsec_sad_entry_add_v2_reply": "0x9ffac24b",
    "ipsec_sad_entry_del": "0x3a91bde5",
    "ipsec_sad_entry_del_reply": "0xe8d4e804",
    "ipsec_set_async_mode": "0xa6465f7c",
    "ipsec_set_async_mode_reply": "0xe8d4e804",
    "ipsec_tunnel_protect_del": "0xcd239930",
    "ipsec_tunnel_protect_del_reply": "0xe8d4e804",
    "ipsec_tunnel_protect_details": "0x21663a50",
    "ipsec_tunnel_protect_dump": "0xf9e6675e",
    "ipsec_tunnel_protect_update": "0x30d5f133",
    "ipsec_tunnel_protect_update_reply": "0xe8d4e804",
    "memif_create_v2": "0x8c7de5f7",
    "memif_create_v2_reply": "0x5383d31f",
    "memif_socket_filename_add_del_v2": "0x34223bdf",
    "memif_socket_filename_add_del_v2_reply": "0x9f29bdb9",
    "pcap_trace_off": "0x51077d14",
    "pcap_trace_off_reply": "0xe8d4e804",
    "pcap_trace_on": "0xcb39e968",
    "pcap_trace_on_reply": "0xe8d4e804",
    "punt_reason_details": "0x2c9d4a40",
    "punt_reason_dump": "0x5c0dd4fe",
    "punt_socket_deregister": "0x75afa766",
    "punt_socket_deregister_reply": "0xe8d4e804",
    "punt_socket_details": "0x330466e4",
    "punt_socket_dump": "0x916fb004",
    "punt_socket_register": "0x7875badb",
    "punt_socket_register_reply": "0xbd30ae90",
    "show_threads": "0x51077d14",
    "show_threads_reply": "0xefd78e83",
    "show_version": "0x51077d14",
    "show_version_reply": "0xc919bde1",
    "sw_interface_add_del_address": "0x5463d73b",
    "sw_interface_add_del_address_reply": "0xe8d4e804",
    "sw_interface_details": "0x6c221fc7",
    "sw_interface_dump": "0xaa610c27",
    "sw_interface_set_flags": "0xf5aec1b8",
    "sw_interface_set_flags_reply": "0xe8d4e804",
    "sw_interface_set_l2_bridge": "0xd0678b13",
    "sw_interface_set_l2_bridge_reply": "0xe8d4e804",
    "sw_interface_set_mtu": "0x5cbe85e5",
    "sw_interface_set_mtu_reply": "0xe8d4e804",
    "sw_interface_set_rx_mode": "0xb04d1cfe",
    "sw_interface_set_rx_mode_reply": "0xe8d4e804",
    "sw_interface_set_table": "0xdf42a577",
    "sw_interface_set_table_reply": "0xe8d4e804",
    "sw_interface_set_unnumbered": "0x154a6439",
    "sw_interface_set_unnumbered_reply": "0xe8d4e804",
    "sw_interface_tag_add_del": "0x426f8bc1",
    "sw_interface_tag_add_del_reply": "0xe8d4e804",
    "sw_interface_tap_v2_details": "0x1e2b2a47",
    "sw_interface_tap_v2_dump": "0xf9e6675e",
    "tap_create_v3": "0x3f3fd1df",
    "tap_create_v3_reply": "0x5383d31f",
    "tap_delete_v2": "0xf9e6675e",
    "tap_delete_v2_reply": "0xe8d4e804",
}


class VppIncompatibleError(VppMeshError):
    """The VPP on the socket is not one vppmesh can safely drive."""


def release(version: str) -> str:
    """`26.06` of `26.06-release`, `v26.06-rc0~12-gabcdef`, `26.06.1-release`."""
    found = re.match(r"v?(\d+\.\d+)", version.strip())
    return found.group(1) if found else version.strip()


def check_version(version: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """Raise for an untested release; returns a warning when the operator accepted it."""
    found = release(version)
    if found in TESTED_RELEASES:
        return None
    tested = ", ".join(TESTED_RELEASES)
    if environ.get(UNTESTED_ENV) == "1":
        return (f"VPP {version} is not a release vppmesh is tested with ({tested}); "
                f"going on because {UNTESTED_ENV}=1")
    raise VppIncompatibleError(
        f"VPP {version} is not a release vppmesh is tested with (tested: {tested}); install "
        f"VPP {TESTED_RELEASES[-1]} (README: Quick start), or set {UNTESTED_ENV}=1 to try "
        "this one anyway (for the agent's service: `vppmesh install-unit "
        "--allow-untested-vpp -- UP-OPTIONS`)")


def message_crcs(message_table: Iterable[str]) -> dict[str, str]:
    """{name: crc} of VPP's message table, whose entries are `<name>_<crc hex>`."""
    table = {}
    for entry in message_table:
        name, _, crc = entry.rpartition("_")
        if name and len(crc) == 8:
            table[name] = f"0x{crc}"
    return table


def check_messages(vpp: Mapping[str, str], version: str,
                   expected: Mapping[str, str] = CRCS) -> None:
    """Every message vppmesh uses that VPP has must have the CRC vppmesh knows."""
    changed = sorted(name for name, crc in expected.items()
                     if name in vpp and vpp[name] != crc)
    if changed:
        shown = ", ".join(f"{n} (VPP {vpp[n]}, vppmesh {expected[n]})" for n in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise VppIncompatibleError(
            f"VPP {version} defines {len(changed)} API message(s) vppmesh uses differently "
            f"from the VPP {TESTED_RELEASES[-1]} API vppmesh speaks: {shown}{more}; run "
            f"FD.io's VPP {TESTED_RELEASES[-1]} packages (README: Quick start)")


def crcs_from_api_json(api_dir: Path, names: Iterable[str]) -> dict[str, str]:
    """The CRCs of `names`, their replies and their details messages, from VPP's
    .api.json files (how CRCS is made)."""
    messages: dict[str, str] = {}
    services: dict[str, dict[str, str]] = {}
    for path in sorted(api_dir.rglob("*.api.json")):
        data = json.loads(path.read_text())
        for message in data.get("messages", []):
            messages[message[0]] = message[-1]["crc"]
        services.update(data.get("services", {}))
    table = {}
    for name in names:
        if name not in messages:
            raise KeyError(f"{name}: not in {api_dir}")
        table[name] = messages[name]
        service = services.get(name, {})
        for related in (service.get("reply"), service.get("stream_msg")):
            if related and related in messages:
                table[related] = messages[related]
        if name.endswith("_dump") and service.get("stream"):
            details = name.removesuffix("_dump") + "_details"
            if details in messages:
                table[details] = messages[details]
    return dict(sorted(table.items()))


if __name__ == "__main__":  # print CRCS (plus messages named after the API directory)
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/vpp/api")
    requests = [n for n in CRCS if not n.endswith(("_reply", "_details"))] + sys.argv[2:]
    for name, crc in crcs_from_api_json(directory, requests).items():
        print(f'    "{name}": "{crc}",')
