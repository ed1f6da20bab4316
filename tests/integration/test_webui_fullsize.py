"""CLoRA on a full-size SD1.5 checkpoint that the host builds from its STOCK config.

Opt-in twice over: needs SD_WEBUI_ROOT like the rest of tests/integration, and SD_WEBUI_FULLSIZE=1.
The tiny checkpoint of the other tests carries its own .yaml; here a random-weight checkpoint with
SD1.5's real widths (UNet 860 M, CLIP ViT-L/14 text tower, VAE) is written with no .yaml beside
it, so A1111 picks its own ``configs/v1-inference.yaml`` (1.8.0 builds the UNet with
``use_checkpoint: True``, i.e. ldm's gradient checkpointing as every user's SD1.5 gets it; 1.10
turns it off when it loads a config). The host needs the CLIP ViT-L/14 tokenizer and config in
its Hugging Face cache (docs/webui-integration-testing.md, step 4). The checkpoint (fp16, about
2 GB) lives in pytest's temporary folder, never in the repository; building it takes about 4 GB of
memory for a minute, the server about 5 GB.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from .conftest import decode_pixels, launch_webui, webui_root

pytestmark = pytest.mark.skipif(
    os.environ.get("SD_WEBUI_FULLSIZE") != "1",
    reason="set SD_WEBUI_FULLSIZE=1 (with SD_WEBUI_ROOT) to run CLoRA on a full-size random SD1.5",
)

TAGGED = "a <lora:tinyA:1> cat and a <lora:tinyB:1> dog"
PLAIN = "a photo of a cat and a dog"
SEED = 4242
STEPS = 3


def write_random_sd15(path, seed: int = 0) -> None:
    """A random-weight SD1.5 checkpoint in the ldm layout (fp16): the tiny model's seeded builder
    at SD1.5's own widths."""
    from lib_loraclr.sd.checkpoint import save_checkpoint
    from lib_loraclr.sd.configs import sd15_config
    from lib_loraclr.testing.tiny import build_tiny_model

    configs = {part: sd15_config(part) for part in ("unet", "text_encoder", "vae", "scheduler")}
    save_checkpoint(build_tiny_model(seed, configs=configs), path, dtype=torch.float16)


@pytest.fixture(scope="module")
def fullsize_webui(tmp_path_factory):
    root = webui_root()
    folder = tmp_path_factory.mktemp("fullsize-ckpt")
    checkpoint = folder / "random-sd15.safetensors"
    t0 = time.monotonic()
    with torch.inference_mode():
        write_random_sd15(checkpoint)
    print(f"\n[timing] full-size random SD1.5 written in {time.monotonic() - t0:.1f} s")
    assert not checkpoint.with_suffix(".yaml").exists()
    timeout = max(900.0, float(os.environ.get("SD_WEBUI_STARTUP_TIMEOUT", "300")))
    with launch_webui(root, checkpoint, tmp_path_factory.mktemp("webui-fullsize"), timeout) as server:
        yield server
    checkpoint.unlink(missing_ok=True)  # 2 GB: do not wait for pytest's temp-folder rotation


def test_fullsize_stock_config_clora_txt2img(fullsize_webui):
    webui = fullsize_webui
    log = webui.log_path.read_text(errors="replace")
    # the host built the model from its own stock config, not from a sidecar
    assert "v1-inference.yaml" in log, webui.log_tail()

    plain_before = decode_pixels(webui.txt2img(prompt=PLAIN, seed=SEED, steps=STEPS)["images"][0])
    t0 = time.monotonic()
    result = webui.txt2img(
        prompt=TAGGED,
        seed=SEED,
        steps=STEPS,
        alwayson_scripts={"CLoRA composition": {"args": [{"enabled": True}]}},
    )
    clora_s = time.monotonic() - t0
    img = decode_pixels(result["images"][0])
    assert img.shape == (64, 64, 3)
    assert "clora" in result["info"].lower(), result["info"][:2000]
    print(
        f"\n[timing] full-size SD1.5 on A1111 {webui.version}: start-up {webui.startup_s:.1f} s, "
        f"CLoRA 64x64 {STEPS} Euler steps {clora_s:.1f} s"
    )
    # nothing left patched
    after = decode_pixels(webui.txt2img(prompt=PLAIN, seed=SEED, steps=STEPS)["images"][0])
    np.testing.assert_array_equal(after, plain_before)
