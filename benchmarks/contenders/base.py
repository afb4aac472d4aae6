"""The interface every contender implements.

A contender turns the bare :class:`~benchmarks.topology.Topology` into a working pod1 ->
pod2 path (a tunnel, a VPP instance...). The harness creates a fresh topology for each
contender, calls ``setup``, measures, and always calls ``teardown`` before destroying the
topology.
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod

from benchmarks import cpu
from benchmarks.topology import Topology


class Contender(ABC):
    """One way of carrying pod traffic between the two nodes."""

    #: Unique, short, used in ``--only`` and in the report.
    name: str = ""
    #: One line for the report.
    description: str = ""
    #: Debian packages the contender needs; installed by ``ensure_packages``.
    packages: tuple[str, ...] = ()
    #: Binaries that must be on PATH for ``available`` to pass.
    binaries: tuple[str, ...] = ()
    #: Names of processes whose CPU belongs to the contender (used if no pids are tracked).
    process_names: tuple[str, ...] = ()

    def available(self) -> tuple[bool, str]:
        """Whether the contender can run here, and if not, why (shown as 'skipped')."""
        if os.geteuid() != 0:
            return False, "needs root for network namespaces"
        missing = [b for b in self.binaries if shutil.which(b) is None]
        if missing:
            return False, f"missing binaries: {', '.join(missing)}"
        return True, ""

    def make_topology(self) -> Topology:
        """The testbed to build for this contender; override to change names or MTUs.

        It is created fresh for every contender, so a contender may also take over its
        interfaces in ``setup`` (e.g. hand the veths to VPP) without affecting others.
        """
        return Topology()

    @abstractmethod
    def setup(self, topo: Topology) -> None:
        """Make pod1 reach pod2 through this contender."""

    @abstractmethod
    def teardown(self, topo: Topology) -> None:
        """Stop what ``setup`` started; must tolerate a half-done ``setup``."""

    def versions(self) -> dict[str, str]:
        """Versions of the software measured, for the report."""
        return {}

    def details(self) -> dict[str, str]:
        """Configuration facts worth recording (cipher, mode, MTU...)."""
        return {}

    def cpu_pids(self) -> list[int]:
        """Pids whose CPU time is the contender's; defaults to a lookup by process name."""
        return cpu.pids_named(self.process_names) if self.process_names else []


class Unavailable(Contender):
    """Stands in for a contender whose module could not even be imported."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self._reason = reason
        self.description = "could not be loaded"

    def available(self) -> tuple[bool, str]:
        """Never available; the reason is the import error."""
        return False, self._reason

    def setup(self, topo: Topology) -> None:
        """Never called, since the contender is never available."""
        raise RuntimeError(self._reason)

    def teardown(self, topo: Topology) -> None:
        """Nothing was started."""
