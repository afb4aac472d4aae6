"""Rotating a node's private key without an outage (docs/operations.md, "Rotating a
node's key"): the node keeps its previous key in KEY.previous while the mesh file with
its new public key reaches the nodes at their own pace. Its channel answers handshakes
to either key and initiates with the one each peer knows; a peer that learns the new key
keeps what it agreed under the old one only when the node, authenticated by the new
key, vouches for it. The attackers: the old private key stolen, handshakes to a retired
key, a flood under the previous key."""

from __future__ import annotations

import itertools
import os
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from typer.testing import CliRunner

from vppmesh.channel import messages as m
from vppmesh.channel import session as s
from vppmesh.channel.noise import public_bytes
from vppmesh.cli import app
from vppmesh.config import dump_mesh
from vppmesh.errors import KeyFileError
from vppmesh.keying.channel_agreement import KEY_VOUCH_WAIT
from vppmesh.keying.keys import (
    NodeSecrets,
    key_previous_file,
    load_secrets,
    private_key_b64,
    public_key_b64,
    rotate_private_key,
    write_secret_file,
)
from vppmesh.ops.status import key_summary
from vppmesh.testing.agents import Agents

ADDRESSES = {n: (f"192.0.2.{n}", 5199) for n in range(1, 4)}
KEYS = {n: X25519PrivateKey.generate() for n in range(1, 4)}
NEW = X25519PrivateKey.generate()  # node 1's new key
PSK = b"\x07" * 32


def channel(n: int, secrets: NodeSecrets, known: dict[int, X25519PrivateKey],
            boot: int = 0, **kwargs: object) -> s.Channel:
    """Node `n`'s channel, knowing each peer by the key in `known` (its mesh file)."""
    found = s.Channel(n, secrets, [s.PeerConfig(p, public_bytes(k), ADDRESSES[p])
                                   for p, k in known.items() if p != n],
                      boot_id=100 + n + boot, **kwargs)  # type: ignore[arg-type]
    for p in found.peers():
        found.accept_generations(p, 0, s.MAX_WINDOW)
    return found


ROTATED = NodeSecrets(NEW, PSK, private_key_previous=KEYS[1])  # step 1 done on node 1
DROPPED = NodeSecrets(NEW, PSK)  # step 3: KEY.previous removed
OLD_VIEW = {1: KEYS[1], 2: KEYS[2], 3: KEYS[3]}  # a mesh file without node 1's new key
NEW_VIEW = {1: NEW, 2: KEYS[2], 3: KEYS[3]}


def deliver(nodes: dict[int, s.Channel], sender: int, out: s.Output, now: float,
            events: dict[int, list[s.Event]]) -> None:
    events.setdefault(sender, []).extend(out.events)
    for destination, data in out.datagrams:
        receiver = next(n for n, a in ADDRESSES.items() if a == destination)
        if receiver in nodes:
            deliver(nodes, receiver, nodes[receiver].receive(now, ADDRESSES[sender], data),
                    now, events)


def meet(nodes: dict[int, s.Channel], initiator: int, now: float) -> dict[int, list[s.Event]]:
    """The initiator's handshakes (retried as its timers say) until its peers answer."""
    events: dict[int, list[s.Event]] = {}
    for i in range(8):
        deliver(nodes, initiator, nodes[initiator].tick(now + i), now + i, events)
        if all(nodes[initiator].established(p, now + i) for p in nodes if p != initiator):
            break
    return events


# ---- the channel ------------------------------------------------------------------------

