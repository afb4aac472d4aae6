"""The capacity harness against a real VPP: `--quick` runs every contender and reports.

Numbers are not asserted (they belong to the machine); what must hold is that every
contender moved packets end to end, the clocks per node were read on both sides, the
encrypt-only run bound SA i to worker i mod W, and the crypto engine in use is named.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.capacity.rig import CONTENDERS
from vppmesh.testing.vpp_helpers import require_vpp

pytestmark = [pytest.mark.vpp, pytest.mark.root]


def test_capacity_quick(tmp_path: Path) -> None:
    require_vpp()
    workers = "0,1" if (os.cpu_count() or 1) >= 2 else "0"
    done = subprocess.run([sys.executable, "-m", "benchmarks.capacity", "--quick",
                           "--workers", workers, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    [path] = tmp_path.glob("*-capacity.json")
    result = json.loads(path.read_text())
    assert set(result["pair"]) == set(CONTENDERS)
    for name, by_mix in result["pair"].items():
        s = by_mix["1400"]
        assert s["mpps"] > 0.01, f"{name} delivered nothing"
        assert s["encrypt_path_clocks"] > 0 and s["decrypt_path_clocks"] > 0, name
        assert s["encrypt_nodes"] and s["decrypt_nodes"], name
    esp = result["pair"]["vppmesh-4t"]["1400"]
    assert "esp4-encrypt-tun" in esp["encrypt_nodes"]
    assert "esp4-decrypt-tun" in esp["decrypt_nodes"]
    wg = result["pair"]["wireguard"]["1400"]
    assert any(n.startswith("wg4") for n in wg["encrypt_nodes"])
    rows = result["encrypt_only"]
    assert [r["workers"] for r in rows] == [int(w) for w in workers.split(",")]
    for row in rows:
        assert row["mixes"]["1400"]["mpps"] > 0.01
        assert row["placement"]["all_ok"], row["placement"]
        assert len(row["placement"]["sas"]) >= 8  # 4 tunnels, an SA each way
        assert row["engine"]
    assert result["vpp"]["crypto"]["active"] and result["vpp"]["tsc_ghz"]
    assert "vppmesh-1t/ipsec-hand" in result["ratios"]
    assert (tmp_path / path.name.replace(".json", ".md")).exists()
    assert result["projection"]["encrypt_only_best"]["encrypt_workers_at_3ghz"] > 0
