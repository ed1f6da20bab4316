"""The merge tab and API against the host stand-in: a loadable checkpoint, list refreshed, loaded
model byte-identical (also after an interrupt), clear messages for bad input."""

from __future__ import annotations

import pytest
import torch

from tests.webui.conftest import load_script

PARAMS = {"steps": 2, "resolution": 64, "iterations": 5}


def _snapshot(view):
    return {k: v.clone() for k, v in view.state_dict().items()}


def _request(**overrides):
    body = {"loras": [{"name": "blackcat", "weight": 1.0}, {"name": "corgi", "weight": 0.8, "concept": "corgi dog"}],
            "output_name": "cat_dog", "params": PARAMS}  # fmt: skip
    body.update(overrides)
    return body


def test_tab_builds_and_api_merge_writes_a_listed_checkpoint(host) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    script = load_script("loraclr_merge")
    tabs = host.script_callbacks.ui_tabs_callback()
    assert tabs and tabs[0][1] == "LoRACLR merge"
    host.script_callbacks.ui_settings_callback()
    assert host.shared.opts.loraclr_default_method == "loraclr"
    app = FastAPI()
    host.script_callbacks.app_started_callback(None, app)
    client = TestClient(app)
    assert client.get("/loraclr/v1/health").json()["ok"] is True
    before = _snapshot(host.view)
    response = client.post("/loraclr/v1/merge", json=_request(lora_rank=4))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["path"].endswith("cat_dog.safetensors") and body["lora_path"]
    assert body["checkpoint_title"] in host.sd_models.checkpoint_tiles()
    assert set(body["report"]["methods"]) == {"loraclr", "lsq", "sum", "average"}
    after = _snapshot(host.view)
    assert all(torch.equal(before[k], after[k]) for k in before)
    from lib_loraclr.runtime import load_checkpoint

    merged = load_checkpoint(body["path"])
    assert merged.unet is not None
    # existing output without overwrite, unknown LoRA, bad parameter, traversal
    assert client.post("/loraclr/v1/merge", json=_request()).status_code == 409
    r = client.post("/loraclr/v1/merge", json=_request(loras=[{"name": "nope"}]))
    assert r.status_code == 404 and "LoRA not found: nope" in r.json()["detail"]
    assert client.post("/loraclr/v1/merge", json=_request(output_name="../x", overwrite=True)).status_code == 400
    assert client.post("/loraclr/v1/merge", json=_request(params={"lr": -1}, overwrite=True)).status_code == 400
    assert script is not None


def test_interrupt_leaves_model_and_writes_nothing(host) -> None:
    script = load_script("loraclr_merge")
    before = _snapshot(host.view)
    host.shared.state.interrupted = True
    import lib_loraclr.merge_request as mr

    request = mr.build_request([mr.LoraChoice("blackcat"), mr.LoraChoice("corgi")], "stopped", params=PARAMS)
    from lib_loraclr.errors import Interrupted

    with pytest.raises(Interrupted):
        script.run_merge(request)
    host.shared.state.interrupted = False
    assert not (host.ckpt_dir / "stopped.safetensors").exists()
    after = _snapshot(host.view)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_builtin_lora_patches_are_suspended_and_restored(host) -> None:
    script = load_script("loraclr_merge")
    layer = dict(host.view.named_modules())["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"]
    clean = layer.weight.detach().clone()
    layer.network_weights_backup = clean.clone()
    with torch.no_grad():
        layer.weight.add_(1.0)  # what the built-in leaves after a generation with a <lora> tag
    layer.network_current_names = (("somelora", 1.0, 1.0, None),)
    patched = layer.weight.detach().clone()
    seen = {}
    from lib_loraclr import merge_service

    original = merge_service.merge_to_checkpoint

    def spy(model, *args, **kwargs):
        seen["weight"] = model.layer_map()["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"].weight.detach().clone()
        return original(model, *args, **kwargs)

    merge_service.merge_to_checkpoint = spy
    try:
        import lib_loraclr.merge_request as mr

        script.run_merge(mr.build_request([mr.LoraChoice("blackcat"), mr.LoraChoice("corgi")], "clean", params=PARAMS))
    finally:
        merge_service.merge_to_checkpoint = original
    assert torch.equal(seen["weight"], clean)
    assert torch.equal(layer.weight, patched) and layer.network_current_names


def test_concept_rows_prefill_activation_text(host) -> None:
    script = load_script("loraclr_merge")
    rows = script._concept_rows("<lora:blackcat:0.7> <lora:corgi>", [])
    assert rows == [["blackcat", 0.7, "blackcat cat"], ["corgi", 1.0, "corgi dog"]]
    assert script._concept_rows("<lora:corgi>", [["corgi", 1.0, "my own text"]]) == [["corgi", 1.0, "my own text"]]
