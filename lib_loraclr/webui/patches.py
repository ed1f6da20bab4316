"""Temporary patches of host objects, each a context manager that restores in ``finally``.

A1111 calls no script hook when a generation fails, so cleanup cannot wait for ``postprocess``:
every patch here is scoped to the narrowest call we own (this generation's ``p.sample``) and
undone on the way out, whatever happens inside.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

_MISSING = object()


def _restore(obj: Any, name: str, previous: Any) -> None:
    """Put back an instance attribute (``_MISSING``: there was none, so the class's shows again)."""
    if previous is _MISSING:
        with contextlib.suppress(AttributeError):
            delattr(obj, name)
    else:
        setattr(obj, name, previous)


@contextlib.contextmanager
def patched_attribute(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``obj.name = value`` and put back exactly what was there (or nothing) afterwards."""
    previous = getattr(obj, "__dict__", {}).get(name, _MISSING)
    setattr(obj, name, value)
    try:
        yield
    finally:
        _restore(obj, name, previous)


@contextlib.contextmanager
def on_sampler_created(
    sd_samplers: Any, callback: Callable[[Any], None], first_only: bool = True
) -> Iterator[None]:
    """Call ``callback(sampler)`` for the sampler(s) this generation creates.

    ``modules.processing`` looks ``sd_samplers.create_sampler`` up at call time, so wrapping the
    module attribute for the duration of one ``p.sample`` reaches the sampler it creates (and,
    with ``first_only``, not the hires-fix pass's second sampler).
    """
    original = sd_samplers.create_sampler
    seen = []

    @functools.wraps(original)
    def create_sampler(*args: Any, **kwargs: Any) -> Any:
        sampler = original(*args, **kwargs)
        if not (first_only and seen):
            seen.append(sampler)
            callback(sampler)
        return sampler

    with patched_attribute(sd_samplers, "create_sampler", create_sampler):
        yield


def wrap_once(obj: Any, name: str, make_context: Callable[[], contextlib.AbstractContextManager]) -> None:
    """Replace ``obj.name`` by a wrapper that runs the original once inside ``make_context()``
    and then removes itself, also when the call fails."""
    original = getattr(obj, name)
    previous = obj.__dict__.get(name, _MISSING)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with make_context():
                return original(*args, **kwargs)
        finally:
            _restore(obj, name, previous)

    setattr(obj, name, wrapper)
