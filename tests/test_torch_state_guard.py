"""The suite's guard (tests/conftest.py) fails the test that leaves torch's global state changed,
restores the state, and so the tests after it run as on a fresh machine."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

PLANTED = """
import torch


def test_leaks_threads():
    torch.set_num_threads(1)


def test_leaks_the_default_dtype():
    torch.set_default_dtype(torch.float64)


def test_leaks_grad_mode():
    torch.set_grad_enabled(False)


def test_restores_what_it_changes(one_thread):
    assert torch.get_num_threads() == 1


def test_runs_as_on_a_fresh_machine():
    assert torch.get_default_dtype() == torch.float32 and torch.is_grad_enabled()
    assert torch.get_num_threads() == THREADS
"""


def test_the_guard_fails_the_leaking_tests_and_protects_the_next(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    threads = 2 if _threads() == 1 else _threads()  # so that setting one thread is a change
    (tmp_path / "test_planted.py").write_text(f"THREADS = {threads}\n" + PLANTED)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=_env(threads),
    )
    out = run.stdout
    assert run.returncode == 1, out
    assert "5 passed, 3 errors" in out, out  # the leaks pass, their teardown fails
    for leak, change in (
        ("test_leaks_threads", f"'num_threads': ({threads}, 1)"),
        ("test_leaks_the_default_dtype", "'default_dtype': (torch.float32, torch.float64)"),
        ("test_leaks_grad_mode", "'grad_enabled': (True, False)"),
    ):
        assert f"test_planted.py::{leak} changed torch's global state and left it so: {{{change}}}" in out, (
            out
        )


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _env(threads: int) -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).parents[1])}
