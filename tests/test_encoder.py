"""The compiled encoders give exactly vpp-papi's bytes, defaults and refusals.

Definitions are the ip_types copy of test_decoder; the real-VPP suite compares both
encoders again on every request the controller builds.
"""

from __future__ import annotations

from typing import Any

import pytest

from vppmesh.dataplane.vpp.decoder import compile_decoder
from vppmesh.dataplane.vpp.encoder import compile_encoder
from vppmesh.testing.decoder_types import definitions

PATH = {"sw_if_index": 7, "nh": "2001:db8::1",
        "labels": [{"is_uniform": 1, "label": n} for n in range(3)]}


def both(fields: dict[str, Any]) -> tuple[Any, Any]:
    """(vpp-papi's result, the compiled encoder's result): bytes, or the error type."""
    message = definitions()["test_details"]
    encode = compile_encoder(message)
    assert encode is not None
    results = []
    for pack in (message.pack, encode):
        try:
            results.append(bytes(pack(dict(fields))))
        except Exception as exc:  # any refusal counts: both must refuse
            results.append(type(exc).__name__)
    return results[0], results[1]


@pytest.mark.parametrize("fields", [
    {"_vl_msg_id": 1, "context": 9, "prefix": "198.18.4.0/26", "flags": 3, "tag": "vppmesh",
     "key": b"\x01\x02", "retval": -6, "up": True, "n_paths": 2,
     "paths": [PATH, {**PATH, "nh": "192.0.2.9"}]},
    {"_vl_msg_id": 1},  # everything else defaults
    {"_vl_msg_id": 1, "tag": None, "key": b"", "n_paths": 0, "paths": []},
    {"_vl_msg_id": 1, "n_paths": 1, "paths": [{"sw_if_index": 3, "labels": [{}, {}, {}]}]},
])
def test_same_bytes_as_vpp_papi(fields: dict[str, Any]) -> None:
    papi, compiled = both(fields)
    assert isinstance(papi, bytes)
    assert compiled == papi
    message = definitions()["test_details"]
    assert compile_decoder(message)(compiled) == message.unpack(papi)[0]  # type: ignore[misc]


@pytest.mark.parametrize("bad", [
    {"tag": "x" * 16},  # the fixed string holds 15 characters and a NUL
    {"key": b"\x00" * 9},  # 8 bytes at most
    {"n_paths": 2, "paths": [PATH]},  # count and list disagree
    {"n_paths": 1, "paths": [{**PATH, "labels": [{}, {}]}]},  # a fixed list of 3
])
def test_refuses_what_vpp_papi_refuses(bad: dict[str, Any]) -> None:
    papi, compiled = both({"_vl_msg_id": 1, **bad})
    assert not isinstance(papi, bytes)
    assert not isinstance(compiled, bytes)


def test_variable_byte_lists_are_left_to_vpp_papi() -> None:
    assert compile_encoder(definitions()["test_blob"]) is None
