"""Fixtures every test module may use: an isolated configuration and free loopback ports."""

from __future__ import annotations

import os
import socket

import pytest


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch):
    """No test sees the developer's ICHNODE_* settings or config file."""
    for key in list(os.environ):
        if key.startswith("ICHNODE_"):
            monkeypatch.delenv(key, raising=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def settings(tmp_path):
    """Embedded-mode settings with everything under a temporary folder."""
    from node.config import Settings

    return Settings(storage={"root": tmp_path / "var", "min_free_mb": 0},
                    dicom={"port": free_port()})
