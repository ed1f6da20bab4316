"""Generate the vendored SDXL key lists in ``tests/data`` from the architecture, on the meta device.

    python tests/data/make_sdxl_lists.py

- ``sdxl_ldm_keys.tsv``: every key of a full-size SDXL base checkpoint in the sgm layout
  (``model.diffusion_model.*``, ``conditioner.embedders.0.transformer.*`` for CLIP-L,
  ``conditioner.embedders.1.model.*`` for OpenCLIP ViT-bigG, ``first_stage_model.*``) with its shape;
- ``sdxl_kohya_lora_modules.tsv``: kohya's LoRA module names for it (``lora``: the default targets,
  the Linear layers of the transformer blocks and both towers' attention and MLP; ``locon``: the
  resnet and sampler layers LoCon adds), each with its diffusers/transformers path, the checkpoint key
  of its weight (a row block ``[a:b]`` of OpenCLIP's fused ``in_proj_weight`` for te2 q/k/v) and
  the base weight's shape.

The UNet keys are enumerated as sgm's ``UNetModel`` constructor lays out its blocks (the values of
``sd_xl_base.yaml``); this project's family tables are not used. The script then checks the lists
against independent code: diffusers' own single-file converters must turn the enumerated UNet and
OpenCLIP keys into exactly the state dict of diffusers' SDXL UNet and of transformers'
``CLIPTextModelWithProjection`` built from the shipped configs, shapes included. The VAE keys are
SD1.5's (SDXL's VAE has the same architecture), taken from ``sd15_ldm_keys.tsv``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent
CONFIGS = DATA.parents[1] / "lib_loraclr" / "sd" / "json"

# sd_xl_base.yaml (network_config)
MODEL_CHANNELS, CHANNEL_MULT, NUM_RES_BLOCKS = 320, (1, 2, 4), 2
ATTENTION_RESOLUTIONS, TRANSFORMER_DEPTH, DEPTH_MIDDLE = (4, 2), (1, 2, 10), 10
CONTEXT_DIM, ADM_IN_CHANNELS, IN_CHANNELS, OUT_CHANNELS = 2048, 2816, 4, 4
TIME_EMBED = 4 * MODEL_CHANNELS


def _config(name: str) -> dict:
    raw = json.loads((CONFIGS / f"sdxl_{name}.json").read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


class Keys:
    """Collects (key, shape, kohya kind) in construction order."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.kinds: dict[str, str] = {}  # module path (no .weight) -> "lora" | "locon"

    def linear(self, path: str, d_in: int, d_out: int, bias: bool = True, kind: str = "") -> None:
        self.shapes[f"{path}.weight"] = (d_out, d_in)
        if bias:
            self.shapes[f"{path}.bias"] = (d_out,)
        if kind:
            self.kinds[path] = kind

    def conv(self, path: str, d_in: int, d_out: int, k: int, kind: str = "") -> None:
        self.shapes[f"{path}.weight"] = (d_out, d_in, k, k)
        self.shapes[f"{path}.bias"] = (d_out,)
        if kind:
            self.kinds[path] = kind

    def norm(self, path: str, width: int) -> None:
        self.shapes[f"{path}.weight"] = (width,)
        self.shapes[f"{path}.bias"] = (width,)


def resblock(keys: Keys, path: str, ch_in: int, ch_out: int) -> None:
    keys.norm(f"{path}.in_layers.0", ch_in)
    keys.conv(f"{path}.in_layers.2", ch_in, ch_out, 3, "locon")
    keys.linear(f"{path}.emb_layers.1", TIME_EMBED, ch_out, kind="locon")
    keys.norm(f"{path}.out_layers.0", ch_out)
    keys.conv(f"{path}.out_layers.3", ch_out, ch_out, 3, "locon")
    if ch_in != ch_out:
        keys.conv(f"{path}.skip_connection", ch_in, ch_out, 1, "locon")


