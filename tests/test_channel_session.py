"""The channel's state machine between two (or three) nodes, over a simulated network."""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vppmesh.channel import messages as m
from vppmesh.channel import session as s
from vppmesh.channel.noise import public_bytes
from vppmesh.keying.keys import NodeSecrets
from vppmesh.testing.channel_net import ADDRESSES, PSK, Net, up


def test_channel_handshake_establishes_both_ends() -> None:
    net = up(Net())
    assert net.nodes[1].established(2) and net.nodes[2].established(1)
    assert s.HandshakeComplete in net.kinds(1) and s.HandshakeComplete in net.kinds(2)
    assert len(net.wire[0][2]) == m.INIT_BYTES and len(net.wire[1][2]) == m.RESPONSE_BYTES
    assert not net.nodes[1].drops and not net.nodes[2].drops


def test_channel_simultaneous_handshakes_settle_on_one() -> None:
    net = Net()
    first, second = net.nodes[1].tick(1000.0), net.nodes[2].tick(1000.0)
    net.run(2, second, 1000.0)  # node 1 has a handshake pending: the lower number's stands
    assert net.nodes[1].stats["collisions"] == 1
    net.run(1, first, 1000.0)
    assert net.nodes[1].established(2) and net.nodes[2].established(1)
    net.run(1, net.nodes[1].send(1001.0, 2, m.Keepalive()), 1001.0)
    assert net.nodes[2].stats["received"] == 2  # node 1's confirmation, then this one


def test_channel_peer_that_only_it_can_reach_us_gets_its_handshake_answered() -> None:
    """Node 1's handshakes never reach node 2 (node 2 sits behind a NAT); once node 1's
    first attempt went unanswered, node 2's own handshake is taken, not refused as a
    collision, and both hold the session."""
    net = Net()
    net.source[2] = ("203.0.113.7", 23456)  # node 2's NAT maps it elsewhere
    net.lose = set(range(0, 10))  # node 1's first handshakes are lost
    net.run(1, net.nodes[1].tick(1000.0), 1000.0)
    net.run(1, net.nodes[1].tick(1000.3), 1000.3)  # a retry: attempt 2, lost too
    net.lose = set()
    net.run(2, net.nodes[2].tick(1000.4), 1000.4)
    assert net.nodes[1].established(2) and net.nodes[2].established(1)
    assert net.nodes[1].stats["collisions"] == 0


def test_channel_generation_key_exchange_gives_both_the_same_secret() -> None:
    net = up(Net())
    net.run(1, net.nodes[1].start_generation(1001.0, 2, 7), 1001.0)
    keyed = {n: [e for e in net.events[n] if isinstance(e, s.GenerationKeyed)] for n in (1, 2)}
    assert [e.generation for e in keyed[1]] == [7] == [e.generation for e in keyed[2]]
    assert keyed[1][0].secret == keyed[2][0].secret
    assert len(keyed[1][0].secret) == 32
    assert "secret" not in repr(keyed[1][0])
    assert net.nodes[1].held_private_keys() == 0  # the answer came: the private key is gone
    assert [e.outbound for e in keyed[1]] == [True] and [e.outbound for e in keyed[2]] == [False]
    net.nodes[1].retire_generation(2, 7, outbound=True)
    assert net.nodes[1].generation_secret(2, 7, outbound=True) is None
    assert net.nodes[2].generation_secret(1, 7, outbound=False) == keyed[2][0].secret


def test_channel_each_generation_gets_a_fresh_secret() -> None:
    net = up(Net())
    for generation in (1, 2):
        net.run(1, net.nodes[1].start_generation(1001.0, 2, generation), 1001.0)
    assert net.nodes[1].generation_secret(2, 1, outbound=True) != \
        net.nodes[1].generation_secret(2, 2, outbound=True)


def test_channel_lost_key_messages_are_retried_and_answered_alike() -> None:
    net = up(Net())
    net.lose = {len(net.wire) + 1}  # the KeyResponse
    net.run(1, net.nodes[1].start_generation(1001.0, 2, 3), 1001.0)
    assert net.nodes[1].held_private_keys() == 1  # still waiting, still holding its key
    answer = net.nodes[2].generation_secret(1, 3, outbound=False)
    net.run(1, net.nodes[1].tick(1001.5), 1001.5)
    assert net.nodes[1].held_private_keys() == 1  # not yet: KEY_RETRY
    net.run(1, net.nodes[1].tick(1002.1), 1002.1)
    assert net.nodes[1].held_private_keys() == 0
    assert net.nodes[1].generation_secret(2, 3, outbound=True) == answer == \
        net.nodes[2].generation_secret(1, 3, outbound=False)
    assert [type(e) for e in net.events[2]].count(s.GenerationKeyed) == 1


