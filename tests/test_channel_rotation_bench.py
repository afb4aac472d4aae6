"""benchmarks.channel_rotation: the simulation reports every interval, the report shapes.

The in-process case runs for real on a small mesh (no timing is asserted); the real-VPP
part (`--vpp`) runs against a VPP on a handful of peers, prefix vrt-.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import channel_rotation as rotation


def test_channel_rotation_benchmark_reports_every_interval(tmp_path: Path) -> None:
    argv = ["--peers", "12", "--duration", "120", "--repeats", "2", "--intervals", "60,120",
            "--out", str(tmp_path)]
    assert rotation.main(argv) == 0
    (written,) = tmp_path.glob("*-channel-rotation.json")
    result = json.loads(written.read_text())
    rows = result["intervals"]
    assert [r["rekey_interval_s"] for r in rows] == [0, 60, 120]  # the baseline first
    for row in rows:
        assert row["repeats"] == 2 and len(row["runs"]) == 2
        assert row["channel_cpu_pct"] > 0
        assert row["datagrams_sent_per_s"] > 0 and row["datagrams_received_per_s"] > 0
        assert row["wakeups_per_s"] > 0 and row["idle_tick_ms"] > 0
        assert row["handshake_cpu_ms_both_ends"] > 0
        assert all(run["drops"] == {} for run in row["runs"])  # nothing refused
        assert "reconcile_cpu_pct" not in row  # no --vpp
        # Every session rekey and every step of a rotation wakes a run of the agent.
        assert row["run_events_per_s"] > 0
    # Rotations: none without an interval, twice as many at half the interval.
    assert rows[0]["rotations_per_s"] == 0
    assert rows[1]["rotations_per_s"] > rows[2]["rotations_per_s"] > 0
    for row in rows[1:]:
        for run in row["runs"]:
            # Every rotation of the node's outbound keys was agreed, so derived.
            assert run["derivations"] >= run["out_steps"] > 0
            assert run["in_slides"] > 0
            assert run["events"]["GenerationKeyed"] == run["derivations"]
    assert written.with_suffix(".md").read_text().startswith("| rekey_interval")
    assert written.with_suffix(".png").stat().st_size > 0


def test_report_adds_the_reconcile_and_the_runs_events_wake() -> None:
    def step(cpu: float) -> dict[str, float]:
        return {"wall_s": cpu, "cpu_s": cpu, "messages": 12, "plan_cpu_s": 0.05}

    vpp = {"peers": 1000, "tunnels_per_peer": 4, "rounds": 5, "install": step(0.002),
           "switch": step(0.001), "slide": step(0.001),
           "agent_run": {"wall_s": 0.8, "cpu_s": 0.4}, "converged": True}
    run = {"cpu_s": 1.0, "sent": 100, "received": 100, "wakeups": 50, "ticks": 500,
           "out_steps": 1, "in_slides": 1, "derivations": 2, "duration_s": 100.0,
           "idle_tick_ms": 0.5, "handshake_cpu_ms_both_ends": 1.0, "drops": {},
           "events": {"GenerationKeyed": 2, "PeerAcked": 3, "EndpointChanged": 7}}
    row = rotation.summarize(100.0, 4, [run], vpp)
    assert row["rotations_per_s"] == 0.02
    assert row["channel_cpu_pct"] == 1.0
    assert row["wakeup_ticks_cpu_pct"] == 0.025  # 0.5 wakeups/s x 0.5 ms
    # 0.01 outbound switches/s x 1 ms + 0.01 slides/s x (2 + 1) ms
    assert row["reconcile_cpu_pct"] == 0.004
    # 0.05 events/s waking a run (a moved endpoint does not), each a run of 0.4 s CPU
    assert row["event_runs_cpu_pct"] == 2.0
    # A day of switches: 0.01/s x 4 tunnels x 86400 s fingerprints, 33 bytes or more each
    ledger = row["ledger_after_a_day"]
    assert ledger["entries"] == 3456 and ledger["bytes"] > 3456 * 33
    assert ledger["record_cpu_s"] > 0
    run["events"] = {"HandshakeComplete": 200}  # 2/s: runs back to back, 0.4 / 0.8 of a core
    assert rotation.summarize(0, 4, [run], vpp)["event_runs_cpu_pct"] == 50.0
    table = rotation.render_table({"intervals": [row], "vpp": vpp, "peers": 1000,
                                   "tunnels_per_peer": 4, "rekey_grace_s": 10.0,
                                   "duration_s": 100.0, "notes": "a qemu guest"})
    assert "| 100 s | 0.02 | 1.0 / 1.0 | 1.00 % | 0.5 (0.03 %) | 0.1 MB, " in table
    assert "| 0.004 % | 1.00 % | 0.05 (2 %) |" in table
    assert "One agent run with nothing to change 400 ms CPU (800 ms wall): every 2 s poll " \
        "20% of a core" in table
    assert table.rstrip().endswith("Notes: a qemu guest")


@pytest.mark.vpp
@pytest.mark.root
def test_channel_rotation_steps_reconcile_against_vpp() -> None:
    from vppmesh.testing.vpp_helpers import require_vpp

    require_vpp()
    found = rotation.measure_vpp(6, 2, 2, "vrt-", Path("/run/vppmesh-vrt"), "256M")
    assert found["converged"]
    for step in rotation.STEPS:
        assert found[step]["cpu_s"] > 0 and found[step]["messages"] > 0
    assert found["agent_run"]["cpu_s"] > 0
