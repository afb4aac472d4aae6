"""Rotating the mesh PSK without an outage (docs/operations.md, "Rotating the PSK"): a
node holds its current PSK and a next (staged) or previous (promoted past) one; the
channel accepts either, the static schedule takes the older one. Each step of the
procedure with nodes out of step, and the attacker's PSKs: a wrong one during the
overlap, an old one replayed after it retired."""

from __future__ import annotations

import itertools
import os
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from vppmesh.channel import messages as m
from vppmesh.channel import session as s
from vppmesh.channel.noise import public_bytes
from vppmesh.config import dump_mesh
from vppmesh.errors import KeyFileError
from vppmesh.keying.keys import NodeSecrets, load_secrets, private_key_b64, write_secret_file
from vppmesh.testing.agents import Agents

OLD, NEW, WRONG = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
ADDRESSES = {n: (f"192.0.2.{n}", 5199) for n in range(1, 5)}
KEYS = {n: X25519PrivateKey.generate() for n in range(1, 5)}

# The procedure, as (current, next, previous) per step of one node.
HOLDS_OLD = (OLD, b"", b"")
STAGED = (OLD, NEW, b"")
PROMOTED = (NEW, b"", OLD)
RETIRED = (NEW, b"", b"")


def secrets(n: int, held: tuple[bytes, bytes, bytes]) -> NodeSecrets:
    current, following, previous = held
    return NodeSecrets(KEYS[n], current, psk_next=following, psk_previous=previous)


class Net:
    """Channels delivering each other's datagrams at once, each node with its PSKs."""

    def __init__(self, held: dict[int, tuple[bytes, bytes, bytes]]) -> None:
        self.nodes = {n: s.Channel(n, secrets(n, h),
                                   [s.PeerConfig(p, public_bytes(KEYS[p]), ADDRESSES[p])
                                    for p in held if p != n], boot_id=100 + n)
                      for n, h in held.items()}
        for node in self.nodes.values():
            for p in node.peers():
                node.accept_generations(p, 0, s.MAX_WINDOW)
        self.keyed: dict[int, list[s.GenerationKeyed]] = {n: [] for n in held}
        self.hold: list[tuple[int, int, bytes]] | None = None  # an attacker keeps these

    def run(self, sender: int, out: s.Output, now: float) -> None:
        self.keyed[sender] += [e for e in out.events if isinstance(e, s.GenerationKeyed)]
        for destination, data in out.datagrams:
            receiver = next(n for n, a in ADDRESSES.items() if a == destination)
            if self.hold is not None:
                self.hold.append((sender, receiver, data))
                continue
            self.run(receiver, self.nodes[receiver].receive(now, ADDRESSES[sender], data), now)


def check_every_pair_agrees(net: Net, now: float) -> float:
    """Each node in turn opens fresh handshakes to every peer (as after its VPP
    restarted) and agrees a generation with each: every pair meets on the first
    attempt, and both ends key the generation with the same secret under the same PSK."""
    for n, channel in net.nodes.items():
        now += 1.0
        before = {p: dict(c.stats) for p, c in net.nodes.items()}
        net.run(n, channel.restarted(now, 1000 + int(now)), now)
        for p in channel.peers():
            assert channel.established(p, now) and net.nodes[p].established(n, now)
            assert net.nodes[p].stats["handshakes_answered"] == \
                before[p].get("handshakes_answered", 0) + 1  # at the first attempt
            generation = int(now) % 16
            net.keyed = {k: [] for k in net.nodes}
            net.run(n, channel.start_generation(now, p, generation), now)
            (mine,), (theirs,) = net.keyed[n], net.keyed[p]
            assert mine.secret == theirs.secret and mine.psk == theirs.psk
            assert mine.psk in (secrets_of(channel) & secrets_of(net.nodes[p]))
            channel.retire_generation(p, generation, outbound=True)
    for channel in net.nodes.values():
        assert not channel.drops, channel.drops  # nothing refused, nothing retried
    return now


def secrets_of(channel: s.Channel) -> set[bytes]:
    return {psk for _role, psk in channel._secrets.psks()}


def test_psk_rotation_every_step_with_nodes_out_of_step_keeps_agreeing_keys() -> None:
    """Three nodes walk the procedure one at a time (stage, promote, retire): after each
    single node's step, every pair still meets and agrees keys, both ways."""
    held = {1: HOLDS_OLD, 2: HOLDS_OLD, 3: HOLDS_OLD}
    net = Net(held)
    now = check_every_pair_agrees(net, 1000.0)
    for step in (STAGED, PROMOTED, RETIRED):
        for n in net.nodes:
            net.nodes[n].set_secrets(secrets(n, step))
            now = check_every_pair_agrees(net, now + s.REJECT_AFTER)
    for channel in net.nodes.values():  # the end: every session under the new PSK
        assert {channel.session_psk(p, now) for p in channel.peers()} == {"current"}
        assert secrets_of(channel) == {NEW}


