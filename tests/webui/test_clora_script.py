"""The always-on CLoRA script in the host stand-in's real hook order: images, masks, infotext, bound
tags taken from the built-in, and nothing left patched (also when sampling fails)."""

from __future__ import annotations

import importlib
import json
import re

import numpy as np
import pytest
import torch

from lib_loraclr.clora.settings import CloraSettings
from lib_loraclr.errors import LoraClrError
from tests.webui.conftest import ORACLE_ATOL, ROOT, composed_image, load_script

PROMPT = "a <lora:blackcat:1> cat and a <lora:corgi:0.8> dog, <lora:ghibli:0.5>"
# W/32: 2 x 2 maps at 64 px. At the auto level's 8 x 8 the masks follow the attention closely
# enough that the host's other summation order (2 threads) moves 11 of 12288 values by up to 6e-4
# against the oracle (1 thread: within 5e-4); the auto level has its own tests (test_clora_passes).
ARGS = {
    "enabled": True,
    "max_step": 2,
    "refine_steps": "0",
    "refine_iterations": 2,
    "show_masks": True,
    "map_level": "W/32",
}
# the oracle's prompt: the stand-in's built-in Lora records the style tag it loads but does not
# patch the weights (tests/webui_stub/networks.py), so its picture is the one without the style
UNSTYLED = "a <lora:blackcat:1> cat and a <lora:corgi:0.8> dog,"
# the host's samplers that the core's reference samplers reproduce (the CLI's names); the host's
# DDIM makes steps - 1 calls on its own timesteps, which the reference's DDIM does not
ORACLE = {"Euler": "euler", "Euler a": "euler_a", "DPM++ 2M Karras": "dpmpp_2m_karras"}


def _generate(host, prompt=PROMPT, sampler="Euler", args=None, script=None, slots=None, **kwargs):
    """One txt2img; ``slots``: the script's argument slots as given (else one dict, ``args``)."""
    processing = importlib.import_module("modules.processing")
    script = script or load_script("loraclr_clora").CloraScript()
    runner = processing.ScriptRunner([(script, slots if slots is not None else [args or ARGS])])
    options = {"negative_prompt": "blurry", "seed": 5, "steps": 3, "width": 64, "height": 64, **kwargs}
    p = processing.StableDiffusionProcessingTxt2Img(
        prompt=prompt, sampler_name=sampler, scripts=runner, script_args=runner.args, **options
    )
    return p, processing.process_images(p)


def _clean(host):
    sd_samplers = importlib.import_module("modules.sd_samplers")
    modules = list(host.view.modules())
    return (
        all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)
        and sd_samplers.create_sampler.__module__ == "modules.sd_samplers"
    )


def test_generation_with_masks_infotext_and_builtin_keeps_styles(host, tiny_model) -> None:
    before = {k: v.clone() for k, v in host.view.state_dict().items()}
    p, processed = _generate(host)
    # the picture the core composes itself, the same up to float rounding
    want = composed_image(tiny_model, host.lora_dir, UNSTYLED, ARGS, "euler", 3)
    torch.testing.assert_close(processed.images[0], want, rtol=0, atol=ORACLE_ATOL)
    assert len(processed.images) == 1 + 3 + 2  # the image, masks of base, blackcat, corgi, the two heatmaps
    assert processed.infotexts[1:] == [
        "CLoRA mask 1: base",
        "CLoRA mask 1: blackcat",
        "CLoRA mask 1: corgi",
        "CLoRA attention 1: blackcat",
        "CLoRA attention 1: corgi",
    ]
    heat = np.asarray(processed.images[4])
    assert heat.shape == (64, 64) and heat.max() == 255  # min-max normalised
    assert torch.isfinite(processed.images[0]).all()
    networks = importlib.import_module("networks")
    assert [n.name for n in networks.loaded_networks] == ["ghibli"]
    info = p.extra_generation_params["CLoRA"]
    assert '"lora":"blackcat"' in info and '"trigger":"blackcat cat"' in info
    assert CloraSettings.from_infotext(info).refine_iterations == 2
    assert _clean(host) and "sample" not in p.__dict__
    assert all(torch.equal(before[k], v) for k, v in host.view.state_dict().items())
    # reproducible: the same settings give the same image
    _, again = _generate(host)
    assert torch.equal(processed.images[0], again.images[0])


