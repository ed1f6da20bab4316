"""The merge end to end on the tiny model: methods ranked as expected, deterministic, model untouched,
writer round-trips with only merged tensors changed, atomic and never touching the base."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lib_loraclr.errors import Interrupted
from lib_loraclr.lora.file import load_lora
from lib_loraclr.merge.engine import MergeConfig, merge_loras
from lib_loraclr.merge.writer import export_lora, ldm_weight_key, write_merged_checkpoint
from lib_loraclr.sd.checkpoint import save_checkpoint
from lib_loraclr.testing import synthetic_loras as sl


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("merge")
    loras = sl.concept_loras(tiny_model, d, seeds=(20, 21, 22))
    config = MergeConfig(
        concepts=("sks cat", "zwx dog", "qrt hat"), steps=2, resolution=64, model_level=False
    )
    return d, loras, config


def _snapshot(model):
    return {k: v.clone() for part in (model.unet, model.text_encoder) for k, v in part.state_dict().items()}


def test_methods_rank_and_model_is_untouched(setup, tiny_model) -> None:
    _, loras, config = setup
    before = _snapshot(tiny_model)
    results = merge_loras(tiny_model, loras, config, methods=["loraclr", "lsq", "sum", "average"])
    after = _snapshot(tiny_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    worst = {m: r.report["worst_error"] for m, r in results.items()}
    assert worst["loraclr"] < worst["sum"] and worst["loraclr"] < worst["average"]
    assert worst["lsq"] <= worst["average"]
    assert len(results["loraclr"].offsets) == len({n for lora in loras for n in lora.modules})


def test_deterministic_for_a_seed(setup, tiny_model) -> None:
    _, loras, config = setup
    a = merge_loras(tiny_model, loras, config)["loraclr"]
    b = merge_loras(tiny_model, loras, config)["loraclr"]
    assert all(torch.equal(a.offsets[n], b.offsets[n]) for n in a.offsets)


def test_interrupt_raises_and_leaves_model(setup, tiny_model) -> None:
    _, loras, config = setup
    before = _snapshot(tiny_model)
    calls = []

    def stop_after_three_checks() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Interrupted):
        merge_loras(tiny_model, loras, config, should_stop=stop_after_three_checks)
    after = _snapshot(tiny_model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_writer_round_trip_atomic_and_base_untouched(setup, tiny_model, tmp_path, monkeypatch) -> None:
    _, loras, config = setup
    base = tmp_path / "base.safetensors"
    save_checkpoint(tiny_model, str(base))
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    result = merge_loras(tiny_model, loras, config)["loraclr"]
    out = tmp_path / "merged.safetensors"
    write_merged_checkpoint(base, out, result.offsets, dtype="fp32", metadata={"loraclr_method": "loraclr"})
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest
    original, merged = load_file(str(base)), load_file(str(out))
    assert set(original) == set(merged)
    changed = {k for k in original if not torch.equal(original[k], merged[k])}
    expected = {ldm_weight_key(n, original) for n in result.offsets}
    assert changed == expected
    for name, delta in result.offsets.items():
        key = ldm_weight_key(name, original)
        torch.testing.assert_close(
            merged[key], original[key] + delta.reshape(original[key].shape), rtol=1e-5, atol=1e-6
        )
    fp16 = tmp_path / "merged16.safetensors"
    write_merged_checkpoint(base, fp16, result.offsets)
    assert load_file(str(fp16))[next(iter(expected))].dtype == torch.float16

    def broken_save(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    with pytest.raises(KeyboardInterrupt):
        write_merged_checkpoint(base, tmp_path / "partial.safetensors", result.offsets)
    assert not (tmp_path / "partial.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_lora_export_reads_back(setup, tiny_model, tmp_path) -> None:
    _, loras, config = setup
    result = merge_loras(tiny_model, loras, config)["loraclr"]
    path = export_lora(result.offsets, tmp_path / "merge_lora.safetensors", rank=64, dtype=torch.float32)
    back = load_lora(path)
    assert set(back.modules) == set(result.offsets)
    name = next(iter(result.offsets))
    full = result.offsets[name]
    torch.testing.assert_close(back.modules[name].delta().reshape(full.shape), full, rtol=1e-3, atol=1e-4)


def test_demo_json(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lib_loraclr", "demo", "--json", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    methods = doc["merge"]["methods"]
    assert set(methods) == {"loraclr", "lsq", "sum", "average"}
    assert methods["loraclr"]["worst_error"] < methods["sum"]["worst_error"]
    assert (tmp_path / "tiny_loraclr_merge.safetensors").exists()
