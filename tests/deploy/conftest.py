"""Fixtures shared by the deployment tests."""

from __future__ import annotations

import asyncio

import pytest
import torch

from consortium.types import Layout, TensorSpec

LAYOUT = Layout((TensorSpec("w", (3,), torch.float32),))


@pytest.fixture()
def hub(tmp_path):
    """A hub on its own event loop, with an audit log and a 3-parameter model's layout."""
    pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")
    from consortium.deploy.audit import AuditLog
    from consortium.deploy.hub import Hub

    loop = asyncio.new_event_loop()
    audit = AuditLog(tmp_path / "audit.jsonl")
    h = Hub(loop, config_toml="", run_id="t", max_result_bytes=1 << 20, audit=audit)
    h.layout = LAYOUT
    yield h
    audit.close()
    loop.close()
