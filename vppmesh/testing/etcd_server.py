"""A throwaway etcd for tests (vppmesh/lab/etcd.py); without etcd the test is skipped."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from vppmesh.lab import etcd as lab
from vppmesh.lab.etcd import EtcdServer, TlsFiles, free_port, make_tls

__all__ = ["EtcdServer", "TlsFiles", "free_port", "make_tls", "require_etcd", "running_etcd"]


def require_etcd() -> str:
    found = lab.etcd_binary()
    if found is None:
        pytest.skip(lab.NO_ETCD)
    return found


@contextmanager
def running_etcd(*args: Any, **kwargs: Any) -> Iterator[EtcdServer]:
    require_etcd()
    with lab.running_etcd(*args, **kwargs) as server:
        yield server
