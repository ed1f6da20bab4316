"""Layer names: kohya module names (canonical) <-> diffusers/transformers paths <-> ldm (WebUI) paths.

Every LoRA format names its target layers differently: kohya files use the diffusers path with
underscores (``lora_unet_down_blocks_0_attentions_0_proj_in``), diffusers/PEFT files the dotted
path, the WebUI's model the original ldm path (``model.diffusion_model.input_blocks.1.1.proj_in``).
We name every layer by its kohya name (with ``text_model_`` for the text encoder) and convert at
the edges, so routing, merging and attention capture never care which runtime built the model.

The conversions are rules on the SD1.x structure, checked in the tests against the full SD1.5 key
list and all 350 kohya module names in ``tests/data``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only where a layer map is built: ``inspect`` reads headers only
    from torch import nn

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
LDM_UNET = "model.diffusion_model."
LDM_TEXT = "cond_stage_model.transformer.text_model."

_ATTN_LEAF = r"(?:attn[12]_(?:to_q|to_k|to_v|to_out_0))|ff_net_0_proj|ff_net_2|norm[123]"
_ATTENTION_REST = re.compile(rf"^(proj_in|proj_out|norm|transformer_blocks_(\d+)_({_ATTN_LEAF}))$")
_RESNET_REST = re.compile(r"^(conv1|conv2|time_emb_proj|conv_shortcut|norm1|norm2)$")
_UNET_BLOCK = re.compile(r"^(?:(down_blocks|up_blocks)_(\d+)_|(mid_block)_)(attentions|resnets)_(\d+)_(.+)$")
_SAMPLER = re.compile(r"^(down_blocks|up_blocks)_(\d+)_(downsamplers|upsamplers)_0_conv$")
_UNET_TOP = {
    "conv_in": "conv_in",
    "conv_out": "conv_out",
    "time_embedding_linear_1": "time_embedding.linear_1",
    "time_embedding_linear_2": "time_embedding.linear_2",
}
_TE_REST = re.compile(r"^(?:text_model_)?encoder_layers_(\d+)_(self_attn_(q|k|v|out)_proj|mlp_fc1|mlp_fc2)$")


def _attention_leaf(leaf: str) -> str:
    """``attn1_to_out_0`` -> ``attn1.to_out.0``; ``ff_net_0_proj`` -> ``ff.net.0.proj``."""
    if leaf.startswith("attn"):
        attn, rest = leaf[:5], leaf[6:]
        return f"{attn}.{rest.replace('to_out_0', 'to_out.0')}"
    if leaf.startswith("ff_net_"):
        return leaf.replace("ff_net_0_proj", "ff.net.0.proj").replace("ff_net_2", "ff.net.2")
    return leaf


def normalise_kohya_name(name: str) -> str:
    """The canonical spelling: text-encoder names always carry ``text_model_``."""
    if name.startswith(TE_PREFIX) and name[len(TE_PREFIX) :].startswith("encoder_"):
        return TE_PREFIX + "text_model_" + name[len(TE_PREFIX) :]
    return name


def kohya_to_diffusers(name: str) -> tuple[str, str] | None:
    """``("unet" | "te", module path)`` of a kohya SD1.x module name, or ``None`` if unknown.

    The text-encoder path is given with ``text_model.`` (transformers 4.x layout).
    """
    if name.startswith(TE_PREFIX):
        match = _TE_REST.match(name[len(TE_PREFIX) :])
        if not match:
            return None
        layer, part = match.group(1), match.group(2)
        part = part.replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
        return "te", f"text_model.encoder.layers.{layer}.{part}"
    if not name.startswith(UNET_PREFIX):
        return None
    rest = name[len(UNET_PREFIX) :]
    if rest in _UNET_TOP:
        return "unet", _UNET_TOP[rest]
    match = _SAMPLER.match(rest)
    if match:
        return "unet", f"{match.group(1)}.{match.group(2)}.{match.group(3)}.0.conv"
    match = _UNET_BLOCK.match(rest)
    if not match:
        return None
    outer, block, mid, kind, index, inner = match.groups()
    prefix = f"{outer}.{block}" if outer else mid
    if kind == "attentions":
        inner_match = _ATTENTION_REST.match(inner)
        if not inner_match:
            return None
        if inner_match.group(2) is not None:
            inner_path = f"transformer_blocks.{inner_match.group(2)}.{_attention_leaf(inner_match.group(3))}"
        else:
            inner_path = inner
    else:
        if not _RESNET_REST.match(inner):
            return None
        inner_path = inner
    return "unet", f"{prefix}.{kind}.{index}.{inner_path}"


def diffusers_to_kohya(part: str, path: str) -> str:
    """Inverse of :func:`kohya_to_diffusers` (``part`` is ``"unet"`` or ``"te"``)."""
    if part == "te":
        if not path.startswith("text_model."):
            path = "text_model." + path
        return normalise_kohya_name(TE_PREFIX + path.replace(".", "_"))
    return UNET_PREFIX + path.replace(".", "_")


def kohya_to_ldm(name: str) -> str | None:
    """The WebUI (ldm) module path of a kohya SD1.x module name, or ``None`` if unknown."""
    resolved = kohya_to_diffusers(normalise_kohya_name(name))
    if resolved is None:
        return None
    part, path = resolved
    if part == "te":
        return LDM_TEXT + path[len("text_model.") :]
    return unet_diffusers_to_ldm(path + ".weight")[: -len(".weight")]


def sd1_layer_names(text_layers: int = 12) -> list[str]:
    """Every kohya name a LoRA/LoCon can target on SD1.x (text encoder with ``text_layers`` layers).

    Candidates are generated from the block structure; names that an actual model lacks (e.g.
    ``conv_shortcut`` where the widths do not change) are filtered by the caller's model.
    """
    names: list[str] = []
    attention = ["proj_in", "proj_out"] + [
        f"transformer_blocks_0_{leaf}"
        for leaf in (
            *(f"attn{a}_{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out_0")),
            "ff_net_0_proj",
            "ff_net_2",
        )
    ]
    resnet = ["conv1", "time_emb_proj", "conv2", "conv_shortcut"]
    for block in range(4):
        for i in range(2):
            names += [f"{UNET_PREFIX}down_blocks_{block}_resnets_{i}_{p}" for p in resnet]
            if block < 3:
                names += [f"{UNET_PREFIX}down_blocks_{block}_attentions_{i}_{p}" for p in attention]
        if block < 3:
            names.append(f"{UNET_PREFIX}down_blocks_{block}_downsamplers_0_conv")
    for i in range(2):
        names += [f"{UNET_PREFIX}mid_block_resnets_{i}_{p}" for p in resnet]
    names += [f"{UNET_PREFIX}mid_block_attentions_0_{p}" for p in attention]
    for block in range(4):
        for i in range(3):
            names += [f"{UNET_PREFIX}up_blocks_{block}_resnets_{i}_{p}" for p in resnet]
            if block > 0:
                names += [f"{UNET_PREFIX}up_blocks_{block}_attentions_{i}_{p}" for p in attention]
        if block < 3:
            names.append(f"{UNET_PREFIX}up_blocks_{block}_upsamplers_0_conv")
    names += [f"{UNET_PREFIX}{name}" for name in _UNET_TOP]
    for layer in range(text_layers):
        for part in (
            "self_attn_q_proj",
            "self_attn_k_proj",
            "self_attn_v_proj",
            "self_attn_out_proj",
            "mlp_fc1",
            "mlp_fc2",
        ):
            names.append(f"{TE_PREFIX}text_model_encoder_layers_{layer}_{part}")
    return names


def _is_weight_layer(module: nn.Module) -> bool:
    from torch import nn

    return isinstance(module, (nn.Linear, nn.Conv2d))


# Where the text encoder's layers live in a WebUI model: A1111's prompt hijack wraps the original
# embedder (``cond_stage_model.wrapped``), and transformers 5 drops the ``text_model.`` level.
_TEXT_PREFIXES = (
    "cond_stage_model.transformer.",
    "cond_stage_model.wrapped.transformer.text_model.",
    "cond_stage_model.wrapped.transformer.",
)


def layer_map_ldm(root: nn.Module, text_layers: int = 24) -> dict[str, nn.Module]:
    """Canonical name -> live ``Linear``/``Conv2d`` of a WebUI-style (ldm-named) model.

    ``root`` is the WebUI's ``sd_model`` (names start with ``model.diffusion_model.`` and
    ``cond_stage_model.transformer.``, or ``cond_stage_model.wrapped.transformer.`` under A1111's
    prompt hijack); a text encoder without ``text_model.`` is found too.
    """
    modules = dict(root.named_modules())
    found: dict[str, nn.Module] = {}
    for name in sd1_layer_names(text_layers):
        path = kohya_to_ldm(name)
        if path is None:
            continue
        module = modules.get(path)
        if module is None and path.startswith(LDM_TEXT):
            rest = path[len(LDM_TEXT) :]
            for prefix in _TEXT_PREFIXES:
                module = modules.get(prefix + rest)
                if module is not None:
                    break
        if module is not None and _is_weight_layer(module):
            found[name] = module
    return found


def layer_map_diffusers(unet: nn.Module | None, text_encoder: nn.Module | None) -> dict[str, nn.Module]:
    """Canonical name -> live ``Linear``/``Conv2d`` of diffusers/transformers modules."""
    found: dict[str, nn.Module] = {}
    if unet is not None:
        for path, module in unet.named_modules():
            if path and _is_weight_layer(module):
                name = diffusers_to_kohya("unet", path)
                if kohya_to_diffusers(name) == ("unet", path):
                    found[name] = module
    if text_encoder is not None:
        for path, module in text_encoder.named_modules():
            if path and _is_weight_layer(module):
                name = diffusers_to_kohya("te", path)
                if kohya_to_diffusers(name) is not None:
                    found[name] = module
    return found


def resolve_against_keys(
    names: Iterable[str], ldm_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str]]:
    """Split canonical names into those whose ``<ldm path>.weight`` is in ``ldm_shapes`` and the rest."""
    resolved, unresolved = [], []
    for name in names:
        path = kohya_to_ldm(name)
        key = f"{path}.weight" if path else None
        alt = (
            f"cond_stage_model.transformer.{path[len(LDM_TEXT) :]}.weight"
            if path and path.startswith(LDM_TEXT)
            else None
        )
        (resolved if key in ldm_shapes or alt in ldm_shapes else unresolved).append(name)
    return resolved, unresolved


def ldm_weight_shape(name: str, ldm_shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The base weight shape of a canonical layer in a checkpoint's key->shape table."""
    path = kohya_to_ldm(name)
    if path is None:
        return None
    shape = ldm_shapes.get(f"{path}.weight")
    if shape is None and path.startswith(LDM_TEXT):
        shape = ldm_shapes.get(f"cond_stage_model.transformer.{path[len(LDM_TEXT) :]}.weight")
    return tuple(shape) if shape is not None else None


