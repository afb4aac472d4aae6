"""The shipped alert rules in a real Prometheus that scrapes a real node's agent
(`up --watch --metrics` over HTTPS with client certificates, real VPPs, two testbed
nodes), as an operator runs them: real faults make the matching alerts fire, and they
resolve when the fault ends.

- VPP killed on the node: VppmeshVppDown fires; VPP back: it resolves and
  VppmeshVppRestarted fires.
- The agent killed: VppmeshAgentDown fires (Prometheus' own `up`); the agent back: it
  resolves.

The rules are containers/k8s/monitoring/vppmesh-alerts.yaml with each `for:` cut to 1 s
(the durations are checked by promtool's unit tests in tests/test_alerts.py); the
expressions, labels and annotations are the shipped ones. Prometheus runs in the node's
network namespace and scrapes the agent every second.

Prefix vpa-. Skipped with the reason when no VPP, no root or no prometheus binary.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from vppmesh.lab.testbed import Testbed
from vppmesh.testing import vpp_helpers
from vppmesh.testing.pki import make_pki

pytestmark = [pytest.mark.vpp]
PREFIX = "vpa-"
BASE = Path("/run/vppmesh-vpa")
ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "containers" / "k8s" / "monitoring" / "vppmesh-alerts.yaml"
PROMETHEUS = shutil.which("prometheus")
# Prometheus listens in the node's namespace: its API is read from there.
FETCH = ("import sys, urllib.request\n"
         "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")
METRICS_PORT = 9465
PROMETHEUS_PORT = 9466


def require_prometheus() -> None:
    if PROMETHEUS is None:
        pytest.skip("prometheus not on PATH (Debian package `prometheus`; `make tools` "
                    "installs it)")


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    with vpp_helpers.testbed(require_prometheus, nodes=2, tunnels=1, pods=1, workers=0,
                             prefix=PREFIX, base_dir=BASE) as bed:
        yield bed


def quick_rules(target: Path) -> Path:
    """The shipped rules, every `for:` cut to 1 s."""
    data = yaml.safe_load(RULES.read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


class Prometheus:
    """A real Prometheus in the node's namespace, scraping its agent every second."""

    def __init__(self, bed: Testbed, work: Path, pki: Any) -> None:
        self.ns = bed.nodes[0].netns
        work.mkdir(parents=True, exist_ok=True)
        config = work / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(quick_rules(work / "rules.yaml"))],
            "scrape_configs": [{
                "job_name": "vppmesh", "scheme": "https",
                "tls_config": {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert),
                               "key_file": str(pki.client_key)},
                "static_configs": [{"targets": [f"127.0.0.1:{METRICS_PORT}"]}]}]}))
        self.log = work / "prometheus.log"
        shutil.rmtree(work / "tsdb", ignore_errors=True)
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, str(PROMETHEUS), f"--config.file={config}",
                 f"--storage.tsdb.path={work / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"],
                stdout=out, stderr=subprocess.STDOUT)

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        out = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", FETCH, url],
                             capture_output=True, text=True, timeout=15)
        if out.returncode != 0:
            return None
        answer = json.loads(out.stdout)
        assert answer["status"] == "success", answer
        return answer["data"]

    def firing(self) -> set[str]:
        data = self.api("alerts")
        return {a["labels"]["alertname"] for a in (data or {"alerts": []})["alerts"]
                if a["state"] == "firing"}

    def wait(self, what: str, check: Any, timeout: float = 60.0) -> float:
        started = time.monotonic()
        while not check():
            if time.monotonic() - started > timeout:
                pytest.fail(f"{what} not seen in {timeout:.0f} s; firing: {self.firing()}; "
                            f"prometheus said:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.5)
        return time.monotonic() - started

    def stop(self) -> None:
        vpp_helpers.stop_process(self.proc)


def test_real_faults_fire_the_shipped_alerts_and_they_resolve(bed: Testbed) -> None:
    n1 = bed.nodes[0]
    # HTTPS with client certificates, as docs/operations.md#metrics says.
    (BASE / "pki").mkdir(parents=True, exist_ok=True)
    pki = make_pki(BASE / "pki")
    metrics = ("--metrics", f"127.0.0.1:{METRICS_PORT}", "--metrics-tls-cert", str(pki.cert),
               "--metrics-tls-key", str(pki.key), "--metrics-client-ca", str(pki.ca))
    agents = {n.name: vpp_helpers.WatchAgent(bed, n, *(metrics if n is n1 else ()))
              for n in bed.nodes}
    prometheus = Prometheus(bed, BASE / "prometheus", pki)
    events: list[str] = []
    try:
        with vpp_helpers.running_agents(agents):
            prometheus.wait("the agent's series", lambda: (prometheus.api(
                "query", query="vppmesh_vpp_up") or {"result": []})["result"])
            prometheus.wait("every pair on agreed keys",
                            lambda: vpp_helpers.settled_on_agreed_keys(bed.nodes))
            # Healthy: nothing fires (VppRestarted may not: nothing restarted).
            time.sleep(3)
            assert prometheus.firing() == set()

            bed.kill_vpp(n1)
            took = prometheus.wait("VppmeshVppDown",
                                   lambda: "VppmeshVppDown" in prometheus.firing())
            events.append(f"VPP killed: VppmeshVppDown firing after {took:.1f} s")
            bed.restart_vpp(n1)
            took = prometheus.wait("VppmeshVppDown resolved and VppmeshVppRestarted",
                                   lambda: (f := prometheus.firing()) is not None
                                   and "VppmeshVppDown" not in f
                                   and "VppmeshVppRestarted" in f)
            events.append(f"VPP back: VppmeshVppDown resolved, VppmeshVppRestarted firing "
                          f"after {took:.1f} s")

            agents["n1"].stop()
            took = prometheus.wait("VppmeshAgentDown",
                                   lambda: "VppmeshAgentDown" in prometheus.firing())
            events.append(f"agent stopped: VppmeshAgentDown firing after {took:.1f} s")
            agents["n1"].start()
            took = prometheus.wait("VppmeshAgentDown resolved",
                                   lambda: "VppmeshAgentDown" not in prometheus.firing())
            events.append(f"agent back: VppmeshAgentDown resolved after {took:.1f} s")
            # Back to normal: nothing fires but the restart notice (15 minutes' window).
            prometheus.wait("only VppmeshVppRestarted left",
                            lambda: prometheus.firing() <= {"VppmeshVppRestarted"})
            annotations = [a["annotations"] for a in prometheus.api("alerts")["alerts"]
                           if a["labels"]["alertname"] == "VppmeshVppRestarted"]
            assert annotations and all(not re.search(r"\{\{|<no value>", v)
                                       for a in annotations for v in a.values()), annotations
    finally:
        prometheus.stop()
    for line in events:
        print("  ", line)
