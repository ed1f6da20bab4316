"""CLoRA settings: UI args, API dict and infotext give the same frozen config; bad values are named."""

from __future__ import annotations

import pytest

from lib_loraclr.clora.settings import CloraSettings, SettingsError


def test_defaults_are_the_reference() -> None:
    s = CloraSettings()
    assert (
        s.step_size,
        s.max_step,
        s.refine_steps,
        s.refine_iterations,
        s.temperature,
        s.mask_threshold,
    ) == (
        20.0,
        25,
        (0, 10, 20),
        20,
        0.5,
        0.4,
    )


def test_positional_dict_and_infotext_round_trip() -> None:
    names = CloraSettings.field_names()
    s = CloraSettings(
        enabled=True,
        step_size=10.0,
        refine_steps=(0, 5),
        morphology="open",
        step_mode="relative",
        map_level="W/16",
    )
    positional = CloraSettings.from_args([s.to_dict()[n] for n in names])
    assert positional == s
    assert (
        CloraSettings.from_args(
            [
                {
                    "enabled": True,
                    "step_size": "10",
                    "refine_steps": "0, 5",
                    "morphology": "open",
                    "step_mode": "relative",
                    "map_level": "W/16",
                }
            ]
        )
        == s
    )
    text = s.infotext([{"lora": "corgi", "weight": 0.8, "subject": "dog", "trigger": "sks"}])
    assert '"bindings"' in text and '"step_size":10.0' in text
    assert CloraSettings.from_infotext(text) == s
    assert CloraSettings.from_args([]) == CloraSettings()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"mask_threshold": 1.5}, "mask threshold 1.5"),
        ({"morphology": "blur"}, "morphology 'blur'"),
        ({"temperature": 0}, "temperature 0"),
        ({"max_step": "many"}, "max_step='many' has the wrong type"),
        ({"colour": 1}, "unknown setting"),
        # what an API client sends by mistake: each is refused, none silently means "off"
        ({"enabled": True, "step_size": "big"}, "step_size='big' has the wrong type"),
        ({"enabled": True, "stepsize": 3}, "unknown setting.*stepsize"),
        ({"enabled": True, "refine_steps": "a,b"}, "refine_steps='a,b' has the wrong type"),
        ({"enabled": "nope"}, "enabled='nope' has the wrong type"),
        ({"enabled": 2}, "enabled=2 has the wrong type"),
        ({"enabled": True, "step_size": True}, "step_size=True has the wrong type"),
        ({"enabled": True, "max_step": 2.5}, "max_step=2.5 has the wrong type"),
        ({"enabled": True, "max_step": "1e999"}, "max_step='1e999' has the wrong type"),
        ({"enabled": True, "refine_steps": [0, True]}, "refine_steps=.0, True. has the wrong type"),
        ({"enabled": True, "morphology": 3}, "morphology=3 has the wrong type"),
        (
            {"enabled": True, "step_mode": "fast"},
            "step mode 'fast' is not one of paper, relative, masks-only",
        ),
        ({"enabled": True, "relative_step": 0}, r"relative step 0.0 is outside \(0, 1\]"),
        ({"enabled": True, "relative_step": 1.5}, r"relative step 1.5 is outside"),
        ({"enabled": True, "map_level": "W/64"}, "map level 'W/64' is not one of auto, W/32, W/16, W/8"),
    ],
)
def test_bad_values_are_named(values, message) -> None:
    with pytest.raises(SettingsError, match=message):
        CloraSettings.from_dict(values)
    with pytest.raises(SettingsError):
        CloraSettings.from_infotext("{not json")


@pytest.mark.parametrize(
    "text, enabled", [("true", True), ("On", True), ("1", True), ("no", False), ("0", False)]
)
def test_booleans_from_text(text, enabled) -> None:
    assert CloraSettings.from_dict({"enabled": text}).enabled is enabled


def test_positional_values_of_the_wrong_type_and_a_spelled_out_string() -> None:
    defaults = [CloraSettings().to_dict()[n] for n in CloraSettings.field_names()]
    with pytest.raises(SettingsError, match="step_size='x' has the wrong type"):
        CloraSettings.from_args([True, "x", 25, *defaults[3:]])
    # "args": "enabled" reaches the script as its characters, one per slot
    with pytest.raises(SettingsError, match="args must be a list.*'e', 'n', 'a', 'b'"):
        CloraSettings.from_args([*"enabled", *defaults[7:]])


def test_api_dict_first_then_host_defaults() -> None:
    """The WebUI's API fills the script's slots with UI defaults and overwrites the first ones with
    the request's ``args``: a dict in slot 0 arrives followed by defaults, and wins."""
    defaults = [CloraSettings().to_dict()[n] for n in CloraSettings.field_names()]
    s = CloraSettings.from_args([{"enabled": True, "step_size": 5}, *defaults[1:]])
    assert s.enabled and s.step_size == 5.0
    with pytest.raises(SettingsError, match="arguments given"):
        CloraSettings.from_args([*defaults, 1])


def test_paste_values_from_infotext() -> None:
    from lib_loraclr.clora.settings import INFOTEXT_KEY

    text = CloraSettings(enabled=True, refine_steps=(0, 5)).infotext(
        [{"lora": "corgi", "weight": 0.8, "subject": "dog", "trigger": ""}]
    )
    params = {INFOTEXT_KEY: text}
    assert CloraSettings.paste_value(params, "enabled") is True
    assert CloraSettings.paste_value(params, "refine_steps") == "0,5"
    assert CloraSettings.paste_value({}, "enabled") is False  # a plain image's parameters turn CLoRA off
    assert CloraSettings.paste_value({}, "step_size") is None  # ... and leave the rest alone
