"""The mesh file: valid meshes load; every invalid one names the field and the fix."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from vppmesh.config import dump_mesh, load_mesh, parse_mesh
from vppmesh.errors import ConfigError
from vppmesh.testing.meshes import make_mesh


def mesh_data(n: int = 3, tunnels: int = 2) -> dict:
    mesh, _ = make_mesh(n, tunnels)
    return yaml.safe_load(dump_mesh(mesh))


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    mesh, _ = make_mesh(3)
    path.write_text(dump_mesh(mesh))
    assert load_mesh(path) == mesh


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda d: d["nodes"][1].update(name=d["nodes"][0]["name"]), "name 'node1' is used by both"),
    (lambda d: d["nodes"][1].update(node_number=1), "node_number 1 is used by both"),
    (lambda d: d["nodes"][2].update(pod_cidr=d["nodes"][0]["pod_cidr"]), "overlaps"),
    (lambda d: d["nodes"][2].update(pod_cidr="10.64.0.0/16"), "overlaps"),
    (lambda d: d["nodes"][0].update(underlay=d["nodes"][0]["underlay"][:1]),
     "add 1 extra uplink address"),
    (lambda d: d["nodes"][0].update(public_key="not base64!"), "public_key is not valid base64"),
    (lambda d: d["nodes"][0].update(public_key="AAAA"), "decodes to 3 bytes, expected 32"),
    (lambda d: d["settings"].update(pod_mtu=1460), "settings.pod_mtu=1460 does not fit"),
    (lambda d: d["settings"].update(underlay_mtu=600), "too small for the ESP/IPIP overhead"),
    (lambda d: d["nodes"][1].update(underlay=d["nodes"][0]["underlay"]),
     "is already an address of node node1"),
    (lambda d: d["nodes"][0].update(node_number=0), "node_number"),
    (lambda d: d["nodes"][0]["underlay"].__setitem__(1, "192.0.2.12/99"),
     "nodes.0.underlay.1: '192.0.2.12/99' is not a valid IPv4 or IPv6 address with prefix "
     "length (e.g. 192.0.2.11/24 or 2001:db8::11/64)"),
    (lambda d: d["nodes"][0]["underlay"].__setitem__(0, True),
     "nodes.0.underlay.0: True is not an address: write it as text (e.g. 192.0.2.11/24)"),
    (lambda d: d["nodes"][0].update(pod_cidr=3232235520),
     "nodes.0.pod_cidr: 3232235520 is not an address: write it as text (e.g. 198.18.1.0/24)"),
    (lambda d: d["nodes"][0].update(nat={"public": 7}), "nodes.0.nat.public: 7 is not an address"),
    (lambda d: d["nodes"][0].update(colour="blue"), "colour"),
    (lambda d: d["settings"].update(tunnels_per_peer="many"), "tunnels_per_peer"),
    (lambda d: d["nodes"][0].update(underlay=["2001:db8::1/64", "2001:db8::2/64"]),
     "nodes[node1] (IPv6 underlay) and nodes[node2] (IPv4 underlay) share no underlay family"),
    (lambda d: d["nodes"][0].update(nat={"public": "2001:db8::7"}),
     "nat.public 2001:db8::7 is IPv6 but the node has no IPv6 underlay address"),
    (lambda d: d["nodes"][0].update(nat={"public": "203.0.113.7", "port": 0}), "nat.port"),
    (lambda d: [n.update(nat={"public": "203.0.113.7"}) for n in d["nodes"][:2]],
     "nodes[node2].nat.public: 203.0.113.7 is already an address of node node1"),
    (lambda d: d["nodes"][1].update(nat={"public": d["nodes"][0]["underlay"][0][:-3]}),
     "is already an address of node node1"),
])
def test_invalid_mesh_names_field_and_fix(mutate, expected: str) -> None:
    data = copy.deepcopy(mesh_data())
    mutate(data)
    with pytest.raises(ConfigError) as err:
        parse_mesh(data, "mesh.yaml")
    assert expected in str(err.value)


def test_unknown_local_node() -> None:
    mesh, _ = make_mesh(2)
    with pytest.raises(ConfigError, match="node 'ghost' is not in the mesh file"):
        mesh.node("ghost")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_mesh(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_mesh(bad)
    bad.write_text("- just a list")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_mesh(bad)


def test_pod_mtu_computed_from_overhead() -> None:
    from vppmesh.dataplane.overhead import encrypted_size, pod_mtu_for

    mesh, _ = make_mesh(2)
    mtu = mesh.pod_mtu()
    assert mtu == pod_mtu_for(1500, ipv6_underlay=False) == 1440
    assert encrypted_size(mtu, ipv6_underlay=False) <= 1500
    # Worst-case padding is assumed: the exact largest fit is 1446 (padding absorbs it).
    assert encrypted_size(1443, ipv6_underlay=False) == 1500
    assert encrypted_size(1446, ipv6_underlay=False) == 1500
    assert encrypted_size(1447, ipv6_underlay=False) > 1500
    assert pod_mtu_for(1500, ipv6_underlay=True) == 1416


@pytest.mark.parametrize("key_epoch", [2**32 - 1, 2**31, 2**40])
def test_key_epoch_leaves_room_for_the_generations_after_it(key_epoch: int) -> None:
    """A key_epoch near 2^32 (a typo, or a datastore writer) is refused when the mesh is
    read, naming the field and the fix, not at the next rekey, when the generation no
    longer fits the key derivation. The datastore's settings are checked the same way."""
    from vppmesh.agent.datastore.records import parse_settings

    highest = 2**31 - 1  # half the 32-bit space stays for the rekeys that follow

    data = copy.deepcopy(mesh_data())
    data["settings"]["key_epoch"] = key_epoch
    expected = f"settings.key_epoch={key_epoch} leaves too few key generations"
    with pytest.raises(ConfigError, match=expected) as err:
        parse_mesh(data, "mesh.yaml")
    assert f"use at most {highest}" in str(err.value)
    with pytest.raises(ConfigError, match=expected):
        parse_settings(f'{{"key_epoch": {key_epoch}}}'.encode(), "etcd://db/vppmesh/settings")
    data["settings"]["key_epoch"] = highest
    assert parse_mesh(data, "mesh.yaml").settings.key_epoch == highest


