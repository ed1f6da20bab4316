"""The extension inside a real A1111 WebUI: it loads, merges over the API, composes with CLoRA.

Opt-in: needs SD_WEBUI_ROOT (see docs/webui-integration-testing.md); every test here is marked
`webui` and skipped without it. Images are 64x64 with 4 steps on a tiny checkpoint, so each
generation takes well under a second on CPU; what is checked is the wiring (routes, script
arguments, infotext, files, and that nothing stays patched), not image quality.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from .conftest import REPO_ROOT, decode_pixels

PLAIN = "a photo of a cat and a dog"
TAGGED = "a <lora:tinyA:1> cat and a <lora:tinyB:1> dog"
SEED = 4242


def _clora(enabled: bool = True, **params) -> dict:
    return {"CLoRA composition": {"args": [{"enabled": enabled, **params}]}}


def _pixels(result: dict, index: int = 0) -> np.ndarray:
    return decode_pixels(result["images"][index])


def _merge_body(output_name: str, **overrides) -> dict:
    body = {
        "base": None,
        "loras": [
            {"name": "tinyA", "weight": 1.0, "concept": "sks cat"},
            {"name": "tinyB", "weight": 1.0, "concept": None},
        ],
        "method": "loraclr",
        "output_name": output_name,
        "overwrite": False,
        "dtype": "fp16",
        "lora_rank": 0,
        # a short feature run: the paper's 20 steps at 512 px take ~5 minutes per merge on 2 CPU cores
        "params": {"steps": 2, "resolution": 128},
    }
    body.update(overrides)
    return body


def _error_text(r) -> str:
    try:
        data = r.json()
    except ValueError:
        return r.text
    return str(data.get("detail") or data.get("error") or data.get("errors") or data)


# --- (a) the extension is there -------------------------------------------------------------


def test_extension_loaded_without_errors(webui):
    # only what start-up wrote: other tests send bad settings on purpose and log their errors
    log = webui.startup_log()
    # A1111 reads each extension's git remote for its Extensions tab; a checkout without an
    # 'origin' remote (a local clone) logs an error there that is not ours.
    bad = [
        line
        for line in log.splitlines()
        if "Error" in line
        and "loraclr" in line.lower()
        and "Failed reading extension data from Git repository" not in line
    ]
    assert not bad, "errors while loading the extension:\n" + "\n".join(bad) + "\n" + webui.log_tail()
    extensions = [e["name"] for e in webui.get("/sdapi/v1/extensions").json()]
    # /sdapi/v1/extensions lists only extensions whose git metadata A1111 could read; a local clone
    # without an 'origin' remote is left out there, but its scripts load (checked below)
    assert not extensions or "sd-webui-loraclr" in extensions, extensions
    scripts = webui.get("/sdapi/v1/scripts").json()
    assert "clora composition" in scripts["txt2img"], scripts


def test_health_route(webui):
    r = webui.get("/loraclr/v1/health")
    assert r.status == 200, f"GET /loraclr/v1/health -> {r.status}: {r.text[:500]}"
    assert isinstance(r.json(), dict)


# --- (b) merge over the API ------------------------------------------------------------------


def test_merge_writes_loadable_checkpoint_and_leaves_model_alone(webui):
    before = _pixels(webui.txt2img(prompt=PLAIN, seed=SEED))
    t0 = time.monotonic()
    r = webui.post("/loraclr/v1/merge", _merge_body("tiny-merged-loraclr"))
    merge_s = time.monotonic() - t0
    assert r.status == 200, f"merge -> {r.status}: {r.text[:3000]}\n--- server log ---\n{webui.log_tail()}"
    out = r.json()
    assert {"path", "checkpoint_title", "report"} <= set(out), out
    path = Path(out["path"])
    assert path.is_file(), out
    assert path.suffix == ".safetensors"
    assert path.parent.resolve() == webui.ckpt_dir.resolve(), (
        f"merge saved outside the checkpoint dir: {path}"
    )

    # same keys and shapes as the base; LoRA-targeted weights changed, the rest did not
    with safe_open(str(webui.checkpoint), framework="pt") as fb, safe_open(str(path), framework="pt") as fm:
        base_keys = {
            k
            for k in fb.keys()
            if k.startswith(("model.diffusion_model.", "cond_stage_model.", "first_stage_model."))
        }
        assert base_keys <= set(fm.keys()), sorted(base_keys - set(fm.keys()))[:10]
        for key in sorted(base_keys):
            assert fm.get_slice(key).get_shape() == fb.get_slice(key).get_shape(), key
        k_cross = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        k_vae = "first_stage_model.decoder.conv_out.weight"
        merged_k, base_k = fm.get_tensor(k_cross).float(), fb.get_tensor(k_cross).float()
        assert torch.isfinite(merged_k).all()
        assert not torch.allclose(merged_k, base_k, atol=1e-3), (
            "cross-attention weight unchanged by the merge"
        )
        torch.testing.assert_close(
            fm.get_tensor(k_vae).float(), fb.get_tensor(k_vae).float(), atol=2e-3, rtol=1e-3
        )
    print(f"\n[timing] merge (loraclr, 2 tiny LoRAs): {merge_s:.2f} s; report: {out['report']!s:.300}")

    # the list knows it
    assert webui.post("/sdapi/v1/refresh-checkpoints").status == 200
    models = webui.get("/sdapi/v1/sd-models").json()
    titles = [m["title"] for m in models]
    assert any(m["filename"] and Path(m["filename"]).name == path.name for m in models), titles
    assert out["checkpoint_title"] in titles, (out["checkpoint_title"], titles)

    # the loaded model's weights are untouched: the same seed gives the same pixels
    after = _pixels(webui.txt2img(prompt=PLAIN, seed=SEED))
    np.testing.assert_array_equal(before, after)

    # the merged checkpoint loads in the WebUI and generates; then back to the base
    # a base with its own config (the tiny one) gets it copied beside the merge, as A1111's merger does
    assert path.with_suffix(".yaml").exists() or not webui.checkpoint.with_suffix(".yaml").exists()
    base_title = webui.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    try:
        r = webui.post("/sdapi/v1/options", {"sd_model_checkpoint": out["checkpoint_title"]})
        assert r.status == 200, r.text
        # A1111 appends " [short hash]" to the title once the file has been hashed (on load)
        loaded = webui.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
        assert loaded == out["checkpoint_title"] or loaded.startswith(out["checkpoint_title"] + " ["), (
            loaded,
            out["checkpoint_title"],
        )
        merged_img = _pixels(webui.txt2img(prompt=PLAIN, seed=SEED))
        assert not np.array_equal(merged_img, before), "the merged model generates the base's image"
    finally:
        assert webui.post("/sdapi/v1/options", {"sd_model_checkpoint": base_title}).status == 200
    np.testing.assert_array_equal(_pixels(webui.txt2img(prompt=PLAIN, seed=SEED)), before)


@pytest.mark.parametrize("method", ["sum", "lsq"])
def test_merge_other_methods(webui, method):
    r = webui.post("/loraclr/v1/merge", _merge_body(f"tiny-merged-{method}", method=method, dtype="fp32"))
    assert r.status == 200, f"merge {method} -> {r.status}: {r.text[:3000]}\n{webui.log_tail()}"
    path = Path(r.json()["path"])
    with safe_open(str(path), framework="pt") as f:
        key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"
        assert f.get_tensor(key).dtype == torch.float32


def test_merge_refuses_to_overwrite(webui):
    body = _merge_body("tiny-merged-twice", method="sum")
    first = webui.post("/loraclr/v1/merge", body)
    assert first.status == 200, first.text[:2000]
    second = webui.post("/loraclr/v1/merge", body)
    assert 400 <= second.status < 500, (
        f"second merge without overwrite -> {second.status}: {second.text[:500]}"
    )
    assert "tiny-merged-twice" in _error_text(second) and "overwrite" in _error_text(second).lower()
    third = webui.post("/loraclr/v1/merge", {**body, "overwrite": True})
    assert third.status == 200, third.text[:2000]


# --- (c) CLoRA through /sdapi/v1/txt2img ------------------------------------------------------


def test_checkpoint_config_keeps_the_stock_checkpointing(webui):
    """Every real SD1.5 checkpoint is built from A1111's stock v1-inference.yaml, which sets
    use_checkpoint: True (ldm's blocks then run under no_grad); a sidecar .yaml that turns it off
    hides CLoRA failures that users hit, so the CLoRA tests below must run with the stock value."""
    import yaml

    sidecar = webui.checkpoint.with_suffix(".yaml")
    if not sidecar.is_file():
        return  # the WebUI's own configs/v1-inference.yaml: the stock value
    unet = yaml.safe_load(sidecar.read_text())["model"]["params"]["unet_config"]["params"]
    assert unet.get("use_checkpoint", True) is True, f"{sidecar}: set use_checkpoint: True (the stock value)"


def test_clora_txt2img_composes_and_leaves_nothing_patched(webui):
    plain_before = _pixels(webui.txt2img(prompt=PLAIN, seed=SEED))
    builtin = webui.txt2img(prompt=TAGGED, seed=SEED)  # both LoRAs global, through the built-in
    t0 = time.monotonic()
    result = webui.txt2img(prompt=TAGGED, seed=SEED, alwayson_scripts=_clora())
    clora_s = time.monotonic() - t0
    t0 = time.monotonic()
    webui.txt2img(prompt=PLAIN, seed=SEED)
    plain_s = time.monotonic() - t0
    print(
        f"\n[timing] 64x64, 4 Euler steps: plain {plain_s:.2f} s, CLoRA {clora_s:.2f} s; startup {webui.startup_s:.1f} s"
    )

    assert result["images"], result.get("info")
    img = _pixels(result)
    assert img.shape == (64, 64, 3)
    assert "clora" in result["info"].lower(), result["info"][:2000]
    assert not np.array_equal(img, _pixels(builtin)), "CLoRA image equals the built-in Lora's image"

    # nothing left patched: a plain generation is bit-identical to the one before
    np.testing.assert_array_equal(_pixels(webui.txt2img(prompt=PLAIN, seed=SEED)), plain_before)
    # and the built-in Lora path is unaffected too
    np.testing.assert_array_equal(_pixels(webui.txt2img(prompt=TAGGED, seed=SEED)), _pixels(builtin))


def test_clora_disabled_is_the_builtin_behaviour(webui):
    builtin = _pixels(webui.txt2img(prompt=TAGGED, seed=SEED))
    disabled = _pixels(webui.txt2img(prompt=TAGGED, seed=SEED, alwayson_scripts=_clora(enabled=False)))
    np.testing.assert_array_equal(builtin, disabled)


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras", "DDIM"])
def test_clora_samplers_and_batches(webui, sampler):
    plain_before = _pixels(webui.txt2img(prompt=PLAIN, seed=SEED, sampler_name=sampler))
    result = webui.txt2img(
        prompt=TAGGED,
        negative_prompt="blurry",
        seed=SEED,
        sampler_name=sampler,
        batch_size=2,
        alwayson_scripts=_clora(),
    )
    assert len(result["images"]) >= 2, len(result["images"])
    for i in range(2):
        assert _pixels(result, i).shape == (64, 64, 3)
    np.testing.assert_array_equal(
        _pixels(webui.txt2img(prompt=PLAIN, seed=SEED, sampler_name=sampler)), plain_before
    )


def test_clora_with_a_schedule_type(webui):
    """A1111 1.9+ takes the schedule type apart from the sampler ("DPM++ 2M" + "Karras"; 1.8.0's
    API ignores the field): CLoRA runs and its infotext entry pastes back."""
    from lib_loraclr.clora.settings import CloraSettings

    result = webui.txt2img(
        prompt=TAGGED,
        seed=SEED,
        sampler_name="DPM++ 2M",
        scheduler="Karras",
        alwayson_scripts=_clora(refine_iterations=2),
    )
    info = result["info"]
    assert "CLoRA" in info, info[:2000]
    import json

    entry = json.loads(info)["extra_generation_params"]["CLoRA"]
    assert CloraSettings.from_infotext(entry).refine_iterations == 2


def test_clora_with_hires_fix(webui):
    """txt2img's hires fix runs a second (img2img) pass with a new sampler in the same p.sample:
    CLoRA's generation still succeeds at the upscaled size and leaves nothing patched."""
    hires = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.6}
    plain_before = _pixels(webui.txt2img(prompt=PLAIN, seed=SEED, **hires, hr_second_pass_steps=2))
    result = webui.txt2img(
        prompt=TAGGED, seed=SEED, **hires, hr_second_pass_steps=2, alwayson_scripts=_clora()
    )
    assert _pixels(result).shape == (128, 128, 3)
    assert "CLoRA" in result["info"], result["info"][:2000]
    plain_after = _pixels(webui.txt2img(prompt=PLAIN, seed=SEED, **hires, hr_second_pass_steps=2))
    np.testing.assert_array_equal(plain_after, plain_before)


