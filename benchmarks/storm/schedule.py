"""The storm's fault schedule: a pure function of the seed, the length and the node count,
so a run is replayed from the seed it printed (the same kinds, nodes, lengths and order).

Faults run one after another (each is attributed the outage, stalls and recovery that
follow it until the next one starts): each holds for `duration` seconds, is then undone,
and the mesh gets `settle` seconds before the next. A default run repeats shuffled rounds
of every kind until the minutes are used; `--quick` runs one round of QUICK_KINDS with
shorter holds.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

# What each kind does (rig.py applies it); the key is the name in results and tables.
KINDS: dict[str, str] = {
    "agent_kill": "one node's agent SIGKILLed, started again after `duration`",
    "agent_term": "one node's agent stopped with SIGTERM, started again after `duration`",
    "vpp_kill": "one node's VPP SIGKILLed and started fresh; its agent re-attaches the pods",
    "vpp_agent_stop": "one node's agent stopped, then its VPP; both back after `duration`",
    "peer_leave": "one node (agent stopped) taken out of the mesh file, put back after "
                  "`duration`",
    "torn_write": "the mesh file written half-way, completed after `duration`",
    "link_down": "one node's underlay link down for `duration` (5-30 s)",
    "netem": "30 % loss and 50 ms jitter towards one node on the underlay",
    "channel_drop": "UDP 4501 dropped on the underlay for longer than key_max_seconds",
    "kex_drop": "only key-exchange-sized channel datagrams (UDP length 79) dropped",
    "replay_spoof": "a burst of replayed channel datagrams, replayed and spoofed ESP",
    "clock_step": "one node's agent restarted with its wall clock stepped +-10 minutes",
}
# The NAT variant's own kind (`--nat`: the last node behind a NAT router).
NAT_KINDS: dict[str, str] = {
    "nat_flush": "the NAT router's connection tracking flushed (`conntrack -F`): its "
                 "mappings, and so the NAT node's public ports, start over",
}
# The datastore variant (`--datastore`: agents register in etcd): peer_leave goes
# through etcd (the node's record deleted), torn_write gives way to torn_record (etcd
# writes whole values: a bad value is what a client can leave), and etcd restarts,
# twice in every round.
DATASTORE_KINDS: dict[str, str] = {
    "etcd_restart": "etcd killed (SIGKILL) or stopped (SIGTERM), started again on its data "
                    "after `duration`",
    "torn_record": "a record cut half-way (invalid JSON) put beside one node's, completed "
                   "after `duration` (a copy that conflicts with that node's), then deleted",
}
DATASTORE_ROUND = ("etcd_restart", "etcd_restart", "torn_record")  # replaces torn_write
DATASTORE_QUICK_KINDS = ("agent_kill", "vpp_kill", "link_down", "kex_drop", "replay_spoof",
                         "clock_step", "peer_leave", *DATASTORE_ROUND)
DATASTORE_QUICK_MINUTES = 7.0  # three faults more than QUICK_KINDS
NODE_KINDS = {"agent_kill", "agent_term", "vpp_kill", "vpp_agent_stop", "peer_leave",
              "link_down", "netem", "clock_step"}
QUICK_KINDS = ("agent_kill", "vpp_kill", "link_down", "kex_drop", "replay_spoof",
               "clock_step", "torn_write")
CLOCK_STEP = 600.0  # seconds, either way
SETTLE = 30.0  # planned seconds after each fault for the mesh to come back


@dataclass(frozen=True)
class Fault:
    kind: str
    node: int  # 1-based node index (the victim; for mesh-wide kinds, whose record is torn)
    duration: float  # seconds the fault holds
    param: float = 0.0  # clock_step: the step in seconds; etcd_restart: the signal
    planned_at: float = 0.0  # seconds from the storm's start, as planned

    def describe(self) -> str:
        extra = f", step {self.param:+.0f} s" if self.kind == "clock_step" else \
            f", {'SIGKILL' if self.param == 9 else 'SIGTERM'}" \
            if self.kind == "etcd_restart" else ""
        where = f"n{self.node}" if self.kind in NODE_KINDS else "the underlay" \
            if self.kind in ("channel_drop", "kex_drop", "replay_spoof") else \
            "the NAT router" if self.kind in NAT_KINDS else "etcd" \
            if self.kind == "etcd_restart" else f"the datastore (beside n{self.node}'s)" \
            if self.kind == "torn_record" else "the mesh file"
        held = f" for {self.duration:.0f} s" if self.duration else ""
        return f"{self.kind} on {where}{held}{extra}"


def duration_of(kind: str, rng: random.Random, *, quick: bool, key_max_seconds: int) -> float:
    """How long one fault of `kind` holds (drawn from `rng`)."""
    if kind == "link_down":
        return float(rng.randint(5, 30 if not quick else 15))
    if kind == "netem":
        return 30.0 if quick else 60.0
    if kind == "channel_drop":
        return float(key_max_seconds + 20)
    if kind == "kex_drop":
        return 20.0 if quick else float(rng.randint(30, 90))
    if kind in ("vpp_agent_stop", "peer_leave", "etcd_restart"):
        return float(rng.randint(5, 20 if not quick else 10))
    if kind == "clock_step":
        return 30.0 if quick else 60.0
    if kind in ("torn_write", "torn_record"):
        return float(rng.randint(3, 10))
    if kind == "replay_spoof":
        return 5.0
    if kind in ("vpp_kill", "nat_flush"):
        return 0.0  # killed and started again at once (a crash and its supervisor)
    return float(rng.randint(1, 5))  # agent restarts and VPP kills: downtime before start


def build(seed: int, *, minutes: float, nodes: int, quick: bool = False,
          key_max_seconds: int = 60, settle: float = SETTLE, nat: bool = False,
          datastore: bool = False) -> list[Fault]:
    """The faults of a run, in order, from the seed alone (with the run's shape); `nat`
    adds NAT_KINDS to every round, `datastore` the datastore's kinds in place of
    torn_write (a run without them replays as before)."""
    rng = random.Random(seed)
    budget = minutes * 60.0
    faults: list[Fault] = []
    at = 0.0
    while True:
        kinds = round_kinds(quick=quick, nat=nat, datastore=datastore)
        rng.shuffle(kinds)
        added = False
        for kind in kinds:
            duration = duration_of(kind, rng, quick=quick, key_max_seconds=key_max_seconds)
            node = rng.randint(1, nodes)
            param = rng.choice((-CLOCK_STEP, CLOCK_STEP)) if kind == "clock_step" else \
                float(rng.choice((9, 15))) if kind == "etcd_restart" else 0.0
            if at + duration + settle > budget and faults:
                continue
            faults.append(Fault(kind, node, duration, param, round(at, 1)))
            at += duration + settle
            added = True
        if quick or not added:
            return faults


def round_kinds(*, quick: bool, nat: bool, datastore: bool) -> list[str]:
    """The kinds of one round, before shuffling."""
    if datastore:
        kinds = list(DATASTORE_QUICK_KINDS) if quick else \
            [k for k in KINDS if k != "torn_write"] + list(DATASTORE_ROUND)
    else:
        kinds = list(QUICK_KINDS if quick else KINDS)
    return kinds + (list(NAT_KINDS) if nat else [])


def as_dicts(faults: list[Fault]) -> list[dict[str, object]]:
    return [asdict(f) for f in faults]
