"""Forward secrecy against an attacker on the path, on real VPPs: two `vppmesh up --watch`
agents, pods pinging across, and the underlay bridge in the attacker's hands (nftables
rules on it, frames captured and replayed with scapy, the wall clock of one agent stepped
in the agent's process).

- Only the channel's key exchanges dropped on the underlay (every transport datagram:
  padded, they all have the key exchange's size) for twice key_max_seconds: the channel
  also runs inside the pair's tunnel, so the pair keeps agreeing keys, the pods lose no
  ping, no static key appears.
- The same with the ESP dropped too (the tunnel path gone with it): the pair ends
  stopped (nothing sent, reported), never on its old key past the limit, never on a
  static key; once the attacker stops, it is back on a new agreed key.
- The channel's port blocked and a VPP restarted (its key burnt, a step forced): no key
  of the static schedule is installed on either node, in either direction.
- Handshakes recorded on the wire, replayed to an agent that restarted since (also from
  another source address): refused as replays, nothing moves, the pods notice nothing.
- An agent restarted with its wall clock stepped an hour back, then an hour ahead: the
  pair keeps its agreed keys, the peer refuses none of its handshakes, a rekey goes
  through.
- A flood of handshakes from spoofed sources while an honest handshake runs: the honest
  one completes, nothing is rate limited.
- Every channel datagram on the wire has one of three sizes, every transport datagram the
  same one.

Two nodes (prefix vfa-). Skipped with the reason when no VPP binary is found or when not
root. Select with `pytest -k forward_secrecy`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from vppmesh.channel import messages as m
from vppmesh.channel.endpoint import PORT
from vppmesh.dataplane.vpp import ipsec
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.keying.epochs import GenerationStore, PeerGenerations
from vppmesh.keying.keys import spi_for
from vppmesh.keying.pairs import pair_secrecy
from vppmesh.lab.testbed import NodeHandle, Testbed, _uplink_mac, in_ns
from vppmesh.lab.wallclock import wall_stepped
from vppmesh.testing import CHANNEL_PACKETS, esp_decrypt, vpp_helpers
from vppmesh.testing.wait import wait_for

pytestmark = [pytest.mark.vpp]
PREFIX = "vfa-"
BASE = Path("/run/vppmesh-vfa")
GRACE = 1.0
KEY_SECONDS = 60  # key_max_seconds (its minimum): a key is replaced at 30 s, dead at 60 s
METRICS = "127.0.0.1:9477"  # each agent's, in its node's namespace
CRAFT = CHANNEL_PACKETS
TABLE = "vppmesh_attack"


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    with vpp_helpers.testbed(nodes=2, tunnels=2, pods=1, workers=0, prefix=PREFIX,
                             base_dir=BASE) as bed:
        data = yaml.safe_load(bed.mesh_file.read_text())
        data["settings"].update(rekey_grace=GRACE, rekey_interval=0,
                                key_max_seconds=KEY_SECONDS)
        bed.mesh_file.write_text(yaml.safe_dump(data, sort_keys=False))
        yield bed


@pytest.fixture(scope="module")
def agents(bed: Testbed) -> Iterator[dict[str, vpp_helpers.WatchAgent]]:
    started = {n.name: vpp_helpers.WatchAgent(bed, n, "--metrics", METRICS, grace=10.0)
               for n in bed.nodes}
    with vpp_helpers.running_agents(started) as running:
        wait_for(lambda: settled(bed), 60, "both directions on agreed keys, windows slid")
        yield running


@pytest.fixture
def healthy(bed: Testbed, agents: dict[str, vpp_helpers.WatchAgent]) -> Iterator[None]:
    """Each test starts, and must end, with the pair on agreed keys and pods talking."""
    n1, n2 = bed.nodes
    wait_for(lambda: settled(bed), 90, "both directions on agreed keys, windows slid")
    vpp_helpers.assert_pods_ping([(n1, n2), (n2, n1)], count=2)
    yield
    clear_filter(bed)
    wait_for(lambda: settled(bed), 90, "both directions back on agreed keys")
    try:  # (a tunnel made again resolves its neighbour first: a ping may go into that)
        for src, dst in ((n1, n2), (n2, n1)):
            wait_for(lambda s=src, d=dst: vpp_helpers.pod_ping(s, d, count=1).returncode == 0,
                     20, f"{src.name}'s pod to ping {dst.name}'s")
    except AssertionError:
        for node in bed.nodes:
            print(f"---- {node.name}", vpp_helpers.vppctl(node, "show", "ip", "fib", "table",
                                                          "1717"),
                  vpp_helpers.vppctl(node, "show", "ipsec", "protect"),
                  vpp_helpers.vppctl(node, "show", "ipsec", "sa"),
                  vpp_helpers.vppctl(node, "show", "interface"),
                  agents[node.name].text()[-3000:], sep="\n", flush=True)
        raise


# ---- what the nodes hold and say ------------------------------------------------------------

def peer_state(node: NodeHandle, peer: NodeHandle) -> PeerGenerations:
    return GenerationStore(node.dir, node.name).load().peers[peer.name]


def settled(bed: Testbed) -> bool:
    if not vpp_helpers.settled_on_agreed_keys(bed.nodes):
        return False
    for node in bed.nodes:
        peers = [p.name for p in bed.nodes if p is not node]
        found = pair_secrecy(GenerationStore(node.dir, node.name).load(), peers)
        if not all(f.forward_secret and f.stopped_since is None and f.agreeing_since is None
                   for f in found.values()):
            return False
    return True


def sa_keys(node: NodeHandle) -> dict[int, tuple[str, bytes]]:
    """SA id -> (direction, key) of every SA the node's VPP holds."""
    with VppClient(node.instance.api_socket).connect() as api:
        return {s.spec.sa_id: (s.spec.direction, s.spec.key.get_secret_value())
                for s in ipsec.dump_sas(api)}