def _fail_after(calls: int, host, monkeypatch) -> None:
    """The UNet raises on its call ``calls + 1``: a failure in the middle of sampling."""
    made = []
    original = host.view.apply_model

    def failing(x, t, cond):
        made.append(1)
        if len(made) > calls:
            raise RuntimeError("GPU fell over")
        return original(x, t, cond)

    monkeypatch.setattr(host.view, "apply_model", failing)


def test_failure_mid_sampling_leaves_nothing_patched(host, monkeypatch) -> None:
    _fail_after(3, host, monkeypatch)
    with pytest.raises(RuntimeError, match="fell over") as info:
        _generate(host)
    assert vars(info.value)["detail"] == "CLoRA: RuntimeError: GPU fell over"  # what the host's API returns
    assert "status_code" not in vars(info.value)  # not the request's fault: the host's 500
    assert _clean(host)


def test_disabled_is_a_plain_generation(host) -> None:
    """Off, the script changes nothing: the same pixels as a generation without it (the built-in
    Lora applies every tag), and nothing in the infotext."""
    processing = importlib.import_module("modules.processing")
    p, disabled = _generate(host, args={"enabled": False})
    assert len(disabled.images) == 1 and "CLoRA" not in p.extra_generation_params and _clean(host)
    options = {"negative_prompt": "blurry", "seed": 5, "steps": 3, "width": 64, "height": 64}
    runner = processing.ScriptRunner([])
    without = processing.StableDiffusionProcessingTxt2Img(
        prompt=PROMPT, sampler_name="Euler", scripts=runner, script_args=runner.args, **options
    )
    assert torch.equal(disabled.images[0], processing.process_images(without).images[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"sampler": "DPM fast"},
            r"sampler 'DPM fast' is not supported \(adapts its steps to the model.*\); use one of "
            "Euler, Euler a, DPM\\+\\+ 2M, LMS, DDIM, DDIM CFG\\+\\+, Heun, .*Restart with any schedule type",
        ),
        ({"sampler": "PLMS"}, r"'PLMS' is not supported \(keeps its own history of predictions\)"),
        ({"enable_hr": True, "hr_sampler_name": "DPM adaptive"}, r"'DPM adaptive' is not supported"),
        ({"prompt": "a <lora:nosuch:1> cat and a <lora:corgi> dog"}, "LoRA 'nosuch' not found"),
        ({"prompt": "a <lora:blackcat> cat AND a dog"}, "AND prompts"),
        ({"prompt": "a <lora:blackcat> cat and a <lora:corgi> cat"}, "bound to two LoRAs"),
    ],
)
def test_bad_input_messages(host, kwargs, message) -> None:
    with pytest.raises(LoraClrError, match=message) as info:
        _generate(host, **kwargs)
    # the host's API answers vars(e).get("status_code", 500) with {"detail": vars(e).get("detail", "")}
    assert vars(info.value)["detail"] == str(info.value)
    assert vars(info.value)["status_code"] == 400
    assert _clean(host)


def _api_slots(request_args) -> list:
    """The script's slots as the host's API fills them (``modules/api/api.py``,
    ``init_script_args``): the UI's defaults, then ``args[i]`` into slot ``i`` for
    ``i < min(slots, len(args))``: a string is indexed character by character."""
    defaults = CloraSettings().to_dict()
    slots = [defaults[name] for name in CloraSettings.field_names()]
    for i in range(min(len(slots), len(request_args))):
        slots[i] = request_args[i]
    return slots


@pytest.mark.parametrize(
    "request_args, message",
    [
        ([{"enabled": True, "step_size": "big"}], "step_size='big' has the wrong type"),
        ([{"enabled": True, "stepsize": 3}], "unknown setting.*stepsize"),
        ([{"enabled": True, "mask_threshold": 1.5}], "mask threshold 1.5"),
        ([{"enabled": True, "refine_steps": "a,b"}], "refine_steps='a,b' has the wrong type"),
        ([True, "x", 25], "step_size='x' has the wrong type"),
        ("enabled", "args must be a list"),
        ([{"enabled": "nope"}], "enabled='nope' has the wrong type"),
        ([{"enabled": False, "step_sise": 3}], "unknown setting.*step_sise"),  # a typo is no "off"
    ],
)
def test_bad_api_settings_fail_the_request(host, request_args, message) -> None:
    """Settings the script cannot read fail the generation with their message and a 400 (they
    are read in ``process``, whose exceptions the host only logs: the script raises them from
    ``p.sample``), instead of a plain picture with the built-in Lora applying every tag."""
    with pytest.raises(LoraClrError, match=message) as info:
        _generate(host, slots=_api_slots(request_args))
    assert vars(info.value)["detail"] == str(info.value) and str(info.value).count("CLoRA:") == 1
    assert vars(info.value)["status_code"] == 400
    assert _clean(host)
    # and what does parse is unchanged: the UI's own values give the plain picture
    _, plain = _generate(host, prompt="a cat and a dog", slots=_api_slots([]))
    _, again = _generate(host, prompt="a cat and a dog", args={"enabled": False})
    assert torch.equal(plain.images[0], again.images[0])


