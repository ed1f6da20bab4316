"""The WebUI stand-in (tests/webui_stub) on sys.path, a tiny model as ``shared.sd_model``, and a
temp models folder with a tiny checkpoint and tiny LoRAs. Everything is removed afterwards."""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from pathlib import Path

import pytest
import torch

STUB = Path(__file__).resolve().parents[1] / "webui_stub"
ROOT = Path(__file__).resolve().parents[2]


def _purge_stub_modules() -> None:
    for name in list(sys.modules):
        if name in ("modules", "launch", "networks", "ldm", "k_diffusion") or name.startswith(
            ("modules.", "ldm.", "k_diffusion.")
        ):
            del sys.modules[name]


@pytest.fixture()
def host(tmp_path, monkeypatch, own_tiny_model):
    """A fresh stand-in host per test: returns a namespace with shared, sd_models, networks, dirs.
    Its model is this test's own copy: the host's Lora and merge code may change weights."""
    tiny_model = own_tiny_model
    from lib_loraclr.sd.checkpoint import save_checkpoint
    from lib_loraclr.testing import synthetic_loras as sl
    from lib_loraclr.testing.ldm_view import ldm_view

    monkeypatch.syspath_prepend(str(STUB))
    monkeypatch.setenv("LORACLR_STUB_DATA", str(tmp_path))
    _purge_stub_modules()
    shared = importlib.import_module("modules.shared")
    sd_models = importlib.import_module("modules.sd_models")
    networks = importlib.import_module("networks")
    ckpt_dir = tmp_path / "models" / "Stable-diffusion"
    lora_dir = tmp_path / "models" / "Lora"
    ckpt_dir.mkdir(parents=True)
    lora_dir.mkdir(parents=True)
    ckpt = ckpt_dir / "tiny.safetensors"
    save_checkpoint(tiny_model, str(ckpt))
    shapes = sl.layer_shapes(tiny_model.layer_map())
    targets = sl.standard_targets(shapes)
    for seed, name, trigger in (
        (1, "blackcat", "blackcat cat"),
        (2, "corgi", "corgi dog"),
        (3, "ghibli", "ghibli style"),
    ):
        sl.write_kohya_lora(
            lora_dir / f"{name}.safetensors", targets, rank=4, alpha=4.0, seed=seed, scale=0.3
        )
        sl.write_sidecar(lora_dir / f"{name}.safetensors", trigger)
    shared.cmd_opts.ckpt_dir = str(ckpt_dir)
    shared.cmd_opts.lora_dir = str(lora_dir)
    networks.lora_dir = str(lora_dir)
    networks.list_available_networks()
    networks.install_forward_patches()
    sd_models.list_models()
    view = ldm_view(tiny_model)
    info = sd_models.checkpoints_list[next(iter(sd_models.checkpoints_list))]
    heads = {
        id(m.to_q): m.heads for m in tiny_model.unet.modules() if hasattr(m, "to_q") and hasattr(m, "heads")
    }
    for node in view.modules():  # ldm's CrossAttention carries .heads, as diffusers' Attention does
        if hasattr(node, "to_q") and id(node.to_q) in heads:
            object.__setattr__(node, "heads", heads[id(node.to_q)])
    checkpointing = contextlib.ExitStack()
    checkpointing.enter_context(
        ldm_checkpointing(tiny_model, view, importlib.import_module("ldm.modules.diffusionmodules.util"))
    )
    view.sd_checkpoint_info = info
    view.sd_model_checkpoint = info.filename
    shared.sd_model = view
    shared.opts.sd_model_checkpoint = info.title
    monkeypatch.syspath_prepend(str(ROOT))

    class Host:
        pass

    h = Host()
    h.shared, h.sd_models, h.networks = shared, sd_models, networks
    h.ckpt_dir, h.lora_dir, h.ckpt, h.model, h.view = ckpt_dir, lora_dir, ckpt, tiny_model, view
    h.script_callbacks = importlib.import_module("modules.script_callbacks")
    h.script_callbacks.clear_callbacks()
    h.errors = importlib.import_module("modules.errors")
    h.progress = importlib.import_module("modules.progress")
    h.call_queue = importlib.import_module("modules.call_queue")
    try:
        with checkpointing:
            yield h
    finally:
        networks.uninstall_forward_patches()
        _purge_stub_modules()