def outbound_sas(node: NodeHandle) -> set[int]:
    return {sa_id for sa_id, (direction, _) in sa_keys(node).items() if direction == "out"}


def static_keys(bed: Testbed) -> set[bytes]:
    """Every key the static schedule can produce from both nodes' files."""
    psk = bed.mesh_file.parent / "psk"
    return {c[0] for c in esp_decrypt.static_schedule_keys(
        bed.mesh_file, [n.dir for n in bed.nodes], [n.key_file for n in bed.nodes],
        psk if psk.exists() else None)}


def assert_no_static_key(bed: Testbed, schedule: set[bytes]) -> None:
    for node in bed.nodes:
        held = sa_keys(node)
        static = sorted(sa_id for sa_id, (_, key) in held.items() if key in schedule)
        assert not static, f"{node.name}'s VPP holds static-schedule keys: SAs {static}"


def metric(node: NodeHandle, name: str, **labels: str) -> float:
    """One sample of the node's agent's metrics endpoint (0 when absent)."""
    text = in_ns(node.netns, sys.executable, "-c",
                 "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen("
                 f"'http://{METRICS}/metrics', timeout=5).read().decode())",
                 check=True, timeout=30).stdout
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if wanted else "") \
        + r" (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


def drops(node: NodeHandle, reason: str) -> float:
    return metric(node, "vppmesh_channel_dropped_total", reason=reason)


# ---- the attacker's tools ----------------------------------------------------------------------

def set_filter(bed: Testbed, rule: str) -> None:
    """An nftables rule on the underlay bridge (the path between the nodes)."""
    clear_filter(bed)
    script = (f"table bridge {TABLE} {{\n chain forward {{\n"
              f"  type filter hook forward priority 0; policy accept;\n  {rule}\n }}\n}}\n")
    subprocess.run(["ip", "netns", "exec", bed.underlay_ns, "nft", "-f", "-"], input=script,
                   text=True, check=True, timeout=30)


