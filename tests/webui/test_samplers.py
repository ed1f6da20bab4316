"""Samplers and schedule types named as the host names them (A1111 1.8.0 and 1.9+)."""

from __future__ import annotations

import pytest

from lib_loraclr.webui import samplers


@pytest.mark.parametrize(
    "name, scheduler, expected",
    [
        ("DPM++ 2M Karras", None, ("DPM++ 2M", "Karras")),  # 1.8.0's combined name
        ("LMS Karras", None, ("LMS", "Karras")),
        ("DPM++ 2M", "Karras", ("DPM++ 2M", "Karras")),  # 1.9+: p.scheduler
        ("Euler a", "Align Your Steps", ("Euler a", "Align Your Steps")),
        ("Euler", None, ("Euler", "Automatic")),
        ("DPM++ 2M SDE Karras", None, ("DPM++ 2M SDE", "Karras")),
        ("My Sampler Karras", None, ("My Sampler Karras", "Automatic")),  # unknown: left as the host named it
    ],
)
def test_sampler_and_schedule(name, scheduler, expected) -> None:
    assert samplers.sampler_and_schedule(name, scheduler) == expected


def test_supported_and_messages_name_samplers_not_schedules() -> None:
    assert samplers.sampler_supported("DPM++ 2M Karras") and samplers.sampler_supported("LMS")
    assert samplers.sampler_supported("Heun") and samplers.sampler_supported("DPM++ SDE Karras")
    assert not samplers.sampler_supported("DPM fast") and samplers.sampler_supported("DDIM CFG++")
    assert not any("Karras" in name for name in samplers.SUPPORTED_SAMPLERS)
    message = samplers.unsupported_sampler_message("DPM adaptive")
    assert "'DPM adaptive' is not supported (adapts its steps" in message
    assert "DPM++ 2M, LMS, DDIM, DDIM CFG++, Heun" in message and "Karras" not in message.split(";")[1]
    assert "history" in samplers.unsupported_sampler_message("UniPC")
