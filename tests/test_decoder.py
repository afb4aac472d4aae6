"""The compiled decoders give exactly what vpp-papi's own decoding gives.

Definitions come from vpp-papi's bundled memclnt API and from a copy of VPP's ip_types
(addresses, prefixes, unions, enums); messages are packed by vpp-papi itself. The
real-VPP suite compares both decoders again on every dump the controller makes.
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import json

from vpp_papi.vpp_papi import VPPApiJSONFiles

from vppmesh.vpp.decoder import compile_decoder

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


def test_nested_addresses_enums_strings_and_variable_lists_match_vpp_papi() -> None:
    message = definitions()["test_details"]
    decode = compile_decoder(message)
    assert decode is not None
    path = {"sw_if_index": 7, "nh": "2001:db8::1",
            "labels": [{"is_uniform": 1, "label": n} for n in range(3)]}
    for paths in ([], [path], [path, {**path, "nh": "192.0.2.9", "sw_if_index": 9}]):
        raw = message.pack({"_vl_msg_id": 1, "context": 42, "prefix": "198.18.4.0/26",
                            "flags": 3, "tag": "vppmesh:host", "key": b"\x01\x02",
                            "retval": -6, "up": True, "n_paths": len(paths),
                            "paths": paths})
        expected = message.unpack(raw)[0]
        got = decode(raw)
        assert got == expected
        assert type(got) is type(expected)
        assert got.prefix == ipaddress.ip_network("198.18.4.0/26")
        assert got.tag == "vppmesh:host" and got.retval == -6
        assert [type(p.nh) for p in got.paths] == [type(p.nh) for p in expected.paths]


def test_variable_byte_list_and_bundled_memclnt_messages() -> None:
    blob = definitions()["test_blob"]
    raw = blob.pack({"_vl_msg_id": 1, "context": 1, "n": 5, "data": b"abcde"})
    assert compile_decoder(blob)(raw) == blob.unpack(raw)[0]  # type: ignore[misc]

    text = importlib.resources.files("vpp_papi.data").joinpath("memclnt.api.json")
    messages, _ = VPPApiJSONFiles.process_json_str(text.read_text())
    reply = messages["sockclnt_create_reply"]
    raw = reply.pack({"_vl_msg_id": 16, "context": 124, "response": 0, "index": 3,
                      "count": 2, "message_table": [{"index": 1, "name": "a_1234"},
                                                    {"index": 2, "name": "b_5678"}]})
    assert compile_decoder(reply)(raw) == reply.unpack(raw)[0]  # type: ignore[misc]
    # A variable-length string is left to vpp-papi.
    assert compile_decoder(messages["get_api_json_reply"]) is None
