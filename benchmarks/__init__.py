"""Throughput, latency and CPU-cost benchmarks of vppmesh against other encrypted overlays.

Every contender is measured on the same two-node, two-pod namespace topology on this
machine, so the numbers compare designs rather than hardware.
"""
