"""The merge tab against the host stand-in, driven through its real gradio Blocks and the queue wrapper:
a loadable, listed checkpoint; the loaded model byte-identical after success, interrupt and error;
clear messages for bad input."""

from __future__ import annotations

import hashlib
import html
import shutil

import pytest
import torch

from lib_loraclr.merge import request as mr
from lib_loraclr.webui.merge_form import CONCEPT_HEADERS, MergeForm
from tests.webui.conftest import load_script

FAST = {"steps": 2, "resolution": 64, "iterations": 5}


def _snapshot(view):
    return {k: v.detach().clone() for k, v in view.state_dict().items()}


def _unchanged(view, before) -> bool:
    after = view.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _no_hooks(view) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in view.modules())


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Tab:
    """Builds the tab like the WebUI (settings first) and clicks Merge as the browser would."""

    def __init__(self, host, compare: bool = False) -> None:
        load_script("loraclr_settings")
        self.script = load_script("loraclr_merge_tab")
        host.script_callbacks.ui_settings_callback()
        host.shared.opts.loraclr_compare_methods = compare
        self.ui = self.script.MergeTab()
        self.host = host
        # gradio 3.41 (the WebUI's) keeps an event's ``_js`` in ``dependencies``, its function in ``fns``
        found = [
            i for i, d in enumerate(self.ui.blocks.dependencies) if d.get("js") == "loraclr_merge_submit"
        ]
        assert len(found) == 1
        self.merge_fn = self.ui.blocks.fns[found[0]].fn

    def values(self, rows, **overrides):
        c = self.ui.components
        values = {name: comp.value for name, comp in c.items()}
        values["concepts"] = c["concepts"].preprocess(
            {"data": rows, "headers": CONCEPT_HEADERS}
        )  # a DataFrame
        values.update({k: v for k, v in FAST.items()})
        values["output_name"] = "cat_dog"
        values.update(overrides)
        return [values[name] for name in MergeForm.names()]

    def merge(self, rows, task="task(loraclr-1)", **overrides):
        return self.merge_fn(task, *self.values(rows, **overrides))


ROWS = [["blackcat", 1.0, ""], ["corgi", 0.8, "corgi dog"]]


def test_merge_writes_a_listed_loadable_checkpoint_and_keeps_the_model(host) -> None:
    tabs = Tab(host)
    assert host.script_callbacks.ui_tabs_callback()[0][1:] == ("LoRACLR merge", "loraclr_merge")
    before, base_sha = _snapshot(host.view), _sha(host.ckpt)
    base_update, title, status = tabs.merge(ROWS, lora_rank=4)
    assert "Saved" in status and "Time taken" in status, (
        status
    )  # the wrapper appends stats to the last (HTML) output
    assert title in host.sd_models.checkpoint_tiles() and title in base_update["choices"]
    assert "task(loraclr-1)" in host.progress.finished_tasks and host.shared.state.job == ""
    assert (host.lora_dir / "cat_dog_lora_r4.safetensors").exists()  # a <lora:...> at once, not a checkpoint
    assert "cat_dog_lora_r4" in host.networks.available_networks
    assert not (host.ckpt_dir / "cat_dog_lora_r4.safetensors").exists()
    assert _unchanged(host.view, before) and _no_hooks(host.view) and _sha(host.ckpt) == base_sha
    from lib_loraclr.lora.safetensors_io import read_header
    from lib_loraclr.sd.checkpoint import load_checkpoint

    merged = load_checkpoint(str(host.ckpt_dir / "cat_dog.safetensors"))
    assert merged.unet is not None
    assert "loraclr" in str(read_header(host.ckpt_dir / "cat_dog.safetensors").metadata)
    assert "Loading cat_dog.safetensors" in tabs.script.load_clicked(title)
    # a second click with the same name is refused until overwrite is ticked
    _, _, again = tabs.merge(ROWS)
    again = html.unescape(again)
    assert "already exists" in again and "tick 'overwrite'" in again


def test_interrupt_and_skip_mid_merge_write_nothing(host) -> None:
    tabs = Tab(host)
    state_cls = type(host.shared.state)

    for flag in ("interrupted", "skipped"):

        class StopAfterFirstStep(state_cls):
            def __setattr__(self, key, value, _flag=flag):
                super().__setattr__(key, value)
                if key == "sampling_step" and value >= 1:
                    super().__setattr__(
                        _flag, True
                    )  # what the Interrupt/Skip button does while the merge runs

        host.shared.state = StopAfterFirstStep()
        before = _snapshot(host.view)
        _, title, status = tabs.merge(ROWS, output_name=f"stopped_{flag}")
        assert "interrupted" in status and title == ""
        assert not (host.ckpt_dir / f"stopped_{flag}.safetensors").exists()
        assert _unchanged(host.view, before) and _no_hooks(host.view)
        assert (
            not host.shared.state.interrupted and not host.shared.state.skipped
        )  # the wrapper clears the flags


def test_error_mid_merge_leaves_no_hooks_and_identical_weights(host) -> None:
    tabs = Tab(host)
    state_cls = type(host.shared.state)

    class FailingState(state_cls):
        def __setattr__(self, key, value):
            if key == "sampling_step" and value >= 1:
                raise RuntimeError("boom in the middle of the merge")
            super().__setattr__(key, value)

    host.shared.state = FailingState()
    before = _snapshot(host.view)
    base_update, title, status = tabs.merge(ROWS, output_name="failed")
    assert "RuntimeError: boom" in status and "class='error'" in status  # the WebUI's own error box
    assert not (host.ckpt_dir / "failed.safetensors").exists()
    assert _unchanged(host.view, before) and _no_hooks(host.view)
    assert host.errors.reported