def clear_filter(bed: Testbed) -> None:
    subprocess.run(["ip", "netns", "exec", bed.underlay_ns, "nft", "delete", "table", "bridge",
                    TABLE], capture_output=True, check=False, timeout=30)


def craft(bed: Testbed, *args: str) -> dict[str, int]:
    out = in_ns(bed.underlay_ns, sys.executable, str(CRAFT), *args, check=True,
                timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


@contextmanager
def capture(bed: Testbed, path: Path) -> Iterator[Path]:
    """Every channel datagram on the underlay bridge, whole, while the block runs."""
    proc = vpp_helpers.tcpdump(bed.underlay_ns, path, "udp", "port", str(PORT), snaplen=None)
    time.sleep(1.0)
    try:
        yield path
    finally:
        time.sleep(0.5)
        proc.terminate()
        proc.wait(timeout=10)


def restart_agent(agent: vpp_helpers.WatchAgent, wall_step: float | None = None) -> None:
    """Stop the agent (SIGTERM) and start it again, its wall clock stepped by
    `wall_step` seconds when given; back once its metrics answer (it has run)."""
    agent.stop()
    mark = len(agent.text())
    if wall_step is None:
        agent.start()
    else:
        node, bed = agent.node, agent.bed
        args = ["ip", "netns", "exec", node.netns, *wall_stepped(wall_step), "up", "--watch",
                *bed.vppmesh_args(node), *bed.state_args(node), *agent.extra]
        with agent.log.open("ab") as out:
            agent.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)

    def answering() -> bool:
        assert agent.proc is not None and agent.proc.poll() is None, \
            f"{agent.node.name}'s agent exited:\n{agent.text()[mark:]}"
        try:
            return metric(agent.node, "vppmesh_vpp_up") == 1
        except subprocess.CalledProcessError:
            return False

    wait_for(answering, 30, f"{agent.node.name}'s new agent to run")


def reattach(bed: Testbed, node: NodeHandle) -> None:
    """The testbed's pods were attached by hand (no CNI records): again, after a restart."""
    bed.run_vppmesh(node, "attach", *bed.attach_args(node, 0))


def dropped(bed: Testbed) -> int:
    """Packets the attacker's rules dropped so far."""
    out = subprocess.run(["ip", "netns", "exec", bed.underlay_ns, "nft", "list", "table",
                          "bridge", TABLE], capture_output=True, text=True, timeout=30).stdout
    return sum(int(n) for n in re.findall(r"counter packets (\d+)", out))


# ---- the attacks ---------------------------------------------------------------------------------

KEY_EXCHANGE = f"udp dport {PORT} udp length {8 + m.TRANSPORT_BYTES} counter drop"


