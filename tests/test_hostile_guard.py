"""The plain-IPIP guard against the fake VPP: bound once, idempotent, refuses a foreign ACL,
removed by `down`. (tests/test_hostile.py shows it dropping real packets.)"""

from __future__ import annotations

import ipaddress

import pytest

from vppmesh.dataplane.vpp import classify, interfaces
from vppmesh.errors import ConfigError
from vppmesh.host import guard
from vppmesh.testing.fake_vpp import FakeVpp

PRIMARY = ipaddress.IPv4Interface("192.0.2.11/24")


def test_guard_is_bound_once_and_removed() -> None:
    vpp = FakeVpp.with_uplink(PRIMARY)
    uplink = interfaces.find_uplink(vpp, None, PRIMARY)[0].sw_if_index
    assert uplink is not None
    assert [c.kind for c in guard.ensure(vpp, uplink, 4)] == ["guard"]
    table = vpp.input_acl[uplink]["ip4"]
    assert vpp.classify_tables[table]["sessions"] == {guard.match(4, 4), guard.match(4, 41)}
    assert guard.mask(4)[9] == 0xFF  # the IPv4 protocol byte, matched from the IP header
    sent = vpp.messages_sent
    assert guard.ensure(vpp, uplink, 4) == []
    assert vpp.counts["classify_add_del_table"] == 1
    assert vpp.messages_sent - sent == 2  # looked, changed nothing
    assert guard.remove(vpp, uplink, 4)
    assert vpp.input_acl[uplink] == {} and vpp.classify_tables == {}
    assert guard.remove(vpp, uplink, 4) == []


def test_dry_run_only_reports() -> None:
    vpp = FakeVpp.with_uplink(PRIMARY)
    uplink = interfaces.find_uplink(vpp, None, PRIMARY)[0].sw_if_index
    assert uplink is not None
    assert guard.ensure(vpp, uplink, 4, dry_run=True)
    assert vpp.classify_tables == {}


def test_an_operators_input_acl_is_left_alone_with_a_clear_error() -> None:
    vpp = FakeVpp.with_uplink(PRIMARY)
    uplink = interfaces.find_uplink(vpp, None, PRIMARY)[0].sw_if_index
    assert uplink is not None
    theirs = vpp.call(classify.add_table(bytes(range(16)), "operator")).new_table_index
    vpp.call(classify.set_input_acl(uplink, ip4=theirs))
    with pytest.raises(ConfigError, match="input ACL"):
        guard.ensure(vpp, uplink, 4)
    assert guard.remove(vpp, uplink, 4) == []
    assert vpp.input_acl[uplink]["ip4"] == theirs
