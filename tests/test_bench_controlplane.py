"""The control-plane benchmark's pure parts: the synthetic mesh and the report."""

from __future__ import annotations

import importlib
import ipaddress

import pytest

from benchmarks.controlplane import (
    MAX_PEERS,
    PHASES,
    PODS,
    UNDERLAY,
    BaselineResult,
    SizeResult,
    render_baseline,
    render_table,
    synthetic_mesh,
)


@pytest.mark.parametrize("peers", [1000, MAX_PEERS])
def test_synthetic_mesh_is_valid_and_deterministic(peers: int) -> None:
    mesh, secrets = synthetic_mesh(peers, 4)
    assert len(mesh.nodes) == peers + 2  # the measured node, the peers, one to join
    addresses = [a.ip for n in mesh.nodes for a in n.underlay]
    assert len(set(addresses)) == len(addresses)
    assert all(a in UNDERLAY for a in addresses)
    assert all(n.pod_cidr.subnet_of(PODS) for n in mesh.nodes)  # type: ignore[arg-type]
    assert mesh.node("n1").uplink == "loop0"
    again, secrets_again = synthetic_mesh(peers, 4)
    assert again == mesh
    assert secrets_again.public_key_b64() == secrets.public_key_b64()
    assert ipaddress.ip_network("198.18.0.0/15").supernet_of(UNDERLAY)


def result(peers: int, scale: float) -> SizeResult:
    return SizeResult(
        peers=peers, tunnels_per_peer=4, sas=8 * peers, tunnels=4 * peers, routes=peers,
        load_average="1.00 1.00 1.00", key_derivation_s=0.1 * scale, plan_cold_s=0.2 * scale,
        plan_warm_s=0.1 * scale, first_reconcile_s=1.0 * scale,
        first_reconcile_cpu_s=0.5 * scale,
        first_reconcile_breakdown={"index": 0.0, "observe": 0.01, "diff": 0.02,
                                   "apply": 0.9 * scale},
        first_reconcile_messages=33 * peers, messages_per_s=30000, noop_full_s=1.2 * scale,
        noop_full_cpu_s=0.4 * scale, noop_full_breakdown={"observe": 1.0, "diff": 0.02},
        noop_full_messages=7, noop_incremental_s=0.004, noop_incremental_cpu_s=0.004,
        add_peer_s=0.01, add_peer_cpu_s=0.009, add_peer_messages=33, remove_peer_s=0.009,
        remove_peer_cpu_s=0.008, remove_peer_messages=21, controller_rss_base_bytes=1 << 26,
        controller_rss_peak_bytes=1 << 27, vpp_heap_before_bytes=0,
        vpp_heap_after_bytes=65536 * peers, vpp_heap_per_peer_bytes=65536.0, converged=True)


def test_report_shows_growth_and_names_missed_targets() -> None:
    table = render_table([result(100, 0.1), result(1000, 1.0)])
    assert "| peers | 100 | 1000 |" in table
    assert "first reconcile x10.0" in table
    assert "noop_full_s at 1000 peers: 1200 ms > 1000 ms" in table
    assert "first_reconcile_s" not in table.split("missed:")[1]
    assert "64 KiB" in table
    large = render_table([result(1000, 1.0), result(5000, 6.0)])
    assert "Targets at 1000 and 5000 peers (wall clock): missed:" in large
    assert "first_reconcile_s at 5000 peers: 6000 ms > 5000 ms" in large
    baseline = render_baseline(BaselineResult(sas=2000, papi_sync_messages_per_s=1900,
                                              papi_sync_dump_s=0.6,
                                              pipelined_messages_per_s=60000,
                                              pipelined_dump_s=0.03))
    assert "| add, messages/s | 1,900 | 60,000 |" in baseline


def test_agents_report_compares_the_modes_and_names_the_phases() -> None:
    from benchmarks.controlplane import AgentResult, render_agents

    phases = {"source": 0.05, "view": 0.004, "reconcile": 0.012, "reconcile: index": 0.002,
              "other": 0.01, "total": 0.076}
    agents = AgentResult(peers=1000, tunnels_per_peer=4, rounds=5, load_average="1 1 1",
                         file_join_s=0.1, file_leave_s=0.08, datastore_join_s=0.12,
                         datastore_leave_s=0.2, join_ratio=1.2, leave_ratio=2.5,
                         file_phases=phases, datastore_phases=phases,
                         messages_per_change=40, converged=True)
    table = render_agents(agents)
    assert "| joins | 100 ms | 120 ms | x1.20 |" in table
    assert "|   reconcile: index | 2.0 ms | 2.0 ms | |" in table
    assert "total" not in table.split("\n\n")[0].split("| leaves")[1]
    assert table.endswith("x1.5 of the file mode: missed.")


def test_idle_report_compares_dumps_with_counters_and_names_missed_targets() -> None:
    from benchmarks.controlplane import IdleMode, IdleResult, render_idle

    def mode(name: str, steady_cpu: float, dumps: float, join: float) -> IdleMode:
        return IdleMode(mode=name, steady_run_s=steady_cpu * 1.2, steady_run_cpu_s=steady_cpu,
                        full_run_s=1.5, full_run_cpu_s=1.0,
                        cpu_s_per_minute=29 * steady_cpu + 1.0,
                        sa_dumps_per_steady_run=dumps, sa_dumps_per_full_run=1, join_s=join,
                        join_cpu_s=join, leave_s=join,
                        join_phases={"source": 0.1, "total": join})

    channel = mode("channel", 0.01, 0, 0.01).model_copy(update={
        "cpu_s_per_minute": 0.3, "channel_cpu_share": 0.004})
    idle = IdleResult(peers=1000, tunnels_per_peer=4, rounds=10, poll_s=2, full_every_s=60,
                      load_average="1 1 1", converged=True,
                      modes=[mode("dumps", 0.5, 1, 0.45), mode("counters", 0.02, 0, 0.15),
                             channel])
    table = render_idle(idle)
    assert "| CPU per minute (2 s polls, resync every 60 s) | 15.50 s (25.8 % of a core) | " \
        "1.58 s (2.6 % of a core) | 0.30 s (0.5 % of a core) |" in table
    assert "|   of which the channel (timers, session rekeys) | - | - | 0.40 % of a core |" \
        in table
    assert "|   SA dumps per poll | 1 | 0 | 0 |" in table
    assert "|   join: source | 100 ms | 100 ms | 100 ms |" in table
    assert table.endswith("missed: idle CPU (counters) 2.6 % > 1 % of a core; "
                          "join 150 ms > 20.0 ms.")
    large = idle.model_copy(update={"peers": 5000, "modes": [channel.model_copy(update={
        "cpu_s_per_minute": 2.4})]})
    assert render_idle(large).endswith(
        "missed: idle CPU (channel) 4.0 % > 3 % of a core.")


def test_every_timed_phase_names_a_function_that_exists() -> None:
    """A phase whose module or function moved would be timed as nothing: its time would
    land in "other" without a word."""
    for phase, module, name in PHASES:
        owner: object = importlib.import_module(module)
        for part in name.split("."):
            assert hasattr(owner, part), (phase, module, name)
            owner = getattr(owner, part)
        assert callable(owner), (phase, module, name)
