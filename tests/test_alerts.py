"""The shipped alert rules and Grafana dashboard (containers/k8s/monitoring/).

- Every metric, label and label value the rules and the dashboard name is in the agent's
  real exposition (AgentMetrics with a snapshot of one peer), so renaming a metric fails
  here rather than silently in an operator's Prometheus.
- `promtool check rules` and `promtool test rules` (the unit-test file beside the rules:
  input series and the alerts expected, annotations rendered).
- A real Prometheus scrapes the agent's endpoint over HTTPS with a client certificate,
  as docs/operations.md#metrics says, answers a query for a vppmesh series, evaluates
  the rules on it and answers every dashboard query with data.

promtool and prometheus are Debian's `prometheus` package (`make tools` installs it);
without them those tests skip, saying so.

`python tests/test_alerts.py` writes vppmesh-prometheusrule.yaml from vppmesh-alerts.yaml
(the one source of the rules).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from vppmesh.ops.metrics import (
    AgentMetrics,
    MetricsServer,
    MetricsTls,
    PeerSample,
    Snapshot,
    TunnelSample,
    families,
)

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "containers" / "k8s" / "monitoring"
RULES = MONITORING / "vppmesh-alerts.yaml"
RULE_TESTS = MONITORING / "vppmesh-alerts.test.yaml"
OPERATOR_RULE = MONITORING / "vppmesh-prometheusrule.yaml"
DASHBOARD = MONITORING / "vppmesh-dashboard.json"
# Labels Prometheus adds to every scraped series, and Prometheus' own `up`.
TARGET_LABELS = {"instance", "job"}
PROMETHEUS_SERIES = {"up": set(TARGET_LABELS)}
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
NO_PROMTOOL = "promtool not on PATH (Debian package `prometheus`; `make tools` installs it)"
NO_PROMETHEUS = "prometheus not on PATH (Debian package `prometheus`; `make tools` installs it)"


# -- the exporter's real output --------------------------------------------------------
def one_peer_metrics() -> AgentMetrics:
    """An agent's metrics after a poll, with a snapshot of one peer over two tunnels:
    outbound keys agreed (forward secret), inbound still static."""
    metrics = AgentMetrics()
    metrics.record_poll(0.02, None, restarted=False)
    metrics.mesh.update(Snapshot(
        tunnels=(TunnelSample("node2", 0, True, True, 10, 1200, 12, 1400),
                 TunnelSample("node2", 1, True, True, 3, 300, 4, 400)),
        peers=(PeerSample("node2", 3, 2, (0.01, 0.02, 0.03), (True, False), key_age=42.0,
                          agreement_pending=0.0, stopped=False),),
        esp_errors=(("replay", 1), ("decryption_failed", 0), ("no_matching_tunnel", 2)),
        guard_drops=0))
    return metrics


def exported() -> dict[str, dict[str, set[str]]]:
    """Series name -> label name -> the values seen, from the agent's exposition."""
    found: dict[str, dict[str, set[str]]] = {}
    for family in families(one_peer_metrics().exposition().decode()):
        for sample in family.samples:
            labels = found.setdefault(sample.name, {})
            for name, value in sample.labels.items():
                labels.setdefault(name, set()).add(value)
    return found


# -- what the rules and the dashboard name ----------------------------------------------
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
METRIC = re.compile(r"\bvppmesh_[a-zA-Z0-9_]+")
SIMPLE_ALTERNATION = re.compile(r"[a-zA-Z0-9_]+(?:\|[a-zA-Z0-9_]+)*")


def rule_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    return [(r.get("alert") or r["record"], r["expr"]) for g in rules["groups"]
            for r in g["rules"]]