def test_clora_unsupported_sampler_is_a_clear_error(webui):
    """A sampler CLoRA cannot drive (UniPC keeps its own history of predictions; present in 1.8.0
    and 1.10.1) fails the request with the extension's message, not an empty 500."""
    plain_before = _pixels(webui.txt2img(prompt=PLAIN, seed=SEED))
    r = webui.post(
        "/sdapi/v1/txt2img",
        {
            "prompt": TAGGED,
            "seed": SEED,
            "steps": 4,
            "width": 64,
            "height": 64,
            "sampler_name": "UniPC",
            "alwayson_scripts": _clora(),
        },
    )
    assert r.status == 400, r.text[:1000]  # the request is at fault: 400, not 500
    assert "UniPC" in _error_text(r) and "not supported" in _error_text(r), r.text[:1000]
    np.testing.assert_array_equal(_pixels(webui.txt2img(prompt=PLAIN, seed=SEED)), plain_before)


def test_clora_show_masks_adds_masks_and_heatmaps(webui):
    result = webui.txt2img(prompt=TAGGED, seed=SEED, alwayson_scripts=_clora(show_masks=True))
    # the image, the masks of the base and both LoRAs, both LoRAs' attention heatmaps
    assert len(result["images"]) == 1 + 3 + 2, len(result["images"])
    masks = [_pixels(result, i) for i in range(1, 4)]
    assert all(m.shape == (64, 64, 3) for m in masks)
    assert set(np.unique(np.concatenate([m.ravel() for m in masks]))) <= {0, 255}  # binary masks


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_clora_img2img_and_inpainting_compose(webui, sampler):
    init = webui.txt2img(prompt=PLAIN, seed=SEED)["images"][0]
    body = {
        "init_images": [init],
        "denoising_strength": 0.6,
        "prompt": TAGGED,
        "seed": SEED,
        "steps": 5,
        "width": 64,
        "height": 64,
        "sampler_name": sampler,
        "cfg_scale": 7,
    }
    plain = webui.post("/sdapi/v1/img2img", body)
    composed = webui.post("/sdapi/v1/img2img", {**body, "alwayson_scripts": _clora()})
    assert plain.status == 200 and composed.status == 200, composed.text[:2000]
    assert "clora" in composed.json()["info"].lower()
    assert not np.array_equal(_pixels(composed.json()), _pixels(plain.json()))
    # the same img2img without CLoRA afterwards is unchanged: nothing was left patched
    np.testing.assert_array_equal(
        _pixels(webui.post("/sdapi/v1/img2img", body).json()), _pixels(plain.json())
    )
    # inpainting the right half: composed inside, the original outside (the host pastes it back)
    half = np.zeros((64, 64, 3), dtype=np.uint8)
    half[:, 32:] = 255
    masked = {**body, "mask": _png_b64(half), "mask_blur": 0}
    plain_inpaint = webui.post("/sdapi/v1/img2img", masked)
    inpaint = webui.post("/sdapi/v1/img2img", {**masked, "alwayson_scripts": _clora()})
    assert plain_inpaint.status == 200 and inpaint.status == 200, inpaint.text[:2000]
    assert "clora" in inpaint.json()["info"].lower()
    original, pixels = decode_pixels(init), _pixels(inpaint.json())
    np.testing.assert_array_equal(pixels[:, :24], original[:, :24])
    assert not np.array_equal(pixels[:, 40:], _pixels(plain_inpaint.json())[:, 40:])
    np.testing.assert_array_equal(
        _pixels(webui.post("/sdapi/v1/img2img", masked).json()), _pixels(plain_inpaint.json())
    )