def test_channel_next_retry_is_when_tick_sends_again() -> None:
    """The loop waits no longer than next_retry: at that moment tick resends, not before."""
    net = Net()
    net.lose = {0}  # the first handshake
    assert net.nodes[1].next_retry(1000.0) is None  # nothing sent, nothing to retry
    net.run(1, net.nodes[1].tick(1000.0), 1000.0)
    due = net.nodes[1].next_retry(1000.0)
    assert due == 1000.0 + s.HANDSHAKE_RETRY
    sent = len(net.wire)
    net.run(1, net.nodes[1].tick(due - 0.01), due - 0.01)
    assert len(net.wire) == sent
    net.run(1, net.nodes[1].tick(due), due)
    assert net.nodes[1].established(2)
    net.lose = {len(net.wire)}  # the first KeyInit
    net.run(1, net.nodes[1].start_generation(1001.0, 2, 3), 1001.0)
    assert net.nodes[1].generation_secret(2, 3, outbound=True) is None
    assert net.nodes[1].next_retry(1001.0) == 1001.0 + s.KEY_RETRY
    net.run(1, net.nodes[1].tick(1001.0 + s.KEY_RETRY), 1001.0 + s.KEY_RETRY)
    assert net.nodes[1].generation_secret(2, 3, outbound=True) is not None
    # Answered: next, the answer's "installed" is awaited (INSTALL_WAIT), then nothing.
    assert net.nodes[1].next_retry(1002.0) == 1002.0 + s.INSTALL_WAIT
    net.run(2, net.nodes[2].acknowledge(1002.5, 1, "installed", 3), 1002.5)
    assert s.PeerAcked(2, "installed", 3) in net.events[1]
    assert net.nodes[1].next_retry(1003.0) is None


def test_channel_an_answered_offer_is_renewed_when_installed_never_comes() -> None:
    """The receiver's agent answered, then died before it installed the generation (its
    successor knows nothing of it): after INSTALL_WAIT the sender offers the generation
    again with a fresh key, and a late "installed" for the old secret no longer counts;
    an offer whose "installed" came is never renewed."""
    net = up(Net())
    net.run(1, net.nodes[1].start_generation(1001.0, 2, 3), 1001.0)
    old = net.nodes[1].generation_secret(2, 3, outbound=True)
    assert old is not None
    late = net.nodes[2].acknowledge(1001.1, 1, "installed", 3)  # held back by the path
    net.run(1, net.nodes[1].tick(1001.0 + s.INSTALL_WAIT - 0.1), 1001.0 + s.INSTALL_WAIT - 0.1)
    assert net.nodes[1].generation_secret(2, 3, outbound=True) == old  # not yet
    net.run(1, net.nodes[1].tick(1001.0 + s.INSTALL_WAIT), 1001.0 + s.INSTALL_WAIT)
    new = net.nodes[1].generation_secret(2, 3, outbound=True)
    assert new is not None and new != old
    assert net.nodes[1].stats["offers_renewed"] == 1
    assert net.nodes[2].generation_secret(1, 3, outbound=False) == new
    net.run(2, late, 1012.0)  # the old secret's "installed": not for this key
    assert s.PeerAcked(2, "installed", 3) not in net.events[1]
    assert net.nodes[1].stats["installed_mismatch"] == 1
    net.run(2, net.nodes[2].acknowledge(1012.0, 1, "installed", 3), 1012.0)
    assert s.PeerAcked(2, "installed", 3) in net.events[1]
    for later in (1100.0, 1500.0):  # confirmed: never renewed again
        net.run(1, net.nodes[1].tick(later), later)
    assert net.nodes[1].generation_secret(2, 3, outbound=True) == new
    assert net.nodes[1].stats["offers_renewed"] == 1


def test_channel_a_new_session_resends_unanswered_offers_at_once() -> None:
    """After a VPP restart the first KeyInit dies while VPP resolves the neighbour; the
    handshake that follows carries it again instead of leaving it to KEY_RETRY."""
    net = up(Net())
    net.lose = {len(net.wire)}  # the KeyInit
    net.run(1, net.nodes[1].start_generation(1001.0, 2, 5), 1001.0)
    assert net.nodes[1].generation_secret(2, 5, outbound=True) is None
    net.run(1, net.nodes[1].restarted(1001.1, 999), 1001.1)  # well before KEY_RETRY
    assert net.nodes[1].generation_secret(2, 5, outbound=True) == \
        net.nodes[2].generation_secret(1, 5, outbound=False) is not None
    assert net.nodes[1].held_private_keys() == 0