def test_psk_rotation_a_promoted_node_learns_its_peer_promoted_and_keeps_next() -> None:
    net = Net({1: STAGED, 2: PROMOTED})
    net.run(2, net.nodes[2].tick(1000.0), 1000.0)  # node 2 initiates under NEW
    assert net.nodes[1].session_psk(2, 1000.0) == "next"
    now = 1000.0 + s.REJECT_AFTER
    net.run(1, net.nodes[1].tick(now), now)  # node 1's own handshake: NEW, not OLD
    assert net.nodes[1].session_psk(2, now) == "next"
    assert net.nodes[2].session_psk(1, now) == "current"


def test_psk_rotation_a_wrong_psk_is_refused_during_the_overlap_without_any_dh() -> None:
    """An attacker holding node 1's private key but neither PSK: its handshakes fail the
    pair MAC at node 2, which holds two PSKs, before any Diffie-Hellman or budget."""
    net = Net({1: STAGED, 2: STAGED})
    attacker = s.Channel(1, NodeSecrets(KEYS[1], WRONG), [
        s.PeerConfig(2, public_bytes(KEYS[2]), ADDRESSES[2])], boot_id=666)
    victim = net.nodes[2]
    for i in range(50):
        now = 1000.0 + i
        for _, init in attacker.tick(now).datagrams:
            assert victim.receive(now, ADDRESSES[1], init).datagrams == []
        attacker = s.Channel(1, NodeSecrets(KEYS[1], WRONG), [
            s.PeerConfig(2, public_bytes(KEYS[2]), ADDRESSES[2])], boot_id=666 + i)
    assert victim.drops == {m.Drop.AUTH: 50}
    assert victim.stats["dh"] == 0 and not victim.established(1)
    # The honest node is not throttled by the flood: its budget was never spent.
    net.run(1, net.nodes[1].tick(1050.0), 1050.0)
    assert victim.established(1, 1050.0)


def test_psk_rotation_overlap_costs_one_handshake_read_per_init() -> None:
    """Two PSKs held: an Init under the second one is read once (two Diffie-Hellmans, as
    with one PSK), and counted under the peer's handshake budget."""
    victim = Net({1: PROMOTED, 2: STAGED}).nodes[2]  # node 1's Inits: node 2's next PSK
    for i in range(int(s.PEER_BURST) + 5):  # authentic, fresh Inits as fast as it can
        fresh = s.Channel(1, secrets(1, PROMOTED), [
            s.PeerConfig(2, public_bytes(KEYS[2]), ADDRESSES[2])], boot_id=7 + i,
            timestamps=lambda i=i: 2_000_000_000 + i)
        ((_, init),) = fresh.tick(1001.0).datagrams
        victim.receive(1001.0, ADDRESSES[1], init)
    assert victim.stats["handshakes_answered"] == s.PEER_BURST
    assert victim.stats["dh"] == 4 * s.PEER_BURST  # one read and one answer per Init
    assert victim.drops == {m.Drop.RATE_LIMITED: 5}


def test_psk_rotation_an_old_psk_handshake_replayed_after_retirement_is_refused() -> None:
    """An attacker holds back an Init made under the old PSK (never delivered: its
    timestamp is fresh) and delivers it once node 2 retired the old PSK: refused by the
    pair MAC, no session, no Diffie-Hellman."""
    net = Net({1: PROMOTED, 2: PROMOTED})
    net.hold = []
    net.run(1, net.nodes[1].tick(1000.0), 1000.0)  # under NEW
    net.run(1, net.nodes[1].tick(1000.0 + s.HANDSHAKE_RETRY), 1000.0)  # retry: OLD
    (_, _, under_new), (_, _, under_old) = net.hold
    net.hold = None
    control = Net({1: PROMOTED, 2: PROMOTED}).nodes[2]  # the old PSK still held: taken
    assert control.receive(1001.0, ADDRESSES[1], under_old).datagrams
    victim = net.nodes[2]
    victim.set_secrets(secrets(2, RETIRED))
    assert victim.receive(1001.0, ADDRESSES[1], under_old).datagrams == []
    assert victim.drops == {m.Drop.AUTH: 1} and victim.stats["dh"] == 0
    assert victim.receive(1001.0, ADDRESSES[1], under_new).datagrams  # NEW still works


def test_psk_rotation_retiring_a_psk_ends_the_sessions_made_with_it() -> None:
    net = Net({1: PROMOTED, 2: STAGED})
    net.run(2, net.nodes[2].tick(1000.0), 1000.0)  # node 2 initiates under OLD
    assert net.nodes[1].session_psk(2, 1000.0) == "previous"
    net.nodes[1].set_secrets(secrets(1, RETIRED))
    assert not net.nodes[1].established(2)
    assert net.nodes[1].stats["sessions_psk_retired"] == 1


