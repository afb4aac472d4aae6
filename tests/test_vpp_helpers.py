"""The real-VPP tests' own measuring tools, checked on recorded output."""

from __future__ import annotations

from vppmesh.testing import vpp_helpers

REPLY = "64 bytes from 198.18.2.2: icmp_seq={} ttl=63 time=0.{} ms"
SUMMARY = """
--- 198.18.2.2 ping statistics ---
{} packets transmitted, {} received, {}% packet loss, time 1000ms"""


def stopped_ping(replies: list[int], transmitted: int, extra: str = "") -> vpp_helpers.SteadyPing:
    ping = vpp_helpers.SteadyPing("ns", "198.18.2.2")
    ping.output = "\n".join([REPLY.format(n, n) for n in replies] + [extra] +
                            [SUMMARY.format(transmitted, len(replies), 0)])
    ping.summary = SUMMARY.format(transmitted, len(replies), 0)
    return ping


def test_steady_ping_requests_in_flight_at_the_stop_are_not_losses() -> None:
    assert stopped_ping(list(range(1, 101)), 102).loss_percent() == 0.0


def test_steady_ping_a_request_lost_while_the_stream_went_on_is_a_loss() -> None:
    replies = [n for n in range(1, 101) if n != 50]
    assert stopped_ping(replies, 100).loss_percent() == 1.0
    unreachable = "From 192.0.2.1 icmp_seq=150 Destination Host Unreachable"
    assert stopped_ping(replies, 160, unreachable).loss_percent() == 1.0


def test_steady_ping_nothing_answered_is_all_lost() -> None:
    assert stopped_ping([], 10).loss_percent() == 100.0