@pytest.mark.parametrize("sampler", ["DDIM", "DPM++ 2M Karras", "Euler a"])
def test_other_samplers_run_through_clora(host, tiny_model, sampler) -> None:
    """DDIM runs on A1111's timestep denoiser (eps out, z in): converted to k-diffusion terms and
    back, and the latent update reaches the sampler's own latent."""
    before = {k: v.clone() for k, v in host.view.state_dict().items()}
    p, processed = _generate(host, sampler=sampler, steps=4)
    assert len(processed.images) == 1 + 5 and torch.isfinite(processed.images[0]).all()
    ((plan, core),) = p.loraclr_clora_state.cores
    assert core.state.step == (3 if sampler == "DDIM" else 4)  # the host's DDIM makes steps - 1 calls
    assert core.state.losses and core.state.masks[1:].sum() > 0
    assert _clean(host) and all(torch.equal(before[k], v) for k, v in host.view.state_dict().items())
    if sampler in ORACLE:  # the same picture as the core's own composition (float rounding apart)
        want = composed_image(tiny_model, host.lora_dir, UNSTYLED, ARGS, ORACLE[sampler], 4)
        torch.testing.assert_close(processed.images[0], want, rtol=0, atol=ORACLE_ATOL)
    # the contrastive update changes the image (step size 0 turns it off)
    _, still = _generate(host, sampler=sampler, steps=4, args={**ARGS, "step_size": 0.0})
    assert not torch.equal(processed.images[0], still.images[0])


def test_batch_has_one_core_per_image(host) -> None:
    """Masks and the contrastive loss are per image: two seeds, two layouts."""
    p, processed = _generate(host, batch_size=2)
    assert len(processed.images) == 2 + 2 * 5
    first, second = (core for _, core in p.loraclr_clora_state.cores)
    assert first.state.losses and second.state.losses
    assert not torch.equal(first.state.maps, second.state.maps)
    assert [t for t in processed.infotexts[2:] if t.startswith("CLoRA mask 2")] == [
        "CLoRA mask 2: base",
        "CLoRA mask 2: blackcat",
        "CLoRA mask 2: corgi",
    ]
    assert _clean(host)


def test_hook_errors_stop_the_generation_with_their_message(host) -> None:
    """The host only logs exceptions raised in script hooks (the stand-in too); the script keeps
    them and raises them from p.sample, so the user sees the message instead of a plain image."""
    module = load_script("loraclr_clora")

    def broken(path):
        raise OSError(f"{path}: disk went away")

    module.load_lora = broken
    with pytest.raises(OSError, match="disk went away"):
        _generate(host, script=module.CloraScript())
    assert _clean(host)


