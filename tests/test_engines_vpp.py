"""Crypto engine choice against a real VPP: the CLI views parse, handlers move, status warns."""

from __future__ import annotations

from pathlib import Path

import pytest

from vppmesh.dataplane import engines
from vppmesh.dataplane.vpp import crypto
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.errors import ConfigError
from vppmesh.lab.testbed import single_vpp
from vppmesh.ops.status import crypto_status
from vppmesh.testing.vpp_helpers import require_vpp

pytestmark = [pytest.mark.vpp, pytest.mark.root]
VAES = frozenset({"aes", "avx2", "vaes", "vpclmulqdq"})
NO_VAES = frozenset({"aes", "avx2", "pclmulqdq"})


def test_engines_on_a_real_vpp() -> None:
    require_vpp()
    with single_vpp("vmg-", Path("/run/vppmesh-engines")) as instance, \
            VppClient(instance.api_socket).connect() as api:
        state = crypto.read_state(api)
        assert state.handlers is not None, "no handler row for vppmesh's AES-GCM"
        assert "native" in state.handlers.candidates and state.active == "native"
        # The startup profile's debug logging makes the native engine's choice visible.
        assert state.native_variant in crypto.NATIVE_GCM_VARIANTS.values()
        # A named engine moves the single-buffer ops, and the chained ones where it has them.
        choice = engines.ensure(api, "openssl")
        assert choice.engine == "openssl" and choice.changes
        moved = crypto.read_handlers(api)
        assert moved is not None and (moved.simple, moved.chained) == ("openssl", "openssl")
        assert engines.ensure(api, "openssl").changes == []
        with pytest.raises(ConfigError, match="--crypto-engine nosuch"):
            engines.ensure(api, "nosuch")
        # auto: native when it runs VAES code or the CPU has none; else ipsecmb if loaded.
        chosen = engines.ensure(api, "auto", flags=NO_VAES).engine
        assert chosen == "native" and crypto.read_handlers(api).simple == "native"  # type: ignore[union-attr]
        chosen = engines.ensure(api, "auto", flags=VAES).engine
        expected = engines.choose(state.handlers.candidates, state.native_variant, VAES, "native")
        assert chosen == expected and crypto.read_handlers(api).simple == expected  # type: ignore[union-attr]
        status = crypto_status(api, flags=VAES)
        assert status is not None and status.engine == expected
        assert (status.warning is None) == (expected == "ipsecmb" or state.native_variant
                                            in crypto.VAES_VARIANTS)
