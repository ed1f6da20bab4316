"""A family's layer tables, generated from its architecture (as the model's constructor lays it out).

Three runtimes name the same layer three ways: diffusers/transformers module paths
(``down_blocks.1.attentions.0.proj_in``), the original ldm/sgm module paths that checkpoints and the
WebUI use (``model.diffusion_model.input_blocks.4.1.proj_in``), and kohya's LoRA module names (one of
those paths with underscores). Instead of parsing one spelling and rewriting it into another, we
walk the architecture once, level by level as ldm's ``UNetModel`` and diffusers'
``UNet2DConditionModel`` build it, and record every module under all of its names; each conversion is
then a dictionary lookup, and a name the architecture does not have is simply absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the name tables load without torch (the LoRA key map is read before it)
    import torch

# ldm's ResBlock keeps its layers in Sequential containers; diffusers names them by role.
RESNET_MODULES = (
    ("norm1", "in_layers.0", False),
    ("conv1", "in_layers.2", True),
    ("time_emb_proj", "emb_layers.1", True),
    ("norm2", "out_layers.0", False),
    ("conv2", "out_layers.3", True),
    ("conv_shortcut", "skip_connection", True),
)
# Inside a transformer block both runtimes use the same names (third field: a weight layer).
TRANSFORMER_BLOCK_MODULES = (
    *((f"attn{a}.{p}", True) for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
    ("ff.net.0.proj", True),
    ("ff.net.2", True),
    ("norm1", False),
    ("norm2", False),
    ("norm3", False),
)
ATTENTION_OUTER = (("norm", False), ("proj_in", True), ("proj_out", True))
TEXT_LAYER_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)


@dataclass(frozen=True)
class UNetLayout:
    """What fixes a UNet's module names: its levels, resnets per level, and the transformer depth
    of each level's attention blocks (0: the level has none); the up path mirrors the down path."""

    depths: tuple[int, ...]  # per down level, highest resolution first
    mid_depth: int
    layers_per_block: int = 2
    add_embedding: bool = False  # SDXL's ``label_emb`` (pooled text and size embeddings)

    @property
    def levels(self) -> int:
        return len(self.depths)


@dataclass(frozen=True)
class UNetModule:
    """One UNet module under both names, with the feature scale its block runs at."""

    diffusers: str
    ldm: str  # relative to ``model.diffusion_model.``
    weight_layer: bool  # a Linear/Conv a LoRA can target (not a norm)
    kind: str  # "resnet" | "attention" | "sampler" | "top"
    downscale: int  # how many times smaller than the latent its feature map is


def _resnet(diffusers: str, ldm: str, downscale: int) -> list[UNetModule]:
    return [
        UNetModule(f"{diffusers}.{d}", f"{ldm}.{m}", w, "resnet", downscale) for d, m, w in RESNET_MODULES
    ]


def _attention(diffusers: str, ldm: str, depth: int, downscale: int) -> list[UNetModule]:
    inner = [*ATTENTION_OUTER]
    inner += [
        (f"transformer_blocks.{b}.{leaf}", w) for b in range(depth) for leaf, w in TRANSFORMER_BLOCK_MODULES
    ]
    return [UNetModule(f"{diffusers}.{p}", f"{ldm}.{p}", w, "attention", downscale) for p, w in inner]


def unet_modules(layout: UNetLayout) -> list[UNetModule]:
    """Every module of a UNet with ``layout``, in the order ldm builds them.

    ldm numbers its blocks flat: ``input_blocks.0`` is ``conv_in``; a down level ``l`` has its
    resnets (each followed by an attention block when the level has one) at ``l*(L+1)+j+1`` and its
    downsampler after them; ``output_blocks`` hold ``L+1`` resnets per up level, the last one
    followed by the upsampler, which is sub-block 2 when that block has attention, else 1.
    """
    n, per = layout.levels, layout.layers_per_block
    out = [
        UNetModule("conv_in", "input_blocks.0.0", True, "top", 1),
        UNetModule("time_embedding.linear_1", "time_embed.0", True, "top", 1),
        UNetModule("time_embedding.linear_2", "time_embed.2", True, "top", 1),
    ]
    if layout.add_embedding:
        out += [
            UNetModule("add_embedding.linear_1", "label_emb.0.0", True, "top", 1),
            UNetModule("add_embedding.linear_2", "label_emb.0.2", True, "top", 1),
        ]
    for level, depth in enumerate(layout.depths):
        scale = 2**level
        for j in range(per):
            index = level * (per + 1) + j + 1
            out += _resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{index}.0", scale)
            if depth:
                out += _attention(
                    f"down_blocks.{level}.attentions.{j}", f"input_blocks.{index}.1", depth, scale
                )
        if level < n - 1:
            index = (level + 1) * (per + 1)
            out.append(
                UNetModule(
                    f"down_blocks.{level}.downsamplers.0.conv",
                    f"input_blocks.{index}.0.op",
                    True,
                    "sampler",
                    scale,
                )
            )
    bottom = 2 ** (n - 1)
    out += _resnet("mid_block.resnets.0", "middle_block.0", bottom)
    out += _attention("mid_block.attentions.0", "middle_block.1", layout.mid_depth, bottom)
    out += _resnet("mid_block.resnets.1", "middle_block.2", bottom)
    for up in range(n):
        depth = layout.depths[n - 1 - up]
        scale = 2 ** (n - 1 - up)
        for j in range(per + 1):
            index = up * (per + 1) + j
            out += _resnet(f"up_blocks.{up}.resnets.{j}", f"output_blocks.{index}.0", scale)
            if depth:
                out += _attention(f"up_blocks.{up}.attentions.{j}", f"output_blocks.{index}.1", depth, scale)
        if up < n - 1:
            index = up * (per + 1) + per
            sub = 2 if depth else 1
            out.append(
                UNetModule(
                    f"up_blocks.{up}.upsamplers.0.conv",
                    f"output_blocks.{index}.{sub}.conv",
                    True,
                    "sampler",
                    scale,
                )
            )
    out += [
        UNetModule("conv_norm_out", "out.0", False, "top", 1),
        UNetModule("conv_out", "out.2", True, "top", 1),
    ]
    return out