def test_accordion_shows_bindings_and_restores_from_infotext(host) -> None:
    import gradio as gr

    scripts = importlib.import_module("modules.scripts")
    module = load_script("loraclr_clora")
    script = module.CloraScript()
    script.is_txt2img = True
    with gr.Blocks() as blocks:
        prompt = gr.Textbox(elem_id="txt2img_prompt")
        for elem_id, callback in script.on_after_component_elem_id:  # what the host's runner does
            if elem_id == "txt2img_prompt":
                callback(scripts.OnComponent(component=prompt))
        components = script.ui(False)
    assert script.prompt_box is prompt and len(components) == len(CloraSettings.field_names())
    wired = [
        d
        for d in blocks.dependencies
        if d["outputs"] == [script.view.bindings._id, script.view.bindings_note._id]
    ]
    assert len(wired) == 2  # prompt blur and the enable checkbox
    rows, note = module.bindings_view(PROMPT)
    assert rows == [["blackcat", "1", "cat", "blackcat cat"], ["corgi", "0.8", "dog", "corgi dog"]]
    assert "ghibli" in note
    rows, note = module.bindings_view("a <lora:nosuch> cat")
    assert rows[0][3] == "(LoRA not found)"
    rows, note = module.bindings_view("a cat and a dog")  # nothing bound: a blank row, no weight 0
    assert rows == [["", "", "", ""]] and "No bindings" in note
    # paste fields: every setting comes back from the infotext; a plain one turns CLoRA off
    info = CloraSettings(enabled=True, step_size=7.0).infotext([])
    fields = dict((component.elem_id, read) for component, read in script.infotext_fields)
    assert fields[script.elem_id("step_size")]({"CLoRA": info}) == 7.0
    assert fields[script.elem_id("enabled")]({}) is False


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_img2img_runs_through_clora(host, sampler) -> None:
    """img2img makes its sampler in p.init (before p.sample) and enters via sample_img2img."""
    processing = importlib.import_module("modules.processing")
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def run(args, **kwargs):
        script = load_script("loraclr_clora").CloraScript()
        runner = processing.ScriptRunner([(script, [args])])
        p = processing.StableDiffusionProcessingImg2Img(
            init_latent=init,
            denoising_strength=0.6,
            prompt=PROMPT,
            sampler_name=sampler,
            seed=5,
            steps=5,
            width=64,
            height=64,
            scripts=runner,
            script_args=runner.args,
            **kwargs,
        )
        return p, processing.process_images(p)

    before = {k: v.clone() for k, v in host.view.state_dict().items()}
    p, processed = run(ARGS)
    ((_, core),) = p.loraclr_clora_state.cores
    # t_enc = int(0.6 * 5) = 3: k-diffusion runs t_enc + 1 steps, the host's DDIM t_enc - 1 calls
    assert core.state.step == (2 if sampler == "DDIM" else 4) and core.state.losses
    assert len(processed.images) == 1 + 5 and "CLoRA" in p.extra_generation_params
    _, still = run({**ARGS, "step_size": 0.0})
    assert not torch.equal(processed.images[0], still.images[0])
    assert _clean(host) and "sample_img2img" not in p.sampler.__dict__
    assert all(torch.equal(before[k], v) for k, v in host.view.state_dict().items())
    run(ARGS, image_mask=torch.ones(8, 8))  # inpainting runs too (tests/webui/test_clora_passes.py)
    assert _clean(host)


def test_stock_config_checkpointing_is_off_for_clora_and_restored(host) -> None:
    """A1111's stock v1-inference.yaml sets use_checkpoint: True; ldm then runs its blocks under
    no_grad (the stand-in too), which left CLoRA's maps without a graph. CLoRA switches it off for
    its own passes only: inside them every flag is False, afterwards every flag is True again."""
    unet = host.view.model.diffusion_model
    flags = [
        (m, f) for m in unet.modules() for f in ("checkpoint", "use_checkpoint") if m.__dict__.get(f) is True
    ]
    assert len(flags) == 16 + 22  # SD1's 16 transformer blocks and 22 resblocks, flags as in the stock config
    seen = []
    original = host.view.apply_model
    host.view.apply_model = lambda x, t, cond: (
        seen.append(any(getattr(m, f) for m, f in flags)),
        original(x, t, cond),
    )[1]
    try:
        _generate(host, steps=2)
    finally:
        del host.view.apply_model
    assert seen and not any(seen)
    assert all(getattr(m, f) is True for m, f in flags) and _clean(host)


def test_stand_in_checkpointing_hides_the_graph_as_ldm_does(host) -> None:
    """The stand-in's mirror of ldm's checkpoint(): with the stock flag, a hook inside a block sees
    no graph under enable_grad (what broke CLoRA); with the flag off it does."""
    from lib_loraclr.sd.patches import checkpointing_disabled

    leaf = host.view.get_submodule("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q")
    captured = []
    handle = leaf.register_forward_hook(lambda m, a, out: captured.append(out.requires_grad))
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    context = host.view.get_learned_conditioning(["a cat"])
    try:
        with torch.enable_grad():
            host.view.apply_model(x, torch.tensor([500.0]), context)
            with checkpointing_disabled(host.view):
                host.view.apply_model(x, torch.tensor([500.0]), context)
    finally:
        handle.remove()
    assert captured == [False, True]


