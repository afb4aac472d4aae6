"""Agents on fake VPPs, driven by the test: `Agents`, long-running agents (Agent with a
Secrecy) whose fake VPPs' punt paths are joined by a PuntRelay under one fake clock, and
`Pair`, two one-shot `up` agents; `fresh` and `never` for the key-generation rules."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

from vppmesh.agent.clock import AgentClock
from vppmesh.agent.node import Agent, NodeOptions, UpResult, up
from vppmesh.agent.secrecy import Secrecy, channel_socket
from vppmesh.config import dump_mesh
from vppmesh.dataplane.state import SA_DIRECTION_BIT, sa_peer
from vppmesh.dataplane.vpp.stats import SaCounters
from vppmesh.keying.agreement import NoAgreement
from vppmesh.keying.epochs import GenerationState, PeerGenerations
from vppmesh.keying.keys import private_key_b64, spi_for, write_secret_file
from vppmesh.testing.fake_punt import PuntRelay
from vppmesh.testing.fake_vpp import FakeVpp
from vppmesh.testing.meshes import make_mesh


def fresh(out: int = 0, floor: int = 0, base: int = 0, since: float = 0.0,
          ephemeral_out: tuple[int, ...] = ()) -> PeerGenerations:
    return PeerGenerations(public_key="k", out=out, out_since=since, floor=floor, in_base=base,
                           ephemeral_out=list(ephemeral_out))


def never(_g: int) -> bool:
    return False


def short_tmp() -> Path:
    """A directory for unix sockets (their paths must stay under 107 bytes)."""
    return Path(tempfile.mkdtemp(dir="/tmp", prefix="fsunit-"))


# ---- agents on fake VPPs, their punt paths joined ------------------------------------

class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Agents:
    """node1..nodeN, each a long-running agent (Agent with a Secrecy) with its own state
    dir and fake VPP; the VPPs' punt paths are joined by a PuntRelay; one fake clock for
    the time that passes, from which each node's boot clock and wall clock are made (a
    test steps a node's wall clock, or reboots it), read through the node's AgentClock."""

    def __init__(self, count: int = 2, counters: bool = True, **settings: object) -> None:
        self.dir = short_tmp()
        self.counters = counters  # agents read SA counts from the (fake) stats segment
        self.mesh, self.secrets = make_mesh(count, 2, rekey_grace=10, rekey_interval=0,
                                            **settings)
        self.mesh_file = self.dir / "mesh.yaml"
        self.mesh_file.write_text(dump_mesh(self.mesh))
        self.relay = PuntRelay(self.dir)
        self.clock = Clock()
        self.names = [n.name for n in self.mesh.nodes]
        self.wall_step = {name: 0.0 for name in self.names}  # each node's wall clock error
        self.booted = {name: 0.0 for name in self.names}  # fake time at each node's boot
        self.boot = {name: 1 for name in self.names}
        self.options: dict[str, NodeOptions] = {}
        self.sessions: dict[str, Agent] = {}
        self.secrecy: dict[str, Secrecy] = {}
        self.results: dict[str, UpResult] = {}
        self._pids = itertools.count(5000)
        for name in self.names:
            key = self.dir / f"{name}.key"
            write_secret_file(key, private_key_b64(self.secrets[name].private_key))
            (self.dir / name).mkdir()
            self.options[name] = NodeOptions(
                mesh_file=self.mesh_file, node=name, private_key=key, host_link="none",
                workers=0, state_dir=self.dir / name, api_socket=self.dir / name / "api.sock")
            self.restart_vpp(name)
            self.start_agent(name)

    def vpp(self, name: str) -> FakeVpp:
        return self.relay.vpps[name]

    def restart_vpp(self, name: str) -> FakeVpp:
        """A fresh VPP (new pid, nothing configured); the agent's connection broke."""
        vpp = FakeVpp.with_uplink(self.mesh.node(name).primary)
        vpp.pid = next(self._pids)
        if name in self.sessions:
            self.sessions[name].close()
        return self.relay.attach(name, vpp)

    def start_agent(self, name: str) -> None:
        """A new agent process: new Agent and Secrecy, the same VPP and state dir."""
        old = self.secrecy.get(name)
        if old is not None:
            old.close()
        options = self.options[name]
        clock = AgentClock(options.state_dir / f"{name}.clock.json",
                           boottime=lambda: self.clock() - self.booted[name],
                           wall=lambda: self.clock() + self.wall_step[name],
                           boot_id=lambda: f"boot-{self.boot[name]}")
        secrecy = Secrecy(channel_socket(options), state_dir=options.state_dir, clock=clock)
        self.secrecy[name] = secrecy
        counters = SaCounters(self.dir / f"{name}.stats.sock",  # FakeVpp reads its own
                              open_reader=lambda _p, n=name: self.vpp(n)) \
            if self.counters else None
        self.sessions[name] = Agent(self.options[name], secrecy=secrecy, counters=counters,
                                      connect=lambda n=name: self.vpp(n))  # type: ignore[misc]

    def reboot(self, name: str) -> None:
        """The node's host reboots: a new VPP and agent, its boot clock from zero."""
        self.booted[name] = self.clock()
        self.boot[name] += 1
        self.restart_vpp(name)
        self.start_agent(name)

    def close(self) -> None:
        for secrecy in self.secrecy.values():
            secrecy.close()
        self.relay.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, name: str, **up_options: object) -> UpResult:
        result = self.results[name] = self.sessions[name].run(
            now=self.secrecy[name].clock(), **up_options)
        return result

    def settle(self) -> None:
        """Deliver and service until the channel is quiet (at the current time)."""
        for _ in range(50):
            moved = self.relay.pump()
            wanted = [self.secrecy[n].service() for n in self.names]
            if not moved and not any(wanted):
                return
        raise AssertionError("the channel never went quiet")

    def step(self, seconds: float = 2.0, traffic: bool = True) -> None:
        """One poll of every agent, the channel serviced, then `seconds` of traffic."""
        for name in self.names:
            self.run(name)
            self.settle()
        self.clock.now += seconds
        if traffic:
            for a, b in itertools.permutations(self.names, 2):
                self.traffic(a, b)
        self.settle()

    def until(self, condition, what: str, steps: int = 30) -> int:  # type: ignore[no-untyped-def]
        for count in range(steps):
            if condition():
                return count
            self.step()
        raise AssertionError(f"never reached: {what}")

    def sas(self, name: str, outbound: bool, peer: str | None = None,
            ) -> dict[int, tuple[bytes, int]]:
        """SPI -> (key, salt) of one direction of the SAs in node `name`'s VPP (towards,
        or from, `peer` only, when given)."""
        number = None if peer is None else self.number(peer)
        found = [(s["entry"]["spi"], (bytes(s["entry"]["crypto_key"]["data"]),
                                      s["entry"]["salt"]))
                 for sa_id, s in self.vpp(name).sas.items()
                 if bool(sa_id & SA_DIRECTION_BIT) == outbound
                 and number in (None, sa_peer(sa_id))]
        if peer is not None:  # one SA per SPI and peer: a static and an agreed key of
            # the same generation never stay side by side after a run
            assert len({spi for spi, _ in found}) == len(found), found
        return dict(found)

    def traffic(self, sender: str, receiver: str, packets: int = 100) -> None:
        """Packets on the sender's outbound SAs to the receiver reach their inbound twins."""
        me, other = self.number(sender), self.number(receiver)
        inbound = {s["entry"]["spi"]: s for sa_id, s in self.vpp(receiver).sas.items()
                   if not sa_id & SA_DIRECTION_BIT and sa_peer(sa_id) == me}
        for sa_id, sa in self.vpp(sender).sas.items():
            twin = inbound.get(sa["entry"]["spi"])
            if sa_id & SA_DIRECTION_BIT and sa_peer(sa_id) == other and twin is not None \
                    and twin["entry"]["crypto_key"] == sa["entry"]["crypto_key"]:
                sa["seq_out"] = sa.get("seq_out", 0) + packets
                twin["last_seq_in"] = sa["seq_out"]

    def link_ok(self, sender: str, receiver: str) -> bool:
        """Every outbound SA of the sender to the receiver has its twin (SPI, key, salt)
        there."""
        out = self.sas(sender, True, receiver)
        inbound = self.sas(receiver, False, sender)
        return bool(out) and all(inbound.get(spi) == key for spi, key in out.items())

    def generations(self, name: str) -> GenerationState:
        return self.options[name].generations.load()

    def forward_secret(self) -> bool:
        return len(self.results) == len(self.names) and all(
            s.forward_secret for r in self.results.values() for s in r.secrecy.values()) \
            and all(self.link_ok(a, b) for a, b in itertools.permutations(self.names, 2))

    def slid(self, generation: int) -> bool:
        """Every receiver's window starts at `generation` (for every sender)."""
        states = {n: self.generations(n).peers for n in self.names}
        return all(p in states[n] and states[n][p].in_base == generation
                   for n, p in itertools.permutations(self.names, 2))

    def number(self, name: str) -> int:
        return self.mesh.node(name).node_number