def test_reparse_takes_unchanged_nodes_as_they_were_and_checks_every_change() -> None:
    """`up --watch` parses a 1000-node mesh file again whenever it changes: a node whose
    data is exactly as before is taken as the Node it was, while a changed node is
    validated again (its error names it) and the mesh-wide checks see every node."""
    mesh, _ = make_mesh(3)
    data = yaml.safe_load(dump_mesh(mesh))
    known: dict = {}
    first = parse_mesh(copy.deepcopy(data), "mesh.yaml", known)
    again = parse_mesh(copy.deepcopy(data), "mesh.yaml", known)
    assert all(a is b for a, b in zip(again.nodes, first.nodes, strict=True))
    assert again == first
    bad = copy.deepcopy(data)
    bad["nodes"][1]["public_key"] = "not a key"
    with pytest.raises(ConfigError, match=r"nodes\.1\.public_key"):
        parse_mesh(bad, "mesh.yaml", known)
    clash = copy.deepcopy(data)
    clash["nodes"][2]["node_number"] = clash["nodes"][0]["node_number"]
    with pytest.raises(ConfigError, match="node_number"):
        parse_mesh(clash, "mesh.yaml", known)
    moved = copy.deepcopy(data)
    moved["nodes"][2]["pod_cidr"] = "10.99.0.0/24"
    changed = parse_mesh(moved, "mesh.yaml", known)
    assert changed.nodes[0] is first.nodes[0] and changed.nodes[2] is not first.nodes[2]
    assert str(changed.nodes[2].pod_cidr) == "10.99.0.0/24"


HAND_WRITTEN = """\
# the lab's mesh
settings:
  tunnels_per_peer: 2

nodes:   # every host
  - name: a   # first
    node_number: 1
    underlay: [192.0.2.1/24, 192.0.2.2/24]
    pod_cidr: 10.1.0.0/24
    public_key: {k1}

  # the second host
  - name: b
    node_number: 2
    underlay:
      - 192.0.2.3/24
      - 192.0.2.4/24
    pod_cidr: 10.1.1.0/24
    public_key: >-
      {k2}
# trailing words
"""