def test_channel_key_exchanges_of_the_two_directions_are_independent() -> None:
    """Both nodes start their own outbound generation 4 at once: two exchanges, two
    secrets, each node holding its outbound and its inbound one."""
    net = up(Net())
    offer_1 = net.nodes[1].start_generation(1001.0, 2, 4)
    offer_2 = net.nodes[2].start_generation(1001.0, 1, 4)
    net.run(2, offer_2, 1001.0)
    net.run(1, offer_1, 1001.0)
    one_to_two = net.nodes[1].generation_secret(2, 4, outbound=True)
    two_to_one = net.nodes[2].generation_secret(1, 4, outbound=True)
    assert one_to_two is not None and two_to_one is not None and one_to_two != two_to_one
    assert net.nodes[2].generation_secret(1, 4, outbound=False) == one_to_two
    assert net.nodes[1].generation_secret(2, 4, outbound=False) == two_to_one
    assert net.nodes[1].held_private_keys() == net.nodes[2].held_private_keys() == 0


def test_channel_acks_restarts_and_keepalives_reach_the_peer() -> None:
    net = up(Net())
    net.run(1, net.nodes[1].start_generation(1000.5, 2, 9), 1000.5)
    net.run(2, net.nodes[2].acknowledge(1001.0, 1, "installed", 9), 1001.0)
    net.run(2, net.nodes[2].acknowledge(1001.0, 1, "slid", 9), 1001.0)
    net.run(2, net.nodes[2].acknowledge(1001.0, 1, "sending", 3), 1001.0)
    net.run(2, net.nodes[2].restarted(1002.0, 777), 1002.0)
    acks = [e for e in net.events[1] if isinstance(e, (s.PeerAcked, s.PeerRestarted))]
    assert acks == [s.PeerAcked(2, "installed", 9), s.PeerAcked(2, "slid", 9),
                    s.PeerAcked(2, "sending", 3),
                    s.PeerRestarted(2, 777)]  # once: the handshake's Hello agrees
    assert net.nodes[1].stats["handshakes_completed"] == 2
    sent, received = len(net.wire), net.nodes[2].stats["received"]
    net.run(1, net.nodes[1].tick(1002.0 + s.KEEPALIVE_AFTER + 1), 1002.0 + 16)
    assert len(net.wire) == sent + 1  # node 1 has nothing to repeat: a bare keepalive
    assert net.nodes[2].stats["received"] == received + 1


def test_channel_acknowledgements_are_repeated_until_they_arrive() -> None:
    net = up(Net())
    for generation in (4, 5):
        net.run(1, net.nodes[1].start_generation(1000.5, 2, generation), 1000.5)
    net.lose = {len(net.wire)}
    net.run(2, net.nodes[2].acknowledge(1001.0, 1, "installed", 4), 1001.0)
    assert not [e for e in net.events[1] if isinstance(e, s.PeerAcked)]
    net.run(2, net.nodes[2].tick(1001.0 + s.KEEPALIVE_AFTER), 1001.0 + s.KEEPALIVE_AFTER)
    assert [e for e in net.events[1] if isinstance(e, s.PeerAcked)] == [
        s.PeerAcked(2, "installed", 4)]
    # Repeated in place of every keepalive and over a new session; reported once.
    later = 1001.0 + 2 * s.KEEPALIVE_AFTER
    net.run(2, net.nodes[2].tick(later), later)
    net.run(1, net.nodes[1].tick(1000.0 + s.REKEY_AFTER), later)
    assert net.nodes[1].stats["received"] >= 3
    assert [e for e in net.events[1] if isinstance(e, s.PeerAcked)] == [
        s.PeerAcked(2, "installed", 4)]
    net.run(2, net.nodes[2].acknowledge(later, 1, "installed", 5), later)
    assert s.PeerAcked(2, "installed", 5) in net.events[1]


def test_channel_restart_reaches_the_peer_when_the_message_is_lost() -> None:
    net = up(Net())
    net.lose = {len(net.wire)}  # the Restarted message: a fresh VPP's first packet
    net.run(2, net.nodes[2].restarted(1002.0, 778), 1002.0)
    assert [e for e in net.events[1] if isinstance(e, s.PeerRestarted)] == [
        s.PeerRestarted(2, 778)]


