"""Shared fixtures: one seeded tiny SD1-architecture model per test session (built in code, no
downloads), and a private copy of it for every test that changes a model."""

from __future__ import annotations

import copy

import pytest


@pytest.fixture(scope="session")
def tiny_model():
    """Read-only: shared by every test of the session, so a test that changes its weights, hooks or
    flags would change what later tests see; such tests take :func:`own_tiny_model`."""
    from lib_loraclr.testing.tiny import build_tiny_model

    return build_tiny_model(seed=0)


@pytest.fixture()
def own_tiny_model(tiny_model):
    """This test's own copy of the tiny model (the session's stays as it was built)."""
    return copy.deepcopy(tiny_model)