@pytest.mark.parametrize("initiator", [1, 2])
def test_key_rotation_a_peer_on_the_old_mesh_file_meets_the_rotated_node(
        initiator: int) -> None:
    """Node 1 rotated; node 2's mesh file names its old key. Whoever initiates, the pair
    meets under the old key, and both ends key a generation with the same secret and the
    pair secret of the old key; node 1 says the session runs on its previous key."""
    nodes = {1: channel(1, ROTATED, OLD_VIEW), 2: channel(2, NodeSecrets(KEYS[2], PSK),
                                                         OLD_VIEW)}
    meet(nodes, initiator, 1000.0)
    assert nodes[1].established(2) and nodes[2].established(1)
    assert nodes[1].session_key(2, 1100.0) == "previous"
    events: dict[int, list[s.Event]] = {}
    deliver(nodes, 1, nodes[1].start_generation(1100.0, 2, 3), 1100.0, events)
    (mine,) = [e for e in events[1] if isinstance(e, s.GenerationKeyed)]
    (theirs,) = [e for e in events[2] if isinstance(e, s.GenerationKeyed)]
    assert mine.secret == theirs.secret and mine.shared == theirs.shared
    assert mine.shared == KEYS[1].exchange(KEYS[2].public_key())  # the old key's
    # No word for the old key over an old-key session: it proves nothing new.
    assert not [e for e in events[2] if isinstance(e, s.PreviousKeyHeld)]


def test_key_rotation_a_peer_with_the_new_key_gets_the_vouch_over_a_new_key_session() -> None:
    nodes = {1: channel(1, ROTATED, OLD_VIEW), 2: channel(2, NodeSecrets(KEYS[2], PSK),
                                                         NEW_VIEW)}
    events = meet(nodes, 2, 1000.0)
    assert nodes[1].session_key(2, 1000.0) == "current"
    assert s.PreviousKeyHeld(1, public_bytes(KEYS[1])) in events[2]
    # The generation keys of this session: the new key's pair secret, at both ends.
    events = {}
    deliver(nodes, 2, nodes[2].start_generation(1000.0, 1, 4), 1000.0, events)
    (mine,), (theirs,) = ([e for e in events[n] if isinstance(e, s.GenerationKeyed)]
                          for n in (2, 1))
    assert mine.shared == theirs.shared == NEW.exchange(KEYS[2].public_key())
    # Without KEY.previous, no vouch: the peer drops what the old key agreed.
    nodes = {1: channel(1, DROPPED, OLD_VIEW), 2: channel(2, NodeSecrets(KEYS[2], PSK),
                                                         NEW_VIEW, boot=1)}
    events = meet(nodes, 2, 2000.0)
    assert nodes[2].established(1)
    assert not [e for e in events.get(2, []) if isinstance(e, s.PreviousKeyHeld)]


def test_key_rotation_the_initiator_learns_which_key_the_peer_knows() -> None:
    """Node 1 initiates with its current key first; a peer on the old mesh file refuses
    it (its MAC) and the retry takes the previous key; from then on node 1 starts with the
    key that peer answered, and no attempt is wasted."""
    pair = {1: KEYS[1], 2: KEYS[2]}
    nodes = {1: channel(1, ROTATED, pair), 2: channel(2, NodeSecrets(KEYS[2], PSK), pair)}
    meet(nodes, 1, 1000.0)
    assert nodes[2].drops == {m.Drop.AUTH: 1}
    now = 1000.0 + s.REJECT_AFTER
    before = nodes[1].stats["handshakes_initiated"]
    deliver(nodes, 1, nodes[1].tick(now), now, {})
    assert nodes[1].stats["handshakes_initiated"] == before + 1
    assert nodes[2].drops == {m.Drop.AUTH: 1} and nodes[1].session_key(2, now) == "previous"


def test_key_rotation_a_handshake_to_the_removed_previous_key_is_refused() -> None:
    """Node 2 still knows node 1 by its old key after node 1 removed KEY.previous: its
    handshakes fail node 1's pair MAC (no Diffie-Hellman), and the sessions on the
    previous key ended when it was removed (fail closed, counted)."""
    nodes = {1: channel(1, ROTATED, OLD_VIEW), 2: channel(2, NodeSecrets(KEYS[2], PSK),
                                                         OLD_VIEW)}
    meet(nodes, 2, 1000.0)
    assert nodes[1].session_key(2, 1000.0) == "previous"
    nodes[1].set_secrets(DROPPED)
    assert not nodes[1].established(2)
    assert nodes[1].stats["sessions_key_retired"] == 1
    dh = nodes[1].stats["dh"]
    fresh = channel(2, NodeSecrets(KEYS[2], PSK), OLD_VIEW, boot=9)
    init = next(d for a, d in fresh.tick(1001.0).datagrams if a == ADDRESSES[1])
    assert nodes[1].receive(1001.0, ADDRESSES[2], init).datagrams == []
    assert nodes[1].drops[m.Drop.AUTH] == 1 and nodes[1].stats["dh"] == dh


