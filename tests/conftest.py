"""Shared fixtures. The helpers tests share live in vppmesh/testing (imported by name)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vppmesh.config import Mesh
from vppmesh.keying.keys import NodeSecrets

# Assertions in the shared test helpers are reported like those in the tests.
pytest.register_assert_rewrite("vppmesh.testing")


@pytest.fixture
def mesh3() -> tuple[Mesh, dict[str, NodeSecrets]]:
    from vppmesh.testing.meshes import make_mesh

    return make_mesh(3)


@pytest.fixture(autouse=True, scope="session")
def core_dumps_left_to_pytest() -> Iterator[None]:
    """Every process that loads a private key forbids its own core dumps
    (vppmesh/agent/hardening.py); the tests load keys in pytest's own process, which stays as
    it was (test_keys checks the real thing in a subprocess)."""
    from vppmesh.agent import hardening

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hardening, "forbid_core_dumps", lambda: None)
        yield
