"""Whether a pair runs on agreed (forward-secret) keys, each way, read from the generation
state alone: a run's result, `status` and the metrics read it the same way."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vppmesh.config import MeshSettings
    from vppmesh.keying.epochs import GenerationState


@dataclass(frozen=True)
class PairSecrecy:
    """Whether a pair runs on agreed (forward-secret) keys, each way: the generation
    this node sends on, and the one the peer's traffic arrives on; and what makes a
    stalled agreement visible: the outbound generation and since when it is used, since
    when the next one is being agreed, and since when (and why) the pair is stopped."""

    outbound: bool
    inbound: bool
    generation: int | None = None
    key_since: float | None = None
    agreeing_since: float | None = None
    stopped_since: float | None = None
    stopped_why: str | None = None
    channel_psk: str | None = None  # "ROLE ID" of the channel session's PSK (None: none)
    channel_key: str | None = None  # the role of this node's key it uses (None: none)
    channel_path: str | None = None  # the path of the last agreement (endpoint.py)

    @property
    def forward_secret(self) -> bool:
        return self.outbound and self.inbound

    def problems(self, settings: MeshSettings, now: float) -> list[str]:
        """What keeps this pair from being forward secret within its window now."""
        found = []
        if self.stopped_since is not None:
            found.append(f"stopped for {max(0.0, now - self.stopped_since):.0f} s "
                         f"({self.stopped_why}): no key may be used, its traffic is dropped")
        if self.agreeing_since is not None:
            found.append(f"agreement of the next key pending for "
                         f"{max(0.0, now - self.agreeing_since):.0f} s")
        window = forward_secrecy_window(settings)
        if self.outbound and self.key_since is not None and self.stopped_since is None \
                and now - self.key_since > window:
            found.append(f"agreed key {self.generation} is {now - self.key_since:.0f} s old, "
                         f"beyond the forward-secrecy window ({window:.0f} s)")
        return found


def forward_secrecy_window(settings: MeshSettings) -> float:
    """How long one agreed key may serve before its pair counts as stalled: the rekey
    period (at half of key_max_seconds when rekey_interval is 0), the receiver's grace,
    and a minute of round trips and poll periods."""
    period = settings.rekey_interval or settings.key_max_seconds / 2
    return period + settings.rekey_grace + 60.0


def pair_secrecy(state: GenerationState, peers: Iterable[str]) -> dict[str, PairSecrecy]:
    """Per peer, from the generation state alone (so `status` reads it from the file).

    Every agent run reports it, and at 1000 peers making the records cost more than
    the rest of a quiet run's result: a peer whose values are those of the last call
    takes that call's (immutable) record again."""
    global _last
    found, last, made = {}, _last, {}
    for name in peers:
        pg = state.peers.get(name)
        if pg is None:
            continue
        arriving = pg.in_seen if pg.in_seen is not None else pg.in_base
        values = (pg.out in pg.ephemeral_out, arriving in pg.ephemeral_in, pg.out,
                  pg.out_since, pg.agreeing_since, pg.stopped_since, pg.stopped_why,
                  pg.channel_psk, pg.channel_key, pg.channel_path)
        kept = last.get(name)
        if kept is None or kept[0] != values:
            kept = (values, PairSecrecy(*values))
        made[name] = kept
        found[name] = kept[1]
    _last = made
    return found


# pair_secrecy's last records, by peer: (the values each was made of, the record).
_last: dict[str, tuple[tuple[object, ...], PairSecrecy]] = {}