def spatial_transformer(keys: Keys, path: str, ch: int, depth: int) -> None:
    keys.norm(f"{path}.norm", ch)
    keys.linear(f"{path}.proj_in", ch, ch, kind="lora")  # use_linear_in_transformer: True
    for b in range(depth):
        block = f"{path}.transformer_blocks.{b}"
        for attn, context in (("attn1", ch), ("attn2", CONTEXT_DIM)):
            keys.linear(f"{block}.{attn}.to_q", ch, ch, bias=False, kind="lora")
            keys.linear(f"{block}.{attn}.to_k", context, ch, bias=False, kind="lora")
            keys.linear(f"{block}.{attn}.to_v", context, ch, bias=False, kind="lora")
            keys.linear(f"{block}.{attn}.to_out.0", ch, ch, kind="lora")
        keys.linear(f"{block}.ff.net.0.proj", ch, 8 * ch, kind="lora")  # GEGLU: 2 x 4ch
        keys.linear(f"{block}.ff.net.2", 4 * ch, ch, kind="lora")
        for n in (1, 2, 3):
            keys.norm(f"{block}.norm{n}", ch)
    keys.linear(f"{path}.proj_out", ch, ch, kind="lora")


def unet_keys() -> Keys:
    """The UNet as sgm's constructor builds it: input blocks, middle block, output blocks."""
    keys = Keys()
    keys.linear("time_embed.0", MODEL_CHANNELS, TIME_EMBED)
    keys.linear("time_embed.2", TIME_EMBED, TIME_EMBED)
    keys.linear("label_emb.0.0", ADM_IN_CHANNELS, TIME_EMBED)
    keys.linear("label_emb.0.2", TIME_EMBED, TIME_EMBED)
    keys.conv("input_blocks.0.0", IN_CHANNELS, MODEL_CHANNELS, 3)  # kohya targets no top-level layer
    chans, ch, ds, block = [MODEL_CHANNELS], MODEL_CHANNELS, 1, 1
    for level, mult in enumerate(CHANNEL_MULT):
        for _ in range(NUM_RES_BLOCKS):
            resblock(keys, f"input_blocks.{block}.0", ch, mult * MODEL_CHANNELS)
            ch = mult * MODEL_CHANNELS
            if ds in ATTENTION_RESOLUTIONS:
                spatial_transformer(keys, f"input_blocks.{block}.1", ch, TRANSFORMER_DEPTH[level])
            chans.append(ch)
            block += 1
        if level != len(CHANNEL_MULT) - 1:
            keys.conv(f"input_blocks.{block}.0.op", ch, ch, 3, "locon")
            chans.append(ch)
            block += 1
            ds *= 2
    resblock(keys, "middle_block.0", ch, ch)
    spatial_transformer(keys, "middle_block.1", ch, DEPTH_MIDDLE)
    resblock(keys, "middle_block.2", ch, ch)
    block = 0
    for level, mult in reversed(list(enumerate(CHANNEL_MULT))):
        for i in range(NUM_RES_BLOCKS + 1):
            resblock(keys, f"output_blocks.{block}.0", ch + chans.pop(), MODEL_CHANNELS * mult)
            ch = MODEL_CHANNELS * mult
            sub = 1
            if ds in ATTENTION_RESOLUTIONS:
                spatial_transformer(keys, f"output_blocks.{block}.1", ch, TRANSFORMER_DEPTH[level])
                sub = 2
            if level and i == NUM_RES_BLOCKS:
                keys.conv(f"output_blocks.{block}.{sub}.conv", ch, ch, 3, "locon")
                ds //= 2
            block += 1
    keys.norm("out.0", MODEL_CHANNELS)
    keys.conv("out.2", MODEL_CHANNELS, OUT_CHANNELS, 3)
    return keys