def _png_b64(pixels: np.ndarray) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_clora_is_reproducible(webui):
    a = _pixels(webui.txt2img(prompt=TAGGED, seed=SEED + 1, alwayson_scripts=_clora()))
    b = _pixels(webui.txt2img(prompt=TAGGED, seed=SEED + 1, alwayson_scripts=_clora()))
    np.testing.assert_array_equal(a, b)


# --- (d) bad input ----------------------------------------------------------------------------


def test_merge_unknown_lora_is_a_clear_4xx(webui):
    body = _merge_body("tiny-merged-bad")
    body["loras"][1]["name"] = "no-such-lora-xyz"
    r = webui.post("/loraclr/v1/merge", body)
    assert 400 <= r.status < 500, f"-> {r.status}: {r.text[:1000]}"
    assert "no-such-lora-xyz" in _error_text(r), r.text[:1000]
    assert not (webui.ckpt_dir / "tiny-merged-bad.safetensors").exists()


@pytest.mark.parametrize(
    "override",
    [{"method": "nonsense"}, {"output_name": "../escape"}, {"output_name": "a/b"}, {"loras": []}],
    ids=["method", "traversal", "separator", "no-loras"],
)
def test_merge_bad_request_is_a_4xx(webui, override):
    r = webui.post("/loraclr/v1/merge", {**_merge_body("tiny-merged-bad2"), **override})
    assert 400 <= r.status < 500, f"{override} -> {r.status}: {r.text[:1000]}"
    assert not list(webui.data_dir.rglob("escape*")), "a file escaped the checkpoint dir"