@contextlib.contextmanager
def ldm_checkpointing(model, view, util, stock: bool = True):
    """The stand-in's transformer blocks and resblocks behave as ldm's under A1111's stock
    ``configs/v1-inference.yaml`` (``use_checkpoint: True``): the ldm-named node of each block
    carries ldm's flag (``checkpoint`` on a BasicTransformerBlock, ``use_checkpoint`` on a ResBlock),
    and while it is True the block runs through ldm's ``checkpoint()`` (no graph inside the block).
    The patched forwards are methods of their block, as ldm's are, so a copy of the model (the
    merge's side copy) runs its own blocks and reads its own flags."""
    from lib_loraclr.webui.patches import patched_attribute

    assert util.__name__ == _UTIL
    paths = {id(module): name for name, module in view.named_modules()}
    with contextlib.ExitStack() as stack:
        for block in model.unet.modules():
            kind = type(block).__name__
            if kind == "BasicTransformerBlock":
                node = view.get_submodule(paths[id(block.attn1.to_q)].rsplit(".attn1.to_q", 1)[0])
                flag, forward = "checkpoint", _checkpointed_transformer
            elif kind == "ResnetBlock2D":
                node = view.get_submodule(paths[id(block.conv1)].rsplit(".in_layers.", 1)[0])
                flag, forward = "use_checkpoint", _checkpointed_resnet
            else:
                continue
            stack.enter_context(patched_attribute(node, flag, stock))
            object.__setattr__(block, "_ldm_node", node)  # not a submodule: the state dict stays as it is
            stack.callback(object.__delattr__, block, "_ldm_node")
            stack.enter_context(patched_attribute(block, "forward", types.MethodType(forward, block)))
        yield


_UTIL = "ldm.modules.diffusionmodules.util"


def _checkpointed_transformer(self, hidden_states, **kwargs):
    """diffusers' transformer block (keyword arguments) through ldm's ``checkpoint(func, (x, context), ...)``."""
    context = kwargs.pop("encoder_hidden_states", None)
    inner = lambda x, c: type(self).forward(self, x, encoder_hidden_states=c, **kwargs)  # noqa: E731
    return sys.modules[_UTIL].checkpoint(
        inner, (hidden_states, context), list(self.parameters()), self._ldm_node.checkpoint
    )


def _checkpointed_resnet(self, hidden_states, temb):
    """diffusers' resnet ``resnet(x, temb)`` through ldm's ``checkpoint(func, (x, emb), ...)``."""
    inner = lambda x, e: type(self).forward(self, x, e)  # noqa: E731
    return sys.modules[_UTIL].checkpoint(
        inner, (hidden_states, temb), list(self.parameters()), self._ldm_node.use_checkpoint
    )


def load_script(name: str):
    """Import one of our scripts/*.py the way the WebUI does (a module per file, run at import)."""
    spec = importlib.util.spec_from_file_location(f"loraclr_test_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# how far the script's picture (pixels in [-1, 1]) may be from the oracle's: float rounding of the
# same sums in other orders (batched rows, the host's CFG layout, the CPU's thread count), grown
# over the steps; 1.04e-4 was seen with Euler a on 2 threads. A wrong mask, step or LoRA routing
# moves pixels by 1e-3 to 1.
ORACLE_ATOL = 5e-4


def composed_image(
    model, lora_dir: Path, prompt: str, args: dict, sampler: str, steps: int, cfg_scale: float = 7.0
):
    """The oracle for the script: the core's own :func:`~lib_loraclr.clora.compose.compose` (its
    reference sampler, its encoder, its routing) on the pristine tiny model, from the stand-in's
    noise for seed 5 and its negative prompt, decoded. ``sampler``: the CLI's name."""
    from lib_loraclr.clora.compose import compose
    from lib_loraclr.clora.settings import CloraSettings
    from lib_loraclr.lora.file import load_lora

    loras = {path.stem: load_lora(path) for path in sorted(lora_dir.glob("*.safetensors"))}
    noise = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(5))[None]
    result = compose(
        model,
        prompt,
        loras,
        CloraSettings.from_dict(args),
        negative="blurry",
        steps=steps,
        cfg_scale=cfg_scale,
        seed=5,
        sampler=sampler,
        width=64,
        height=64,
        latents=noise,
    )
    with torch.no_grad():
        return model.decode(result.latents)[0]
