"""The merge's memory plan for SDXL from headers alone: a full-size SDXL base checkpoint and 4 or 12
rank-32 kohya SDXL LoRAs of the default targets, all sparse files (real headers, no data written)."""

from __future__ import annotations

import json
import math

import pytest

from lib_loraclr.cli import main
from tests.sd15_reference import write_header_only_checkpoint
from tests.sdxl_reference import sdxl_kohya_modules, sdxl_ldm_shapes

GiB = 2**30


def _header_only_lora(path, rank: int = 32):
    """kohya's SDXL default targets (986 modules: UNet transformers, both towers) at ``rank``."""
    shapes = {}
    for name, kind, _, _, _, shape in sdxl_kohya_modules():
        if kind == "lora":
            shapes[f"{name}.lora_down.weight"] = (rank, shape[1])
            shapes[f"{name}.lora_up.weight"] = (shape[0], rank)
            shapes[f"{name}.alpha"] = ()
    return write_header_only_checkpoint(path, shapes)


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory):
    """The base and twelve LoRAs at ranks 8, 16 and 32 (the usual sizes of SDXL character LoRAs:
    about 55, 110 and 220 MB in fp16)."""
    folder = tmp_path_factory.mktemp("sdxl")
    base = write_header_only_checkpoint(folder / "sdxl.safetensors", sdxl_ldm_shapes())
    loras = {
        r: [_header_only_lora(folder / f"r{r}_{k}.safetensors", r) for k in range(12)] for r in (8, 16, 32)
    }
    return base, loras


def _estimate(base, loras, capsys, *rest: str) -> tuple[int, dict]:
    args = [
        "merge",
        "--base",
        str(base),
        *[a for p in loras for a in ("--lora", str(p))],
        "--estimate",
        "--json",
    ]
    code = main([*args, *rest])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("count", "rank"), [(4, 16), (4, 32), (12, 8)])
def test_estimate_on_full_sdxl_fits_24_gib_on_a_gpu(sdxl_files, capsys, count, rank) -> None:
    base, loras = sdxl_files
    code, plan = _estimate(base, loras[rank][:count], capsys, "--max-memory", "24GiB", "--device", "cuda")
    assert code == 0 and plan["fits"], plan["message"]
    assert plan["peak_bytes"] <= 24 * GiB and plan["concepts"] == count
    # every default target is planned: both towers (12 + 32 layers x 6), the 70 transformer blocks'
    # 140 cross-attention K/V, the other 582 attention-block layers
    assert {s: v["layers"] for s, v in plan["stages"].items()} == {"te": 264, "cross_kv": 140, "spatial": 582}
    # the CLI loads the whole model: about 3.5 billion values, fp16 on CUDA
    values = sum(math.prod(s) for s in sdxl_ldm_shapes().values())
    assert 3.3e9 < values < 3.6e9 and plan["breakdown"]["model"] == 2 * values
    # at 1024 px the sampling run's UNet takes the concepts a prompt and CFG half at a time when
    # all four at once would not fit (12 x 4 pictures of 128 x 128 latents)
    assert plan["spatial_batch"] == 4 * count if count == 4 else plan["spatial_batch"] < 4 * count


@pytest.mark.parametrize(("rank", "low", "high"), [(16, 24, 24.2), (32, 24.8, 27)])
def test_twelve_larger_sdxl_loras_need_just_over_24_gib_and_say_so(
    sdxl_files, capsys, rank, low, high
) -> None:
    """The limit as planned: every LoRA's factors count as held on the device (12 x 0.21 / 0.43 GiB
    in float32) beside the model (6.5 GiB) while the largest feed-forward layers are solved (at
    K = 12: 1280 -> 10240 needs 12.9 GiB, 5120 -> 1280 holds 4.7 GiB of statistics and needs
    10.4 GiB). The refusal names the layer and what to change."""
    base, loras = sdxl_files
    code, plan = _estimate(base, loras[rank], capsys, "--max-memory", "24GiB", "--device", "cuda")
    assert code == 3 and not plan["fits"]
    assert low * GiB < plan["peak_bytes"] < high * GiB
    assert "ff_net_" in plan["message"] and "merge fewer LoRAs" in plan["message"]
    code, plan = _estimate(base, loras[rank], capsys, "--max-memory", "28GiB", "--device", "cuda")
    assert code == 0 and plan["fits"]


def test_the_estimate_takes_sdxls_own_resolution(sdxl_files, capsys) -> None:
    """No --resolution: SDXL's 1024 px (a 128 x 128 latent), so a larger plan than at 512 px."""
    base, loras = sdxl_files
    common = ("--device", "cuda", "--max-memory", "24GiB")
    _, native = _estimate(base, loras[16][:4], capsys, *common)
    _, at_1024 = _estimate(base, loras[16][:4], capsys, *common, "--resolution", "1024")
    _, at_512 = _estimate(base, loras[16][:4], capsys, *common, "--resolution", "512")
    assert native == at_1024 and at_512["peak_bytes"] < native["peak_bytes"]
    assert at_512["spatial_batch"] == 4 * 4


def test_on_the_cpu_the_fp32_model_alone_takes_half_of_24_gib(sdxl_files, capsys) -> None:
    base, loras = sdxl_files
    code, plan = _estimate(base, loras[16][:4], capsys, "--max-memory", "24GiB", "--device", "cpu")
    assert code == 3 and plan["breakdown"]["model"] > 12.5 * GiB
    assert "model, LoRAs and offsets" in plan["message"]
