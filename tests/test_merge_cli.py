"""The ``merge`` command: the memory plan from headers (full-size SD1.5, twelve LoRAs), a merge of
the tiny checkpoint with a report, and the model-level report against what it must say."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from lib_loraclr.cli import main
from lib_loraclr.lora.file import load_lora
from lib_loraclr.lora.safetensors_io import read_header
from lib_loraclr.merge.engine import MergeConfig, merge_loras
from lib_loraclr.sd.checkpoint import load_checkpoint, save_checkpoint
from lib_loraclr.testing import synthetic_loras as sl
from tests.sd15_reference import kohya_modules, ldm_shapes, write_header_only_checkpoint


def _header_only_lora(path, rank: int = 32):
    """A kohya LoRA of SD1.5's default targets whose data is a sparse hole (the header is real)."""
    shapes = {}
    for name, kind, _, shape in kohya_modules():
        if kind != "lora":
            continue
        tail = tuple(shape[2:])
        shapes[f"{name}.lora_down.weight"] = (rank, shape[1], *tail)
        shapes[f"{name}.lora_up.weight"] = (shape[0], rank, *((1, 1) if tail else ()))
        shapes[f"{name}.alpha"] = ()
    return write_header_only_checkpoint(path, shapes)


@pytest.fixture(scope="module")
def sd15_with_twelve(tmp_path_factory):
    """A full-size SD1.5 checkpoint and twelve rank-32 kohya LoRAs, headers only (sparse files)."""
    folder = tmp_path_factory.mktemp("sd15")
    base = write_header_only_checkpoint(folder / "sd15.safetensors", ldm_shapes())
    return base, [_header_only_lora(folder / f"l{k}.safetensors") for k in range(12)]


def _merge_args(base, loras, *rest: str) -> list[str]:
    return ["merge", "--base", str(base), *[a for p in loras for a in ("--lora", str(p))], *rest]


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_estimate_twelve_loras_on_full_sd15_fits_24_gib(sd15_with_twelve, capsys, device) -> None:
    base, loras = sd15_with_twelve
    assert (
        main(_merge_args(base, loras, "--estimate", "--json", "--max-memory", "24GiB", "--device", device))
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["peak_bytes"] <= 24 * 2**30 and plan["budget_bytes"] == 24 * 2**30
    assert plan["device"] == device and plan["concepts"] == 12 and plan["passes"] > 3
    assert {s: v["layers"] for s, v in plan["stages"].items()} == {"te": 72, "cross_kv": 32, "spatial": 160}
    assert plan["breakdown"]["model"] > 1.5e9 * (2 if device == "cpu" else 1)  # the CLI loads the model


def test_estimate_that_cannot_fit_says_what_to_change(sd15_with_twelve, tmp_path, capsys) -> None:
    base, loras = sd15_with_twelve
    common = _merge_args(base, loras, "--max-memory", "4GB", "--device", "cuda")
    assert main([*common, "--estimate"]) == 3
    text = capsys.readouterr().out
    assert "does NOT fit" in text and "Raise the memory limit" in text
    assert main([*common, "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "Raise the memory limit" in capsys.readouterr().err and not (tmp_path / "m.safetensors").exists()


def test_merge_command_writes_the_checkpoint_and_the_report(tmp_path, tiny_model, capsys) -> None:
    base = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny_model, base)
    targets = sl.standard_targets(sl.layer_shapes(tiny_model.layer_map()))
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"c{k}.safetensors")
        sl.write_kohya_lora(paths[-1], targets, rank=4, alpha=4.0, seed=60 + k, scale=0.1)
    out, report = tmp_path / "merged.safetensors", tmp_path / "report.json"
    args = [
        "merge",
        "--base",
        str(base),
        "--lora",
        f"{paths[0]}:0.8",
        "--lora",
        str(paths[1]),
        "--concept",
        "sks cat",
        "--concept",
        "zwx dog",
        "--out",
        str(out),
        "--report",
        str(report),
        "--compare",
        "--steps",
        "2",
        "--resolution",
        "64",
        "--iterations",
        "5",
        "--device",
        "cpu",
        "--max-memory",
        "20GiB",
    ]
    assert main(args) == 0
    doc = json.loads(report.read_text())
    assert doc["method"] == "loraclr" and set(doc["methods"]) == {"loraclr", "lsq", "sum", "average"}
    assert [c["concept"] for c in doc["methods"]["loraclr"]["concepts"]] == ["sks cat", "zwx dog"]
    assert doc["methods"]["loraclr"]["memory_plan"]["fits"]
    meta = read_header(out).metadata
    sources = json.loads(meta["loraclr_sources"])
    assert [s["weight"] for s in sources] == [0.8, 1.0] and [s["concept"] for s in sources] == [
        "sks cat",
        "zwx dog",
    ]
    assert meta["loraclr_base"] == "tiny.safetensors"
    assert meta["loraclr_base_hash"] == hashlib.sha256(base.read_bytes()).hexdigest()[:10]
    merged = load_checkpoint(str(out))
    before = tiny_model.layer_map()["lora_unet_down_blocks_0_attentions_0_proj_in"].weight
    after = merged.layer_map()["lora_unet_down_blocks_0_attentions_0_proj_in"].weight
    assert not torch.allclose(before, after)
    assert "WORST" in capsys.readouterr().out
    # the same merge again: the same bytes (so the same sha256 and A1111 short hash)
    again = tmp_path / "again.safetensors"
    assert main([str(again) if a == str(out) else a for a in args]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_model_level_report_is_zero_for_the_lora_itself_and_large_for_the_base(tmp_path, tiny_model) -> None:
    """One LoRA merged by the naive sum is that LoRA: its noise prediction equals the LoRA's (0);
    an average of it with an opposite LoRA cancels it (1: as if absent)."""
    targets = sl.standard_targets(sl.layer_shapes(tiny_model.layer_map()))
    sl.write_kohya_lora(tmp_path / "a.safetensors", targets, rank=4, alpha=4.0, seed=70, scale=0.1)
    lora = load_lora(tmp_path / "a.safetensors")
    config = MergeConfig(concepts=("sks cat",), steps=1, resolution=64, iterations=1, model_level=True)
    alone = merge_loras(tiny_model, [lora], config, methods=["sum"])["sum"].report["model_level"]
    assert alone["worst"] < 1e-4, alone
    config2 = MergeConfig(
        concepts=("sks cat", "sks cat"), weights=(1.0, -1.0), steps=1, resolution=64, iterations=1
    )
    cancelled = merge_loras(tiny_model, [lora, lora], config2, methods=["sum"])["sum"].report["model_level"]
    assert cancelled["concepts"][0]["relative_eps_error"] == pytest.approx(1.0, rel=0.05)
