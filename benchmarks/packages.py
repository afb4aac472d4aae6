"""Installing the Debian packages the contenders need.

Packages are only ever installed here, through apt-get, so a fresh CI machine gets the
same tools as a developer's by running the harness.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

#: Needed by every contender: namespaces and routes, the load generator, the RTT probe.
BASE_PACKAGES: tuple[str, ...] = ("iproute2", "iperf3", "iputils-ping")

_APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}


@dataclass
class PackageReport:
    """What ``ensure_packages`` found and did."""

    present: list[str] = field(default_factory=list)
    installed: list[str] = field(default_factory=list)
    error: str = ""


def is_installed(package: str) -> bool:
    """Whether dpkg has the package fully installed."""
    try:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and proc.stdout.strip().endswith("install ok installed")


def _apt(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["apt-get", *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        env={**os.environ, **_APT_ENV},
    )


def ensure_packages(
    packages: Iterable[str], progress: Callable[[str], None] = lambda _msg: None
) -> PackageReport:
    """Install whichever of ``packages`` are missing with ``apt-get install -y``.

    Runs ``apt-get update`` only if the first install attempt fails (stale or missing
    package lists). Never raises: a package that cannot be installed makes its contender
    report itself unavailable, with the reason, instead.
    """
    wanted = list(dict.fromkeys([*BASE_PACKAGES, *packages]))
    report = PackageReport()
    missing: list[str] = []
    for pkg in wanted:
        (report.present if is_installed(pkg) else missing).append(pkg)
    if not missing:
        return report
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        report.error = f"cannot install {missing}: needs root and apt-get"
        return report
    progress(f"installing Debian packages: {' '.join(missing)}")
    try:
        proc = _apt(["install", "-y", "--no-install-recommends", *missing], timeout=900)
        if proc.returncode != 0:
            _apt(["update"], timeout=600)
            proc = _apt(["install", "-y", "--no-install-recommends", *missing], timeout=900)
    except subprocess.TimeoutExpired as exc:
        report.error = f"apt-get timed out: {exc}"
        return report
    if proc.returncode != 0:
        report.error = f"apt-get install failed: {proc.stderr.strip()[-500:]}"
    report.installed = [p for p in missing if is_installed(p)]
    return report