def test_key_rotation_the_stolen_old_key_completes_no_handshake_once_dropped() -> None:
    """An attacker holds node 1's old private key (and the PSK), nothing else. During the
    overlap it can pose as node 1 to a peer whose mesh file still names that key (what
    the overlap is for); once node 1 dropped it and the peers moved, it completes nothing:
    posing as node 1 to node 2, nor as node 2 to node 1 (key compromise impersonation)."""
    thief_as_1 = channel(1, NodeSecrets(KEYS[1], PSK), OLD_VIEW, boot=66)
    victim_2 = channel(2, NodeSecrets(KEYS[2], PSK), OLD_VIEW)
    meet({1: thief_as_1, 2: victim_2}, 1, 1000.0)
    assert victim_2.established(1)  # control: the old key worked while it was published
    # Node 1 dropped it; node 2's mesh file names the new key.
    victim_1 = channel(1, DROPPED, NEW_VIEW)
    victim_2 = channel(2, NodeSecrets(KEYS[2], PSK), NEW_VIEW, boot=1)
    thief_as_1 = channel(1, NodeSecrets(KEYS[1], PSK), OLD_VIEW, boot=67)
    meet({1: thief_as_1, 2: victim_2}, 1, 2000.0)
    assert not victim_2.established(1) and victim_2.stats["dh"] == 0
    assert set(victim_2.drops) == {m.Drop.AUTH}
    # The same thief poses as node 2 to node 1: from node 1's old key it computes the
    # pair MAC of (old key, node 2's key). While node 1 holds that key the MAC passes
    # (the Noise handshake then fails: node 2's own key is missing); once dropped, the
    # MAC fails before any Diffie-Hellman.
    def forged_init(boot: int) -> bytes:
        forger = s.Channel(2, NodeSecrets(KEYS[1], PSK), [
            s.PeerConfig(1, public_bytes(KEYS[2]), ADDRESSES[1])], boot_id=boot)
        ((_, init),) = forger.tick(2000.0).datagrams
        return init

    control = channel(1, ROTATED, NEW_VIEW)
    assert control.receive(2000.0, ADDRESSES[2], forged_init(68)).datagrams == []
    assert control.drops == {m.Drop.AUTH: 1} and control.stats["dh"] == 2  # past the MAC
    assert victim_1.receive(2000.0, ADDRESSES[2], forged_init(69)).datagrams == []
    assert victim_1.drops == {m.Drop.AUTH: 1} and victim_1.stats["dh"] == 0


def test_key_rotation_a_flood_under_the_previous_key_stays_within_the_budgets() -> None:
    """Authentic, fresh Inits to node 1's previous key as fast as a peer can send: each
    costs what one to the current key costs (one read, one answer: four
    Diffie-Hellmans), and the peer's handshake budget bounds them as before."""
    victim = channel(1, ROTATED, OLD_VIEW)
    for i in range(int(s.PEER_BURST) + 5):
        fresh = channel(2, NodeSecrets(KEYS[2], PSK), OLD_VIEW, boot=i,
                        timestamps=lambda i=i: 2_000_000_000 + i)
        init = next(d for a, d in fresh.tick(1001.0).datagrams if a == ADDRESSES[1])
        victim.receive(1001.0, ADDRESSES[2], init)
    assert victim.stats["handshakes_answered"] == s.PEER_BURST
    assert victim.stats["dh"] == 4 * s.PEER_BURST
    assert victim.drops == {m.Drop.RATE_LIMITED: 5}