def test_failed_generation_retains_nothing(host, monkeypatch) -> None:
    """After an exception mid-sampling nothing of the generation stays reachable, even while the
    processing object is still alive (the WebUI keeps it until the request ends): not the cores
    (captured maps, closures over the encoded prompts), not the loaded LoRA copies."""
    import gc
    import weakref

    from lib_loraclr.webui import clora_sampling

    refs = []

    class Recorded(clora_sampling.CloraCore):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            refs.extend([weakref.ref(self), weakref.ref(self.maps)])

    monkeypatch.setattr(clora_sampling, "CloraCore", Recorded)
    module = load_script("loraclr_clora")
    load = module.load_lora
    module.load_lora = lambda path: (lambda lora: (refs.append(weakref.ref(lora)), lora)[1])(load(path))
    _fail_after(3, host, monkeypatch)
    processing = importlib.import_module("modules.processing")
    script = module.CloraScript()
    runner = processing.ScriptRunner([(script, [ARGS])])
    p = processing.StableDiffusionProcessingTxt2Img(
        prompt=PROMPT,
        sampler_name="Euler",
        scripts=runner,
        script_args=runner.args,
        negative_prompt="",
        seed=5,
        steps=3,
        width=64,
        height=64,
    )
    with pytest.raises(RuntimeError, match="fell over"):
        processing.process_images(p)
    gc.collect()
    assert len(refs) == 2 + 2  # one core and its maps, two bound LoRAs
    assert [r() for r in refs] == [None] * len(refs)
    assert _clean(host)


def test_every_image_is_planned_from_its_own_prompt(host) -> None:
    """Wildcards, dynamic prompts and prompts from a file give each image of a batch its own
    prompt: each is planned from it (its own bindings, masks and loss), the bound tags are taken
    out of each prompt, and each image's infotext lists its own bindings."""
    own = "a <lora:corgi:1> dog on a hill"
    p, processed = _generate(host, prompt=[PROMPT, own], batch_size=2, steps=2)
    (first_plan, first), (second_plan, second) = p.loraclr_clora_state.cores
    assert [b.lora for b in first_plan.bindings] == ["blackcat", "corgi"]
    assert [b.lora for b in second_plan.bindings] == ["corgi"] and "hill" in second_plan.base_prompt
    assert first.state.losses and second.state.losses
    assert [n.name for n in importlib.import_module("networks").loaded_networks] == [
        "ghibli"
    ]  # styles stay with the built-in
    assert [t for t in processed.infotexts[2:] if t.startswith("CLoRA mask 2")] == [
        "CLoRA mask 2: base",
        "CLoRA mask 2: corgi",
    ]
    first_info, second_info = (
        eval(text)["CLoRA"] for text in processed.infotexts[:2]
    )  # the stand-in's str(dict)
    assert first_info == second_info  # 1.8.0 gives every image of a job the same value: it lists each image's
    per_image = json.loads(first_info)["bindings_per_image"]
    assert [[b["lora"] for b in image] for image in per_image] == [["blackcat", "corgi"], ["corgi"]]
    assert (
        "bindings" not in json.loads(first_info)
        and CloraSettings.from_infotext(first_info).refine_iterations == 2
    )
    assert _clean(host)


@pytest.mark.parametrize(
    "flags, family",
    [
        ({"is_sd3": True, "is_sd1": False}, "SD3"),
        ({"is_sdxl": True, "is_sd1": False}, "SDXL"),
        ({"is_sd2": True, "is_sd1": False}, "SD2.x"),
        ({"is_sd1": False}, "not SD1.x"),
    ],
)
def test_other_model_families_are_refused_up_front(host, flags, family) -> None:
    """A1111 1.10 loads SD3 beside SD1/SD2/SDXL: anything the host does not flag as SD1 is refused
    before any LoRA is read or any step runs, naming the family and the fix."""
    module = load_script("loraclr_clora")
    module.load_lora = lambda path: pytest.fail("a LoRA was read for a model that is not SD1.x")
    for name, value in flags.items():
        setattr(host.view, name, value)
    try:
        with pytest.raises(
            LoraClrError, match=f"loaded model is {re.escape(family)}.*load an SD1.x checkpoint"
        ):
            _generate(host, script=module.CloraScript(), steps=1)
    finally:
        for name in flags:
            delattr(host.view, name)
    assert _clean(host)