def openclip_keys(prefix: str, width: int, layers: int, mlp: int, vocab: int, tokens: int) -> dict:
    shapes = {
        f"{prefix}positional_embedding": (tokens, width),
        f"{prefix}token_embedding.weight": (vocab, width),
        f"{prefix}ln_final.weight": (width,),
        f"{prefix}ln_final.bias": (width,),
        f"{prefix}text_projection": (width, width),
        f"{prefix}logit_scale": (),
    }
    for i in range(layers):
        r = f"{prefix}transformer.resblocks.{i}."
        shapes.update(
            {
                f"{r}ln_1.weight": (width,),
                f"{r}ln_1.bias": (width,),
                f"{r}attn.in_proj_weight": (3 * width, width),
                f"{r}attn.in_proj_bias": (3 * width,),
                f"{r}attn.out_proj.weight": (width, width),
                f"{r}attn.out_proj.bias": (width,),
                f"{r}ln_2.weight": (width,),
                f"{r}ln_2.bias": (width,),
                f"{r}mlp.c_fc.weight": (mlp, width),
                f"{r}mlp.c_fc.bias": (mlp,),
                f"{r}mlp.c_proj.weight": (width, mlp),
                f"{r}mlp.c_proj.bias": (width,),
            }
        )
    return shapes


_OPENCLIP_LEAF = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_TEXT_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)


def te2_target(prefix: str, layer: int, module: str, width: int) -> str:
    """OpenCLIP's checkpoint key of one transformers module (q/k/v: rows of ``in_proj_weight``)."""
    root = f"{prefix}transformer.resblocks.{layer}."
    if module in _TEXT_MODULES[:3]:
        i = _TEXT_MODULES.index(module)
        return f"{root}attn.in_proj_weight[{i * width}:{(i + 1) * width}]"
    return f"{root}{_OPENCLIP_LEAF[module]}.weight"


def _check_unet(keys: Keys) -> dict[str, str]:
    """diffusers' converter maps the enumerated keys onto its SDXL UNet exactly; returns ldm -> diffusers."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        unet = UNet2DConditionModel(**_config("unet"))
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    checkpoint = {f"model.diffusion_model.{k}": torch.empty(s, device="meta") for k, s in keys.shapes.items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    got = {k: tuple(v.shape) for k, v in converted.items()}
    assert got == expected, (sorted(set(got) ^ set(expected))[:5], len(got), len(expected))
    by_tensor = {id(t): k for k, t in checkpoint.items()}
    mapping = {by_tensor[id(t)]: k for k, t in converted.items() if id(t) in by_tensor}
    assert len(mapping) == len(checkpoint), "the converter copied a tensor; cannot pair keys"
    return {k.removeprefix("model.diffusion_model."): v for k, v in mapping.items()}


def _check_openclip(prefix: str, shapes: dict, config: dict) -> None:
    """diffusers' OpenCLIP converter turns the keys into CLIPTextModelWithProjection's, and a q/k/v
    row block is the module our list names (checked with values on a narrow tower)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.device("meta"):
        model = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    got = {
        k: tuple(v.shape)
        for k, v in convert_open_clip_checkpoint(model, meta, prefix).items()
        if not k.endswith("position_ids")
    }
    assert got == expected, sorted(set(got) ^ set(expected))[:5]
    narrow = {
        **config,
        "hidden_size": 4,
        "intermediate_size": 8,
        "num_attention_heads": 1,
        "num_hidden_layers": 1,
    }
    small = openclip_keys(prefix, 4, 1, 8, config["vocab_size"], config["max_position_embeddings"])
    values = {k: torch.randn(s) for k, s in small.items()}
    with torch.device("meta"):
        narrow_model = CLIPTextModelWithProjection(CLIPTextConfig(**narrow))
    out = convert_open_clip_checkpoint(narrow_model, values, prefix)
    for module in _TEXT_MODULES:
        target = te2_target(prefix, 0, module, 4)
        key, _, rows = target.partition("[")
        tensor = values[key]
        if rows:
            a, b = (int(x) for x in rows.rstrip("]").split(":"))
            tensor = tensor[a:b]
        assert torch.equal(out[f"text_model.encoder.layers.0.{module}.weight"], tensor), module