def test_clora_unknown_lora_fails_clearly_and_leaves_nothing_patched(webui):
    plain_before = _pixels(webui.txt2img(prompt=PLAIN, seed=SEED))
    body = {
        "prompt": "a <lora:no-such-lora-xyz:1> cat and a <lora:tinyB:1> dog",
        "seed": SEED,
        "steps": 4,
        "width": 64,
        "height": 64,
        "sampler_name": "Euler",
        "alwayson_scripts": _clora(),
    }
    r = webui.post("/sdapi/v1/txt2img", body)
    if r.status == 200:  # accepted: the unknown tag must be reported, not silently dropped
        info = r.json()["info"]
        log = webui.log_tail(200)
        assert "no-such-lora-xyz" in info or "no-such-lora-xyz" in log, info[:1000]
    else:
        assert "no-such-lora-xyz" in r.text, f"-> {r.status}: {r.text[:1000]}"
    np.testing.assert_array_equal(_pixels(webui.txt2img(prompt=PLAIN, seed=SEED)), plain_before)


# --- install.py in the WebUI's own environment ---------------------------------------------------


def test_install_py_installs_nothing_when_all_present():
    """The launcher runs install.py as `python install.py` with PYTHONPATH=<webui root>."""
    root = Path(os.environ["SD_WEBUI_ROOT"]).expanduser().resolve()
    installer = REPO_ROOT / "install.py"
    assert installer.is_file(), "the extension has no install.py"
    env = dict(os.environ, PYTHONPATH=str(root), PIP_NO_INDEX="1")
    python = os.environ.get("SD_WEBUI_PYTHON", sys.executable)
    proc = subprocess.run(
        [python, str(installer)], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Installing" not in out, (
        f"install.py tried to install something the WebUI already has:\n{out[-3000:]}"
    )


