"""Tools that build a mesh on one machine for tests, benchmarks and demos, not for real nodes.

testbed.py makes hosts out of network namespaces, one VPP each, and runs `vppmesh up` in
them (`vppmesh testbed`); demo.py is `make demo`, iperf3 across such a mesh; vm.py runs a
command in a throwaway VM guest with /dev/vhost-net for the tap v2 path (`vppmesh vm`);
uplinkbed.py is a host with one NIC and a peer router for uplink takeover. These are real
namespaces, VPPs and processes; the tests' doubles (fake VPP, punt relay, agents on fake
VPPs) and test-side helpers are in vppmesh/testing. vppmesh/ops/verify.py, which operators run
on live nodes, is not part of it.
"""
