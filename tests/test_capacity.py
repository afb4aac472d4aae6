"""The capacity harness's arithmetic: `show runtime` parsing, clocks per packet, ratios."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.capacity import report, traffic
from benchmarks.capacity.measure import Sample, sample_of, summarize, workers_for_line_rate
from benchmarks.capacity.rig import HarnessError, Setup
from benchmarks.capacity.runtime import parse_runtime, path_cost
from vppmesh.lab.testbed import TestbedSpec

DATA = Path(__file__).parent / "data"


def test_parse_runtime_of_a_vpp_with_workers() -> None:
    threads = parse_runtime((DATA / "show_runtime_workers.txt").read_text())
    assert [t.name for t in threads] == ["vpp_main", "vpp_wk_0"]
    assert [t.lcore for t in threads] == [0, 1]
    worker = threads[1]
    enc = worker.node("esp4-encrypt-tun")
    assert enc is not None and enc.vectors > 0 and enc.state == "active"
    # Clocks are printed per packet; the total undoes VPP's division.
    assert enc.total_clocks == pytest.approx(enc.clocks_per * enc.vectors)
    # Idle process nodes ("event wait", "any wait") parse too, with their states.
    states = {n.state for t in threads for n in t.nodes}
    assert "event wait" in states or "any wait" in states
    assert worker.seconds > 0


def test_parse_runtime_of_a_main_thread_only_vpp() -> None:
    threads = parse_runtime((DATA / "show_runtime_main.txt").read_text())
    assert len(threads) == 1 and threads[0].index == 0
    assert threads[0].vectors("pg-input") > 0


def test_path_cost_leaves_out_generator_link_and_sink() -> None:
    text = (DATA / "show_runtime_workers.txt").read_text()
    threads = parse_runtime(text)
    sent = sum(t.vectors("pg2-tx") for t in threads)
    cost = path_cost(threads, sent)
    assert cost is not None
    names = dict(cost.nodes)
    assert "esp4-encrypt-tun" in names and "pg-input" not in names and "pg2-tx" not in names
    # Path and I/O add up to every clock the busy nodes spent, per packet sent.
    busy = sum(n.total_clocks for t in threads for n in t.busy_nodes())
    assert cost.path_clocks + cost.io_clocks == pytest.approx(busy / sent)
    assert cost.nodes[0][1] >= cost.nodes[-1][1]  # largest first
    assert sum(c for _, c in cost.nodes) == pytest.approx(cost.path_clocks)
    assert path_cost(threads, 0) is None


def test_hand_made_runtime_sums_as_expected() -> None:
    header = ("Name State Calls Vectors Suspends Clocks Vectors/Call",)
    rows = [
        "pg-input           polling   1000  256000  0  1.00e2  256.00",
        "ip4-input          active    1000  256000  0  5.00e1  256.00",
        "esp4-encrypt-tun   active    1000  256000  0  1.00e3  256.00",
        "memif1/0-tx        active    1000  256000  0  4.00e1  256.00",
        "api-rx-from-ring   any wait     0       0  5  2.00e4    0.00",
    ]
    text = "\n".join(["Time 2.0, 10 sec internal node vector rate 256.00 loops/sec 1000.00",
                      "  vector rates in 1.0000e6, out 1.0000e6, drop 0.0000e0, punt 0.0000e0",
                      *header, *rows]) + "\n"
    threads = parse_runtime(text)
    cost = path_cost(threads, 256000)
    assert cost is not None
    assert cost.path_clocks == pytest.approx(1050)
    assert cost.io_clocks == pytest.approx(140)
    assert dict(cost.nodes) == {"esp4-encrypt-tun": pytest.approx(1000),
                                "ip4-input": pytest.approx(50)}


def runtime_text(*rows: str) -> str:
    return "\n".join(["Time 1.0, 10 sec internal node vector rate 256.00 loops/sec 1000.00",
                      "Name State Calls Vectors Suspends Clocks Vectors/Call", *rows]) + "\n"


def test_a_window_that_delivers_nothing_is_a_harness_failure() -> None:
    """A contender that moves nothing (a WireGuard peer without its handshake) must stop
    the run with a reason, not become a row of zeros."""
    setup = Setup(sender=object(), receiver=object(), sent_node="memif1/0-tx",  # type: ignore[arg-type]
                  sink_node="pg3-tx", workers=0)
    sender = runtime_text("wg4-output-tun  active  10  2560  0  1.50e3  256.00",
                          "memif1/0-tx     active  10  2560  0  4.00e1  256.00")
    silent = runtime_text("memif1/0-input  polling 10     0  0  0.00e0    0.00")
    with pytest.raises(HarnessError, match=r"nothing was delivered .*2560 packets sent"):
        sample_of(setup, traffic.MIXES["1400"], [sender, silent], 1.0)
    delivered = runtime_text("esp4-decrypt-tun active 10 2560 0 6.00e2 256.00",
                             "pg3-tx           active 10 2560 0 2.00e1 256.00")
    got = sample_of(setup, traffic.MIXES["1400"], [sender, delivered], 1.0)
    assert (got.sent, got.delivered) == (2560, 2560)
    assert got.decrypt is not None and dict(got.decrypt.nodes)["esp4-decrypt-tun"] == \
        pytest.approx(600)


def sample(mpps: float, enc: float, mix: str = "1400") -> Sample:
    threads = parse_runtime(
        "Time 1.0, 10 sec internal\n"
        f"esp4-encrypt-tun active 10 {int(mpps * 1e6)} 0 {enc:.2e} 256.00\n")
    packets = int(mpps * 1e6)
    return Sample(mix=mix, seconds=1.0, sent=packets, delivered=packets, mean_bytes=1400,
                  encrypt=path_cost(threads, packets), decrypt=None)


def test_summaries_are_medians_and_rates_follow_bytes() -> None:
    s = summarize([sample(1.0, 1000), sample(3.0, 900), sample(2.0, 1100)])
    assert s.mpps == pytest.approx(2.0) and s.encrypt_clocks == pytest.approx(1000)
    assert s.inner_gbps == pytest.approx(2.0e6 * 1400 * 8 / 1e9)
    assert s.decrypt_clocks is None and s.repeats == 3


def test_ratios_come_from_one_repeat_each() -> None:
    per_repeat = [{"a": {"1400": 2.0}, "b": {"1400": 1.0}},
                  {"a": {"1400": 1.0}, "b": {"1400": 1.0}},
                  {"a": {"1400": 3.0}, "b": {"1400": 2.0}}]
    assert report.ratios(per_repeat, (("a", "b"),), ["1400"]) == {"a/b": {"1400": 1.5}}


def test_line_rate_projection() -> None:
    # 36.3 Gbit/s of goodput in 1388-byte segments is 3.27 Mpps: 1,000 clocks per
    # packet at 3 GHz is 1.09 cores.
    assert workers_for_line_rate(1000, 3.0) == pytest.approx(36.3e9 / 8 / 1388 * 1000 / 3e9)
    assert workers_for_line_rate(1000, 3.0) == pytest.approx(1.09, abs=0.01)


def test_imix_mean_size() -> None:
    assert traffic.MIXES["imix"].mean_bytes == pytest.approx((7 * 64 + 4 * 570 + 1400) / 12)
    assert traffic.MIXES["1400"].mean_bytes == 1400


def test_markdown_and_json_report(tmp_path: Path) -> None:
    s = summarize([sample(1.5, 1000)]).as_dict()
    result = {"run_id": "T", "machine": {"cpu_model": "cpu", "cores": 2, "flags": {"aes": True},
                                         "kernel": "k"},
              "vpp": {"version": "26.06", "tsc_ghz": 2.4,
                      "crypto": {"active": "native", "engines": ["native"],
                                 "native_variant": "avx2"}},
              "config": {"repeats": 1, "window_s": 1.0, "mixes": ["1400"]},
              "pair": {"vppmesh-4t": {"1400": s}}, "ratios": {"a/b": {"1400": 1.0}},
              "encrypt_only": [{"workers": 1, "engine": "native", "mixes": {"1400": s},
                                "placement": {"all_ok": True}}]}
    result["projection"] = report.projection(result)
    assert result["projection"]["encrypt_only_best"]["encrypt_workers_at_3ghz"] > 0
    paths = report.write(result, tmp_path)
    md = paths[1].read_text()
    assert "| vppmesh-4t | 1400 |" in md and "| 1 | native | 1400 |" in md
    assert "workers for 40G" in md


def test_memif_underlay_joins_two_nodes_only() -> None:
    TestbedSpec(nodes=2, underlay="memif")
    with pytest.raises(ValueError, match="memif joins exactly 2 nodes"):
        TestbedSpec(nodes=3, underlay="memif")


def test_core_ratios_compare_path_clocks_within_each_repeat() -> None:
    def s(enc: float, dec: float) -> dict[str, object]:
        return {"encrypt": {"path_clocks_per_packet": enc},
                "decrypt": {"path_clocks_per_packet": dec}}
    samples = {"a": {"1400": [s(500, 600), s(600, 700), s(550, 650)]},
               "b": {"1400": [s(1000, 600), s(1200, 1400), s(1100, 650)]}}
    ratios = report.core_ratios(samples, (("a", "b"),))  # type: ignore[arg-type]
    assert ratios == {"a/b": {"1400 encrypt": 2.0, "1400 decrypt": 1.0}}
