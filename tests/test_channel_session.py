"""The channel's state machine between two (or three) nodes, over a simulated network."""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from vppmesh.channel import messages as m
from vppmesh.channel import session as s
from vppmesh.channel.noise import public_bytes
from vppmesh.keys import NodeSecrets

PSK = bytes(range(32))
ADDRESSES = {1: ("192.0.2.1", 5199), 2: ("192.0.2.2", 5199), 3: ("192.0.2.3", 5199)}


class Net:
    """Channels that deliver each other's datagrams at once (recording them)."""

    def __init__(self, count: int = 2, psk: bytes = PSK) -> None:
        self.keys = {n: X25519PrivateKey.generate() for n in range(1, count + 1)}
        self.nodes = {
            n: s.Channel(n, NodeSecrets(key, psk),
                         [s.PeerConfig(p, public_bytes(k), ADDRESSES[p])
                          for p, k in self.keys.items() if p != n], boot_id=100 + n)
            for n, key in self.keys.items()}
        self.wire: list[tuple[int, int, bytes]] = []  # (from, to, datagram)
        self.events: dict[int, list[s.Event]] = {n: [] for n in self.nodes}
        self.source = dict(ADDRESSES)  # where each node's datagrams appear to come from
        self.lose: set[int] = set()  # message kinds (by wire order) to drop: test knobs

    def run(self, sender: int, out: s.Output, now: float) -> None:
        self.events[sender] += out.events
        for destination, data in out.datagrams:
            receiver = next(n for n in self.nodes if destination in (ADDRESSES[n], self.source[n]))
            self.wire.append((sender, receiver, data))
            if len(self.wire) - 1 in self.lose:
                continue
            self.run(receiver, self.nodes[receiver].receive(now, self.source[sender], data), now)

    def kinds(self, node: int) -> list[type]:
        return [type(e) for e in self.events[node]]


def up(net: Net, now: float = 1000.0) -> Net:
    net.run(1, net.nodes[1].tick(now), now)
    return net


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
    assert net.nodes[2].stats["received"] == 1


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
    assert net.nodes[1].next_retry(1002.0) is None


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
    net.run(2, net.nodes[2].acknowledge(1001.0, 1, "installed", 9), 1001.0)
    net.run(2, net.nodes[2].acknowledge(1001.0, 1, "slid", 9), 1001.0)
    net.run(2, net.nodes[2].acknowledge(1001.0, 1, "sending", 3), 1001.0)
    net.run(2, net.nodes[2].restarted(1002.0, 777), 1002.0)
    acks = [e for e in net.events[1] if isinstance(e, (s.PeerAcked, s.PeerRestarted))]
    assert acks == [s.PeerAcked(2, "installed", 9), s.PeerAcked(2, "slid", 9),
                    s.PeerAcked(2, "sending", 3),
                    s.PeerRestarted(2, 777)]  # once: the handshake's Hello agrees
    assert net.nodes[1].stats["handshakes_completed"] == 2
    sent = len(net.wire)
    net.run(1, net.nodes[1].tick(1002.0 + s.KEEPALIVE_AFTER + 1), 1002.0 + 16)
    assert len(net.wire) == sent + 1  # node 1 has nothing to repeat: a bare keepalive
    assert net.nodes[2].stats["received"] == 1


def test_channel_acknowledgements_are_repeated_until_they_arrive() -> None:
    net = up(Net())
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
    (b"\x01\x01\x00\x01\x00\x02" + bytes(10), m.Drop.TRUNCATED),
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
    assert node2.stats["handshakes_completed"] == s.SOURCE_BURST  # the burst, in 0.1 s
    assert node2.drops[m.Drop.RATE_LIMITED] == 1000 - s.SOURCE_BURST


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
    """A receiver that lost a peer's inbound keys (not its VPP) asks for a rekey."""
    net = up(Net())
    net.run(2, net.nodes[2].ask_rekey(1001.0, 1), 1001.0)
    assert [e for e in net.events[1] if isinstance(e, s.PeerRestarted)] == [
        s.PeerRestarted(2, 102)]
