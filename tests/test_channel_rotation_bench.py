"""benchmarks.channel_rotation: the simulation reports every interval, the report shapes.

The in-process case runs for real on a small mesh (no timing is asserted); the real-VPP
part (`--vpp`) runs against a VPP on a handful of peers, prefix vrt-.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import channel_rotation as rotation
from vppmesh.agent.loop import EARLY_BUDGET, EARLY_BURST


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
        assert "runs_cpu_pct" not in row and "total_cpu_pct" not in row  # no --vpp
    # Every step of a rotation wakes a run of the agent; a session rekey does not.
    assert rows[0]["run_events_per_s"] == 0
    assert all(row["run_events_per_s"] > 0 for row in rows[1:])
    # Rotations: none without an interval, twice as many at half the interval.
    assert rows[0]["rotations_per_s"] == 0
    assert rows[1]["rotations_per_s"] > rows[2]["rotations_per_s"] > 0
    for row in rows[1:]:
        for run in row["runs"]:
            # Every rotation of the node's outbound keys was agreed, so derived.
            assert run["derivations"] >= run["out_steps"] > 0
            assert run["in_slides"] > 0
            assert run["events"]["GenerationKeyed"] == run["derivations"]
    table = written.with_suffix(".md").read_text()
    assert table.startswith("| rekey_interval")
    assert "Without --vpp: the channel only" in table and "Target" not in table
    assert written.with_suffix(".png").stat().st_size > 0


COSTS = rotation.RunCosts(quiet=(0.004, 0.003), one_peer=(0.02, 0.014),
                          per_peer=(0.001, 0.0005),
                          steps={"install": (0.003, 0.002), "switch": (0.002, 0.001),
                                 "slide": (0.002, 0.001)})


def wakes(*times: float) -> list[rotation.Work]:
    return [rotation.Work(at, peer, True) for peer, at in enumerate(times)]


def fixed(seconds: float):  # type: ignore[no-untyped-def]
    return lambda peers, steps: (seconds, seconds)


def test_a_run_costs_what_it_decides_and_reconciles() -> None:
    assert COSTS.run(0, []) == (0.004, 0.003)  # a quiet poll
    assert COSTS.run(1, []) == (0.02, 0.014)
    wall, cpu = COSTS.run(3, ["install", "switch"])
    assert round(wall, 6) == 0.027 and round(cpu, 6) == 0.018  # one + 2 peers + steps
    vpp = {"agent_runs": {"quiet": {"wall_s": 0.004, "cpu_s": 0.003},
                          "one_peer": {"wall_s": 0.02, "cpu_s": 0.014},
                          "peers": {"wall_s": 0.051, "cpu_s": 0.0295, "spoken": 32}},
           **{step: {"wall_s": w, "cpu_s": c} for step, (w, c) in COSTS.steps.items()}}
    found = rotation.RunCosts.of(vpp)
    assert found.quiet == COSTS.quiet and found.steps == COSTS.steps
    assert [round(x, 6) for x in found.per_peer] == [0.001, 0.0005]  # (32-peer - 1) / 31


def test_replay_polls_every_poll_with_nothing_to_do() -> None:
    runs = rotation.replay([], 0.0, 100.0, COSTS.run)
    assert runs.early == runs.deciding_polls == runs.decided == 0
    assert runs.quiet_polls == 49  # every 2 s after the last run ended (2.004 s apart)
    assert round(runs.cpu_s, 6) == round(49 * 0.003, 6)


def test_replay_runs_a_burst_early() -> None:
    """A few channel events after a quiet while are each served at once: the gap after
    a 10 ms run is 50 ms (EARLY_MIN_GAP), the credit a whole burst."""
    runs = rotation.replay(wakes(10.5, 10.7, 10.9), 0.0, 12.0, fixed(0.01))
    assert runs.early == 3 and runs.decided == 3 and runs.deciding_polls == 0
    assert runs.longest_wait_s == 0.0
    # Faster than the gap: the second waits for it, and takes the third with it.
    runs = rotation.replay(wakes(10.5, 10.51, 10.52), 0.0, 12.0, fixed(0.01))
    assert runs.early == 2 and runs.decided == 3
    assert 0.04 < runs.longest_wait_s < 0.051


@pytest.mark.parametrize("run", [0.005, 0.05])
def test_replay_holds_a_sustained_stream_to_the_budget_and_polls_on(run: float) -> None:
    """Ten events a second for 10 minutes: run at once they would take 5 % (5 ms runs)
    or half (50 ms) of a core. Early runs come only out of the credit (a burst, then 1 %
    a second, which every run spends, the polls included); the polls run whatever the
    credit, so no run is ever more than a poll after the last, and every event is acted
    on by a run within about a poll."""
    duration = 600.0
    events = wakes(*[0.05 + i * 0.1 for i in range(int(duration * 10) - 30)])
    runs = rotation.replay(events, 0.0, duration, fixed(run))
    polls = runs.deciding_polls + runs.quiet_polls
    assert runs.early * run <= EARLY_BURST + EARLY_BUDGET * duration + run
    assert polls + runs.early >= duration / (2.0 + run)
    assert runs.decided == len(events)  # every event acted on once (batched)
    assert runs.longest_wait_s <= 2.0 + run
    if run == 0.005:  # the polls take 0.25 %: the rest of the credit goes to early runs
        assert runs.early > 800
    else:  # the polls alone take 2.5 %: after the burst, the stream waits for them
        assert runs.early < 2 * EARLY_BURST / run
        assert runs.deciding_polls >= duration / (2.0 + run) - runs.early


def test_replay_acts_on_time_rules_at_the_next_run_only() -> None:
    """A rotation or a slide that comes due asks for no early run: the next poll acts on
    it, with its step's reconcile."""
    work = [rotation.Work(1.0, 7, False), rotation.Work(1.5, 8, False, "slide")]
    runs = rotation.replay(work, 0.0, 3.0, COSTS.run)
    assert runs.early == 0 and runs.quiet_polls == 0
    assert runs.deciding_polls == 1 and runs.decided == 2 and runs.steps == 1
    assert round(runs.cpu_s, 6) == round(0.014 + 0.0005 + 0.001, 6)


