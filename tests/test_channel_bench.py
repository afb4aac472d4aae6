"""benchmarks.channel runs and reports every case with what the session made of it."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import channel


def test_channel_benchmark_reports_every_case(tmp_path: Path, capsys: object) -> None:
    assert channel.main(["--count", "300", "--peers", "30", "--out", str(tmp_path)]) == 0
    (written,) = tmp_path.glob("*-channel.json")
    result = json.loads(written.read_text())
    cases = result["in_process"]
    assert cases["forged handshake (bad MAC)"]["dropped_as"] == {"auth": 300}
    assert cases["replayed handshake"]["dropped_as"] == {"replay": 300}
    assert cases["replayed transport"]["dropped_as"] == {"replay": 300}
    assert cases["forged transport (bad tag)"]["dropped_as"] == {"auth": 300}
    assert cases["handshake from a stranger"]["dropped_as"] == {"unknown_peer": 300}
    assert cases["oversized"]["dropped_as"] == {"oversized": 300}
    assert cases["valid transport"]["dropped_as"] == {}
    assert all(c["per_s"] > 0 for c in cases.values())
    assert result["peers"]["peers"] == 30
    assert written.with_suffix(".md").read_text().startswith("| Received by the session")
    assert written.with_suffix(".png").stat().st_size > 0