def test_forward_secrecy_attack_dropped_key_exchanges_agree_through_the_tunnel(
        bed: Testbed, agents: dict[str, vpp_helpers.WatchAgent], healthy: None) -> None:
    """Every datagram of the key exchange's size dropped on the underlay (transports are
    padded to one size: that is every transport datagram; handshakes pass) for twice
    key_max_seconds under pod traffic. The agents' channel also runs inside the pair's
    own tunnel (channel/endpoint.py), which the attacker cannot pick out of the ESP:
    the pair never stops, keeps agreeing new keys (no static key anywhere), the pods
    lose no ping, and the metric says the tunnel carried the channel."""
    n1, n2 = bed.nodes
    schedule = static_keys(bed)
    old = {n.name: peer_state(n, p).out for n, p in ((n1, n2), (n2, n1))}
    tunnel = {n.name: metric(n, "vppmesh_channel_path_datagrams_total", path="tunnel")
              for n in bed.nodes}
    set_filter(bed, KEY_EXCHANGE)
    began = time.monotonic()
    with vpp_helpers.SteadyPing(n1.pod_netns(0), str(n2.pod_address(0)),
                                interval=0.2) as ping:
        while time.monotonic() - began < 2 * KEY_SECONDS + 10:
            assert_no_static_key(bed, schedule)
            for node, peer in ((n1, n2), (n2, n1)):
                pg = peer_state(node, peer)
                assert pg.stopped_since is None, f"{node.name} stopped the pair: {pg}"
            time.sleep(2.0)
    attacked = dropped(bed)
    clear_filter(bed)
    assert attacked > 0, "the attacker dropped nothing: the test proves nothing"
    for node, peer in ((n1, n2), (n2, n1)):
        pg = peer_state(node, peer)
        assert pg.out >= old[node.name] + 2, (node.name, old[node.name], pg)
        assert metric(node, "vppmesh_channel_path_datagrams_total", path="tunnel") > \
            tunnel[node.name]
    assert ping.loss_percent() == 0.0, ping.summary
    status = bed.run_vppmesh(n1, "status", "--state-dir", str(n1.dir), check=False).stdout
    assert f"last agreement via: tunnel: {n2.name}" in status, status
    print(f"\nunderlay channel dropped {2 * KEY_SECONDS + 10} s ({attacked} datagrams): "
          f"generations {old[n1.name]} -> {peer_state(n1, n2).out}, 0 lost pings "
          f"({ping.summary.splitlines()[-2] if ping.summary else ''})", flush=True)
    assert_no_static_key(bed, schedule)


def test_forward_secrecy_attack_dropped_key_exchanges_and_esp_stop_the_pair_at_the_key_limit(
        bed: Testbed, agents: dict[str, vpp_helpers.WatchAgent], healthy: None) -> None:
    """Every datagram of the key exchange's size dropped, and the ESP too (the tunnel's
    path for the channel gone with it: a plain denial of service), for longer than
    key_max_seconds under pod traffic. No outbound key serves past its limit: by then
    each node has stopped the pair (no outbound SA, `stopped_why`, metric, status); no
    static key appears anywhere; once the attacker stops, a new agreed key."""
    n1, n2 = bed.nodes
    schedule = static_keys(bed)
    old = {n.name: (peer_state(n, p).out, peer_state(n, p).out_since, outbound_sas(n))
           for n, p in ((n1, n2), (n2, n1))}
    set_filter(bed, f"{KEY_EXCHANGE}\n  ip protocol esp counter drop\n"
                    "  udp dport 4500 counter drop")
    began = time.monotonic()
    with vpp_helpers.SteadyPing(n1.pod_netns(0), str(n2.pod_address(0)), interval=0.2):
        while time.monotonic() - began < KEY_SECONDS + 10:
            assert_no_static_key(bed, schedule)
            now = time.time()
            for node in (n1, n2):
                generation, since, sas = old[node.name]
                if now > since + KEY_SECONDS + 6:  # a poll (2 s) and the run, past the limit
                    assert not sas & outbound_sas(node), \
                        f"{node.name} still holds generation {generation}'s outbound SAs " \
                        f"{now - since:.0f} s after it was first used"
            time.sleep(2.0)
    for node, peer in ((n1, n2), (n2, n1)):
        pg = peer_state(node, peer)
        assert pg.out == old[node.name][0], "no key can have been agreed meanwhile"
        assert pg.stopped_why in ("key limit", "no agreement"), pg
        assert not outbound_sas(node), f"{node.name} still sends"
        assert metric(node, "vppmesh_peer_stopped", peer=peer.name) == 1
    status = bed.run_vppmesh(n1, "status", "--state-dir", str(n1.dir), check=False).stdout
    assert f"{n2.name}: stopped for" in status, status
    print(f"\npair stopped at the key limit: {n1.name} ({peer_state(n1, n2).stopped_why}), "
          f"{n2.name} ({peer_state(n2, n1).stopped_why})", flush=True)
    clear_filter(bed)
    took = wait_for(lambda: settled(bed), 90, "a new agreed key once the attacker stops")
    print(f"back on agreed keys {took:.1f} s after the attacker stopped", flush=True)
    for node, peer in ((n1, n2), (n2, n1)):
        assert peer_state(node, peer).out > old[node.name][0]
    assert_no_static_key(bed, schedule)