# OpenCLIP's text model <-> transformers' ``CLIPTextModelWithProjection``: top-level tensors, and
# each residual block's (``transformer.resblocks.{i}.`` <- ``text_model.encoder.layers.{i}.``).
OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
OPENCLIP_BLOCK = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
OPENCLIP_FUSED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # in_proj's row blocks
# OpenCLIP keeps CLIP's contrastive temperature beside the text model; text encoding never reads
# it. Writing a checkpoint from a model built in code, we give OpenCLIP's initial value, log(1/0.07).
OPENCLIP_EXTRA = {"logit_scale": 2.659260036932778}


@dataclass(frozen=True)
class Source:
    """Where one tensor of a transformers text model lives in a checkpoint: its key, which of the
    equal row blocks of a fused tensor it is (``(index, count)``; ``None``: all of it), and
    whether it is stored transposed."""

    key: str
    block: tuple[int, int] | None = None
    transposed: bool = False

    def of(self, stored: torch.Tensor) -> torch.Tensor:
        """This tensor, cut out of the checkpoint's ``stored`` one."""
        t = stored.chunk(self.block[1])[self.block[0]] if self.block else stored
        return t.T if self.transposed else t


@dataclass(frozen=True)
class TextTower:
    """One text encoder: its LoRA prefix, where its weights live, and its depth.

    ``ldm`` is its root in a checkpoint; ``openclip``: the ldm side is OpenCLIP's layout, whose
    attention keeps q, k and v as three row blocks of one fused ``in_proj_weight``.
    """

    kohya: str  # "lora_te_", "lora_te1_", "lora_te2_"
    peft: str  # the prefix diffusers/PEFT files use: "text_encoder.", "text_encoder_2."
    ldm: str  # e.g. "cond_stage_model.transformer."
    layers: int
    width: int
    openclip: bool = False
    name_layers: int = 0  # layers whose names are accepted (0: ``layers``)
    position_ids: bool = False  # its checkpoints carry CLIP's position ids (ldm's do, sgm's not)
    # -- its part of the conditioning
    penultimate: bool = False  # context from the last-but-one layer's output (no final LayerNorm)
    pooled: bool = False  # its projected end-token output joins the UNet's vector
    pad_id: int | None = None  # the tokenizer's padding id (None: the end token, as CLIP's)

    def source(self, key: str) -> Source:
        """Where a transformers state-dict key of this tower (``text_model.…``,
        ``text_projection.weight``; transformers 5 drops ``text_model.`` from ``CLIPTextModel``'s
        keys) is in a checkpoint; ``KeyError`` for one OpenCLIP lacks."""
        if key != "text_projection.weight":
            key = "text_model." + key.removeprefix("text_model.")
        if not self.openclip:
            return Source(self.ldm + key)
        if key == "text_projection.weight":  # OpenCLIP multiplies x @ P; a Linear x @ W.T
            return Source(f"{self.ldm}text_projection", transposed=True)
        if key in OPENCLIP_TOP:
            return Source(self.ldm + OPENCLIP_TOP[key])
        prefix = "text_model.encoder.layers."
        if not key.startswith(prefix):
            raise KeyError(f"not a text-tower key of OpenCLIP's layout: {key}")
        layer, _, rest = key[len(prefix) :].partition(".")
        module, _, leaf = rest.rpartition(".")
        root = f"{self.ldm}transformer.resblocks.{layer}."
        if module in OPENCLIP_FUSED:
            return Source(f"{root}attn.in_proj_{leaf}", (OPENCLIP_FUSED.index(module), len(OPENCLIP_FUSED)))
        if module not in OPENCLIP_BLOCK:
            raise KeyError(f"not a text-tower key of OpenCLIP's layout: {key}")
        return Source(f"{root}{OPENCLIP_BLOCK[module]}.{leaf}")

    def ldm_target(self, layer: int, module: str) -> tuple[str, tuple[int, int] | None]:
        """The checkpoint key of one encoder layer's weight, and its row block when fused (rows of
        a tower of the family's width)."""
        where = self.source(f"text_model.encoder.layers.{layer}.{module}.weight")
        if where.block is None:
            return where.key, None
        index, _ = where.block
        return where.key, (index * self.width, (index + 1) * self.width)

    def ldm_extras(self) -> dict[str, float]:
        """Checkpoint scalars of this tower that its model has no tensor for (``logit_scale``)."""
        return {self.ldm + k: v for k, v in OPENCLIP_EXTRA.items()} if self.openclip else {}
