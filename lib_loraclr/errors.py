"""Errors a user can act on.

Every error names the file or value at fault and, where there is one, the fix; callers (the CLI,
the WebUI tab, the API) show ``str(error)`` as it is.
"""

from __future__ import annotations

from pathlib import Path


class LoraClrError(Exception):
    """Base class: something the user can fix (bad file, bad prompt, bad option)."""


class LoraFileError(LoraClrError, ValueError):
    """A LoRA or checkpoint file that cannot be used as asked."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path.name}: {problem}")


class ModelMismatchError(LoraClrError, ValueError):
    """A LoRA made for another base model family than the loaded one."""


class PromptError(LoraClrError, ValueError):
    """A prompt or binding that cannot be turned into CLoRA variants."""


class Interrupted(LoraClrError):
    """The user asked to stop; raised between steps so every patch unwinds through ``finally``."""
