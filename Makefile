# vppmesh: `make demo` (a 3-node encrypted mesh on this machine) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEB_TOOLS := iperf3 tcpdump ethtool iproute2 iputils-ping tinc wireguard-go wireguard-tools \
	containernetworking-plugins etcd-server nftables conntrack

.PHONY: venv tools test lint unit demo bench bench-quick bench-control bench-capacity bench-metrics clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

venv: $(VENV)/.installed

# Debian tools the testbed and benchmarks drive (root only; skipped otherwise).
tools:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; for t in iperf3 tcpdump ethtool tincd wireguard-go ping etcd nft conntrack; do \
	    command -v $$t >/dev/null 2>&1 || missing=1; done; \
	  [ -x /usr/lib/cni/host-local ] || missing=1; \
	  if [ -n "$$missing" ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEB_TOOLS) >/dev/null; fi; \
	else echo "not root: skipping Debian tools (VPP and namespace tests will skip)"; fi

lint: venv
	$(VENV)/bin/ruff check vppmesh benchmarks tests

unit: venv
	$(PY) -m pytest -q -m 'not vpp and not root'

test: venv tools lint
	$(PY) -m pytest -q -ra

demo: venv tools
	$(VENV)/bin/vppmesh demo

bench: venv tools
	$(PY) -m benchmarks

bench-quick: venv tools
	$(PY) -m benchmarks --quick

# Encryption capacity per core: two VPPs over memif, VPP's packet generator as the pods
# (root + VPP). CAPACITY_ARGS=--quick for a one-minute run.
bench-capacity: venv
	$(PY) -m benchmarks.capacity $(CAPACITY_ARGS)

# Control plane at scale: one VPP programmed with 100, 300 and 1000 peers x 4 tunnels.
bench-control: venv
	$(PY) -m benchmarks.controlplane

# What a Prometheus scrape of a 1000-peer node costs the agent (--vpp: snapshots from VPP).
bench-metrics: venv
	$(PY) -m benchmarks.metrics_scrape

clean:
	-$(VENV)/bin/vppmesh testbed down
	rm -rf $(VENV) .pytest_cache .ruff_cache
