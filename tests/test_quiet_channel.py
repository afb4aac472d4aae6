"""Quiet runs with the agents' channel: an idle agent reuses its last run (node.QuietRuns)
only while nothing happened on the channel (ChannelAgreement.settles), so a quiet run
never hides what a full run would act on: a peer's KeyInit, a rotation's answers held
back by an attacker, a NAT port learned, a session expired while its peer fell silent."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import vppmesh.agent.node as node_module
from vppmesh.channel import session as s
from vppmesh.config import NatSettings, dump_mesh
from vppmesh.dataplane.state import SA_DIRECTION_BIT
from vppmesh.testing.agents import Agents
from vppmesh.testing.fake_punt import Relayed


@pytest.fixture
def decisions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per run that decided the keys again (a quiet run does not)."""
    made: list[int] = []
    real = node_module.observe_keys

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(node_module, "observe_keys", counted)
    return made


@pytest.fixture
def agents() -> Iterator[Agents]:
    found = Agents(2, counters=True, key_max_seconds=120)
    yield found
    found.close()


def quiet(agents: Agents, decisions: list[int]) -> None:
    """Agreed keys both ways, then polls without traffic until both agents' runs are
    quiet (they decide nothing again)."""
    agents.until(lambda: agents.slid(1), "both pairs agreed and slid")
    for _ in range(10):
        before = len(decisions)
        agents.step(traffic=False)
        if len(decisions) == before:
            return
    raise AssertionError("the agents never went quiet")  # (a channel that never settles)


def sends_on(agents: Agents, name: str) -> set[int]:
    """The generations of `name`'s outbound SAs (the SPI's low bits)."""
    return {spi & 0xF for spi in agents.sas(name, True)}


def test_an_idle_agent_with_the_channel_reuses_its_last_run(agents: Agents,
                                                            decisions: list[int]) -> None:
    quiet(agents, decisions)
    before = len(decisions)
    for _ in range(10):
        agents.step(traffic=False)
    # 20 runs: only those where a generation's time rule is met decide (both agents
    # at once: a receiver's grace, a sender's proof), never every poll.
    assert len(decisions) - before <= 4
    assert all(agents.secrecy[n].agreement.settles for n in agents.names)


def test_a_keyinit_between_two_polls_makes_the_next_run_decide(agents: Agents,
                                                              decisions: list[int]) -> None:
    """node2 offers generation 2 while node1 is quiet: node1's channel answers between
    polls, and node1's very next run installs its inbound SAs of generation 2 with the
    agreed key and says so, so the generation is agreed and node2 moves to it."""
    quiet(agents, decisions)
    agents.run("node1")  # a poll now: the next one at the same instant meets no time rule
    agents.run("node2", rekey=True)  # its KeyInit for generation 2
    agents.settle()  # node1's channel answers it
    before = len(decisions)
    agents.run("node1")
    assert len(decisions) == before + 1  # not a quiet run
    assert 2 in agents.generations("node1").peers["node2"].ephemeral_in
    agents.settle()
    agents.until(lambda: sends_on(agents, "node2") == {2}, "node2 sends on generation 2",
                 steps=6)
    assert agents.forward_secret()