# -- full state-dict keys: diffusers UNet <-> ldm ``model.diffusion_model.*`` ---------------------
# A resnet's layers are named by role in diffusers and by position in ldm's Sequential containers.
_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_TO_DIFFUSERS = {v: k for k, v in _RESNET_TO_LDM.items()}
_TOP_TO_LDM = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_TOP_TO_DIFFUSERS = {v: k for k, v in _TOP_TO_LDM.items()}


def _resnet_to_ldm(rest: str) -> str:
    head, _, leaf = rest.rpartition(".")
    if head not in _RESNET_TO_LDM:
        raise KeyError(rest)
    return f"{_RESNET_TO_LDM[head]}.{leaf}"


def _resnet_to_diffusers(rest: str) -> str:
    head, _, leaf = rest.rpartition(".")
    if head not in _RESNET_TO_DIFFUSERS:
        raise KeyError(rest)
    return f"{_RESNET_TO_DIFFUSERS[head]}.{leaf}"


def unet_diffusers_to_ldm(key: str, layers_per_block: int = 2) -> str:
    """A diffusers ``UNet2DConditionModel`` state-dict key of SD1.x -> its ldm checkpoint key.

    ldm numbers its blocks flat: ``input_blocks.k`` with ``k = level*(L+1) + j + 1`` (the
    downsampler of a level at ``(level+1)*(L+1)``), ``output_blocks.k`` with ``k = level*(L+1) + j``
    (``L`` = layers per block, 2 in SD1). Attention blocks keep their inner names. Raises
    ``KeyError`` for a key SD1.x does not have, so a converter never silently drops a tensor.
    """
    n = layers_per_block + 1
    try:
        if m := re.fullmatch(r"(time_embedding\.linear_[12]|conv_in|conv_norm_out|conv_out)\.(\w+)", key):
            return f"{LDM_UNET}{_TOP_TO_LDM[m[1]]}.{m[2]}"
        if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            side, level, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            if side == "down":
                index, blocks = level * n + j + 1, "input_blocks"
            else:
                index, blocks = level * n + j, "output_blocks"
            inner = f"1.{rest}" if kind == "attentions" else f"0.{_resnet_to_ldm(rest)}"
            return f"{LDM_UNET}{blocks}.{index}.{inner}"
        if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            return f"{LDM_UNET}input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
        if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            level = int(m[1])
            # SD1's first up level (lowest resolution) has no attention: its upsampler is sub-block 1.
            return (
                f"{LDM_UNET}output_blocks.{level * n + layers_per_block}.{2 if level > 0 else 1}.conv.{m[2]}"
            )
        if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
            if m[1] == "attentions" and m[2] == "0":
                return f"{LDM_UNET}middle_block.1.{m[3]}"
            if m[1] == "resnets" and m[2] in ("0", "1"):
                return f"{LDM_UNET}middle_block.{2 * int(m[2])}.{_resnet_to_ldm(m[3])}"
    except KeyError:
        pass
    raise KeyError(f"not an SD1.x UNet key (diffusers layout): {key}")


