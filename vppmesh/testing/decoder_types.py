"""API definitions for the decoder tests: vpp-papi's own reading of a copy of VPP's ip_types
(addresses, prefixes, unions, enums) and two test messages."""

from __future__ import annotations

import json

from vpp_papi.vpp_papi import VPPApiJSONFiles

IP_TYPES = {
    "enums": [["address_family", ["ADDRESS_IP4", 0], ["ADDRESS_IP6", 1], {"enumtype": "u8"}],
              ["test_flags", ["TEST_A", 1], ["TEST_B", 2], {"enumtype": "u32"}]],
    "unions": [["address_union", ["vl_api_ip4_address_t", "ip4", {"case": "ADDRESS_IP4"}],
                ["vl_api_ip6_address_t", "ip6", {"case": "ADDRESS_IP6"}]]],
    "aliases": {"ip4_address": {"type": "u8", "length": 4},
                "ip6_address": {"type": "u8", "length": 16},
                "interface_index": {"type": "u32"}},
    "types": [
        ["address", ["vl_api_address_family_t", "af"],
         ["vl_api_address_union_t", "un", {"discriminator": "af"}]],
        ["prefix", ["vl_api_address_t", "address"], ["u8", "len"]],
        ["test_label", ["u8", "is_uniform"], ["u32", "label"]],
        ["test_path", ["vl_api_interface_index_t", "sw_if_index"], ["vl_api_address_t", "nh"],
         ["vl_api_test_label_t", "labels", 3]],
    ],
    "messages": [
        ["test_details", ["u16", "_vl_msg_id"], ["u32", "context"],
         ["vl_api_prefix_t", "prefix"], ["vl_api_test_flags_t", "flags"],
         ["string", "tag", 16], ["u8", "key", 8], ["i32", "retval"], ["bool", "up"],
         ["u8", "n_paths"], ["vl_api_test_path_t", "paths", 0, "n_paths"],
         {"crc": "0x12345678"}],
        ["test_blob", ["u16", "_vl_msg_id"], ["u32", "context"], ["u32", "n"],
         ["u8", "data", 0, "n"], {"crc": "0x12345679"}],
    ],
}


def definitions() -> dict[str, object]:
    messages, _ = VPPApiJSONFiles.process_json_str(json.dumps(IP_TYPES))
    return messages