def test_forward_secrecy_attack_blocked_channel_installs_no_static_key(
        bed: Testbed, agents: dict[str, vpp_helpers.WatchAgent], healthy: None) -> None:
    """The channel's port blocked, then n1's VPP killed and restarted (its outbound key
    is burnt: a step is forced). `forward_secrecy: required` (the default): neither VPP
    gets a key of the static schedule, either way; n1 waits for the agreement, and says
    so; once the port is open again the pair agrees a key and the pods talk."""
    n1, n2 = bed.nodes
    schedule = static_keys(bed)
    set_filter(bed, f"udp dport {PORT} counter drop")
    try:
        bed.restart_vpp(n1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert_no_static_key(bed, schedule)
            time.sleep(2.0)
        pg = peer_state(n1, n2)
        assert pg.agreeing_since is not None or pg.stopped_since is not None, pg
        assert not outbound_sas(n1)
        done = bed.run_vppmesh(n1, "status", "--state-dir", str(n1.dir), check=False)
        status = done.stdout
        assert f"{n2.name}: agreement of the next key pending" in status or \
            f"{n2.name}: stopped for" in status, status + done.stderr
    finally:
        clear_filter(bed)
        reattach(bed, n1)
    took = wait_for(lambda: settled(bed), 90, "agreed keys once the port is open")
    print(f"\nagreed keys {took:.1f} s after the channel's port opened", flush=True)
    assert_no_static_key(bed, schedule)


def test_forward_secrecy_attack_replayed_handshakes_after_an_agent_restart_change_nothing(
        bed: Testbed, agents: dict[str, vpp_helpers.WatchAgent], healthy: None,
        tmp_path: Path) -> None:
    """n1's handshake Inits recorded on the wire (n1's agent restarted to make some), then
    n2's agent restarted (its replay marks come back from its state directory), then the
    recording replayed to n2, as it was and from an attacker's address: every one is
    refused as a replay before any Diffie-Hellman, no handshake completes, nothing
    moves, the pods lose nothing."""
    n1, n2 = bed.nodes
    pcap = tmp_path / "inits.pcap"
    with capture(bed, pcap):
        before = metric(n2, "vppmesh_channel_handshakes_total")
        restart_agent(agents[n1.name])
        wait_for(lambda: metric(n2, "vppmesh_channel_handshakes_total") > before, 30,
                 "n1's new agent's handshake with n2")
        wait_for(lambda: settled(bed), 60, "n1's new agent on agreed keys")
    restart_agent(agents[n2.name])
    wait_for(lambda: metric(n2, "vppmesh_channel_handshakes_total") >= 1, 30,
             "n2's new agent's handshake with n1")
    wait_for(lambda: settled(bed), 60, "n2's new agent on agreed keys")
    handshakes = metric(n2, "vppmesh_channel_handshakes_total")
    replays, auth = drops(n2, "replay"), drops(n2, "auth")
    with vpp_helpers.SteadyPing(n1.pod_netns(0), str(n2.pod_address(0)),
                                interval=0.05) as ping:
        sent = craft(bed, "replay", "br0", str(pcap), "192.0.2.200")["sent"]
        time.sleep(3.0)  # the agent's next poll brings the metrics up to date
    assert sent >= 2, "nothing was recorded to replay: " + subprocess.run(
        ["tcpdump", "-nr", str(pcap)], capture_output=True, text=True).stdout
    inits = sent // 2  # as recorded, and from the attacker's address
    assert ping.loss_percent() == 0.0
    wait_for(lambda: drops(n2, "replay") - replays >= 1, 10, "the replays counted")
    assert drops(n2, "auth") == auth
    assert metric(n2, "vppmesh_channel_handshakes_total") == handshakes
    assert settled(bed)
    print(f"\n{inits} recorded datagram(s) replayed twice: "
          f"{drops(n2, 'replay') - replays:.0f} refused as replays", flush=True)


def test_forward_secrecy_attack_wall_clock_steps_keep_agreed_keys(
        bed: Testbed, agents: dict[str, vpp_helpers.WatchAgent], healthy: None) -> None:
    """n1's agent restarted with its wall clock an hour behind (CLOCK_BOOTTIME untouched,
    as an NTP step leaves it), then an hour ahead: the pods lose nothing, n2 refuses none
    of n1's handshakes (no replay, no rate limit), and a rekey on n1 still goes through."""
    n1, n2 = bed.nodes
    agent = agents[n1.name]
    replays, limited = drops(n2, "replay"), drops(n2, "rate_limited")
    try:
        for step in (-3600.0, 3600.0):
            before = peer_state(n1, n2).out
            with vpp_helpers.SteadyPing(n1.pod_netns(0), str(n2.pod_address(0)),
                                        interval=0.05) as ping:
                restart_agent(agent, step)
                wait_for(lambda: settled(bed), 60, f"agreed keys with n1's clock {step}")
                rekey = bed.run_vppmesh(n1, "rekey", "--key", str(n1.key_file),
                                        "--state-dir", str(n1.dir), check=False)
                assert rekey.returncode == 0, rekey.stdout + rekey.stderr
                wait_for(lambda b=before: peer_state(n1, n2).out > b and settled(bed), 60,
                         f"a rekey with n1's clock {step}")
            assert ping.loss_percent() == 0.0, step
            assert drops(n2, "replay") == replays and drops(n2, "rate_limited") == limited
    finally:
        restart_agent(agent)


def test_forward_secrecy_attack_spoofed_handshake_flood_spares_the_honest_one(
        bed: Testbed, agents: dict[str, vpp_helpers.WatchAgent], healthy: None) -> None:
    """3,000 handshake Inits from spoofed sources (right size, right node numbers, random
    content) at n2 while n1's restarted agent shakes hands: the forgeries die at the pair
    MAC (counted), the honest handshake completes, nothing is rate limited."""
    n1, n2 = bed.nodes
    handshakes = metric(n2, "vppmesh_channel_handshakes_total")
    auth, limited = drops(n2, "auth"), drops(n2, "rate_limited")
    restart_agent(agents[n1.name])
    sent = craft(bed, "flood", "br0", _uplink_mac(n2.index), str(n2.underlay[0].ip),
                 str(n1.index), str(n2.index), "3000")
    wait_for(lambda: settled(bed), 60, "agreed keys after the flood")
    wait_for(lambda: metric(n2, "vppmesh_channel_handshakes_total") > handshakes, 20,
             "the honest handshake")
    # What the agent's socket queue let through (load) reaches the metrics endpoint at
    # the agent's next run after it read its backlog: not at once.
    forged = 0.0

    def refused() -> bool:
        nonlocal forged
        forged = drops(n2, "auth") - auth
        return forged > 0
    wait_for(refused, 30, f"the forged handshakes refused at the pair MAC ({sent})")
    assert drops(n2, "rate_limited") == limited
    print(f"\n{sent['sent']} forged handshakes: {forged:.0f} refused at the pair MAC, the "
          "honest handshake completed, 0 rate limited", flush=True)


def test_forward_secrecy_attack_every_channel_datagram_has_one_of_three_sizes(
        bed: Testbed, agents: dict[str, vpp_helpers.WatchAgent], healthy: None,
        tmp_path: Path) -> None:
    """A handshake, a rekey each way (KeyInit, KeyResponse, acknowledgements) and the
    keepalives, captured on the wire: Inits, Responses and transports each have one
    size, so the key exchange cannot be told from the rest."""
    from scapy.all import UDP, rdpcap  # type: ignore[attr-defined]

    n1, n2 = bed.nodes
    pcap = tmp_path / "channel.pcap"
    with capture(bed, pcap):
        restart_agent(agents[n1.name])
        wait_for(lambda: settled(bed), 60, "n1's new agent on agreed keys")
        for node, peer in ((n1, n2), (n2, n1)):
            before = peer_state(node, peer).out
            rekey = bed.run_vppmesh(node, "rekey", "--key", str(node.key_file),
                                    "--state-dir", str(node.dir), check=False)
            assert rekey.returncode == 0, rekey.stdout + rekey.stderr
            wait_for(lambda n=node, p=peer, b=before: peer_state(n, p).out > b, 30, "rekey")
        wait_for(lambda: settled(bed), 60, "settled after the rekeys")
    sizes: dict[int, set[int]] = {}
    for frame in rdpcap(str(pcap)):
        if UDP in frame:
            payload = bytes(frame[UDP].payload)
            sizes.setdefault(payload[1], set()).add(len(payload))
    assert sizes.get(m.DatagramType.TRANSPORT) == {m.TRANSPORT_BYTES}, sizes
    assert sizes.get(m.DatagramType.INIT) == {m.INIT_BYTES}, sizes
    assert sizes.get(m.DatagramType.RESPONSE, {m.RESPONSE_BYTES}) == {m.RESPONSE_BYTES}, sizes
    print(f"\nchannel datagram sizes on the wire: {sizes}", flush=True)


def test_forward_secrecy_window_measured(
        bed: Testbed, agents: dict[str, vpp_helpers.WatchAgent], healthy: None) -> None:
    """The forward-secrecy window, measured: with rekey_interval R under pod traffic, how
    long each of n1's generations has keys in either VPP (from its outbound SA's first
    sighting on n1 to the last sighting of any of its SAs on either node, 0.2 s samples).
    It must stay within R + rekey_grace plus a few seconds of round trips and polls."""
    n1, n2 = bed.nodes
    interval = 10
    data = yaml.safe_load(bed.mesh_file.read_text())
    data["settings"]["rekey_interval"] = interval
    bed.mesh_file.write_text(yaml.safe_dump(data, sort_keys=False))
    seen: dict[int, list[float]] = {}  # n1's generation -> [first, last] sighting
    try:
        with vpp_helpers.SteadyPing(n1.pod_netns(0), str(n2.pod_address(0)), interval=0.1):
            deadline = time.monotonic() + 5 * interval
            while time.monotonic() < deadline:
                now = time.monotonic()
                with VppClient(n1.instance.api_socket).connect() as api:
                    outbound = {s.spec.spi & 0xF for s in ipsec.dump_sas(api)
                                if s.spec.direction == "out"}
                with VppClient(n2.instance.api_socket).connect() as api:
                    inbound = {s.spec.spi & 0xF for s in ipsec.dump_sas(api)
                               if s.spec.direction == "in"
                               and s.spec.spi & ~0xFF == spi_for(n1.index, 0, 0)}
                for g in outbound:
                    seen.setdefault(g, [now, now])
                for g in outbound | inbound:
                    if g in seen:
                        seen[g][1] = now
                time.sleep(0.2)
    finally:
        data["settings"]["rekey_interval"] = 0
        bed.mesh_file.write_text(yaml.safe_dump(data, sort_keys=False))
    last = max(seen)
    lived = sorted(end - start for g, (start, end) in seen.items()
                   if g != last and g != min(seen))  # whole lifetimes only
    assert len(lived) >= 2, seen
    print(f"\nforward-secrecy window with rekey_interval {interval} s, rekey_grace "
          f"{GRACE:g} s: generations lived {', '.join(f'{x:.1f}' for x in lived)} s "
          f"(median {lived[len(lived) // 2]:.1f} s, max {lived[-1]:.1f} s)", flush=True)
    assert lived[-1] <= interval + GRACE + 6.0