def test_key_rotation_holding_two_keys_and_two_psks_meets_every_combination() -> None:
    """A node key rotation during a PSK rotation: four (key, PSK) combinations, each
    peer's meets on the first or a retried attempt; still one read per Init."""
    secrets = NodeSecrets(NEW, PSK, psk_next=b"\x08" * 32, private_key_previous=KEYS[1])
    for view, peer_psk in itertools.product((OLD_VIEW, NEW_VIEW), (PSK, b"\x08" * 32)):
        nodes = {1: channel(1, secrets, view), 2: channel(2, NodeSecrets(KEYS[2], peer_psk),
                                                          view)}
        meet(nodes, 1, 1000.0)
        assert nodes[1].established(2) and nodes[2].established(1)
        meet(nodes, 2, 1000.0 + s.REJECT_AFTER)
        assert nodes[1].stats["handshakes_answered"] == 1


# ---- files and the command --------------------------------------------------------------

def test_key_rotation_files_and_keygen_rotate(tmp_path: Path) -> None:
    key = tmp_path / "private.key"
    write_secret_file(key, private_key_b64(KEYS[1]))
    assert load_secrets(key, None).private_key_previous is None
    result = CliRunner().invoke(app, ["keygen", "--rotate", "--key", str(key)])
    assert result.exit_code == 0, result.output
    new_public = result.stdout.strip().splitlines()[0]
    secrets = load_secrets(key, None)
    assert secrets.public_key_b64() == new_public != public_key_b64(KEYS[1])
    assert secrets.private_key_previous is not None
    assert public_key_b64(secrets.private_key_previous) == public_key_b64(KEYS[1])
    assert os.stat(key_previous_file(key)).st_mode & 0o777 == 0o600
    assert [role for role, _ in secrets.private_keys()] == ["current", "previous"]
    assert secrets.key_for(public_key_b64(KEYS[1])) is secrets.private_key_previous
    assert private_key_b64(KEYS[1]) not in repr(secrets)
    # A second rotation before the first finished is refused: at most two keys.
    with pytest.raises(KeyFileError, match=r"private\.key\.previous exists.*status"):
        rotate_private_key(key)
    result = CliRunner().invoke(app, ["keygen", "--rotate", "--force", "--key", str(key)])
    assert result.exit_code != 0
    os.chmod(key_previous_file(key), 0o644)
    with pytest.raises(KeyFileError, match=r"previous has mode 0644.*chmod 600"):
        load_secrets(key, None)
    os.unlink(key_previous_file(key))
    assert load_secrets(key, None).private_key_previous is None


def test_key_rotation_status_line_names_the_pairs_on_the_previous_key() -> None:
    from vppmesh.keying.pairs import PairSecrecy

    pairs = {name: PairSecrecy(outbound=True, inbound=True, generation=1, key_since=0.0,
                               channel_key=key)
             for name, key in (("node2", "previous"), ("node3", "current"), ("node4", None))}
    assert key_summary(pairs) == \
        "channel key: current: node3; no session: node4; previous: node2"


# ---- agents end to end: the procedure on the multi-agent harness ------------------------

ROTATING = "node2"


def key_agents(count: int = 3) -> Agents:
    """Agents each with its own mesh file (the operator updates them one at a time)."""
    agents = Agents(count)
    for name in agents.names:
        mesh_file = agents.dir / name / "mesh.yaml"
        mesh_file.write_text(dump_mesh(agents.mesh))
        agents.options[name] = replace(agents.options[name], mesh_file=mesh_file)
        agents.start_agent(name)
    return agents


def rotate_on_disk(agents: Agents) -> str:
    """Step 1 on the rotating node, as `vppmesh keygen --rotate` does it on disk: the key
    moves to KEY.previous, a new one takes its place; the new public key."""
    key = agents.options[ROTATING].private_key
    os.link(key, key.with_name(key.name + ".previous"))
    new = X25519PrivateKey.generate()
    staged = key.with_name("staged.key")
    write_secret_file(staged, private_key_b64(new))
    os.replace(staged, key)
    return public_key_b64(new)


def publish(agents: Agents, name: str, public_key: str) -> None:
    """Step 2 on node `name`: its mesh file names the rotating node's new key."""
    nodes = [n.model_copy(update={"public_key": public_key}) if n.name == ROTATING else n
             for n in agents.mesh.nodes]
    mesh = agents.mesh.model_copy(update={"nodes": nodes})
    agents.options[name].mesh_file.write_text(dump_mesh(mesh))