def test_a_rotation_whose_answers_an_attacker_held_back_completes_once_released(
        agents: Agents, decisions: list[int]) -> None:
    """node1's keys come due (half of key_max_seconds): its run offers generation 2 (the
    time rule is not skipped). An attacker holds back everything node2 says to node1 (the
    answer, then "installed") for a few polls, then lets it through at once: node1's very
    next run moves to generation 2 instead of reusing its last plan until its next full
    resync."""
    quiet(agents, decisions)
    held: list[Relayed] = []

    def hold(relayed: Relayed) -> bool:
        if relayed.sender == "node2" and relayed.receiver == "node1":
            held.append(relayed)
            return True
        return False

    agents.relay.lose = hold
    due = agents.generations("node1").peers["node2"].out_since + 60
    agents.clock.now = max(agents.clock.now, due)
    wants = agents.run("node1")
    assert any("generation 2" in note for note in wants.notes), wants.notes
    agents.settle()
    for _ in range(4):  # answers and acknowledgements held back
        agents.step(traffic=False)
    assert held and sends_on(agents, "node1") == {1}
    agents.run("node1")  # a poll now: the next one at the same instant meets no time rule
    agents.relay.lose = None
    for relayed in held:
        agents.relay.punt("node1", relayed.frame)
    agents.settle()
    before = len(decisions)
    agents.run("node1")
    assert len(decisions) == before + 1  # not a quiet run
    assert sends_on(agents, "node1") == {2}
    agents.settle()
    agents.step(traffic=False)
    assert agents.forward_secret()


def test_a_nat_port_learned_between_polls_is_applied(decisions: list[int]) -> None:
    """node2 sits behind a NAT (ESP in UDP): the port its NAT maps its flow to changes
    while node1 is quiet. node1's channel learns it between polls, and node1's next run
    points its outbound SAs at the new port."""
    agents = Agents(2, counters=True)
    try:
        behind = agents.mesh.nodes[1]
        nat = NatSettings(public=behind.underlay[0].ip, port=4500)
        mesh = agents.mesh.model_copy(update={"nodes": [
            agents.mesh.nodes[0], behind.model_copy(update={"nat": nat})]})
        agents.mesh_file.write_text(dump_mesh(mesh))
        agents.mesh = mesh
        quiet(agents, decisions)
        agents.run("node1")  # a poll now: the next one at the same instant meets no time rule
        secrecy = agents.secrecy["node1"]
        number = agents.number("node2")
        assert secrecy.channel is not None
        host = str(behind.underlay[0].ip)
        # What the channel reports when the peer's authenticated datagrams come from
        # another port of its NAT (channel/session.py's EndpointChanged).
        moved_to = s.EndpointChanged(peer=number, endpoint=(host, 23456))
        assert secrecy._event(secrecy.clock(), moved_to)  # it wants a run
        before = len(decisions)
        moved = agents.run("node1")
        assert len(decisions) == before + 1  # not a quiet run
        assert any("UDP encapsulation changed" in note for note in moved.notes), moved.notes
        assert agents.generations("node1").peers["node2"].nat_ports[:1] == [23456]

        def outbound_ports() -> set[int]:
            return {sa["entry"]["udp_dst_port"] for sa_id, sa
                    in agents.vpp("node1").sas.items() if sa_id & SA_DIRECTION_BIT}

        agents.settle()
        agents.until(lambda: 23456 in outbound_ports(), "node1's ESP goes to the new port",
                     steps=6)
    finally:
        agents.close()


def test_a_session_that_expires_between_polls_makes_the_next_run_decide(
        decisions: list[int]) -> None:
    """node2's agent falls silent (an attacker drops all it says): node1's session with
    it expires (REJECT_AFTER) with no event at all. No time rule of the generations falls
    there, yet node1's first run after the expiry decides again (the peer's word no
    longer counts), where a quiet run would go on using what it said."""
    agents = Agents(2, counters=True)
    try:
        quiet(agents, decisions)
        channel = agents.secrecy["node1"].channel
        assert channel is not None
        expires = channel.usable_until(agents.number("node2"))
        assert expires is not None
        agents.relay.lose = lambda relayed: relayed.sender == "node2"
        decided = []
        while agents.clock.now < expires + 4:
            before = len(decisions)
            agents.run("node1")
            decided.append((agents.clock.now >= expires, len(decisions) > before))
            agents.settle()
            agents.clock.now += 2.0
        first_after = next(made for expired, made in decided if expired)
        assert first_after  # the first run after the expiry decided
        assert agents.secrecy["node1"].agreement.established(
            agents.sessions["node1"].view()) == set()
    finally:
        agents.close()