def test_channel_handshake_hello_reveals_a_restart() -> None:
    net = up(Net())
    node2 = net.nodes[2]
    node2.boot_id = 555  # its VPP restarted while the agent lost the session
    node2._peers[1].current = None
    net.run(2, node2.tick(1005.0), 1005.0)
    assert s.PeerRestarted(2, 555) in net.events[1]


def test_channel_messages_wait_for_the_handshake() -> None:
    net = Net()
    net.run(1, net.nodes[1].send(1000.0, 2, m.Restarted(5)), 1000.0)
    assert s.PeerRestarted(1, 5) in net.events[2]


def test_channel_unanswered_handshakes_back_off() -> None:
    net = Net()
    net.lose = set(range(100))
    sent = []
    for step in range(800):
        now = 1000.0 + step * 0.125
        before = len(net.wire)
        net.run(1, net.nodes[1].tick(now), now)
        sent += [now] * (len(net.wire) - before)
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert gaps[:5] == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert max(gaps) <= s.HANDSHAKE_RETRY_MAX


def test_channel_rekeys_and_keeps_the_previous_session_for_stragglers() -> None:
    net = up(Net())
    straggler = net.nodes[2].send(1001.0, 1, m.Keepalive())  # in flight across the rekey
    net.run(1, net.nodes[1].tick(1000.0 + s.REKEY_AFTER), 1000.0 + s.REKEY_AFTER)
    assert net.nodes[1].stats["handshakes_completed"] == 2
    net.run(2, straggler, 1000.0 + s.REKEY_AFTER)
    assert net.nodes[1].stats["received"] == 1 and not net.nodes[1].drops


def test_channel_sessions_expire() -> None:
    net = up(Net())
    late = net.nodes[2].send(1001.0, 1, m.Keepalive())
    for _, data in late.datagrams:
        net.nodes[1].receive(1000.0 + s.REJECT_AFTER, ADDRESSES[2], data)
    assert net.nodes[1].drops == {m.Drop.REPLAY: 1}


# ---- hostile datagrams ------------------------------------------------------------------
def transport_datagrams(net: Net) -> list[bytes]:
    return [d for f, _, d in net.wire if f == 1 and d[1] == m.DatagramType.TRANSPORT]