def check_links_through(agents: Agents, what: str, seconds: float) -> None:
    """Every agent runs in turn, the channel serviced, for `seconds` with a rekey at the
    start and traffic throughout: after every single run each outbound SA has its twin at
    the receiver (not one packet lost)."""
    def every_link() -> bool:
        return all(agents.link_ok(a, b) for a, b in itertools.permutations(agents.names, 2))

    for name in agents.names:
        agents.sessions[name]._last_full = None  # the next run reads the files again
    for tick in range(int(seconds // 2)):
        for name in agents.names:
            agents.run(name, rekey=tick == 0)
            assert every_link(), (what, name, tick)
            agents.settle()
            assert every_link(), (what, name, tick)
        agents.clock.now += 2
        for a, b in itertools.permutations(agents.names, 2):
            agents.traffic(a, b)


def key_roles(agents: Agents) -> set[str | None]:
    """The roles of the rotating node's keys its pairs' channels run on."""
    return {pg.channel_key for pg in agents.generations(ROTATING).peers.values()}


def test_key_rotation_agents_never_lose_a_pair_through_the_procedure() -> None:
    """Three agents on fake VPPs: node2 rotates its key, its new public key reaches the
    mesh files of node1, node2 itself and node3 one at a time (each given time for the
    channel's sessions to renew and past the vouch's wait), and node2 removes
    KEY.previous once no pair runs on it. After every run of every agent each outbound
    SA has its twin at the receiver, the pairs stay forward secret, no agreed key is
    dropped, and status moves from `previous` to `current`."""
    agents = key_agents()
    try:
        agents.until(lambda: agents.slid(1), "every pair agreed and slid")
        new_public = rotate_on_disk(agents)
        check_links_through(agents, "rotated", s.REJECT_AFTER)
        assert key_roles(agents) == {"previous"}  # every peer still knows the old key
        for name in ("node1", ROTATING, "node3"):
            publish(agents, name, new_public)
            check_links_through(agents, f"published at {name}",
                                max(s.REJECT_AFTER, KEY_VOUCH_WAIT + 10))
            assert agents.forward_secret(), name
        assert key_roles(agents) == {"current"}  # status: KEY.previous may go
        os.unlink(key_previous_file(agents.options[ROTATING].private_key))
        check_links_through(agents, "previous removed", s.REJECT_AFTER)
        assert agents.forward_secret()
        assert key_roles(agents) == {"current"}
        for name in agents.names:
            assert agents.secrecy[name].agreement.unvouched == 0
            channel = agents.secrecy[name].channel
            assert channel is not None and not channel.stats["sessions_key_retired"]
    finally:
        agents.close()


def test_key_rotation_previous_removed_too_early_fails_closed_and_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    """KEY.previous removed while the peers' mesh files still name the old key: the
    node's sessions on it end, the log names the stranded peers, and the peers' renewed
    handshakes to the old key are refused (auth drops), never answered."""
    agents = key_agents()
    try:
        agents.until(lambda: agents.slid(1), "every pair agreed and slid")
        publish(agents, ROTATING, rotate_on_disk(agents))  # its own file only
        check_links_through(agents, "rotated", 10)
        assert key_roles(agents) == {"previous"}
        os.unlink(key_previous_file(agents.options[ROTATING].private_key))
        agents.sessions[ROTATING]._last_full = None
        with caplog.at_level("WARNING", logger="vppmesh"):
            agents.run(ROTATING)
        assert "previous key was removed while node1, node3 still knew this node" in \
            caplog.text
        channel = agents.secrecy[ROTATING].channel
        assert channel is not None and channel.stats["sessions_key_retired"] == 2
        agents.clock.now += s.REJECT_AFTER  # the peers' sessions expire and renew
        for _ in range(5):
            agents.step()
        assert channel.drops[m.Drop.AUTH] > 0
        assert not any(channel.established(n, agents.secrecy[ROTATING].clock())
                       for n in channel.peers())
    finally:
        agents.close()
