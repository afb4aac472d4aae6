"""The agreement of key generations with the peers' agents, as one run sees it.

A run (node.up) goes down one way: view -> keying decision -> plan -> reconcile ->
commit. Its agreement says what the peers said, which of this node's generations are
offered, and after the reconcile what VPP now holds; `NoAgreement` (a one-shot `up`,
or an agent without the channel) says nothing and keys follow the static schedule, the
agents' channel (channel_agreement.ChannelAgreement) agrees ephemeral keys.

Nonces stay safe only if a generation about to be offered is marked agreed on disk
before any peer hears of it: an agent that restarts after the offer must never install
that generation with its static key. That order is held by the types: `claim()` returns
the run's Claim, `save_state()` alone turns a Claim into Saved (after writing the
generation file), and `flush()`, which sends, takes only the Saved of the agreement's
latest claim (anything else raises UnsavedClaim).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, final

from vppmesh.agent.nat import ported_view, saved_ports
from vppmesh.keying.book import KeyBook

if TYPE_CHECKING:
    from vppmesh.dataplane.view import LocalView, PeerView
    from vppmesh.dataplane.vpp.ipsec import SaState
    from vppmesh.keying.epochs import GenerationState, GenerationStore, PeerSaid


class UnsavedClaim(RuntimeError):
    """Peers were to be told of generations not yet claimed on disk."""


@final
class Claim:
    """The generations a run is about to offer (peer name -> generation), marked agreed
    in the run's generation state but not yet on disk."""

    def __init__(self, wants: Mapping[str, int]) -> None:
        self.wants: Mapping[str, int] = MappingProxyType(dict(wants))


_WRITTEN = object()


@final
class Saved:
    """Proof that a run's generation state, its Claim in it, is on disk: only
    save_state() makes one."""

    def __init__(self, claim: Claim, text: str, written: object) -> None:
        if written is not _WRITTEN:
            raise TypeError("a Saved is made by save_state() only, after the state is written")
        self.claim = claim
        self.text = text  # the state as saved (GenerationStore.text)


def save_state(store: GenerationStore, state: GenerationState, before: str | None,
               claim: Claim) -> Saved:
    """Write the run's generation state (when its text changed from `before`, as loaded):
    from here on, the generations `claim` offers are agreed on disk."""
    text = store.text(state)
    if text != before:
        store.save(state, text)
    return Saved(claim, text, _WRITTEN)


class Agreement:
    """What node.up asks of the agreement, in the order it asks it: clock, follow_keys,
    learned_view, book (observe_keys: offering), watch_flows, said; then claim, applied,
    and once the state is saved, flush."""

    book: KeyBook  # the SA keys of agreed generations (adopted from VPP without the channel)
    clock: Callable[[], float]  # the node's clock: the run's `now`

    # Whether nothing the agreement knows of happened since its last run, so that a run
    # whose other inputs are unchanged may reuse the last plan (node.QuietRuns).
    settles: bool = False
    _claim: Claim | None = None

    def quiet(self) -> None:
        """A run that reused the last plan (node.QuietRuns): nothing is claimed, applied
        or sent; keep what must be kept on every run anyway."""

    def follow_keys(self, view: LocalView, state: GenerationState) -> None:
        """A peer's public key changed: keep the agreed keys it vouches for."""

    def learned_view(self, view: LocalView, state: GenerationState) -> LocalView:
        """`view` whose paths to peers behind NAT send where their NATs map to (the
        ports an agent learned, from the generation file)."""
        return ported_view(view, saved_ports(view, state))

    def offering(self, peer: int, generation: int) -> bool:
        """An offer of our outbound `generation` to `peer` awaits its answer."""
        return False

    def peer_marks(self, view: LocalView) -> Mapping[str, object] | None:
        """Per peer, what the agreement feeds into its key decision besides `said`
        (keying/settled.py compares it with the last run's; a peer absent: nothing).
        None: something node-wide happened since the last run (a new channel, a restart
        to announce, a vouch awaited): every peer is decided again."""
        return {}

    def watch_flows(self, sas: Mapping[int, SaState], packets: Mapping[int, int] | None,
                    ) -> list[int]:
        """Behind NAT: probe the pairs whose ESP gets no answer. Returns those probed."""
        return []

    def said(self, view: LocalView, peers: Iterable[PeerView] | None = None,
             ) -> dict[str, PeerSaid]:
        """What each peer's agent said (of `peers`, by default the view's), for
        epochs.schedule (nothing: no channel)."""
        return {}

    @final
    def claim(self, state: GenerationState, wants: Mapping[str, int]) -> Claim:
        """Before the state is saved: the generations about to be offered are marked
        agreed in `state`, so none of them is ever used with its static key."""
        claim = self._claim = Claim(wants)
        self._mark(state, claim.wants)
        return claim

    def _mark(self, state: GenerationState, wants: Mapping[str, int]) -> None:
        """Mark `wants` agreed (nothing is offered without the channel)."""

    def applied(self, claim: Claim, view: LocalView, state: GenerationState,
                installed: Mapping[str, tuple[int, ...]]) -> list[tuple[bytes, int]]:
        """After a successful run (VPP holds the plan), before the state is saved:
        record what VPP holds and queue what the peers are told. `installed`: the
        inbound generations the run installed, per peer. Returns the outbound keys
        retired, (key, salt): the used-key ledger forgets them."""
        return []

    @final
    def flush(self, saved: Saved) -> None:
        """Send what applied() queued, once the claim is on disk (`saved`)."""
        if not isinstance(saved, Saved) or saved.claim is not self._claim:
            raise UnsavedClaim("the peers are told of generations only after the generation "
                               "state that claims them is saved (save_state)")
        self._claim = None
        self._send()

    def _send(self) -> None:
        """Send what applied() queued (nothing without the channel)."""


class NoAgreement(Agreement):
    """No channel (a one-shot `up`, `rekey`, or an agent without the channel): keys
    follow the static schedule, and agreed keys an agent left in VPP are adopted. One per
    run: its key book holds only what that run adopted."""

    settles = True

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.book = KeyBook()
