"""Zoo tests run offline: the hub variables set, and any socket to another host refused."""

from __future__ import annotations

import socket

import pytest

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture
def no_network(monkeypatch):
    """Offline hub variables, and ``socket.create_connection`` refused (use it per test module)."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)

    def refuse(*args, **kwargs):
        raise OSError(f"network access in a test: {args[:1]}")

    monkeypatch.setattr(socket, "create_connection", refuse)
