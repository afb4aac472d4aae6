"""The channel's wire format: every message round-trips; nothing raises out of the parser."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vppmesh.channel import messages as m

GENERATIONS = st.integers(min_value=0, max_value=2**32 - 1)
BOOT_IDS = st.integers(min_value=0, max_value=2**64 - 1)
KEYS = st.binary(min_size=32, max_size=32)
PORTS = st.integers(min_value=1, max_value=65535)
MESSAGES = st.one_of(
    st.builds(m.Hello, BOOT_IDS),
    st.builds(m.KeyInit, GENERATIONS, KEYS),
    st.builds(m.KeyResponse, GENERATIONS, KEYS),
    st.builds(m.SasInstalled, GENERATIONS, st.binary(min_size=8, max_size=8)),
    st.builds(m.WindowSlid, GENERATIONS),
    st.builds(m.SendingOn, GENERATIONS),
    st.builds(m.Restarted, BOOT_IDS),
    st.just(m.Keepalive()),
    st.builds(m.ObservedAddress, st.ip_addresses(), PORTS),
    st.builds(m.FlowProbe, GENERATIONS),
    st.builds(m.RekeyRequest, BOOT_IDS),
)


@given(MESSAGES)
@settings(deadline=None)
def test_channel_messages_round_trip(message: m.Message) -> None:
    data = m.encode(message)
    assert len(data) == m.MESSAGE_BYTES  # padded: every kind has one length
    assert m.decode(data) == message
    if not isinstance(message, m.ObservedAddress):  # its length depends on the family
        assert m.decode(m.encode(message, padded=False), padded=False) == message


@given(MESSAGES, st.data())
@settings(deadline=None)
def test_channel_padding_must_be_zeros(message: m.Message, data: st.DataObject) -> None:
    raw = m.encode(message)
    compact = len(m.encode(message, padded=False))
    if compact == len(raw):
        return  # the largest kinds have no padding
    at = data.draw(st.integers(min_value=compact, max_value=len(raw) - 1))
    dirty = bytearray(raw)
    dirty[at] = data.draw(st.integers(min_value=1, max_value=255))
    assert m.decode(bytes(dirty)) is m.Drop.MALFORMED


@given(MESSAGES, st.data())
@settings(deadline=None)
def test_channel_messages_truncated_or_extended_are_dropped(message: m.Message,
                                                           data: st.DataObject) -> None:
    raw = m.encode(message)
    cut = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    assert isinstance(m.decode(raw[:cut]), m.Drop)
    longer = raw + data.draw(st.binary(min_size=1, max_size=40))
    assert isinstance(m.decode(longer), m.Drop)


@given(st.binary(max_size=200))
@settings(deadline=None)
def test_channel_decode_never_raises(data: bytes) -> None:
    assert isinstance(m.decode(data), (m.Drop, *m.Message.__args__))  # type: ignore[attr-defined]


@given(st.binary(max_size=300))
@settings(deadline=None)
def test_channel_parse_datagram_never_raises(data: bytes) -> None:
    parsed = m.parse_datagram(data)
    assert isinstance(parsed, (m.Drop, m.Init, m.Response, m.Transport))
    if len(data) > m.MAX_DATAGRAM:
        assert parsed is m.Drop.OVERSIZED


def test_channel_decode_reasons() -> None:
    assert m.decode(b"") is m.Drop.TRUNCATED
    assert m.decode(b"\x63" + bytes(m.MESSAGE_BYTES - 1)) is m.Drop.MALFORMED  # unknown kind
    assert m.decode(bytes([m.Kind.SAS_INSTALLED]) + bytes(12)) is m.Drop.TRUNCATED
    assert m.decode(bytes([m.Kind.SAS_INSTALLED]) + bytes(11), padded=False) is \
        m.Drop.TRUNCATED
    assert m.decode(bytes([m.Kind.SAS_INSTALLED]) + bytes(13), padded=False) is \
        m.Drop.MALFORMED
    assert m.decode(bytes([m.Kind.KEEPALIVE]) * (m.MAX_MESSAGE + 1)) is m.Drop.OVERSIZED
    v4 = m.encode(m.ObservedAddress(ipaddress.ip_address("192.0.2.1"), 4500))
    assert m.decode(v4[:1] + b"\x05" + v4[2:]) is m.Drop.MALFORMED  # no such family
    v4 = m.encode(m.ObservedAddress(ipaddress.ip_address("192.0.2.1"), 4500), padded=False)
    assert m.decode(v4[:1] + b"\x06" + v4[2:], padded=False) is m.Drop.MALFORMED  # IPv6?
    assert m.decode(v4[:-2] + b"\x00\x00", padded=False) is m.Drop.MALFORMED  # port 0


def test_channel_datagram_sizes_and_header_checks() -> None:
    init = m.build_init(1, 2, 7, 123, bytes(m.NOISE_INIT_BYTES)) + bytes(m.MAC_BYTES)
    assert len(init) == m.INIT_BYTES
    parsed = m.parse_datagram(init)
    assert isinstance(parsed, m.Init)
    assert (parsed.sender, parsed.receiver, parsed.sender_index, parsed.timestamp) == (1, 2, 7, 123)
    assert parsed.signed + parsed.mac == init
    assert m.parse_datagram(init[:-1]) is m.Drop.TRUNCATED
    assert m.parse_datagram(init + b"\x00") is m.Drop.OVERSIZED
    response = m.build_response(2, 1, 8, 7, bytes(m.NOISE_RESPONSE_BYTES)) + bytes(m.MAC_BYTES)
    assert isinstance(m.parse_datagram(response), m.Response)
    assert m.parse_datagram(response + b"\x00") is m.Drop.MALFORMED
    transport = m.transport_header(1, 2, 9, 5) + bytes(m.MESSAGE_BYTES + 16)
    assert len(transport) == m.TRANSPORT_BYTES == 71
    parsed_t = m.parse_datagram(transport)
    assert isinstance(parsed_t, m.Transport) and parsed_t.counter == 5
    assert m.parse_datagram(transport[:-1]) is m.Drop.TRUNCATED
    assert m.parse_datagram(transport + b"\x00") is m.Drop.MALFORMED
    assert (m.INIT_BYTES, m.RESPONSE_BYTES) == (91, 87)  # the sizes the module states
    for bad in (b"\x01" + init[1:],  # version
                init[:1] + b"\x09" + init[2:],  # type
                m.build_init(0, 2, 7, 1, bytes(m.NOISE_INIT_BYTES)) + bytes(16),  # node 0
                m.build_init(2, 2, 7, 1, bytes(m.NOISE_INIT_BYTES)) + bytes(16)):  # to itself
        assert m.parse_datagram(bad) is m.Drop.MALFORMED


@pytest.mark.parametrize("size", [0, 1, 5])
def test_channel_tiny_datagrams_are_truncated(size: int) -> None:
    assert m.parse_datagram(bytes(size)) is m.Drop.TRUNCATED
