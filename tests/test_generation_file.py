"""The generation file keeps nonces from being reused after a restart: whatever a run
changes in the generation state must reach the disk, however it was changed, although
the file's text is made from each peer's text kept from the last run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vppmesh.keying.agreement import Claim, save_state
from vppmesh.keying.epochs import GenerationState, GenerationStore, PeerGenerations


def peer(key: str, **fields: Any) -> PeerGenerations:
    return PeerGenerations(public_key=key, out=3, out_since=100.5, floor=1, in_base=2,
                           in_marks={2: 10, 3: 0}, **fields)


# One change per field of PeerGenerations: in place for its lists and dicts.
CHANGES: dict[str, Any] = {
    "public_key": lambda p: setattr(p, "public_key", "other"),
    "out": lambda p: setattr(p, "out", p.out + 1),
    "out_since": lambda p: setattr(p, "out_since", p.out_since + 1e-6),
    "out_sent_at": lambda p: setattr(p, "out_sent_at", 7.25),
    "in_marks": lambda p: p.in_marks.__setitem__(3, 1),
    "floor": lambda p: setattr(p, "floor", 2),
    "in_base": lambda p: setattr(p, "in_base", 3),
    "in_seen": lambda p: setattr(p, "in_seen", 4),
    "in_seen_at": lambda p: setattr(p, "in_seen_at", 9.0),
    "rekey_pending": lambda p: setattr(p, "rekey_pending", True),
    "last_note": lambda p: setattr(p, "last_note", "a note"),
    "ephemeral_out": lambda p: p.ephemeral_out.append(4),
    "ephemeral_in": lambda p: p.ephemeral_in.append(3),
    "nat_ports": lambda p: p.nat_ports.extend([4500, 4501]),
    "agents_met": lambda p: setattr(p, "agents_met", True),
    "agreeing_since": lambda p: setattr(p, "agreeing_since", 1.0),
    "stopped_since": lambda p: setattr(p, "stopped_since", 2.0),
    "stopped_why": lambda p: setattr(p, "stopped_why", "key limit"),
    "channel_psk": lambda p: setattr(p, "channel_psk", "current 1"),
    "channel_key": lambda p: setattr(p, "channel_key", "current"),
    "channel_path": lambda p: setattr(p, "channel_path", "tunnel"),
    "tunnel_in": lambda p: setattr(p, "tunnel_in", 3),
    "previous_public_key": lambda p: setattr(p, "previous_public_key", "old"),
    "key_changed_since": lambda p: setattr(p, "key_changed_since", 5.0),
}


def test_every_field_has_a_change() -> None:
    assert set(CHANGES) == set(PeerGenerations.model_fields)


def run(store: GenerationStore, change: Any) -> GenerationState:
    """One agent run: load (reused), the loaded text, a change, save_state."""
    with store.locked():
        state = store.load(reuse=True)
        before = store.loaded_text(state)
        change(state)
        save_state(store, state, before, Claim({}))
        return state


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_every_change_reaches_the_file(tmp_path: Path, field: str) -> None:
    """A change to any field (a list or dict changed in place too) of one peer of many,
    made on the very state object the store keeps between runs, is on disk after the
    run; and a second change of the same field is too (what was kept is the new one)."""
    store = GenerationStore(tmp_path, "n1")
    store.save(GenerationState(peers={f"p{i}": peer(f"k{i}") for i in range(20)}))
    run(store, lambda s: None)  # the store now keeps every peer's text
    for _ in range(2):
        changed = run(store, lambda s: CHANGES[field](s.peers["p7"]))
        on_disk = GenerationStore(tmp_path, "n1").load()
        assert on_disk == changed
        assert getattr(on_disk.peers["p7"], field) == getattr(changed.peers["p7"], field)
        assert store.path.read_text() == changed.model_dump_json(indent=1)


def test_peers_joining_and_leaving_reach_the_file(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path, "n1")
    store.save(GenerationState(peers={"a": peer("ka"), "b": peer("kb")}))
    run(store, lambda s: None)
    run(store, lambda s: s.peers.__setitem__("c", peer("kc")))
    run(store, lambda s: s.peers.pop("a"))
    # Another peer's text under a name the store kept, with equal fields but another key.
    run(store, lambda s: s.peers.__setitem__("b", peer("kc")))
    on_disk = GenerationStore(tmp_path, "n1").load()
    assert sorted(on_disk.peers) == ["b", "c"] and on_disk.peers["b"].public_key == "kc"
    run(store, lambda s: s.peers.clear())
    assert GenerationStore(tmp_path, "n1").load() == GenerationState()


def test_the_text_is_the_serializers(tmp_path: Path) -> None:
    """The file is what pydantic writes for the whole state, kept texts or not."""
    store = GenerationStore(tmp_path, "n1")
    state = GenerationState(peers={"n-2.x": peer("k", nat_ports=[1, 2], last_note='"q"\n')})
    assert store.text(state) == store.text(state) == state.model_dump_json(indent=1)
    assert store.text(GenerationState()) == GenerationState().model_dump_json(indent=1)


def test_pair_secrecy_follows_every_change() -> None:
    """pair_secrecy reuses a peer's record while its values are unchanged: a change in
    place (an agreed generation added) or by assignment shows at once."""
    from vppmesh.keying.pairs import PairSecrecy, pair_secrecy

    state = GenerationState(peers={"a": peer("ka"), "b": peer("kb")})
    first = pair_secrecy(state, ["a", "b"])
    assert first["a"] == PairSecrecy(outbound=False, inbound=False, generation=3,
                                     key_since=100.5)
    state.peers["a"].ephemeral_out.append(3)
    state.peers["b"].channel_path = "tunnel"
    again = pair_secrecy(state, ["a", "b", "gone"])
    assert again["a"].outbound and again["b"].channel_path == "tunnel"
    assert pair_secrecy(state, ["a"]) == {"a": again["a"]}
