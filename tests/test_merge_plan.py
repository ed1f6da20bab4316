"""The memory plan and the exact statistics forms: a budget changes the number of feature passes,
never the merged weights; every form builds the same Gram problem (keep-best: test_precision.py)."""

from __future__ import annotations

import pytest
import torch

from lib_loraclr.lora.file import load_lora
from lib_loraclr.merge.engine import MergeConfig, MergeMemoryError, merge_loras, plan_for
from lib_loraclr.merge.plan import plan_merge
from lib_loraclr.merge.sizes import parse_size
from lib_loraclr.merge.stats import FORMS, LayerStats, choose_form, form_sizes
from lib_loraclr.testing import synthetic_loras as sl


@pytest.fixture(scope="module")
def three(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("plan")
    loras = sl.concept_loras(tiny_model, d, seeds=(40, 41, 42))
    config = MergeConfig(
        concepts=("sks cat", "zwx dog", "qrt hat"),
        steps=2,
        resolution=64,
        model_level=False,
        iterations=8,
        lr=1e-3,
    )
    return loras, config


def test_parse_size() -> None:
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("512mib") == 512 * 2**20
    assert parse_size(1000) == 1000
    for bad in ("", "12 parsecs", "-3GB", "GiB"):
        with pytest.raises(ValueError, match="memory size"):
            parse_size(bad)


def test_form_choice_follows_the_sizes() -> None:
    assert choose_form(4, rows=154, d_in=768, d_out=3072) == "raw"  # 77-token text features
    assert choose_form(4, rows=20480, d_in=320, d_out=2560) == "cross"  # ff.net.0.proj
    assert choose_form(4, rows=20480, d_in=1280, d_out=320) == "gram"  # ff.net.2
    for K, rows, d_in, d_out in [(2, 5000, 64, 64), (12, 9000, 1280, 10240), (8, 9000, 5120, 1280)]:
        sizes = form_sizes(K, rows, d_in, d_out)
        assert choose_form(K, rows, d_in, d_out) == min(("cross", "gram"), key=sizes.__getitem__)


@pytest.mark.parametrize("form", FORMS)
def test_every_form_builds_the_gram_problem_of_its_rows(form) -> None:
    g = torch.Generator().manual_seed(3)
    K, d_in, d_out = 3, 5, 7
    W = torch.randn(d_out, d_in, generator=g)
    M = W + 0.2 * torch.randn(K, d_out, d_in, generator=g)
    stats = LayerStats(form, K, d_in, d_out, "cpu")
    batches = [torch.randn(K, n, d_in, generator=g) for n in (4, 9, 2)]
    for X in batches:
        stats.update(X, torch.einsum("kni,koi->kno", X, M))
    X = torch.cat(batches, dim=1).double()
    Y = torch.einsum("kni,koi->kno", X, M.double())
    got = stats.gram(M)
    torch.testing.assert_close(got.G[0], torch.einsum("kni,knj->kij", X, X), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got.H[0], torch.einsum("ani,bno->abio", X, Y), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got.c[0], Y.pow(2).sum(dim=(1, 2)), rtol=1e-6, atol=1e-5)
    assert stats.rows == 15 and got.rows.item() == 15
    for a in range(K):  # the solver's batched read of a row of H
        torch.testing.assert_close(stats.cross_row(a, M), got.H[0, a], rtol=1e-12, atol=1e-12)


def test_a_budget_that_forces_several_passes_gives_the_same_merge(three, tiny_model) -> None:
    loras, config = three
    unbounded = plan_for(tiny_model, loras, config, None, methods=2)
    fixed = sum(unbounded.breakdown[k] for k in ("model", "loras", "offsets_on_device"))
    budget, tight = None, unbounded
    for share in [s / 100 for s in range(95, 0, -5)]:  # the tightest budget that fits
        trial = fixed + int(share * (unbounded.peak_bytes - fixed))
        plan = plan_for(tiny_model, loras, config, trial, methods=2)
        if plan.fits:
            budget, tight = trial, plan
    assert tight.fits and tight.feature_passes > unbounded.feature_passes + 3, (
        tight.feature_passes,
        unbounded.feature_passes,
    )
    assert all(len(p) == 1 for p in unbounded.passes.values())
    a = merge_loras(tiny_model, loras, config, methods=["loraclr", "lsq"])
    b = merge_loras(tiny_model, loras, config, methods=["loraclr", "lsq"], budget=budget)
    for method in a:
        assert set(a[method].offsets) == set(b[method].offsets)
        for name, offset in a[method].offsets.items():
            diff = (offset - b[method].offsets[name]).norm() / offset.norm().clamp_min(1e-30)
            assert diff < 1e-5, (method, name, float(diff))
        assert a[method].report["worst_error"] == pytest.approx(b[method].report["worst_error"], rel=1e-5)
    assert b["loraclr"].report["memory_plan"]["passes"] == tight.feature_passes


def test_a_merge_that_cannot_fit_is_refused_before_any_work(three, tiny_model) -> None:
    loras, config = three
    calls = []
    with pytest.raises(MergeMemoryError, match="Raise the memory limit") as caught:
        merge_loras(tiny_model, loras, config, budget=4096, progress=lambda *a: calls.append(a))
    assert not caught.value.plan.fits and not calls


def test_progress_reaches_its_total(three, tiny_model) -> None:
    loras, config = three
    seen = []
    merge_loras(
        tiny_model,
        loras,
        config,
        methods=["loraclr", "sum"],
        progress=lambda d, t, label: seen.append((d, t)),
    )
    assert seen[-1][0] == seen[-1][1] and all(d <= t for d, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_one_lora_merged_alone_is_that_lora(tmp_path, tiny_model) -> None:
    """K = 1 with a vanishing ridge: least squares reproduces the LoRA wherever the features span
    the layer's inputs, and LoRACLR (started there) stays there."""
    targets = sl.standard_targets(sl.layer_shapes(tiny_model.layer_map()))
    sl.write_kohya_lora(tmp_path / "one.safetensors", targets, rank=4, alpha=4.0, seed=7, scale=0.12)
    lora = load_lora(tmp_path / "one.safetensors")
    config = MergeConfig(
        concepts=("sks cat",), steps=2, resolution=64, model_level=False, ridge=1e-9, iterations=5
    )
    results = merge_loras(tiny_model, [lora], config, methods=["lsq", "loraclr"])
    plan = plan_for(tiny_model, [lora], config, None)
    checked = 0
    for name, p in plan.layers.items():
        if p.rows < 8 * p.d_in:  # too few rows to pin every input direction
            continue
        expected = lora.modules[name].delta().reshape(results["lsq"].offsets[name].shape)
        for method in ("lsq", "loraclr"):  # float32 statistics of a badly conditioned tiny model: ~1e-2
            error = (results[method].offsets[name] - expected).norm() / expected.norm()
            assert error < 2e-2, (method, name, float(error))
        checked += 1
    assert checked >= 50


def test_full_size_sd15_with_twelve_loras_fits_in_24_gib() -> None:
    """From shapes alone: the 264 kohya targets of SD1.5 with 12 LoRAs at the paper's settings."""
    from tests.sd15_reference import kohya_modules

    shapes = {name: (shape[0], shape[1]) for name, kind, _, shape in kohya_modules() if kind == "lora"}
    plan = plan_merge(
        shapes,
        12,
        budget=parse_size("24GiB"),
        device="cuda",
        lora_bytes=12 * 150 * 2**20,
        model_bytes=1_720_000_000,
    )
    unbounded = plan_merge(shapes, 12, budget=None, device="cuda")
    assert plan.fits and plan.peak_bytes <= parse_size("24GiB")
    assert unbounded.peak_bytes > parse_size("60GiB")  # why the passes are needed
    assert plan.feature_passes > 3
    assert len(shapes) == 264 and len(plan.layers) == 264  # every kohya target is in a merge group


def test_the_feature_run_defaults_to_the_models_own_size(three, tiny_model, tmp_path) -> None:
    """No resolution given: the size the model was trained at (the tiny model's config names a
    latent of 8, so 64 px; SD1.5's 64, so 512), for merges, plans and header-only estimates."""
    from lib_loraclr.merge.plan import plan_from_files
    from lib_loraclr.sd.checkpoint import save_checkpoint
    from lib_loraclr.sd.configs import native_resolution, sd15_config
    from lib_loraclr.testing.ldm_view import ldm_view
    from lib_loraclr.webui.model import WebUIModel

    loras, config = three
    assert tiny_model.native_resolution == 64 and native_resolution(sd15_config("unet")["sample_size"]) == 512
    assert WebUIModel(ldm_view(tiny_model)).native_resolution == 64  # ldm's image_size, from the yaml
    assert native_resolution(None) == 512 and native_resolution("0") == 512
    auto = MergeConfig(concepts=config.concepts, steps=2)
    assert auto.resolution is None and auto.for_model(tiny_model).resolution == 64
    assert plan_for(tiny_model, loras, auto, None) == plan_for(tiny_model, loras, config, None)
    big = plan_for(tiny_model, loras, MergeConfig(concepts=config.concepts, steps=2, resolution=512), None)
    assert big.peak_bytes > plan_for(tiny_model, loras, auto, None).peak_bytes
    base = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny_model, base)
    paths = [lora.path for lora in loras]
    headers_only = plan_from_files(base, paths, device="cpu", budget=None, steps=2)
    assert (
        headers_only.peak_bytes
        == plan_from_files(base, paths, device="cpu", budget=None, steps=2, resolution=64).peak_bytes
    )


@pytest.mark.parametrize("form", ["gram", "raw"])
def test_the_sampling_run_in_smaller_unet_calls_gives_the_same_statistics(three, tiny_model, form) -> None:
    """A tight budget makes the sampling run's UNet take fewer rows per call (whole groups of all K
    concepts); every layer's statistics equal the one-call run's (the raw form: row for row)."""
    from lib_loraclr.merge.features import FeatureRun
    from lib_loraclr.merge.stats import LayerStats

    loras, config = three
    layers = tiny_model.layer_map()
    names = [n for n in layers if n.endswith(("attn1_to_q", "proj_out"))][:6]
    K = len(loras)

    def collect(groups: int) -> dict[str, LayerStats]:
        stats = {n: LayerStats(form, K, *reversed(layers[n].weight.shape[:2]), "cpu") for n in names}
        FeatureRun(tiny_model, loras, config, [1.0] * K, config.concepts).spatial(stats, groups)
        return stats

    whole, ones = collect(0), collect(1)
    for name in names:
        assert whole[name].rows == ones[name].rows > 0
        # float32 UNet math over other batch shapes rounds differently: compared relative to the
        # whole (rows out of order would differ by their own size)
        parts = ("inputs",) if form == "raw" else ("G", "H")
        for part in parts:
            a, b = (s.inputs() if part == "inputs" else getattr(s, part) for s in (ones[name], whole[name]))
            assert (a - b).norm() / b.norm() < 1e-5, (name, part)


def test_a_tight_budget_plans_smaller_unet_calls_before_refusing() -> None:
    from lib_loraclr.merge.plan import activation_bytes

    shapes = {"lora_unet_input_blocks_4_1_proj_in": (640, 640)}
    roomy = plan_merge(shapes, 12, budget=None, device="cuda", resolution=1024)
    assert roomy.spatial_groups == 4 and roomy.as_json()["spatial_batch"] == 48
    one_call = activation_bytes("spatial", 12, 2, 1024, 320, 768)
    tight = plan_merge(shapes, 12, budget=one_call // 2, device="cuda", resolution=1024)
    assert tight.fits and tight.spatial_groups == 1 and tight.working_sets["spatial"] == one_call // 4