def test_the_simulation_gives_the_runs_their_work() -> None:
    rotating = rotation.simulate(12, 60, 120, grace=10.0, tunnels=2, seed=0, costs=COSTS)
    assert rotating["agent"]["steps"] > 0 and rotating["agent"]["decided"] > 0
    assert rotating["agent"]["early"] > 0  # the rotation's steps ask for runs
    still = rotation.simulate(12, 0, 120, grace=10.0, tunnels=2, seed=0, costs=COSTS)
    assert still["agent"]["early"] == still["agent"]["deciding_polls"] == 0
    assert still["agent"]["quiet_polls"] > 0
    assert "work" not in still  # the timeline is not reported


def test_report_gives_the_runs_the_total_and_the_target() -> None:
    def row(interval: float, runs_pct: float) -> dict[str, object]:
        run = {"cpu_s": 1.0, "sent": 100, "received": 100, "wakeups": 50, "ticks": 500,
               "out_steps": 1, "in_slides": 1, "derivations": 2, "duration_s": 100.0,
               "idle_tick_ms": 0.5, "handshake_cpu_ms_both_ends": 1.0, "drops": {},
               "events": {"GenerationKeyed": 2, "PeerAcked": 3, "HandshakeComplete": 7},
               "agent": {"deciding_polls": 40, "quiet_polls": 10, "early": 20,
                         "decided": 120, "steps": 3, "cpu_s": runs_pct, "wall_s": 2.0,
                         "longest_wait_s": 1.5}}
        return rotation.summarize(interval, 4, [run])

    none, rotating = row(0, 0.2), row(120, 1.5)
    assert rotating["run_events_per_s"] == 0.05  # a session rekey wakes no run
    assert rotating["polls_per_s"] == 0.5 and rotating["early_runs_per_s"] == 0.2
    assert rotating["peers_per_run"] == 2.0  # 120 peers over 60 deciding runs
    assert rotating["runs_cpu_pct"] == 1.5
    assert rotating["total_cpu_pct"] == 1.0 + 0.025 + 1.5  # channel + ticks + runs
    rows = [none, rotating]
    for r in rows:
        r["delta_cpu_pct"] = round(r["total_cpu_pct"] - none["total_cpu_pct"], 3)
    target = rotation.target_check(rows, 1000)
    assert target is not None and target["measured_pct"] == 1.3 and not target["met"]
    assert rotation.target_check(rows, 12) is None  # not the target's size
    step = {"wall_s": 0.002, "cpu_s": 0.001, "messages": 12, "plan_cpu_s": 0.004}
    vpp = {"peers": 1000, "rounds": 3, "install": step, "switch": step, "slide": step,
           "converged": True,
           "agent_runs": {"quiet": {"wall_s": 0.004, "cpu_s": 0.003},
                          "one_peer": {"wall_s": 0.02, "cpu_s": 0.014},
                          "peers": {"wall_s": 0.05, "cpu_s": 0.03, "spoken": 32}}}
    table = rotation.render_table({"intervals": rows, "vpp": vpp, "peers": 1000,
                                   "tunnels_per_peer": 4, "rekey_grace_s": 10.0,
                                   "duration_s": 100.0, "notes": "a qemu guest",
                                   "target": target})
    assert "| 120 s | 0.02 | 1.0 / 1.0 | 1.00 % | 0.5 (0.03 %) | " in table
    assert "| 0.50 (0.40) + 0.20 | 2.0 | 1.50 % | 2.52 % | +1.30 % |" in table
    assert "a quiet poll 3.0 ms (4.0 ms)" in table
    assert "costs <= 1 % of a core over none): 1.30 %, MISSED." in table
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
    for kind in ("quiet", "one_peer", "peers"):
        assert found["agent_runs"][kind]["cpu_s"] > 0
