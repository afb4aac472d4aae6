"""What reconcile() compares, as plain data: a Reconciler's cache and a fresh dump of VPP
checked against each other."""

from __future__ import annotations

from typing import Any

from vppmesh.dataplane.reconcile import Observed


def summary(observed: Observed) -> dict[str, Any]:
    """What reconcile() compares, in a form a cache and a fresh dump can be checked by."""
    tunnels = {i: (t.sw_if_index, str(t.src), str(t.dst)) for i, t in observed.tunnels.items()}
    indexes = {t.sw_if_index for t in observed.tunnels.values()}
    return {
        "tunnels": tunnels,
        "sas": {i: (s.spec.spi, s.spec.key.get_secret_value(), s.spec.salt,
                    s.spec.anti_replay_window, s.thread_index)
                for i, s in observed.sas.items()},
        "protections": {i: (o, tuple(sorted(ins)))
                        for i, (o, ins) in observed.protections.items()},
        "unnumbered": {i: g for i, g in observed.unnumbered.items() if i in indexes},
        "routes": {p: paths for p, paths in observed.routes.items()
                   if set(paths) <= indexes},  # the mesh's own; VPP adds its own routes
        "tunnel_ifaces": {i: (observed.interfaces[i].admin_up, observed.interfaces[i].mtu)
                          for i in indexes},
    }
