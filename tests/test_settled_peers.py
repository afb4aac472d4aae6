"""A run decides again only the peers it concerns (keying/settled.py), and decides exactly
what a run that decides every peer would: same plans, same generation files, same
failures closed, through joins, leaves, traffic up to key limits, time rules, clock steps
and rekeys."""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import pytest

from vppmesh.agent.node import Agent, NodeOptions
from vppmesh.config import Mesh, dump_mesh
from vppmesh.dataplane.state import SA_DIRECTION_BIT, sa_peer
from vppmesh.dataplane.vpp.stats import SaCounters
from vppmesh.keying.keys import private_key_b64, write_secret_file
from vppmesh.testing.fake_vpp import FakeVpp
from vppmesh.testing.meshes import make_mesh

SETTINGS = {"rekey_interval": 70, "key_max_seconds": 150, "key_max_packets": 4096,
            "rekey_grace": 10}


class Node1:
    """node1's agent on its own fake VPP (with its stats segment) and state dir."""

    def __init__(self, mesh: Mesh, secrets: dict, *, settled: bool) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="settled-"))
        self.mesh_file = self.dir / "mesh.yaml"
        key = self.dir / "node1.key"
        write_secret_file(key, private_key_b64(secrets["node1"].private_key))
        self.options = NodeOptions(mesh_file=self.mesh_file, node="node1", private_key=key,
                                   host_link="none", workers=0, state_dir=self.dir)
        self.primary = mesh.node("node1").primary
        self.vpp = FakeVpp.with_uplink(self.primary)
        counters = SaCounters(self.dir / "stats.sock", open_reader=lambda _p: self.vpp)
        self.agent = Agent(self.options, connect=lambda: self.vpp,  # type: ignore[arg-type,return-value]
                           full_every=10**9, counters=counters)
        self.kept: list[int] = []  # per run, how many peers' decisions were the last run's
        peers = self.agent._quiet.peers
        clean = peers.clean

        def counted(*args: object, **kwargs: object) -> dict:
            found = clean(*args, **kwargs) if settled else {}  # type: ignore[arg-type]
            self.kept.append(len(found))
            return found
        peers.clean = counted  # type: ignore[method-assign]

    def run(self, mesh: Mesh, now: float, **options: object):  # type: ignore[no-untyped-def]
        self.mesh_file.write_text(dump_mesh(mesh))
        return self.agent.run(now=now, **options)

    def restart_vpp(self, pid: int) -> None:
        """VPP restarts empty; the agent's connection broke."""
        self.vpp = FakeVpp.with_uplink(self.primary)
        self.vpp.pid = pid
        self.agent.close()

    def traffic(self, peer: int, packets: int, inbound: bool) -> None:
        """Packets on node1's SAs towards (or from) one peer, as the stats segment counts."""
        for sa_id, sa in self.vpp.sas.items():
            if sa_peer(sa_id) != peer or bool(sa_id & SA_DIRECTION_BIT) == inbound:
                continue
            field = "last_seq_in" if inbound else "seq_out"
            sa[field] = sa.get(field, 0) + packets

    def generations(self) -> str:
        return (self.dir / "node1.generations.json").read_text()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def same(a, b) -> None:  # type: ignore[no-untyped-def]
    assert a.desired == b.desired
    assert (a.stopped_peers, a.waiting_peers, a.blocked_peers, a.downgraded_peers,
            a.rekey_pending) == (b.stopped_peers, b.waiting_peers, b.blocked_peers,
                                 b.downgraded_peers, b.rekey_pending)
    assert a.secrecy == b.secrecy


