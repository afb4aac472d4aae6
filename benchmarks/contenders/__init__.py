"""Registry of contenders.

A contender module lives in this package and exposes ``contenders() -> list[Contender]``
(a list, so one module can offer variants such as vppmesh with 1 and with N tunnels).
Adding a contender means adding its module name to :data:`MODULES`; the order here is
the order of the report.
"""

from __future__ import annotations

import importlib

from benchmarks.contenders.base import Contender, Unavailable

MODULES: list[str] = [
    "vpp",
    "bare",
    "tinc",
    "wireguard_go",
    "xfrm",
]

#: Preferred reference for the ratios, first one measured wins; otherwise the first
#: contender measured. VPP-based contenders go in front of this list when they exist.
RATIO_REFERENCES: list[str] = ["vppmesh-4t", "vppmesh"]


def all_contenders() -> list[Contender]:
    """Instantiate every registered contender; a module that fails to import is reported
    as an unavailable contender instead of breaking the run."""
    out: list[Contender] = []
    for mod_name in MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{mod_name}")
            out.extend(module.contenders())
        except Exception as exc:  # report, don't crash: one broken module must not stop a run
            out.append(Unavailable(mod_name, f"import failed: {exc.__class__.__name__}: {exc}"))
    return out


def select(contenders: list[Contender], only: list[str] | None) -> list[Contender]:
    """Keep the contenders named in ``only`` (all if ``None``); unknown names are an error."""
    if only is None:
        return contenders
    known = {c.name for c in contenders}
    unknown = [n for n in only if n not in known]
    if unknown:
        raise ValueError(f"unknown contender(s) {unknown}; known: {sorted(known)}")
    return [c for c in contenders if c.name in only]


__all__ = ["MODULES", "RATIO_REFERENCES", "Contender", "all_contenders", "select"]