def unet_ldm_to_diffusers(key: str, layers_per_block: int = 2) -> str:
    """Inverse of :func:`unet_diffusers_to_ldm`; ``key`` may carry ``model.diffusion_model.``."""
    rel = key[len(LDM_UNET) :] if key.startswith(LDM_UNET) else key
    n = layers_per_block + 1
    try:
        if m := re.fullmatch(r"(time_embed\.[02]|input_blocks\.0\.0|out\.[02])\.(\w+)", rel):
            return f"{_TOP_TO_DIFFUSERS[m[1]]}.{m[2]}"
        if m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op\.(\w+)", rel):
            return f"down_blocks.{int(m[1]) // n - 1}.downsamplers.0.conv.{m[2]}"
        if m := re.fullmatch(r"input_blocks\.(\d+)\.([01])\.(.+)", rel):
            level, j = divmod(int(m[1]) - 1, n)
            if j < layers_per_block:
                if m[2] == "1":
                    return f"down_blocks.{level}.attentions.{j}.{m[3]}"
                return f"down_blocks.{level}.resnets.{j}.{_resnet_to_diffusers(m[3])}"
        if m := re.fullmatch(r"output_blocks\.(\d+)\.([012])\.(.+)", rel):
            level, j = divmod(int(m[1]), n)
            sub, rest = m[2], m[3]
            is_upsampler = (sub == "2" or (sub == "1" and level == 0)) and j == layers_per_block
            if is_upsampler and (c := re.fullmatch(r"conv\.(\w+)", rest)):
                return f"up_blocks.{level}.upsamplers.0.conv.{c[1]}"
            if sub == "1" and level > 0:
                return f"up_blocks.{level}.attentions.{j}.{rest}"
            if sub == "0":
                return f"up_blocks.{level}.resnets.{j}.{_resnet_to_diffusers(rest)}"
        if m := re.fullmatch(r"middle_block\.([012])\.(.+)", rel):
            if m[1] == "1":
                return f"mid_block.attentions.0.{m[2]}"
            return f"mid_block.resnets.{int(m[1]) // 2}.{_resnet_to_diffusers(m[2])}"
    except KeyError:
        pass
    raise KeyError(f"not an SD1.x UNet key (ldm layout): {key}")