def test_channel_replays_are_dropped_and_counted() -> None:
    net = up(Net())
    net.run(1, net.nodes[1].send(1001.0, 2, m.SasInstalled(3)), 1001.0)
    init, transport = net.wire[0][2], transport_datagrams(net)[0]
    node2 = net.nodes[2]
    events = len(net.events[2])
    for data in (init, transport, transport):
        assert node2.receive(1002.0, ADDRESSES[1], data) == s.Output()
    assert node2.drops == {m.Drop.REPLAY: 3}
    assert node2.stats["dh"] == 4  # the handshake's own; the replayed init cost none
    assert len(net.events[2]) == events
    response = net.wire[1][2]
    assert net.nodes[1].receive(1002.0, ADDRESSES[2], response) == s.Output()
    assert net.nodes[1].drops == {m.Drop.REPLAY: 1}


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_channel_any_bit_flip_is_dropped(data: st.DataObject) -> None:
    net = up(Net())
    net.run(1, net.nodes[1].send(1001.0, 2, m.SasInstalled(3)), 1001.0)
    datagram = data.draw(st.sampled_from([net.wire[0][2], transport_datagrams(net)[0]]))
    bit = data.draw(st.integers(min_value=0, max_value=len(datagram) * 8 - 1))
    flipped = bytearray(datagram)
    flipped[bit // 8] ^= 1 << (bit % 8)
    receiver = net.nodes[2]
    if datagram[1] != m.DatagramType.TRANSPORT:  # a node that has not seen the original
        receiver = s.Channel(2, NodeSecrets(net.keys[2], PSK),
                             [s.PeerConfig(1, public_bytes(net.keys[1]), ADDRESSES[1])],
                             boot_id=1)
    before = dict(receiver.stats)
    out = receiver.receive(1002.0, ADDRESSES[1], bytes(flipped))
    assert out == s.Output()
    assert sum(receiver.drops.values()) == 1
    assert dict(receiver.stats) == before  # nothing received, no Diffie-Hellman done


def test_channel_forgeries_and_strangers_cost_no_diffie_hellman() -> None:
    net = up(Net())
    node2 = net.nodes[2]
    dh = node2.stats["dh"]
    stranger = Net()  # another mesh: its node 1 has other keys
    stranger_init = stranger.nodes[1].tick(1000.0).datagrams[0][1]
    assert node2.receive(1001.0, ADDRESSES[1], stranger_init) == s.Output()
    not_a_peer = m.build_init(9, 2, 1, 1, bytes(m.NOISE_INIT_BYTES)) + bytes(16)
    assert node2.receive(1001.0, ADDRESSES[1], not_a_peer) == s.Output()
    other_receiver = m.build_init(1, 3, 1, 1, bytes(m.NOISE_INIT_BYTES)) + bytes(16)
    assert node2.receive(1001.0, ADDRESSES[1], other_receiver) == s.Output()
    assert node2.drops == {m.Drop.AUTH: 1, m.Drop.UNKNOWN_PEER: 2}
    assert node2.stats["dh"] == dh


def test_channel_wrong_psk_never_completes() -> None:
    net = Net()
    other = s.Channel(2, NodeSecrets(net.keys[2], bytes(32)),
                      [s.PeerConfig(1, public_bytes(net.keys[1]), ADDRESSES[1])], boot_id=1)
    init = net.nodes[1].tick(1000.0).datagrams[0][1]
    assert other.receive(1000.0, ADDRESSES[1], init) == s.Output()
    assert other.drops == {m.Drop.AUTH: 1}  # the pair MAC already differs


@pytest.mark.parametrize("datagram,reason", [
    (b"", m.Drop.TRUNCATED),
    (bytes(m.MAX_DATAGRAM + 1), m.Drop.OVERSIZED),
    (bytes(65000), m.Drop.OVERSIZED),
    (bytes([m.VERSION]) + b"\x01\x00\x01\x00\x02" + bytes(10), m.Drop.TRUNCATED),
    (b"\x01\x01\x00\x01\x00\x02" + bytes(m.INIT_BYTES - 6), m.Drop.MALFORMED),  # version 1
    (b"\x07" + bytes(60), m.Drop.MALFORMED),
])
def test_channel_malformed_datagrams_are_counted(datagram: bytes, reason: m.Drop) -> None:
    net = up(Net())
    assert net.nodes[2].receive(1001.0, ADDRESSES[1], datagram) == s.Output()
    assert net.nodes[2].drops == {reason: 1}


def test_channel_a_flood_of_handshakes_is_rate_limited() -> None:
    """Handshakes that pass the MAC (an insider, or one replaying with fresh timestamps
    it cannot make without the keys) still get only the Diffie-Hellman budget."""
    net = Net()
    insider = net.nodes[1]
    node2 = net.nodes[2]
    for i in range(1000):
        insider._peers[2].pending = None
        init = insider.tick(2000.0 + i * 1e-4).datagrams[0][1]
        node2.receive(2000.0 + i * 1e-4, ADDRESSES[1], init)
    assert node2.stats["handshakes_answered"] == s.PEER_BURST  # the burst, in 0.1 s
    assert node2.drops[m.Drop.RATE_LIMITED] == 1000 - s.PEER_BURST


def test_channel_node_budget_caps_many_sources() -> None:
    bucket = s.TokenBucket(s.NODE_RATE, s.NODE_BURST, 0.0)
    assert sum(bucket.take(0.0) for _ in range(10_000)) == s.NODE_BURST
    assert sum(bucket.take(1.0) for _ in range(10_000)) == s.NODE_RATE


def test_channel_follows_a_nat_port_change_and_tells_the_peer() -> None:
    net = up(Net())
    net.source[2] = ("198.51.100.7", 40001)  # node 2 now behind a NAT that picked a port
    net.run(2, net.nodes[2].send(1001.0, 1, m.Keepalive()), 1001.0)
    assert net.nodes[1].endpoint(2) == ("198.51.100.7", 40001)
    assert s.EndpointChanged(2, ("198.51.100.7", 40001)) in net.events[1]
    assert s.PeerObserved(1, ("198.51.100.7", 40001)) in net.events[2]


def test_channel_forged_source_does_not_move_the_peer() -> None:
    net = up(Net())
    junk = bytearray(net.nodes[2].send(1001.0, 1, m.Keepalive()).datagrams[0][1])
    junk[-1] ^= 1
    net.nodes[1].receive(1001.0, ("203.0.113.66", 1), bytes(junk))
    assert net.nodes[1].endpoint(2) == ADDRESSES[2]


def test_channel_three_nodes_keep_pairs_apart() -> None:
    net = Net(3)
    for n in (1, 2):
        net.run(n, net.nodes[n].tick(1000.0), 1000.0)
    assert all(net.nodes[a].established(b) for a in net.nodes for b in net.nodes if a != b)
    for peer in (2, 3):
        net.run(1, net.nodes[1].start_generation(1001.0, peer, 1), 1001.0)
    assert net.nodes[2].generation_secret(1, 1, outbound=False) != \
        net.nodes[3].generation_secret(1, 1, outbound=False)


def test_channel_observed_address_carries_ipv6() -> None:
    message = m.ObservedAddress(ipaddress.ip_address("2001:db8::5"), 4500)
    assert m.decode(m.encode(message)) == message


@given(st.sampled_from(list(m.DatagramType)), st.binary(max_size=120))
@settings(max_examples=300, deadline=None)
def test_channel_receive_never_raises_and_counts_everything(kind: m.DatagramType,
                                                            body: bytes) -> None:
    net = up(Net())
    node = net.nodes[2]
    received = node.stats["received"]
    out = node.receive(1001.0, ADDRESSES[1], m.header(kind, 1, 2) + body)
    assert out == s.Output()
    assert sum(node.drops.values()) == 1 and node.stats["received"] == received


def test_channel_ask_rekey_reaches_the_peer_as_a_restart_with_the_same_boot_id() -> None:
    """A receiver that lost a peer's inbound keys (not its VPP) asks for a rekey: each
    request once, however often its message is repeated."""
    net = up(Net())
    net.run(2, net.nodes[2].ask_rekey(1001.0, 1), 1001.0)
    assert [e for e in net.events[1] if isinstance(e, s.PeerRestarted)] == [
        s.PeerRestarted(2, 102)]
    for _ in range(3):  # the same request again (a peer repeating itself)
        net.run(2, net.nodes[2].send(1002.0, 1, m.RekeyRequest(42)), 1002.0)
    net.run(2, net.nodes[2].ask_rekey(1003.0, 1), 1003.0)  # a new loss: honoured
    assert [e for e in net.events[1] if isinstance(e, s.PeerRestarted)] == [
        s.PeerRestarted(2, 102)] * 3
    assert net.nodes[1].stats["rekey_requests_repeated"] == 2


# ---- key confirmation -------------------------------------------------------------------
def test_channel_responder_sends_nothing_before_the_initiator_confirms() -> None:
    """The responder's session is `next` until the initiator's first message: its queued
    messages wait, it is not established, and the Init's source is answered without
    becoming the peer's endpoint; the initiator confirms at once."""
    net = Net()
    two = net.nodes[2]
    two.send(999.0, 1, m.SendingOn(4))  # queued: node 2 has no session yet
    two._peers[1].pending = None  # (its own handshake is not what this test follows)
    [(_, init)] = net.nodes[1].tick(1000.0).datagrams
    elsewhere = ("198.51.100.9", 7777)  # where the Init appears to come from
    out = two.receive(1000.0, elsewhere, init)
    assert [(d, data[1]) for d, data in out.datagrams] == [(elsewhere, m.DatagramType.RESPONSE)]
    assert out.events == [] and not two.established(1) and two.endpoint(1) == ADDRESSES[1]
    [(_, response)] = out.datagrams
    confirm = net.nodes[1].receive(1000.0, ADDRESSES[2], response)
    assert net.nodes[1].established(2)
    assert [data[1] for _, data in confirm.datagrams] == [m.DatagramType.TRANSPORT]
    [(_, confirmation)] = confirm.datagrams
    done = two.receive(1000.1, ("198.51.100.9", 7778), confirmation)
    assert two.established(1) and s.HandshakeComplete(1) in done.events
    assert two.endpoint(1) == ("198.51.100.9", 7778)  # where the confirmation came from
    assert s.EndpointChanged(1, ("198.51.100.9", 7778)) in done.events
    assert len(done.datagrams) == 2  # the queued SendingOn, then the ObservedAddress


def test_channel_a_restart_in_an_unconfirmed_handshake_is_not_reported() -> None:
    """A Hello's new boot id counts only once the session is confirmed: an Init replayed
    from an earlier boot (or forged by nobody: held back) reports no restart."""
    net = up(Net())
    old = Net()  # node 2's Init under another boot id, its MAC valid for this pair
    old.keys, old.nodes = net.keys, {2: s.Channel(2, NodeSecrets(net.keys[2], PSK), [
        s.PeerConfig(1, public_bytes(net.keys[1]), ADDRESSES[1])], boot_id=55)}
    [(_, init)] = old.nodes[2].tick(1001.0).datagrams
    out = net.nodes[1].receive(1001.0, ("203.0.113.66", 4501), init)
    assert len(out.datagrams) == 1 and out.events == []
    net.run(1, net.nodes[1].send(1002.0, 2, m.Keepalive()), 1002.0)  # the live session
    assert not net.nodes[2].drops and net.nodes[1].endpoint(2) == ADDRESSES[2]
    assert not [e for e in net.events[1] if isinstance(e, s.PeerRestarted)]


# ---- SasInstalled names its key ---------------------------------------------------------
def test_channel_installed_acks_confirm_only_the_agreed_key() -> None:
    """The sender's KeyResponse is dropped: the receiver's "installed" arrives while the
    sender holds no key for the generation, and must not let it switch; once the offer
    is answered again, the same (repeated) acknowledgement counts."""
    net = up(Net())
    net.lose = {len(net.wire) + 1}  # the KeyResponse
    net.run(1, net.nodes[1].start_generation(1001.0, 2, 3), 1001.0)
    net.run(2, net.nodes[2].acknowledge(1001.2, 1, "installed", 3), 1001.2)
    assert not [e for e in net.events[1] if isinstance(e, s.PeerAcked)]
    assert net.nodes[1].stats["installed_mismatch"] == 1
    net.run(1, net.nodes[1].tick(1001.0 + s.KEY_RETRY), 1001.0 + s.KEY_RETRY)  # answered
    later = 1001.0 + s.KEY_RETRY + s.KEEPALIVE_AFTER
    net.run(2, net.nodes[2].tick(later), later)  # the acknowledgement, repeated
    assert [e for e in net.events[1] if isinstance(e, s.PeerAcked)] == [
        s.PeerAcked(2, "installed", 3)]
    # Another key's digest never counts, and a generation whose secret the receiver's
    # channel does not hold is acknowledged with nothing at all.
    net.run(2, net.nodes[2].send(later, 1, m.SasInstalled(3, s.installed_digest(bytes(32)))),
            later)
    assert net.nodes[1].stats["installed_mismatch"] == 2
    assert net.nodes[2].acknowledge(later, 1, "installed", 9) == s.Output()
    assert net.nodes[2].stats["installed_unknown_secret"] == 1


# ---- padding ----------------------------------------------------------------------------
def test_channel_every_transport_datagram_has_one_length() -> None:
    """An observer cannot pick the key exchanges (or any kind) out by their length."""
    net = up(Net())
    one, two = net.nodes[1], net.nodes[2]
    net.run(1, one.start_generation(1001.0, 2, 1), 1001.0)
    for what in ("installed", "slid", "sending"):
        net.run(2, two.acknowledge(1001.0, 1, what, 1), 1001.0)
    for message in (m.Keepalive(), m.Restarted(9), m.RekeyRequest(5), m.FlowProbe(1),
                    m.ObservedAddress(ipaddress.ip_address("192.0.2.9"), 4500),
                    m.ObservedAddress(ipaddress.ip_address("2001:db8::9"), 4500)):
        net.run(1, one.send(1001.0, 2, message), 1001.0)
    transports = [d for _, _, d in net.wire if d[1] == m.DatagramType.TRANSPORT]
    assert len(transports) >= 12
    assert {len(d) for d in transports} == {m.TRANSPORT_BYTES}
    assert not one.drops and not two.drops


# ---- bounded work -----------------------------------------------------------------------
def test_channel_spoofed_source_handshakes_do_not_spend_an_honest_peers_budget() -> None:
    """Node 3 (a member: its MACs verify) sends a burst of handshakes from a thousand
    spoofed addresses, and strangers send forged ones: node 1's handshake with node 2
    still completes."""
    net = Net(3)
    two, insider = net.nodes[2], net.nodes[3]
    forged = bytearray(next(d for _, d in insider.tick(1000.0).datagrams if d[5] == 2))
    forged[-1] ^= 1  # its MAC broken: as a stranger's
    for i in range(1000):
        insider._peers[2].pending = None
        now = 1000.0 + i * 1e-5
        [(_, init)] = [d for d in insider.tick(now).datagrams if d[1][5] == 2]
        two.receive(now, (f"10.{i >> 8}.{i & 0xFF}.9", 4501), init)
        two.receive(now, (f"10.9.{i & 0xFF}.{i >> 8}", 4501), bytes(forged))
    net.run(1, net.nodes[1].tick(now), now)  # at once, the burst just over
    assert net.nodes[1].established(2) and two.established(1)
    assert two.drops[m.Drop.RATE_LIMITED] == 1000 - s.PEER_BURST  # one budget for node 3
    assert two.drops[m.Drop.AUTH] == 1000  # the forgeries: before any budget


def test_channel_key_inits_outside_the_window_cost_no_diffie_hellman() -> None:
    """A member (or a confused peer) offering generations far outside the receiver's
    window: no Diffie-Hellman, no event, nothing kept, each counted."""
    net = up(Net())
    two = net.nodes[2]
    two.accept_generations(1, 5, 3)
    dh, events = two.stats["dh"], len(net.events[2])
    for generation in (0, 4, 8, 123456, 10**9, 2**32 - 1):
        net.run(1, net.nodes[1].start_generation(1001.0, 2, generation), 1001.0)
    assert two.stats["dh"] == dh and len(net.events[2]) == events
    assert two.drops == {m.Drop.OUT_OF_WINDOW: 6}
    assert two._peers[1].answers == {} and two._peers[1].keyed_in == {}
    net.run(1, net.nodes[1].start_generation(1001.0, 2, 6), 1001.0)  # inside: answered
    assert two.generation_secret(1, 6, outbound=False) is not None
    two.accept_generations(1, 7, 3)  # the window slid past 6: its answer is forgotten
    assert two._peers[1].answers == {} and two.generation_secret(1, 6, outbound=False) is None
    fresh = Net()  # before the agent gives a window, nothing is answered
    fresh.nodes[2].accept_generations(1, 0, 0)
    up(fresh)
    fresh.run(1, fresh.nodes[1].start_generation(1001.0, 2, 0), 1001.0)
    assert fresh.nodes[2].drops == {m.Drop.OUT_OF_WINDOW: 1}


def test_channel_restarted_is_honoured_once_per_boot_id() -> None:
    net = up(Net())
    for _ in range(3):
        net.run(2, net.nodes[2].send(1001.0, 1, m.Restarted(777)), 1001.0)
        net.run(2, net.nodes[2].send(1001.0, 1, m.Restarted(102)), 1001.0)  # its own boot
    assert [e for e in net.events[1] if isinstance(e, s.PeerRestarted)] == [
        s.PeerRestarted(2, 777)]
    assert net.nodes[1].stats["restarts_repeated"] == 5


def test_channel_key_inits_back_off_while_unanswered() -> None:
    """An attacker drops every key exchange: the offer is resent after 1, 2, 4 ... up to
    KEY_RETRY_MAX seconds, not every second for ever; a new session sends it at once."""
    net = up(Net())
    one = net.nodes[1]
    net.lose = set(range(len(net.wire), 10_000))
    net.run(1, one.start_generation(1001.0, 2, 3), 1001.0)
    sent = [1001.0]
    for step in range(1, 880):  # 110 s, before the session's own rekey
        now = 1001.0 + step * 0.125
        net.run(1, one.tick(now), now)
        last = one._peers[2].offers[3][1]
        if last != sent[-1]:
            sent.append(last)
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert gaps[:3] == [1.0, 2.0, 4.0] and set(gaps[3:]) == {s.KEY_RETRY_MAX}
    assert one.next_retry(now) == sent[-1] + s.KEY_RETRY_MAX
    net.lose = set()
    net.run(1, one.tick(1000.0 + s.REKEY_AFTER), 1000.0 + s.REKEY_AFTER)  # a new session
    assert one.generation_secret(2, 3, outbound=True) is not None


@pytest.mark.parametrize("blocked", ["handshakes", "key exchanges"])
def test_channel_agrees_within_the_retry_cap_once_an_attacker_stops_dropping(
        blocked: str) -> None:
    """An attacker drops the pair's channel (every datagram, or only the key exchange)
    for 42 s, then stops: the pair agrees the generation within 10 s of that (the two
    retry caps, 5 s each), not after a backoff grown to half a minute. The storm saw
    27-29 s with the old 30 s caps."""
    net = up(Net())
    one = net.nodes[1]
    start = 1001.0
    if blocked == "handshakes":
        net.lose = set(range(len(net.wire), 100_000))
        net.run(1, one.tick(1000.0 + s.REKEY_AFTER), 1000.0 + s.REKEY_AFTER)
        start = 1000.0 + s.REKEY_AFTER
    net.lose = set(range(len(net.wire), 100_000))
    net.run(1, one.start_generation(start, 2, 3), start)
    now = start
    while now < start + 42.0:
        now += 0.125
        net.run(1, one.tick(now), now)
        net.run(2, net.nodes[2].tick(now), now)
    net.lose = set()
    stopped = now
    while one.generation_secret(2, 3, outbound=True) is None:
        now += 0.125
        assert now - stopped <= 10.0, "the pair still waits on a long backoff"
        net.run(1, one.tick(now), now)
        net.run(2, net.nodes[2].tick(now), now)