def test_bad_input_gives_messages(host) -> None:
    tabs = Tab(host)
    cases = [
        ([["nope", 1.0, ""], ["corgi", 1.0, ""]], {}, "LoRA not found: nope"),
        ([["corgi", 1.0, ""], ["corgi", 1.0, ""]], {}, "listed twice"),
        ([["", 1.0, ""]], {}, "no LoRAs chosen"),
        (ROWS, {"output_name": "../escape"}, "without folders or '..'"),
        (ROWS, {"output_name": "model.ckpt"}, ".safetensors only"),
        (ROWS, {"base": "missing-model"}, "checkpoint 'missing-model' not found"),
        (ROWS, {"resolution": 100}, "multiple of 64"),
        (ROWS, {"groups": []}, "choose one or more"),
    ]
    before = _snapshot(host.view)
    for rows, overrides, message in cases:
        _, title, status = tabs.merge(rows, **overrides)
        status = html.unescape(status)
        assert message in status and title == "", (message, status)
    assert _unchanged(host.view, before)
    assert sorted(p.name for p in host.ckpt_dir.iterdir()) == ["tiny.safetensors"]


def test_other_base_is_merged_on_a_side_copy(host) -> None:
    other = host.ckpt_dir / "other.safetensors"
    shutil.copyfile(host.ckpt, other)
    host.sd_models.list_models()
    tabs = Tab(host)
    before = _snapshot(host.view)
    _, title, status = tabs.merge(ROWS, base="other.safetensors", method="Naive sum", output_name="on_other")
    assert "Saved" in status, status
    assert title == "on_other.safetensors" and _unchanged(host.view, before) and _no_hooks(host.view)


def test_builtin_lora_patches_are_suspended_and_restored(host, monkeypatch) -> None:
    tabs = Tab(host)
    layer = dict(host.view.named_modules())[
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    ]
    clean = layer.weight.detach().clone()
    layer.network_weights_backup = clean.clone()
    with torch.no_grad():
        layer.weight.add_(1.0)  # what the built-in leaves after a generation with a <lora> tag
    layer.network_current_names = (("somelora", 1.0, 1.0, None),)
    patched = layer.weight.detach().clone()
    seen = {}
    from lib_loraclr.merge import service as merge_service

    original = merge_service.merge_to_checkpoint

    def spy(model, *args, **kwargs):
        seen["weight"] = (
            model.layer_map()["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"]
            .weight.detach()
            .clone()
        )
        return original(model, *args, **kwargs)

    monkeypatch.setattr(merge_service, "merge_to_checkpoint", spy)
    _, _, status = tabs.merge(ROWS, method="Naive sum", output_name="clean")
    assert "Saved" in status, status
    assert torch.equal(seen["weight"], clean)
    assert torch.equal(layer.weight, patched) and layer.network_current_names


def test_concept_rows_picker_refresh_and_settings(host) -> None:
    tabs = Tab(host)
    script = tabs.script
    rows, message = script.tags_changed("<lora:blackcat:0.7> <lora:corgi>", None)
    assert rows == [["blackcat", 0.7, "blackcat cat"], ["corgi", 1.0, "corgi dog"]] and message == ""
    assert script.tags_changed("<lora:corgi>", [["corgi", 1.0, "my own text"]])[0] == [
        ["corgi", 1.0, "my own text"]
    ]
    assert "not a number" in script.tags_changed("<lora:corgi:abc>", None)[1]
    (host.lora_dir / "ghibli.json").write_text('{"activation text": "ghibli style", "preferred weight": 0.6}')
    assert script.lora_picked("ghibli", "<lora:corgi:1>") == ("<lora:corgi:1> <lora:ghibli:0.6>", None)
    assert script.lora_picked("corgi", "<lora:corgi:1>")[0] == "<lora:corgi:1>"
    shutil.copyfile(host.lora_dir / "corgi.safetensors", host.lora_dir / "corgi2.safetensors")
    shutil.copyfile(host.ckpt, host.ckpt_dir / "new.safetensors")
    base, picker = script.refreshed()
    assert "new.safetensors" in base["choices"] and "corgi2" in picker["choices"]
    assert "Nothing to load" in script.load_clicked("")
    opts = host.shared.opts
    assert opts.loraclr_default_method == "loraclr" and opts.data_labels["loraclr_merge_dir"].section == (
        "loraclr",
        "LoRACLR / CLoRA",
    )
    assert all(
        key.startswith("loraclr_")
        for key in script.shared.opts.data_labels
        if key not in ("sd_model_checkpoint", "memmon_poll_rate", "extra_networks_default_multiplier")
    )


def test_merge_dir_option_and_flag(host, tmp_path) -> None:
    from lib_loraclr.webui import host as hs

    sub = host.ckpt_dir / "LoRACLR"
    assert hs.merge_folder(host.shared.cmd_opts, host.shared.opts, "/unused") == str(host.ckpt_dir)
    host.shared.opts.loraclr_merge_dir = str(sub)
    assert hs.merge_folder(host.shared.cmd_opts, host.shared.opts, "/unused") == str(sub) and sub.is_dir()
    host.shared.cmd_opts.loraclr_merge_dir = str(tmp_path / "flag")
    assert hs.merge_folder(host.shared.cmd_opts, host.shared.opts, "/unused") == str(tmp_path / "flag")


def test_the_api_names_the_body_fields_for_an_unknown_one(host) -> None:
    module = load_script("loraclr_api")
    with pytest.raises(
        mr.MergeRequestError, match=r"unknown field\(s\) \['loarz'\]; the body's fields are base, "
    ) as info:
        module.request_from_body({"loarz": [], "output_name": "x"})
    assert "estimate" in str(info.value) and "README.md, section API" in str(info.value)