def main() -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    keys = unet_keys()
    ldm_to_diffusers = _check_unet(keys)
    rows: dict[str, tuple[int, ...]] = {f"model.diffusion_model.{k}": s for k, s in keys.shapes.items()}

    te1_config, te2_config = _config("text_encoder"), _config("text_encoder_2")
    with torch.device("meta"):
        te1 = CLIPTextModel(CLIPTextConfig(**te1_config))
    te1_root = "conditioner.embedders.0.transformer."
    for k, v in te1.state_dict().items():
        rows[te1_root + "text_model." + k.removeprefix("text_model.")] = tuple(v.shape)
    te2_root = "conditioner.embedders.1.model."
    te2 = openclip_keys(
        te2_root,
        te2_config["hidden_size"],
        te2_config["num_hidden_layers"],
        te2_config["intermediate_size"],
        te2_config["vocab_size"],
        te2_config["max_position_embeddings"],
    )
    _check_openclip(te2_root, te2, te2_config)
    rows.update(te2)
    sd15 = [
        r.split("\t") for r in (DATA / "sd15_ldm_keys.tsv").read_text().splitlines() if not r.startswith("#")
    ]
    rows.update(
        {k: tuple(int(d) for d in s.split("x")) for k, s in sd15 if k.startswith("first_stage_model.")}
    )

    def fmt(shape: tuple[int, ...]) -> str:
        return "x".join(str(d) for d in shape)

    with (DATA / "sdxl_ldm_keys.tsv").open("w", encoding="utf-8") as handle:
        handle.write("# every key of a full-size SDXL base checkpoint in the sgm layout, with its shape ")
        handle.write("(generated by make_sdxl_lists.py; an empty shape is a scalar)\tshape\n")
        for k, s in rows.items():
            handle.write(f"{k}\t{fmt(s)}\n")

    modules = []
    for path, kind in keys.kinds.items():
        weight = f"{path}.weight"
        modules.append(
            (
                f"lora_unet_{path.replace('.', '_')}",
                kind,
                ldm_to_diffusers[weight].removesuffix(".weight"),
                f"model.diffusion_model.{weight}",
                keys.shapes[weight],
            )
        )
    for prefix, config, target in (
        ("lora_te1_", te1_config, lambda i, m: f"{te1_root}text_model.encoder.layers.{i}.{m}.weight"),
        ("lora_te2_", te2_config, lambda i, m: te2_target(te2_root, i, m, te2_config["hidden_size"])),
    ):
        width, mlp = config["hidden_size"], config["intermediate_size"]
        shapes = {"mlp.fc1": (mlp, width), "mlp.fc2": (width, mlp)}
        for i in range(config["num_hidden_layers"]):
            for m in _TEXT_MODULES:
                path = f"text_model.encoder.layers.{i}.{m}"
                modules.append(
                    (
                        f"{prefix}{path.replace('.', '_')}",
                        "lora",
                        path,
                        target(i, m),
                        shapes.get(m, (width, width)),
                    )
                )
    with (DATA / "sdxl_kohya_lora_modules.tsv").open("w", encoding="utf-8") as handle:
        handle.write(
            "# kohya LoRA module name (SDXL: ldm-style UNet names, lora_te1_/lora_te2_)\tkind (lora: kohya default "
            "targets; locon: the resnet/sampler layers LoCon adds)\tdiffusers/transformers module path\t"
            "checkpoint key of the base weight ([a:b]: its rows)\tbase weight shape\n"
        )
        for row in modules:
            handle.write("\t".join([*row[:4], fmt(row[4])]) + "\n")
    print(f"{len(rows)} checkpoint keys, {len(modules)} kohya modules")  # noqa: T201


if __name__ == "__main__":
    main()