# -- text encoder: ldm ``cond_stage_model.transformer.*`` <-> transformers ``CLIPTextModel`` -------
LDM_TEXT_ROOT = "cond_stage_model.transformer."


def transformers_text_prefix(text_encoder: object) -> str:
    """``"text_model."`` where ``CLIPTextModel`` nests its tower (transformers 4), else ``""`` (5)."""
    return "text_model." if hasattr(text_encoder, "text_model") else ""


def te_ldm_to_transformers(key: str, prefix: str = "text_model.") -> str:
    """ldm text-encoder key -> ``CLIPTextModel`` state-dict key (``prefix`` from
    :func:`transformers_text_prefix`). Old checkpoints without ``text_model.`` are accepted."""
    if not key.startswith(LDM_TEXT_ROOT):
        raise KeyError(f"not an SD1.x text-encoder key (ldm layout): {key}")
    rest = key[len(LDM_TEXT_ROOT) :]
    rest = rest.removeprefix("text_model.")
    if not rest.startswith(("embeddings.", "encoder.layers.", "final_layer_norm.")):
        raise KeyError(f"not an SD1.x text-encoder key (ldm layout): {key}")
    return prefix + rest


def te_transformers_to_ldm(key: str) -> str:
    """``CLIPTextModel`` state-dict key (with or without ``text_model.``) -> ldm checkpoint key."""
    rest = key.removeprefix("text_model.")
    if not rest.startswith(("embeddings.", "encoder.layers.", "final_layer_norm.")):
        raise KeyError(f"not a CLIP text-encoder key: {key}")
    return f"{LDM_TEXT}{rest}"
