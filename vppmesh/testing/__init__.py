"""Test support: the doubles and helpers vppmesh's tests share, importable as a package.

Like wireguard-go's conn/bindtest and tun/tuntest, the stand-ins ship next to the code
they stand in for, so that a test imports them by name (`from vppmesh.testing.fake_vpp
import FakeVpp`) and no test module imports another:

- fake_vpp.FakeVpp, a VPP API in memory; fake_punt.PuntRelay, the punt paths of fake
  VPPs joined (the underlay between agents); agents.Agents and agents.Pair, agents on
  fake VPPs driven by a fake clock; datastore.MemoryStore, an in-memory etcd store;
  channel_net.Net, channel state machines on a simulated network;
- wait.wait_for, the one way a test polls for a condition;
- meshes.make_mesh, meshes with real keys; pki, cni, decoder_types, observed, vm_outcomes:
  small shared helpers;
- packet crafting run inside a namespace by path (HOSTILE_PACKETS, CHANNEL_PACKETS, with
  scapy) and esp_decrypt, which opens captured ESP with keys an attacker seized;
- etcd_server and vpp_helpers, the pytest side of the real-VPP tests (skips, fixtures,
  assertions); vpp_helpers uses benchmarks/ and so runs from a checkout.

vppmesh/lab/ holds the real things these tests and the demos build (network namespaces,
VPPs, etcd, VM guests); this package holds doubles and test-side helpers. Nothing in
vppmesh outside this package imports it (tests/test_imports.py checks).
"""

from __future__ import annotations

from pathlib import Path

HOSTILE_PACKETS = Path(__file__).parent / "hostile_packets.py"  # `python <it> IFACE ...`
CHANNEL_PACKETS = Path(__file__).parent / "channel_packets.py"
