"""The systemd unit `vppmesh install-unit` writes: is it there, does it run; stop, remove.

`down --stop-agent` stops the agent through systemd rather than by asking it to exit:
the unit's Restart=always would start an agent that merely exited again within
RestartSec, and it would put the mesh back. `uninstall` disables and removes it.
Every systemctl call goes through systemctl() (the tests replace it).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vppmesh.errors import VppMeshError

SYSTEMD_RUNNING = Path("/run/systemd/system")  # sd_booted(3): systemd is PID 1
# Where install-unit writes the unit (cli/service.py's UNIT_PATH; the commands that only
# read it take it from here, so they need not import install-unit's module).
UNIT_FILE = Path("/etc/systemd/system/vppmesh.service")


def systemctl(*args: str) -> subprocess.CompletedProcess[str] | None:
    """systemctl ARGS; None where systemd does not run (a container): no unit runs there,
    its file is only a file."""
    if shutil.which("systemctl") is None or not SYSTEMD_RUNNING.is_dir():
        return None
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False,
                          timeout=120)


@dataclass(frozen=True)
class Unit:
    """The unit file install-unit wrote (its name is the file's: vppmesh.service)."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    def installed(self) -> bool:
        return self.path.exists()

    def active(self) -> bool:
        done = systemctl("is-active", "--quiet", self.name)
        return done is not None and done.returncode == 0

    def stop(self) -> None:
        self._run("stop", self.name)

    def disable_now(self) -> None:
        """Stopped and no longer started at boot."""
        self._run("disable", "--now", self.name)

    def remove(self) -> None:
        """The unit file gone and systemd told (a unit whose file is gone stays loaded)."""
        self.path.unlink(missing_ok=True)
        systemctl("daemon-reload")

    @staticmethod
    def _run(*args: str) -> None:
        done = systemctl(*args)
        if done is not None and done.returncode != 0:
            raise VppMeshError(f"systemctl {' '.join(args)} failed: "
                               f"{(done.stderr or done.stdout).strip()}")
