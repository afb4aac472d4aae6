"""`status`, `plan` and `verify` say, per pair, whether its keys are agreed by the two
agents (ephemeral: forward secret) or static, read from the node's generation file; and
`verify --require-forward-secrecy` fails naming the pairs still on static keys. The CLI
runs against the fake VPP, on which a one-shot `up` built node1's part of a 3-node mesh."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner, Result

from vppmesh.agent.node import NodeOptions, up
from vppmesh.cli import app
from vppmesh.config import dump_mesh
from vppmesh.keying.agreement import NoAgreement
from vppmesh.keying.epochs import GenerationStore
from vppmesh.keying.keys import private_key_b64, write_secret_file
from vppmesh.keying.pairs import PairSecrecy
from vppmesh.ops.status import keys_kind, secrecy_summary
from vppmesh.testing.fake_vpp import FakeVpp
from vppmesh.testing.meshes import make_mesh

FIX = "run `vppmesh up --watch` (the agent) on both nodes"


class Node1:
    """node1 of a 3-node mesh brought up once on a fake VPP that the CLI talks to."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        mesh, secrets = make_mesh(3)
        self.mesh_file = tmp / "mesh.yaml"
        self.mesh_file.write_text(dump_mesh(mesh))
        self.key = tmp / "node1.key"
        write_secret_file(self.key, private_key_b64(secrets["node1"].private_key))
        self.state = tmp / "state"
        self.vpp = FakeVpp.with_uplink(mesh.node("node1").primary)
        options = NodeOptions(mesh_file=self.mesh_file, node="node1", private_key=self.key,
                              host_link="none", workers=0, state_dir=self.state)
        up(options, api=self.vpp, agreement=NoAgreement(options.clock))
        self.store = GenerationStore(self.state, "node1")
        # The CLI's connection is the fake (with and without `with`).
        monkeypatch.setattr(FakeVpp, "__enter__", lambda vpp: vpp, raising=False)
        monkeypatch.setattr(FakeVpp, "__exit__", lambda vpp, *exc: None, raising=False)
        monkeypatch.setattr("vppmesh.cli.mesh.VppClient",
                            lambda socket: SimpleNamespace(connect=lambda: self.vpp))
        # verify: no stats segment (so no counter check) and no waiting.
        monkeypatch.setattr("vppmesh.ops.verify.StatsReader",
                            lambda path: contextlib.nullcontext(None))
        monkeypatch.setattr("vppmesh.ops.verify.time.sleep", lambda seconds: None)

    def agree(self, peer: str, *, outbound: bool, inbound: bool) -> None:
        """Mark the generations in use with `peer` as agreed over the channel, as the
        agent's Secrecy does (claim: outbound; applied: inbound)."""
        state = self.store.load()
        pg = state.peers[peer]
        if outbound:
            pg.ephemeral_out.append(pg.out)
        if inbound:
            pg.ephemeral_in.append(pg.in_seen if pg.in_seen is not None else pg.in_base)
        self.store.save(state)

    def cli(self, *args: str) -> Result:
        return CliRunner().invoke(app, [*args, "--mesh", str(self.mesh_file), "--node",
                                        "node1", "--state-dir", str(self.state)])


@pytest.fixture
def node1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Node1:
    return Node1(tmp_path, monkeypatch)


