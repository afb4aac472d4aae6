# vppmesh: `make demo` (a 3-node encrypted mesh on this machine) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEB_TOOLS := iperf3 tcpdump ethtool iproute2 iputils-ping tinc wireguard-go wireguard-tools \
	containernetworking-plugins etcd-server nftables conntrack prometheus

VM_DEB := qemu-system-x86 linux-image-amd64 busybox-static

.PHONY: venv tools vm-tools runtime-tools test vm-test runtime-test lint unit demo bench \
	bench-quick bench-control bench-capacity bench-metrics storm clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

venv: $(VENV)/.installed

# Debian tools the testbed and benchmarks drive (root only; skipped otherwise).
tools:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; for t in iperf3 tcpdump ethtool tincd wireguard-go ping etcd nft conntrack \
	      promtool prometheus; do \
	    command -v $$t >/dev/null 2>&1 || missing=1; done; \
	  [ -x /usr/lib/cni/host-local ] || missing=1; \
	  if [ -n "$$missing" ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEB_TOOLS) >/dev/null; fi; \
	else echo "not root: skipping Debian tools (VPP and namespace tests will skip)"; fi

lint: venv
	$(VENV)/bin/ruff check vppmesh benchmarks tests

unit: venv
	$(PY) -m pytest -q -m 'not vpp and not root and not vm'

# The VM tests (marker vm) boot a qemu guest under software emulation: about 17 minutes
# on 2 cores, so `make test` (and CI, already 28 minutes) leaves them out.
test: venv tools lint
	$(PY) -m pytest -q -ra -m 'not vm'

# qemu, a Debian kernel (vhost_net), busybox-static and virtme-ng for the VM guest.
vm-tools: venv tools
	@if [ "$$(id -u)" = 0 ]; then \
	  command -v qemu-system-x86_64 >/dev/null && command -v busybox >/dev/null && \
	    ls /boot/vmlinuz-* >/dev/null 2>&1 || { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(VM_DEB) >/dev/null; }; \
	else echo "not root: skipping qemu and the kernel (the VM tests will skip)"; fi
	$(PY) -m pip install -q -e '.[test,bench,vm]'

# The tap v2 path in a VM guest; VPP from VPPMESH_VM_VPP, else VPPMESH_VPP (docs/vm.md).
vm-test: vm-tools
	$(PY) -m pytest -ra -m vm tests/test_vm.py

# The node image under podman (runc, CNI backend) on two testbed hosts (docs/kubernetes.md,
# "Checked under a real runtime"); VPP from VPPMESH_VPP's /opt/vpp tree, or
# VPPMESH_IMAGE_VPP=fdio for FD.io's packages. Several minutes: `make test` runs it only
# where podman and a VPP are present.
RUNTIME_DEB := podman runc debootstrap containernetworking-plugins nftables tcpdump

runtime-tools: venv tools
	@if [ "$$(id -u)" = 0 ]; then \
	  command -v podman >/dev/null && command -v runc >/dev/null && \
	    command -v debootstrap >/dev/null || { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(RUNTIME_DEB) >/dev/null; }; \
	else echo "not root: skipping podman (the runtime test will skip)"; fi

runtime-test: runtime-tools
	$(PY) -m pytest -s -ra -m runtime tests/test_runtime.py

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

# The storm: 4 nodes under pod traffic and a seeded fault schedule for 30 minutes (root +
# VPP; benchmarks/README.md, "The storm"). STORM_ARGS="--quick --seed 1" for ~5 minutes;
# too long for `make test` (CI is already at its budget), so it runs only here.
storm: venv tools
	$(PY) -m benchmarks.storm $(STORM_ARGS)

clean:
	-$(VENV)/bin/vppmesh testbed down
	rm -rf $(VENV) .pytest_cache .ruff_cache