def test_psk_rotation_static_schedule_takes_the_psk_every_node_holds() -> None:
    statics = {step: secrets(1, step).static_psk
               for step in (HOLDS_OLD, STAGED, PROMOTED, RETIRED)}
    # Staging and promoting, node by node, never moves the static PSK: OLD throughout.
    assert statics == {HOLDS_OLD: OLD, STAGED: OLD, PROMOTED: OLD, RETIRED: NEW}
    with pytest.raises(KeyFileError, match="at most two PSKs"):
        NodeSecrets(KEYS[1], OLD, psk_next=NEW, psk_previous=WRONG)


def test_psk_rotation_files_beside_the_psk(tmp_path: Path) -> None:
    key, psk = tmp_path / "private.key", tmp_path / "psk"
    write_secret_file(key, private_key_b64(KEYS[1]))
    write_secret_file(psk, "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=")
    assert load_secrets(key, psk).psks() == (("current", OLD),)
    write_secret_file(tmp_path / "psk.next", "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=")
    assert load_secrets(key, psk).psks() == (("current", OLD), ("next", NEW))
    os.chmod(tmp_path / "psk.next", 0o644)
    with pytest.raises(KeyFileError, match=r"psk\.next has mode 0644.*chmod 600"):
        load_secrets(key, psk)
    os.chmod(tmp_path / "psk.next", 0o600)
    os.link(psk, tmp_path / "psk.previous")  # a promotion halfway: previous == current
    assert load_secrets(key, psk).psks() == (("current", OLD), ("next", NEW))
    os.replace(tmp_path / "psk.next", psk)
    assert load_secrets(key, psk).psks() == (("current", NEW), ("previous", OLD))
    write_secret_file(tmp_path / "psk.next", "AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=")
    with pytest.raises(KeyFileError, match=r"psk\.next and .*psk\.previous exist"):
        load_secrets(key, psk)
    assert "AQEB" not in repr(secrets(1, STAGED)) and "psk_next=set" in repr(secrets(1, STAGED))


# ---- agents end to end: the procedure on the multi-agent harness ------------------------

def psk_agents(count: int = 3) -> Agents:
    """Agents whose nodes each have their own PSK files (one mesh file per node naming
    them), all on OLD."""
    agents = Agents(count)
    for name in agents.names:
        psk = agents.dir / name / "psk"
        write_secret_file(psk, _b64(OLD))
        settings = agents.mesh.settings.model_copy(update={"psk_file": psk})
        mesh_file = agents.dir / name / "mesh.yaml"
        mesh_file.write_text(dump_mesh(agents.mesh.model_copy(update={"settings": settings})))
        agents.options[name] = replace(agents.options[name], mesh_file=mesh_file)
        agents.start_agent(name)
    return agents


def _b64(psk: bytes) -> str:
    import base64
    return base64.b64encode(psk).decode()


def node_step(agents: Agents, name: str, step: str) -> None:
    """One node's step of the procedure, as the operator's commands do it on disk, and
    a run that reads the key files again (the agent's full run)."""
    psk = agents.dir / name / "psk"
    if step == "stage":
        write_secret_file(psk.with_name("psk.next"), _b64(NEW))
    elif step == "promote":
        os.link(psk, psk.with_name("psk.previous"))
        os.replace(psk.with_name("psk.next"), psk)
    else:
        os.unlink(psk.with_name("psk.previous"))
    agents.sessions[name]._last_full = None  # the next run reads the key files again


def test_psk_rotation_agents_never_lose_a_pair_through_the_procedure() -> None:
    """Three agents on fake VPPs; one node's step at a time, each followed by a rekey
    and the channel's sessions expiring: after every run of every agent each outbound
    SA has its twin at the receiver (no packet lost), and the pairs stay forward secret."""
    agents = psk_agents()
    try:
        agents.until(lambda: agents.slid(1), "every pair agreed and slid")

        def every_link() -> bool:
            return all(agents.link_ok(a, b) for a, b in itertools.permutations(agents.names, 2))

        for step in ("stage", "promote", "retire"):
            for name in agents.names:
                node_step(agents, name, step)
                agents.run(name, rekey=True)
                agents.settle()
                for _tick in range(1 + int(s.REJECT_AFTER // 2)):  # every session renewed
                    for other in agents.names:
                        agents.run(other)
                        assert every_link(), (step, name)
                        agents.settle()
                        assert every_link(), (step, name)
                    agents.clock.now += 2
                    for a, b in itertools.permutations(agents.names, 2):
                        agents.traffic(a, b)
                assert agents.forward_secret(), (step, name)
        for name in agents.names:
            state = agents.generations(name)
            assert {pg.channel_psk.split()[0] for pg in state.peers.values()
                    if pg.channel_psk} == {"current"}
            channel = agents.secrecy[name].channel
            assert channel is not None and not channel.drops.get(m.Drop.AUTH)
    finally:
        agents.close()