def peer_lines(output: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in output.splitlines():
        if line.startswith(("node2 ", "node3 ")):
            found.setdefault(line.split()[0], []).append(line)
    return found


def test_key_kinds_are_named_each_way_forward_secrecy() -> None:
    assert keys_kind(PairSecrecy(outbound=True, inbound=True)) == "ephemeral"
    assert keys_kind(PairSecrecy(outbound=False, inbound=False)) == "static"
    assert keys_kind(PairSecrecy(outbound=True, inbound=False)) == "ephemeral out/static in"
    assert keys_kind(PairSecrecy(outbound=False, inbound=True)) == "static out/ephemeral in"
    pairs = {f"n{i}": PairSecrecy(outbound=i % 2 == 0, inbound=False) for i in range(13)}
    line = secrecy_summary(pairs)
    assert line.startswith("keys: ephemeral (forward secret) with 0 of 13 peer(s); not with "
                           "n0 (ephemeral out/static in), n1 (static), n10 (ephemeral")
    assert "n5 (static), n6 (ephemeral out/static in) and 3 more: " + FIX in line
    assert secrecy_summary({"n1": PairSecrecy(outbound=True, inbound=True)}) == \
        "keys: ephemeral (forward secret) with all 1 peer(s)"


def test_status_says_static_then_ephemeral_forward_secrecy(node1: Node1) -> None:
    fresh = node1.cli("status")
    assert fresh.exit_code == 0, fresh.output
    rows = peer_lines(fresh.output)
    assert set(rows) == {"node2", "node3"}
    assert all(" static " in line for lines in rows.values() for line in lines)
    assert "keys: ephemeral (forward secret) with 0 of 2 peer(s); not with node2 (static), " \
           f"node3 (static): {FIX}" in fresh.output

    node1.agree("node2", outbound=True, inbound=True)
    node1.agree("node3", outbound=True, inbound=False)
    agreed = node1.cli("status")
    rows = peer_lines(agreed.output)
    assert all(" ephemeral " in line for line in rows["node2"])
    assert all(" ephemeral out/static in " in line for line in rows["node3"])
    assert "with 1 of 2 peer(s); not with node3 (ephemeral out/static in)" in agreed.output

    as_json = json.loads(node1.cli("status", "--json").stdout.split("\nwarning:")[0])
    keys = {p["name"]: (p["keys"], p["forward_secret"],
                        {k: p["secrecy"][k] for k in ("outbound", "inbound")})
            for p in as_json["peers"]}
    assert keys == {"node2": ("ephemeral", True, {"outbound": True, "inbound": True}),
                    "node3": ("ephemeral out/static in", False,
                              {"outbound": True, "inbound": False})}
    assert all(p["key_problems"] == [] and p["secrecy"]["stopped_since"] is None
               for p in as_json["peers"])


def test_plan_says_which_pairs_are_forward_secret_forward_secrecy(node1: Node1) -> None:
    fresh = node1.cli("plan", "--key", str(node1.key))
    assert fresh.exit_code == 0, fresh.output
    count, summary = fresh.output.splitlines()[-2:]
    assert count.endswith("change(s)")
    assert summary.startswith("keys: ephemeral (forward secret) with 0 of 2 peer(s); not "
                              "with node2 (static), node3 (static)")
    node1.agree("node2", outbound=True, inbound=True)
    node1.agree("node3", outbound=True, inbound=True)
    agreed = node1.cli("plan", "--key", str(node1.key))
    assert "keys: ephemeral (forward secret) with all 2 peer(s)" in agreed.output


def test_verify_reports_key_kinds_and_requires_forward_secrecy_on_demand(
        node1: Node1) -> None:
    # Default: reported, not required.
    fresh = node1.cli("verify", "--no-probes", "--seconds", "0.5")
    assert fresh.exit_code == 0, fresh.output
    assert all(" static " in lines[0] for lines in peer_lines(fresh.output).values())
    assert "not with node2 (static), node3 (static)" in fresh.output
    assert fresh.output.rstrip().splitlines()[-2].startswith("PASS")

    node1.agree("node2", outbound=True, inbound=True)
    node1.agree("node3", outbound=False, inbound=True)
    required = node1.cli("verify", "--no-probes", "--seconds", "0.5",
                         "--require-forward-secrecy")
    assert required.exit_code == 3, required.output
    assert "FAIL: no forward secrecy on pair(s) node1-node3 (static out/ephemeral in): " \
           f"{FIX}; VPP needs `punt {{ socket ... }}` in startup.conf" in required.output
    assert "node1-node2" not in required.output

    as_json = json.loads(node1.cli("verify", "--no-probes", "--seconds", "0.5",
                                   "--require-forward-secrecy", "--json")
                         .stdout.split("\nwarning:")[0])
    assert not as_json["ok"] and as_json["require_forward_secrecy"]
    assert {p["name"]: p["keys"] for p in as_json["peers"]} == \
        {"node2": "ephemeral", "node3": "static out/ephemeral in"}

    node1.agree("node3", outbound=True, inbound=False)
    passed = node1.cli("verify", "--no-probes", "--seconds", "0.5",
                       "--require-forward-secrecy")
    assert passed.exit_code == 0, passed.output
    assert "every pair on ephemeral keys (forward secret)" in passed.output


def test_a_stalled_agreement_is_visible_and_fails_required_forward_secrecy(
        node1: Node1) -> None:
    """Both pairs on agreed keys, but node2's key is older than the forward-secrecy
    window while its next agreement waits (an attacker drops the key exchange), and
    node3's pair is stopped at a key limit: `status` names both, and `verify
    --require-forward-secrecy` fails on them where it passed before."""
    node1.agree("node2", outbound=True, inbound=True)
    node1.agree("node3", outbound=True, inbound=True)
    passed = node1.cli("verify", "--no-probes", "--seconds", "0.5",
                       "--require-forward-secrecy")
    assert passed.exit_code == 0, passed.output
    state = node1.store.load()
    now = time.time()
    state.peers["node2"].out_since = now - 3600
    state.peers["node2"].agreeing_since = now - 3000
    state.peers["node3"].stopped_since = now - 40
    state.peers["node3"].stopped_why = "key limit"
    node1.store.save(state)
    status = node1.cli("status")
    assert status.exit_code == 0, status.output
    assert "node2: agreement of the next key pending for 3000 s" in status.output
    assert "node2: agreed key 0 is 3600 s old, beyond the forward-secrecy window (670 s)" \
        in status.output
    assert "node3: stopped for 40 s (key limit)" in status.output
    failed = node1.cli("verify", "--no-probes", "--seconds", "0.5",
                       "--require-forward-secrecy")
    assert failed.exit_code == 3, failed.output
    verdict = next(line for line in failed.output.splitlines() if line.startswith("FAIL: "))
    assert "node1-node2 (agreement" in verdict
    assert "node1-node3 (stopped for 40 s (key limit)" in verdict