def hand_written(**extra: str) -> str:
    mesh, _ = make_mesh(2)
    return HAND_WRITTEN.format(k1=mesh.nodes[0].public_key, k2=mesh.nodes[1].public_key,
                               **extra)


@pytest.mark.parametrize("text", [
    pytest.param(dump_mesh(make_mesh(4)[0]), id="dumped"),
    pytest.param(hand_written(), id="indented, comments, folded text"),
    pytest.param(hand_written().replace("\n", "\r\n"), id="CRLF"),
    pytest.param("nodes:\n- name: a\n  node_number: 1\nsettings:\n  key_epoch: 3\n",
                 id="settings after nodes"),
])
def test_entries_read_alone_read_as_in_the_whole_file(text: str) -> None:
    """`up --watch` reads only the entries of `nodes` whose text changed: each entry read
    alone must give exactly what the whole file gives."""
    from vppmesh.config import read_entries

    read = read_entries(text, {})
    assert read is not None
    assert read[0] == yaml.safe_load(text)
    assert len(read[1]) == len(yaml.safe_load(text)["nodes"])


@pytest.mark.parametrize("text", [
    "nodes: [{name: a}, {name: b}]\n",
    "nodes:\n- &a {name: a}\n- *a\n",  # an alias to another entry's anchor
    "---\nnodes:\n- name: a\n",
    "nodes:\n- name: \"a\n- b\"\n",  # a quoted text running across entries
    "nodes:\n\t- name: a\n",
])
def test_files_not_laid_out_as_entries_are_read_whole(text: str) -> None:
    from vppmesh.config import read_entries

    assert read_entries(text, {}) is None


def test_reload_reads_and_validates_only_the_changed_entry_and_still_refuses_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At 1000 nodes reading the whole mesh file cost more than the rest of a join: a
    reload with the `known` nodes now reads and validates only the entries whose text
    changed. A changed entry is still checked (its error names the field and the fix,
    and nothing is taken from the file), and the mesh-wide checks see every node."""
    import vppmesh.config as config

    mesh, _ = make_mesh(20)
    path = tmp_path / "mesh.yaml"
    path.write_text(dump_mesh(mesh))
    known: dict = {}
    first = load_mesh(path, known)
    moved = yaml.safe_load(dump_mesh(mesh))
    moved["nodes"][7]["pod_cidr"] = "10.99.0.0/24"
    bad = copy.deepcopy(moved)
    bad["nodes"][12]["public_key"] = "not a key"
    clash = copy.deepcopy(moved)
    clash["nodes"][3]["pod_cidr"] = "10.99.0.0/25"  # inside node 7's, only 3 changed
    moved_text, bad_text, clash_text = (yaml.safe_dump(d, sort_keys=False)
                                        for d in (moved, bad, clash))
    read: list[int] = []
    validated: list[str] = []
    real_load, real_decode = yaml.load, config.decode_key
    monkeypatch.setattr(config.yaml, "load", lambda text, *a, **kw: (
        read.append(len(text)), real_load(text, *a, **kw))[1])
    monkeypatch.setattr(config, "decode_key", lambda value, *a, **kw: (
        validated.append(value), real_decode(value, *a, **kw))[1])

    path.write_text(moved_text)
    changed = load_mesh(path, known)
    assert str(changed.nodes[7].pod_cidr) == "10.99.0.0/24"
    assert all(changed.nodes[i] is first.nodes[i] for i in range(20) if i != 7)
    assert validated == [mesh.nodes[7].public_key]  # the one changed entry, no other
    assert sum(read) < len(path.read_text()) / 4  # its text and the settings, not all

    path.write_text(bad_text)
    with pytest.raises(ConfigError, match=r"nodes\.12\.public_key: .*vppmesh keygen"):
        load_mesh(path, known)
    path.write_text(clash_text)
    with pytest.raises(ConfigError, match=r"overlaps nodes\[node4\]\.pod_cidr 10\.99\.0\.0/25"):
        load_mesh(path, known)
    path.write_text(moved_text)
    assert load_mesh(path, known) == changed
