"""Shared fixtures: one seeded tiny SD1-architecture model per test session (built in code, no downloads)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model():
    from lib_loraclr.testing.tiny import build_tiny_model

    return build_tiny_model(seed=0)
