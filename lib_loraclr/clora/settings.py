"""CLoRA script settings: one frozen dataclass, its infotext form and its API (dict) form.

The WebUI hands scripts their UI values as ``*args``; every hook turns them into
:class:`CloraSettings` on its first line (from the UI's positional order or, for the API, one
dict), so the rest of the code never indexes an argument list.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from lib_loraclr.clora.attention import MAP_LEVEL_CHOICES
from lib_loraclr.errors import LoraClrError

MORPHOLOGY = ("none", "erode", "dilate", "open", "close")
# How each latent update is sized: the reference's fixed step on the gradient ("paper"), a step
# that moves the latent by a fixed fraction of its own norm ("relative"), or no update at all,
# only the masked fusion ("masks-only": no gradient pass, the cheapest mode).
STEP_MODES = ("paper", "relative", "masks-only")
INFOTEXT_KEY = "CLoRA"


class SettingsError(LoraClrError, ValueError):
    """A CLoRA setting out of range or of the wrong type."""


@dataclass(frozen=True)
class CloraSettings:
    """Defaults are the CLoRA reference's (paper: 50 DDIM steps, guidance 7.5)."""

    enabled: bool = False
    step_size: float = 20.0
    max_step: int = 25
    refine_steps: tuple[int, ...] = (0, 10, 20)
    refine_iterations: int = 20
    temperature: float = 0.5
    mask_threshold: float = 0.4
    mask_from_step: int = 0
    morphology: str = "none"
    reuse_prediction: bool = True
    cond_only_loss: bool = False
    show_masks: bool = False
    step_mode: str = "paper"
    relative_step: float = 0.03  # ||update|| / ||latent|| per update, with step_mode "relative"
    map_level: str = "auto"  # attention-map resolution: see lib_loraclr.clora.attention.MAP_LEVELS

    def __post_init__(self) -> None:
        checks = [
            (0.0 <= self.step_size <= 1000.0, f"step size {self.step_size} is outside 0..1000"),
            (0 <= self.max_step <= 1000, f"max step {self.max_step} is outside 0..1000"),
            (
                0 <= self.refine_iterations <= 200,
                f"refinement iterations {self.refine_iterations} is outside 0..200",
            ),
            (0.01 <= self.temperature <= 10.0, f"temperature {self.temperature} is outside 0.01..10"),
            (
                0.0 < self.mask_threshold < 1.0,
                f"mask threshold {self.mask_threshold} must be between 0 and 1",
            ),
            (0 <= self.mask_from_step <= 1000, f"mask-from step {self.mask_from_step} is outside 0..1000"),
            (
                self.morphology in MORPHOLOGY,
                f"morphology {self.morphology!r} is not one of {', '.join(MORPHOLOGY)}",
            ),
            (
                self.step_mode in STEP_MODES,
                f"step mode {self.step_mode!r} is not one of {', '.join(STEP_MODES)}",
            ),
            (0.0 < self.relative_step <= 1.0, f"relative step {self.relative_step} is outside (0, 1]"),
            (
                self.map_level in MAP_LEVEL_CHOICES,
                f"map level {self.map_level!r} is not one of {', '.join(MAP_LEVEL_CHOICES)}",
            ),
            (
                all(0 <= s <= 1000 for s in self.refine_steps),
                f"refinement steps {self.refine_steps} must be in 0..1000",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(f"CLoRA: {message}")

    @property
    def updates_latents(self) -> bool:
        """Whether the contrastive latent update runs at all (not in masks-only mode, nor with a
        zero paper step)."""
        return self.step_mode != "masks-only" and (self.step_mode == "relative" or self.step_size > 0)

    # -- UI / API --------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_args(cls, args: Sequence[Any]) -> CloraSettings:
        """From the script's ``*args``: the UI's positional values, or a dict as the FIRST value (API).

        The WebUI's API fills a script's argument slots with the UI defaults and then overwrites
        the first ``len(request args)`` of them, so an API call that sends ``[{...}]`` reaches us
        as ``({...}, default, default, ...)``: the dict wins and the trailing defaults are ignored.
        """
        if args and isinstance(args[0], Mapping):
            return cls.from_dict(args[0])
        if not args:
            return cls()
        if _spelled_out(args):
            raise SettingsError(
                "CLoRA: the script's args must be a list, e.g. "
                '"args": [{"enabled": true, "step_size": 20}]; a string was given, which the WebUI '
                f"hands over one character at a time ({', '.join(map(repr, args[:4]))}, ...)"
            )
        if len(args) > len(cls.field_names()):
            raise SettingsError(
                f"CLoRA: {len(args)} arguments given, at most {len(cls.field_names())} expected "
                f"({', '.join(cls.field_names())}); or pass one dict"
            )
        return cls.from_dict(dict(zip(cls.field_names(), args, strict=False)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CloraSettings:
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise SettingsError(
                f"CLoRA: unknown setting(s) {', '.join(unknown)}; known: {', '.join(cls.field_names())}"
            )
        converted: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in values or values[f.name] is None:
                continue
            converted[f.name] = _convert(f.name, f.default, values[f.name])
        return cls(**converted)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["refine_steps"] = list(self.refine_steps)
        return data

    # -- infotext --------------------------------------------------------------------------------
    def infotext(
        self,
        bindings: Sequence[Mapping[str, Any]] = (),
        per_image: Sequence[Sequence[Mapping[str, Any]]] | None = None,
    ) -> str:
        """A compact JSON value for ``p.extra_generation_params['CLoRA']``: only what differs
        from the defaults, plus the bindings (LoRA, weight, subject, trigger); when the images of
        a job have different bindings, ``per_image`` gives each image's (``bindings_per_image``)."""
        default = CloraSettings(enabled=True).to_dict()
        data = {k: v for k, v in self.to_dict().items() if k != "show_masks" and default.get(k) != v}
        data.pop("enabled", None)
        if bindings:
            data["bindings"] = [dict(b) for b in bindings]
        if per_image is not None:
            data["bindings_per_image"] = [[dict(b) for b in image] for image in per_image]
        return json.dumps(data, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_infotext(cls, text: str) -> CloraSettings:
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError):
            raise SettingsError(f"CLoRA infotext is not valid JSON: {text!r}") from None
        if not isinstance(data, dict):
            raise SettingsError(f"CLoRA infotext is not an object: {text!r}")
        data.pop("bindings", None)
        data.pop("bindings_per_image", None)
        return cls.from_dict({**data, "enabled": True})

    @classmethod
    def paste_value(cls, params: Mapping[str, Any], name: str) -> Any:
        """The value of UI field ``name`` from parsed infotext ``params`` (``None``: leave the field).

        Pasting an infotext without a CLoRA entry turns "enable" off (so a plain image's parameters
        do not run CLoRA); the other fields keep their values. Tuples become the text box's form.
        """
        if INFOTEXT_KEY not in params:
            return False if name == "enabled" else None
        value = getattr(cls.from_infotext(params[INFOTEXT_KEY]), name)
        return ",".join(map(str, value)) if isinstance(value, tuple) else value


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _spelled_out(args: Sequence[Any]) -> bool:
    """The API's slots filled from a string: the host indexes ``args`` and so gives a string's
    characters one by one; the UI's first value is the Enable checkbox, never a 1-character text."""
    return isinstance(args[0], str) and len(args[0]) == 1 and args[0] not in _TRUE + _FALSE


def _convert(name: str, default: Any, value: Any) -> Any:
    """One setting from the UI or the API, refusing what only looks like a value (a string
    that is no boolean must not silently mean "off"; JSON ``true`` is no number)."""
    try:
        if isinstance(default, bool):
            return _boolean(value)
        if isinstance(default, tuple):
            items = value.replace(";", ",").split(",") if isinstance(value, str) else value
            return tuple(_integer(v) for v in items if not isinstance(v, str) or v.strip())
        if isinstance(value, bool):
            raise TypeError(name)
        if isinstance(default, int):
            return _integer(value)
        if isinstance(default, float):
            return float(value)
        if not isinstance(value, str):
            raise TypeError(name)
        return value
    except (TypeError, ValueError, OverflowError):
        raise SettingsError(
            f"CLoRA: setting {name}={value!r} has the wrong type (expected like {default!r})"
        ) from None


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(value)
    number = float(value)
    if number != int(number):
        raise ValueError(value)
    return int(number)


def _boolean(value: Any) -> bool:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(value)
