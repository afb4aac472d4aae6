"""Keep the agent's secrets out of core files and away from other processes.

An agent holds the node's private key, the PSK, the channel's ephemeral secrets and the
SA keys of the generations it agreed. A core file of the agent (a crash, SIGQUIT, a
`gcore` by a user of the same uid) would write them to disk, where forward secrecy no
longer protects them. So every process that loads the private key sets RLIMIT_CORE to
0 (no core file) and PR_SET_DUMPABLE to 0 (no core file whatever the limit, no ptrace
or /proc/PID/mem by non-root users of the same uid). Both are inherited across fork, the
limit also across exec: a program the agent starts writes no core file either (VPP's
`coredump-size` raises it again when the operator asked for core files).
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import sys

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def forbid_core_dumps() -> None:
    """Best effort, idempotent: what the kernel refuses is logged at debug level (the
    process then keeps running: refusing to start would not protect the keys more)."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        log.debug("cannot set RLIMIT_CORE to 0: %s", exc)
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            log.debug("cannot clear the dumpable flag: %s", os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        log.debug("cannot clear the dumpable flag: %s", exc)
