"""The keying decision's agreement (vppmesh/keying/agreement.py): a one-shot `up` runs
with NoAgreement, and no peer hears of a generation before the state claiming it is on
disk, whatever the agreement (claim -> save -> flush, held by the types)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vppmesh.agent import node
from vppmesh.config import dump_mesh
from vppmesh.keying.agreement import Claim, NoAgreement, Saved, UnsavedClaim, save_state
from vppmesh.keying.epochs import GenerationStore
from vppmesh.keying.keys import private_key_b64, write_secret_file
from vppmesh.testing.agents import Agents
from vppmesh.testing.fake_vpp import FakeVpp
from vppmesh.testing.meshes import make_mesh


def one_shot(tmp_path: Path) -> tuple[node.NodeOptions, FakeVpp]:
    mesh, secrets = make_mesh(3, tunnels=2)
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(dump_mesh(mesh))
    key = tmp_path / "node1.key"
    write_secret_file(key, private_key_b64(secrets["node1"].private_key))
    options = node.NodeOptions(mesh_file=mesh_file, node="node1", private_key=key,
                               host_link="none", workers=0, state_dir=tmp_path)
    return options, FakeVpp.with_uplink(mesh.node("node1").primary)


def test_keying_one_shot_up_runs_with_no_agreement_on_static_keys(tmp_path: Path) -> None:
    options, vpp = one_shot(tmp_path)
    result = node.up(options, api=vpp, agreement=NoAgreement(options.clock))  # type: ignore[arg-type]
    assert result.changes and len(result.desired.tunnels) == 2 * 2
    assert not result.blocked_peers and not result.stopped_peers
    assert all(not s.outbound and not s.inbound for s in result.secrecy.values())
    state = GenerationStore(tmp_path, "node1").load()
    assert set(state.peers) == {"node2", "node3"}
    assert all(not pg.ephemeral_out for pg in state.peers.values())  # nothing claimed
    again = node.up(options, api=vpp, agreement=NoAgreement(options.clock))  # type: ignore[arg-type]
    assert not again.changes  # the same static schedule: nothing to do


def test_keying_up_has_no_default_agreement(tmp_path: Path) -> None:
    options, vpp = one_shot(tmp_path)
    with pytest.raises(TypeError, match="agreement"):
        node.up(options, api=vpp)  # type: ignore[call-arg,arg-type]


def test_keying_flush_takes_only_the_saved_latest_claim(tmp_path: Path) -> None:
    options, _ = one_shot(tmp_path)
    agreement = NoAgreement(options.clock)
    store = GenerationStore(tmp_path, "node1")
    state = store.load()
    claim = agreement.claim(state, {})
    with pytest.raises(UnsavedClaim):
        agreement.flush(claim)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Saved(claim, "", object())  # only save_state() makes one
    with pytest.raises(TypeError):
        agreement.flush()  # type: ignore[call-arg]
    older = save_state(store, state, store.loaded_text(state), claim)
    newer = agreement.claim(state, {})  # a later claim, not saved yet
    with pytest.raises(UnsavedClaim):
        agreement.flush(older)
    agreement.flush(save_state(store, state, older.text, newer))
    with pytest.raises(UnsavedClaim):  # once only
        agreement.flush(save_state(store, state, older.text, newer))
    assert isinstance(newer, Claim) and dict(newer.wants) == {}


@pytest.fixture
def agents() -> Iterator[Agents]:
    pair = Agents()
    yield pair
    pair.close()


def test_keying_an_offer_waits_for_the_saved_claim(agents: Agents) -> None:
    """The channel's agreement: an offer queued by applied() leaves only once the state
    claiming its generation is on disk; an attempt to send before raises and sends
    nothing, so an agent that crashes before the save never offered the generation."""
    agents.until(agents.forward_secret, "both pairs on agreed keys")
    secrecy = agents.secrecy["node1"]
    agreement = secrecy.agreement
    session = agents.sessions["node1"]
    store = agents.options["node1"].generations
    view = session.view()
    with store.locked():
        state = store.load()
        before = store.loaded_text(state)
        want = state.peers["node2"].out + 1
        claim = agreement.claim(state, {"node2": want})
        assert want in state.peers["node2"].ephemeral_out
        agreement.applied(claim, view, state, {})
        assert secrecy.endpoint is not None
        sent = secrecy.endpoint.transport.sent
        with pytest.raises(UnsavedClaim):
            agreement.flush(claim)  # type: ignore[arg-type]
        assert secrecy.endpoint.transport.sent == sent  # the offer did not leave
        assert want not in GenerationStore(store.path.parent, "node1").load() \
            .peers["node2"].ephemeral_out
        agreement.flush(save_state(store, state, before, claim))
    assert secrecy.endpoint.transport.sent > sent  # the KeyInit, once claimed on disk
    assert want in GenerationStore(store.path.parent, "node1").load().peers["node2"].ephemeral_out


def test_keying_a_run_whose_save_fails_tells_no_peer(agents: Agents,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk refuses the generation file (full, read-only) in a rekey run: the run
    fails and not one datagram leaves, so no peer holds an offer of a generation the
    file does not claim; the next run offers it."""
    agents.until(lambda: agents.slid(1), "both pairs agreed and slid")
    endpoint = agents.secrecy["node1"].endpoint
    assert endpoint is not None
    sent = endpoint.transport.sent
    before = agents.generations("node1").peers["node2"].ephemeral_out

    def full(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(GenerationStore, "save", full)
        with pytest.raises(OSError, match="No space"):
            agents.run("node1", rekey=True)
    assert endpoint.transport.sent == sent
    assert agents.generations("node1").peers["node2"].ephemeral_out == before
    result = agents.run("node1", rekey=True)
    assert any("agreeing generation 2" in n for n in result.notes), result.notes
    assert endpoint.transport.sent > sent  # the offer, once claimed on disk
    assert len(agents.generations("node1").peers["node2"].ephemeral_out) > len(before)