def test_sampler_and_schedule_type_as_the_host_names_them(host) -> None:
    """A1111 1.9+ passes the sampler and the schedule type apart (p.scheduler); CLoRA runs on
    "DPM++ 2M" with the "Karras" schedule as on 1.8's "DPM++ 2M Karras", and the infotext
    round trip holds."""
    sd_samplers = importlib.import_module("modules.sd_samplers")
    p, processed = _generate(host, sampler="DPM++ 2M", scheduler="Karras", steps=3)
    ((_, core),) = p.loraclr_clora_state.cores
    assert core.state.step == 3 and core.state.losses and torch.isfinite(processed.images[0]).all()
    assert torch.equal(
        p.sampler.sigmas, sd_samplers.create_sampler("DPM++ 2M Karras", host.view).get_sigmas(3)
    )
    assert (
        p.scheduler == "Karras"
        and CloraSettings.from_infotext(p.extra_generation_params["CLoRA"]).refine_iterations == 2
    )
    module = load_script("loraclr_clora")
    assert (
        "DPM++ 2M Karras" not in module.HELP
        and "LMS Karras" not in module.HELP
        and "schedule type" in module.HELP
    )


def test_help_and_notes_keep_their_tags_in_markdown(host) -> None:
    """The accordion's help and the bindings note are Markdown: a bare <lora:NAME:W> is an autolink
    there (the brackets vanish); tags go in code spans or are escaped."""
    from markdown_it import MarkdownIt

    module = load_script("loraclr_clora")
    render = MarkdownIt("commonmark").render
    assert "&lt;lora:NAME:WEIGHT&gt;" in render(module.HELP) and "<a href" not in render(module.HELP)
    for prompt in ("a cat and a dog", "a <lora:> cat"):
        _, note = module.bindings_view(prompt)
        assert "&lt;lora:" in render(note) and "<a href" not in render(note), note


def test_every_option_has_a_tooltip_on_both_tabs(host) -> None:
    """javascript/loraclr.js titles each CLoRA option by element id on txt2img AND img2img (the
    host names them script_<tab>_clora_composition_<field>)."""
    import re

    source = (ROOT / "javascript" / "loraclr.js").read_text()
    block = source[
        source.index("const cloraTips = {") : source.index("};", source.index("const cloraTips = {"))
    ]
    fields = set(re.findall(r"^\s+(\w+): \"", block, re.M))
    assert fields == set(CloraSettings.field_names())
    script = load_script("loraclr_clora").CloraScript()
    for tab in ("txt2img", "img2img"):
        script.is_img2img = tab == "img2img"
        assert f'"{tab}"' in source[source.index("for (const tab of") :].split("\n")[0]
        assert all(script.elem_id(f) == f"script_{tab}_clora_composition_{f}" for f in fields)


def test_progress_counts_the_refinement_work(host) -> None:
    """The host's bar is sampling_step / sampling_steps: the latent updates (3 at step 0 here, 21
    with the paper's settings) count beside the steps, so the bar moves during the refinement
    instead of sitting at 0 % with an ETA of hours."""
    records = []
    original = host.view.apply_model
    host.view.apply_model = lambda x, t, cond: (
        records.append((host.shared.state.sampling_step, host.shared.state.sampling_steps)),
        original(x, t, cond),
    )[1]
    try:
        _generate(host, steps=3)  # updates: 1 + 2 refinements at step 0, 1 at step 1 -> 3 steps + 4 updates
    finally:
        del host.view.apply_model
    done = [step for step, _ in records]
    assert {total for _, total in records} == {7}
    assert done == sorted(done) and {0, 1, 2} <= set(done) and done[-1] == 6


def test_token_positions_follow_the_hosts_comma_backtrack(host, monkeypatch) -> None:
    """A full 75-token chunk moves back to its last comma when that is within the user's
    ``comma_padding_backtrack`` tokens (A1111's setting; tests/test_prompts.py checks the shift
    itself): the script plans with the user's value, not the default 20."""
    script = load_script("loraclr_clora")
    seen = []
    original = script.plan_composition

    def spy(*args, **kwargs):
        seen.append(kwargs.get("comma_backtrack"))
        return original(*args, **kwargs)

    monkeypatch.setattr(script, "plan_composition", spy)
    for setting in (0, 7):
        host.shared.opts.comma_padding_backtrack = setting
        _generate(host, steps=2, script=script.CloraScript())
        assert seen[-1] == setting
