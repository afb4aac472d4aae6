"""The compiled decoders give exactly what vpp-papi's own decoding gives.

Definitions come from vpp-papi's bundled memclnt API and from a copy of VPP's ip_types
(addresses, prefixes, unions, enums); messages are packed by vpp-papi itself. The
real-VPP suite compares both decoders again on every dump the controller makes.
"""

from __future__ import annotations

import importlib.resources
import ipaddress

from vpp_papi.vpp_papi import VPPApiJSONFiles

from vppmesh.dataplane.vpp.decoder import compile_decoder
from vppmesh.testing.decoder_types import definitions


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
