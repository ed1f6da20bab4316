"""The stand-in host itself: a plain txt2img runs through the real life-cycle order and is seeded."""

from __future__ import annotations

import importlib

import torch


def test_plain_txt2img_is_deterministic(host) -> None:
    processing = importlib.import_module("modules.processing")

    def run():
        p = processing.StableDiffusionProcessingTxt2Img(
            prompt="a cat <lora:ghibli:0.5>",
            negative_prompt="",
            seed=3,
            steps=3,
            width=64,
            height=64,
            sampler_name="Euler",
        )
        return processing.process_images(p)

    first, second = run(), run()
    assert len(first.images) == 1 and first.images[0].shape == (3, 64, 64)
    assert torch.equal(first.images[0], second.images[0])
    networks = importlib.import_module("networks")
    assert [n.name for n in networks.loaded_networks] == ["ghibli"]