@pytest.mark.parametrize("seed", range(6))
def test_deciding_only_what_changed_decides_as_deciding_everything(seed: int) -> None:
    rng = random.Random(seed)
    mesh, secrets = make_mesh(14, 2, **SETTINGS)
    nodes = {n.name: n for n in mesh.nodes}
    present = set(rng.sample(sorted(set(nodes) - {"node1"}), 9)) | {"node1"}
    partial, whole = Node1(mesh, secrets, settled=True), Node1(mesh, secrets, settled=False)
    now = 1_000_000.0
    try:
        for step in range(90):
            event = rng.choice(["poll", "poll", "time", "time", "traffic", "traffic",
                                "join", "leave", "step back", "rekey", "limit",
                                "vpp restart"])
            options: dict[str, object] = {}
            if event == "time":
                now += rng.choice([1, 2, 5, 11, 30])
            elif event == "step back":
                now -= rng.choice([1, 5])
            elif event in ("traffic", "limit"):
                number = int(rng.choice(sorted(present - {"node1"}))[4:])
                packets = 5000 if event == "limit" else rng.choice([1, 50, 900])
                inbound = rng.random() < 0.5
                for node in (partial, whole):
                    node.traffic(number, packets, inbound)
            elif event == "join" and len(present) < len(nodes):
                present.add(rng.choice(sorted(set(nodes) - present)))
            elif event == "leave" and len(present) > 3:
                present.discard(rng.choice(sorted(present - {"node1"})))
            elif event == "vpp restart":
                for node in (partial, whole):
                    node.restart_vpp(6000 + step)
            elif event == "rekey":
                options["rekey"] = True
            now += 0.5
            view = mesh.model_copy(update={"nodes": [n for n in mesh.nodes
                                                     if n.name in present]})
            a, b = partial.run(view, now, **options), whole.run(view, now, **options)
            same(a, b)
            assert partial.generations() == whole.generations(), (step, event)
            assert partial.vpp.sas.keys() == whole.vpp.sas.keys(), (step, event)
        # The comparison means something only if decisions were taken over: most runs
        # kept most peers' decisions.
        assert sum(1 for k in partial.kept if k >= 5) > len(partial.kept) / 3, partial.kept
    finally:
        partial.close()
        whole.close()


def test_a_settled_peer_whose_key_reaches_its_packet_limit_between_runs_steps() -> None:
    """One peer joins while another's key, decided by the last run, reaches its packet
    limit: the run takes the joiner and every other peer from the last run, but not the
    peer whose counters moved (the stats segment says so; the SA dump is not read)."""
    mesh, secrets = make_mesh(6, 2, **SETTINGS)
    first = mesh.model_copy(update={"nodes": mesh.nodes[:5]})
    node = Node1(mesh, secrets, settled=True)
    now = 1_000_000.0
    try:
        node.run(first, now)
        node.run(first, now + 1)
        settled = node.run(first, now + 2)
        assert not settled.changes
        out = {sa_id for sa_id in node.vpp.sas if sa_id & SA_DIRECTION_BIT
               and sa_peer(sa_id) == 3}
        node.traffic(3, 5000, inbound=False)  # past key_max_packets
        result = node.run(mesh, now + 3)  # node6 joins in the same run
        assert node.kept[-1] == 3, node.kept  # node2, node4 and node5: the last run's
        now_out = {sa_id for sa_id in node.vpp.sas if sa_id & SA_DIRECTION_BIT
                   and sa_peer(sa_id) == 3}
        assert now_out and now_out.isdisjoint(out), "node3 still sends on its spent key"
        assert "node6" not in result.blocked_peers
    finally:
        node.close()


def test_with_the_channel_a_pair_rotates_while_the_other_peers_keep_their_decision(
        ) -> None:
    """Agents on the channel: node1's key to node2 reaches its packet limit and the pair
    agrees the next generation over the channel (offer, answer, "installed", switch,
    "slid"), while node1's runs take node3's and node4's decisions from the last run
    (nothing of theirs changed). Every event of the rotation makes the run decide node2
    again: the pair gets through to the new agreed generation and nothing falls back to
    a static key."""
    from vppmesh.testing.agents import Agents

    agents = Agents(4, key_max_packets=4096)
    try:
        agents.until(lambda: agents.forward_secret() and agents.slid(1), "agreed keys")
        kept: list[set[str]] = []
        peers = agents.sessions["node1"]._quiet.peers
        clean = peers.clean

        def spied(*args: object, **kwargs: object) -> dict:
            found = clean(*args, **kwargs)  # type: ignore[arg-type]
            kept.append(set(found))
            return found
        peers.clean = spied  # type: ignore[method-assign]
        before = agents.generations("node1").peers["node2"].out
        agents.traffic("node1", "node2", packets=5000)  # past key_max_packets
        for _ in range(30):  # traffic between node1 and node2 only
            pg = agents.generations("node1").peers["node2"]
            theirs = agents.generations("node2").peers["node1"]
            if pg.out > before and pg.out in pg.ephemeral_out and \
                    theirs.in_base >= pg.out and agents.link_ok("node1", "node2"):
                break
            agents.step(traffic=False)
            agents.traffic("node1", "node2")
            agents.traffic("node2", "node1")
        else:
            raise AssertionError("node1 -> node2 never reached the next agreed generation")
        assert any({"node3", "node4"} <= k and "node2" not in k for k in kept), kept
        assert agents.forward_secret()  # every pair on agreed keys, none static
    finally:
        agents.close()
