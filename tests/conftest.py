"""Shared fixtures: one seeded tiny SD1-architecture model per test session (built in code, no
downloads), a private copy of it for every test that changes a model, and a guard that fails the
test which leaves torch's process-wide state changed (instead of a later test that it breaks)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

# torch's process-wide settings a test may change only if it puts them back: name -> (read, write)
GLOBAL_TORCH_STATE: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {
    "num_threads": (torch.get_num_threads, torch.set_num_threads),
    "default_dtype": (torch.get_default_dtype, torch.set_default_dtype),
    "grad_enabled": (torch.is_grad_enabled, torch.set_grad_enabled),
    "inference_mode": (torch.is_inference_mode_enabled, lambda _: None),  # only a context sets it
    "deterministic": (
        lambda: (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ),
        lambda v: torch.use_deterministic_algorithms(v[0], warn_only=v[1]),
    ),
    "anomaly_detection": (torch.is_anomaly_enabled, torch.set_anomaly_enabled),
    "float32_matmul_precision": (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    "flush_denormal": (lambda: torch.empty(1).new_tensor([1e-40]).item() == 0.0, torch.set_flush_denormal),
}


def torch_state() -> dict[str, Any]:
    return {name: read() for name, (read, _) in GLOBAL_TORCH_STATE.items()}


def restore_torch_state(state: dict[str, Any]) -> None:
    for name, value in state.items():
        GLOBAL_TORCH_STATE[name][1](value)


@pytest.fixture(autouse=True)
def _torch_state_unchanged(request) -> Iterator[None]:
    """Fails the test that changes torch's global state and puts the state back, so the next test
    runs as on a fresh machine. (A suite once failed only in full: one test set one CPU thread, and
    a later one summed weights in another order and differed by 5e-7.)"""
    before = torch_state()
    yield
    after = torch_state()
    changed = {name: (before[name], after[name]) for name in before if before[name] != after[name]}
    if changed:
        restore_torch_state(before)
        pytest.fail(
            f"{request.node.nodeid} changed torch's global state and left it so: {changed} "
            "(before, after); restore it (for example with the one_thread fixture or try/finally)",
            pytrace=False,
        )


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``n`` CPU threads for a block, then the caller's again."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """One torch CPU thread for this test (a sampling test's numbers then do not depend on the
    machine's cores), restored afterwards."""
    with torch_threads(1):
        yield


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