def static_keys(agents: Agents, name: str, peer: str, outbound: bool) -> dict[int, bytes]:
    """SPI -> key of the static schedule, for every generation SPIs can name."""
    view = agents.sessions[name].view()
    me, other = agents.number(name), agents.number(peer)
    sender = me if outbound else other
    return {spi_for(sender, t, g): view.sa_key(view.peer(peer), outbound=outbound, tunnel=t,
                                               epoch=g).key.get_secret_value()
            for t in range(view.settings.tunnels_per_peer) for g in range(16)}


# ---- two one-shot agents, two fake VPPs ----------------------------------------------

class Pair:
    """node1 and node2, each an agent with its own state dir and fake VPP."""

    def __init__(self, tmp: Path, **settings: object) -> None:
        self.mesh, self.secrets = make_mesh(2, 2, rekey_grace=10, rekey_interval=0, **settings)
        self.mesh_file = tmp / "mesh.yaml"
        self.mesh_file.write_text(dump_mesh(self.mesh))
        self.opts = {}
        self.vpp = {}
        for name in ("node1", "node2"):
            key = tmp / f"{name}.key"
            write_secret_file(key, private_key_b64(self.secrets[name].private_key), force=True)
            self.opts[name] = NodeOptions(mesh_file=self.mesh_file, node=name, private_key=key,
                                          host_link="none", workers=0, state_dir=tmp / name)
            self.restart_vpp(name)

    def restart_vpp(self, name: str) -> None:
        self.vpp[name] = FakeVpp.with_uplink(self.mesh.node(name).primary)

    def run(self, name: str, now: float, rekey: bool = False):  # type: ignore[no-untyped-def]
        return up(self.opts[name], api=self.vpp[name], now=now, rekey=rekey,
                  agreement=NoAgreement(self.opts[name].clock))

    def traffic(self, sender: str, receiver: str, packets: int = 100) -> None:
        """Packets on the sender's current outbound SAs reach the receiver's inbound SAs."""
        out = {sa["entry"]["spi"]: sa for sa in self.vpp[sender].sas.values()
               if sa["entry"]["sad_id"] & SA_DIRECTION_BIT}
        for spi, sa in out.items():
            sa["seq_out"] = sa.get("seq_out", 0) + packets
            inbound = [s for s in self.vpp[receiver].sas.values()
                       if not s["entry"]["sad_id"] & SA_DIRECTION_BIT
                       and s["entry"]["spi"] == spi]
            if inbound:
                inbound[0]["last_seq_in"] = sa["seq_out"]

    def link_ok(self, sender: str, receiver: str) -> bool:
        """Every outbound SA of the sender has its twin (SPI, key, salt) at the receiver."""
        inbound = {(s["entry"]["spi"], bytes(s["entry"]["crypto_key"]["data"]),
                    s["entry"]["salt"])
                   for s in self.vpp[receiver].sas.values()
                   if not s["entry"]["sad_id"] & SA_DIRECTION_BIT}
        out = [(s["entry"]["spi"], bytes(s["entry"]["crypto_key"]["data"]), s["entry"]["salt"])
               for s in self.vpp[sender].sas.values() if s["entry"]["sad_id"] & SA_DIRECTION_BIT]
        return bool(out) and all(o in inbound for o in out)

    def out_generation(self, name: str) -> set[int]:
        return {s["entry"]["spi"] & 0xF for s in self.vpp[name].sas.values()
                if s["entry"]["sad_id"] & SA_DIRECTION_BIT}