def dashboard_expressions(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and templating query."""
    found = []
    for panel in board["panels"]:
        for nested in [panel, *panel.get("panels", [])]:
            for target in nested.get("targets", []):
                found.append((f"panel {nested['title']!r} {target['refId']}", target["expr"]))
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found.append((f"variable {var['name']}", query))
    return found


def unknown_references(expr: str, series: dict[str, dict[str, set[str]]]) -> list[str]:
    """What `expr` names that the exporter does not produce: metric names, label names in
    selectors and groupings, and literal label values (`reason=~"replay|..."`)."""
    known = {**series, **{name: {label: set() for label in labels}
                          for name, labels in PROMETHEUS_SERIES.items()}}
    problems = [f"metric {name}" for name in METRIC.findall(expr) if name not in known]
    used: set[str] = set()
    for name, body in SELECTOR.findall(expr):
        if name not in known:
            continue
        used.add(name)
        for label, _op, value in MATCHER.findall(body):
            if label in TARGET_LABELS:
                continue
            if label not in known[name]:
                problems.append(f"label {label} of {name}")
            elif "$" not in value and SIMPLE_ALTERNATION.fullmatch(value):
                problems += [f"{label}={choice!r} of {name}" for choice in value.split("|")
                             if choice not in known[name][label]]
    used |= {name for name in METRIC.findall(expr) if name in known}
    labels = set(TARGET_LABELS) | {"le"} | {label for name in used for label in known[name]}
    for group in GROUPING.findall(expr):
        problems += [f"label {label} in ({group})"
                     for label in (part.strip() for part in group.split(",")) if label
                     and label not in labels]
    return problems


def test_the_reference_check_catches_a_renamed_metric_label_or_value() -> None:
    series = exported()
    assert unknown_references('vppmesh_peer_forward_secret{direction="inbound"} == 0',
                              series) == []
    assert unknown_references("vppmesh_peer_forward_secrets == 0", series) == [
        "metric vppmesh_peer_forward_secrets"]
    assert unknown_references('vppmesh_peer_stopped{pair="x"}', series) == [
        "label pair of vppmesh_peer_stopped"]
    assert unknown_references('rate(vppmesh_esp_errors_total{reason=~"replay|forged"}[5m])',
                              series) == ["reason='forged' of vppmesh_esp_errors_total"]
    assert unknown_references("sum by (node) (vppmesh_tunnel_up)", series) == [
        "label node in (node)"]


def test_rules_name_only_series_the_agent_exports() -> None:
    series = exported()
    problems = {name: unknown_references(expr, series) for name, expr in rule_expressions()}
    assert {name: found for name, found in problems.items() if found} == {}


def test_dashboard_is_json_and_names_only_series_the_agent_exports() -> None:
    board = json.loads(DASHBOARD.read_text())
    series = exported()
    expressions = dashboard_expressions(board)
    assert len(expressions) >= 20
    problems = {where: unknown_references(expr, series) for where, expr in expressions}
    assert {where: found for where, found in problems.items() if found} == {}
    # The per-pair panels the operator needs, templated on node and peer.
    named = " ".join(expr for _, expr in expressions)
    for family in ("vppmesh_peer_forward_secret", "vppmesh_key_age_seconds",
                   "vppmesh_key_agreement_pending_seconds", "vppmesh_peer_stopped",
                   "vppmesh_key_generation", "vppmesh_rekeys_total", "vppmesh_tunnel_up",
                   "vppmesh_tunnel_protected", "vppmesh_tunnel_packets_total",
                   "vppmesh_tunnel_bytes_total", "vppmesh_esp_errors_total",
                   "vppmesh_vpp_restarts_total"):
        assert family in named, family
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "instance", "peer"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_operations_doc_lists_every_metric_the_agent_exports() -> None:
    """The metrics table the alerts and panels are read against (docs/operations.md)."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    names = {f"{f.name}_total" if f.type == "counter" else f.name
             for f in families(one_peer_metrics().exposition().decode())
             if not f.name.endswith("_created")}  # the library's creation times
    assert sorted(name for name in names if f"| `{name}` |" not in doc) == []


# -- the Prometheus Operator's copy ------------------------------------------------------
def prometheus_rule(plain: str) -> str:
    """vppmesh-alerts.yaml as a PrometheusRule (spec.groups: the same text, indented)."""
    groups = plain[plain.index("\ngroups:") + 1:]
    indented = "".join(f"  {line}" if line.strip() else line
                       for line in groups.splitlines(keepends=True))
    return ("# Generated from vppmesh-alerts.yaml by `python tests/test_alerts.py`: edit that\n"
            "# file, not this one. For the Prometheus Operator: give it the labels your\n"
            "# Prometheus' ruleSelector asks for (kube-prometheus-stack: release: <its name>).\n"
            "apiVersion: monitoring.coreos.com/v1\n"
            "kind: PrometheusRule\n"
            "metadata:\n"
            "  name: vppmesh\n"
            "  namespace: kube-system\n"
            "  labels:\n"
            "    app.kubernetes.io/name: vppmesh\n"
            "spec:\n" + indented)