def test_merge_after_a_lora_generation_equals_one_after_a_plain_generation(webui):
    """A1111's built-in re-applies the last generation's LoRAs on forward; the merge must not bake
    them in (the merge after ``<lora:tinyA:1>`` equals the merge after a plain prompt)."""
    names = []
    for prompt, name in (("a <lora:tinyA:1> photo of a cat", "tiny-after-lora"), (PLAIN, "tiny-after-plain")):
        webui.txt2img(prompt=prompt, seed=SEED)
        r = webui.post("/loraclr/v1/merge", _merge_body(name, method="lsq", dtype="fp32"))
        assert r.status == 200, f"merge -> {r.status}: {r.text[:2000]}\n{webui.log_tail()}"
        names.append(Path(r.json()["path"]))
    with safe_open(str(names[0]), framework="pt") as fa, safe_open(str(names[1]), framework="pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        for key in fa.keys():
            assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), key


def test_merge_estimate_and_memory_limit(webui):
    r = webui.post("/loraclr/v1/merge", {**_merge_body(""), "estimate": True})
    assert r.status == 200, f"estimate -> {r.status}: {r.text[:2000]}"
    plan = r.json()["estimate"]
    assert plan["fits"] and plan["passes"] >= 3 and plan["peak_bytes"] > 0, plan
    r = webui.post("/loraclr/v1/merge", {**_merge_body("tiny-too-small"), "max_memory": "64KiB"})
    assert r.status == 400 and "Raise the memory limit" in _error_text(r), (r.status, r.text[:2000])
    assert not (webui.ckpt_dir / "tiny-too-small.safetensors").exists()