def test_prometheus_rule_manifest_is_the_plain_rules() -> None:
    shipped = OPERATOR_RULE.read_text()
    assert shipped == prometheus_rule(RULES.read_text()), \
        "vppmesh-prometheusrule.yaml is stale: run python tests/test_alerts.py"
    manifest = yaml.safe_load(shipped)
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


# -- promtool ---------------------------------------------------------------------------
@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_checks_the_rules() -> None:
    done = subprocess.run([str(PROMTOOL), "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in done.stdout


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_unit_tests_of_every_alert_pass() -> None:
    done = subprocess.run([str(PROMTOOL), "test", "rules", RULE_TESTS.name], cwd=MONITORING,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    # Every alert is expected to fire somewhere in the unit tests.
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert tested == {name for name, _ in rule_expressions()}


# -- a real Prometheus ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as reply:
        answer = json.load(reply)
    assert answer["status"] == "success", answer
    return answer["data"]


def prometheus_answer(what: str, check: Any, log: Path, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except OSError:
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not seen in {timeout:.0f} s; prometheus said:\n"
                        + log.read_text()[-3000:])
        time.sleep(0.5)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A real Prometheus scraping an in-process agent endpoint over HTTPS with a client
    certificate every second, the shipped rules loaded; (its port, its log)."""
    from vppmesh.testing.pki import make_pki

    pki = make_pki(tmp_path)
    server = MetricsServer(one_peer_metrics(), ("127.0.0.1", 0),
                           MetricsTls(cert=pki.cert, key=pki.key, client_ca=pki.ca)).start()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{
            "job_name": "vppmesh", "scheme": "https",
            "tls_config": {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert),
                           "key_file": str(pki.client_key)},
            "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}]}]}))
    port, log = free_port(), tmp_path / "prometheus.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={config}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        yield port, log
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        server.stop()


@pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS)
def test_real_prometheus_scrapes_the_agent_over_tls_and_evaluates_rules_and_dashboard(
        prometheus: tuple[int, Path]) -> None:
    port, log = prometheus
    secret = prometheus_answer("vppmesh_peer_forward_secret", lambda: api(
        port, "query", query="vppmesh_peer_forward_secret")["result"], log)
    assert {(s["metric"]["peer"], s["metric"]["direction"], s["metric"]["job"]): s["value"][1]
            for s in secret} == {("node2", "outbound", "vppmesh"): "1",
                                 ("node2", "inbound", "vppmesh"): "0"}
    up = api(port, "query", query='up{job="vppmesh"}')["result"]
    assert [s["value"][1] for s in up] == ["1"]

    # The rules evaluate on the scraped series: the static inbound keys make
    # VppmeshPairNotForwardSecret pending (it fires after 15 minutes), nothing else.
    def pending() -> list[dict[str, Any]]:
        return [a for a in api(port, "alerts")["alerts"] if a["state"] == "pending"]
    alerts = prometheus_answer("a pending alert", pending, log)
    assert [(a["labels"]["alertname"], a["labels"]["peer"], a["labels"]["direction"])
            for a in alerts] == [("VppmeshPairNotForwardSecret", "node2", "inbound")]
    rules = [r for g in api(port, "rules")["groups"] for r in g["rules"]]
    assert len(rules) == len(rule_expressions())
    assert {r["name"]: r["health"] for r in rules} == {
        name: "ok" for name, _ in rule_expressions()}

    # Every dashboard query is valid PromQL and finds the scraped series (rates once two
    # scrapes are in); a filter (`> 0`) may leave nothing.
    board = json.loads(DASHBOARD.read_text())

    def answered(expr: str) -> list[Any]:
        concrete = (expr.replace("$instance", ".*").replace("$peer", ".*")
                    .replace("$__rate_interval", "1m"))
        if concrete.startswith("label_values("):
            metric = concrete[len("label_values("):concrete.rindex(",")]
            return list(api(port, "series", **{"match[]": metric}))
        return list(api(port, "query", query=concrete)["result"])

    for where, expr in dashboard_expressions(board):
        if re.search(r"> 0\s*$", expr):
            answered(expr)
            continue
        prometheus_answer(f"{where}: {expr}", lambda e=expr: answered(e), log, timeout=10)


if __name__ == "__main__":
    OPERATOR_RULE.write_text(prometheus_rule(RULES.read_text()))
    print(f"wrote {OPERATOR_RULE.relative_to(ROOT)}")
