"""Training the lab's networks: the VAE, the base model (UNet and text encoder together), LoRAs.

Plain, seeded loops with AdamW and a warm-up + cosine schedule; each takes a step budget so the
smoke run and the full run are the same code. The base learns the world from scratch, the text
encoder with it (there is no pretrained CLIP to start from), with 10 % empty captions so
classifier-free guidance works. Data is rendered once and the VAE's latents cached, so the
UNet never pays for the VAE.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lib_loraclr.lab.grounding import Grounding, grounded, grounding_maps
from lib_loraclr.sd.model import SDModel

log = logging.getLogger(__name__)
Report = Callable[[str], None]


# The grounding loss (lab/grounding.py) trains the base only: continued at weight 0.5 it made the
# maps localise but the LoRAs pair worse (world v4, docs/quality.md), and LoRAs trained with it
# lost their identities, so they train on the noise prediction alone, as the paper's do. It is off
# in FULL; `--budget base_grounding=W` turns it on, the smoke run keeps the path exercised.
SMOKE_GROUNDING = 0.5


@dataclass(frozen=True)
class Budget:
    """Step counts and batch sizes of one lab run (``FULL`` or ``SMOKE``)."""

    vae_steps: int  # on base scenes
    vae_tune_steps: int  # then on scenes of every look (identity colours and patterns too)
    vae_batch: int
    base_images: int
    base_steps: int
    base_batch: int
    lora_images: int
    lora_steps: int
    lora_batch: int
    judge_images: int
    judge_steps: int
    judge_batch: int
    gate_pictures: int = 16  # per class prompt of the gates (lab/gates.py); 64 per gate line
    base_grounding: float = 0.0  # weight of the base's attention-grounding loss (lab/grounding.py)


FULL = Budget(700, 600, 24, 16000, 1000, 64, 48, 300, 12, 6000, 1500, 32)
SMOKE = Budget(3, 2, 4, 64, 3, 8, 4, 2, 2, 48, 3, 8, gate_pictures=1, base_grounding=SMOKE_GROUNDING)


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


class _Clock:
    """Logs a loss line about every 20 s (and at the end), with the rate."""

    def __init__(self, name: str, steps: int, report: Report | None) -> None:
        self.name, self.steps, self.report = name, steps, report or log.info
        self.started = self.last = time.perf_counter()
        self.losses: list[float] = []
        self.pending: list[torch.Tensor] = []

    def tick(self, step: int, loss: torch.Tensor | float) -> None:
        """``loss`` may stay a device tensor: it is read back only when a line is logged, so a GPU
        loop does not wait for every step."""
        self.pending.append(loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(loss))
        now = time.perf_counter()
        if now - self.last > 20 or step == self.steps - 1:
            self._flush()
            recent = float(np.mean(self.losses[-50:]))
            rate = (step + 1) / (now - self.started)
            self.report(f"{self.name}: step {step + 1}/{self.steps}  loss {recent:.4f}  ({rate:.1f} steps/s)")
            self.last = now

    def _flush(self) -> None:
        if self.pending:
            self.losses.extend(torch.stack([p.float().cpu() for p in self.pending]).tolist())
            self.pending.clear()

    def mean_loss(self, last: int) -> float:
        self._flush()
        return float(np.mean(self.losses[-last:])) if self.losses else float("nan")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def _to_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float() / 255.0


def train_vae(
    model: SDModel, images: np.ndarray, steps: int, batch: int, seed: int, report: Report | None = None
) -> dict:
    """Autoencoder training: L1 + L2 reconstruction and a small KL term, first on 32 px crops (a
    quarter of the cost; the networks are convolutional) then on whole pictures. Afterwards the
    latent is rescaled in the weights so that ``0.18215 * z`` has unit variance, SD's convention."""
    vae = model.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    clock = _Clock("vae", steps, report)
    n = len(images)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, 1e-3, 50)
        idx = torch.randint(n, (batch,), generator=gen)
        x = _to_unit(images[idx.numpy()]) * 2 - 1
        if step < steps * 3 // 4:  # random 32 px crops
            oy, ox = (int(v) for v in torch.randint(0, 33, (2,), generator=gen))
            x = x[:, :, oy : oy + 32, ox : ox + 32]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clock.tick(step, loss)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        probe = _to_unit(images[: min(n, 256)]) * 2 - 1
        std = float(vae.encode(probe).latent_dist.mean.std())
        _rescale_latent(vae, 1.0 / (0.18215 * std))
        rec = model.decode(model.encode_image(probe[:64] * 0.5 + 0.5))
        error = float((rec - (probe[:64] * 0.5 + 0.5)).abs().mean())
    return {"steps": steps, "seconds": clock.seconds, "latent_std": std, "l1_error": error}


@torch.no_grad()
def _rescale_latent(vae: nn.Module, a: float) -> None:
    """Scale the encoder's mean by ``a`` (and its log-variance by 2 ln a) and undo it at the
    decoder's input: the same autoencoder, with the latent in SD's range."""
    q, pq = vae.quant_conv, vae.post_quant_conv
    c = q.out_channels // 2
    q.weight[:c] *= a
    q.bias[:c] *= a
    q.bias[c:] += 2 * math.log(a)
    pq.weight /= a


@torch.no_grad()
def encode_all(model: SDModel, images: np.ndarray, batch: int = 128) -> torch.Tensor:
    """Scaled posterior-mean latents of every picture (float16 to keep the cache small), encoded
    on the model's device, returned on the CPU."""
    out = []
    for i in range(0, len(images), batch):
        x = _to_unit(images[i : i + batch]).to(model.device)
        out.append(model.encode_image(x).half().cpu())
    return torch.cat(out)


def _noisy(
    model: SDModel, x0: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noised ``x0`` at random timesteps, on the model's device. The random numbers come from the
    CPU generator ``gen`` whatever the device, so a run draws the same batches everywhere."""
    t = torch.randint(0, len(model.alphas_cumprod), (len(x0),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    x0, t, noise = (v.to(model.device, non_blocking=True) for v in (x0, t, noise))
    a = model.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, noise


def _adamw(params: Sequence[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused into one kernel on CUDA (a small model's step is otherwise launch-bound)."""
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def min_snr_weights(model: SDModel, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights for noise prediction (Hang et al. 2023): ``min(SNR, gamma) /
    SNR``. The plain loss spends most of its gradient on nearly clean latents, where nothing about
    the layout is decided; capping the weight of low-noise steps makes a small model learn which
    objects to draw several times faster."""
    a = model.alphas_cumprod[t]
    snr = a / (1 - a)
    return snr.clamp(max=gamma) / snr


BASE_LR, BASE_WARMUP = 5e-4, 200


def train_base(
    model: SDModel,
    latents: torch.Tensor,
    captions: Sequence[str],
    budget: Budget,
    seed: int,
    report: Report | None = None,
    start: int = 0,
    snapshot: Callable[[int], None] | None = None,
    snapshot_every: int = 250,
    seconds: float | None = None,
    grounding: Grounding | None = None,
) -> dict:
    """UNet + text encoder on the min-SNR-weighted noise-prediction loss (plus, with
    ``grounding``, the attention-grounding loss), steps ``start`` to ``budget.base_steps``;
    returns with the EMA weights in ``model``.

    The learning rate is constant after the warm-up and the EMA is the model, so training can
    stop at any step and continue later from the stored weights (``start`` > 0: the EMA weights
    are the starting point, Adam's moments start afresh after a short warm-up). ``snapshot(step)``
    is called every ``snapshot_every`` steps with the EMA weights in place. ``seconds`` stops the
    run early at a time limit (a GPU lease); the summary's ``steps`` says how far it got. The
    model trains on its own device."""
    ids = model.tokenize(list(captions))
    empty = model.tokenize([""])[0]
    model.unet.train().requires_grad_(True)
    model.text_encoder.train().requires_grad_(True)
    params = [*model.unet.parameters(), *model.text_encoder.parameters()]
    opt = _adamw(params, BASE_LR, 1e-2)
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(seed + start)
    todo = max(0, budget.base_steps - start)
    clock = _Clock("base", todo, report)
    warmup = BASE_WARMUP if start == 0 else BASE_WARMUP // 4
    ids, empty = ids.cpu(), empty.cpu()
    done = 0
    with grounding_maps(model, grounding) as maps:
        for i in range(todo):
            if seconds is not None and clock.seconds > seconds:
                (report or log.info)(
                    f"base: stopped at step {start + i} after {clock.seconds:.0f} s (time limit)"
                )
                break
            for g in opt.param_groups:
                g["lr"] = BASE_LR * min(1.0, (i + 1) / warmup)
            idx = torch.randint(len(latents), (budget.base_batch,), generator=gen)
            tokens = ids[idx].clone()
            dropped = torch.rand(len(idx), generator=gen) < 0.1
            tokens[dropped] = empty
            tokens = tokens.to(model.device, non_blocking=True)
            x, t, noise = _noisy(model, latents[idx].float(), gen)
            if maps is not None:
                maps.reset()
            context = model.text_encoder(input_ids=tokens).last_hidden_state
            error = (model.unet(x, t, encoder_hidden_states=context).sample - noise).pow(2).mean((1, 2, 3))
            loss = grounded((error * min_snr_weights(model, t)).mean(), maps, grounding, idx, dropped)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step = start + i
            decay = min(0.999, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema, params, strict=True):
                    e.lerp_(p.detach(), 1 - decay)
            clock.tick(i, loss)
            done = i + 1
            if snapshot and done % snapshot_every == 0 and done < todo:
                with _swapped(params, ema):
                    snapshot(step + 1)
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    model.eval().requires_grad_(False)
    return {
        "steps": start + done,
        "seconds": clock.seconds,
        "final_loss": clock.mean_loss(100),
        "loss": "min-SNR-5 weighted noise prediction"
        + (
            f" + {grounding.weight} x attention grounding"
            if grounding is not None and grounding.weight > 0
            else ""
        ),
    }


@contextmanager
def flushing_denormals() -> Iterator[None]:
    """Denormal floats flushed to zero for the block, the previous mode back after. Late in
    training many gradients and Adam moments are that small, and the CPU computes with denormals
    several times slower (a continued base ran at about half speed without this)."""
    before = torch.empty(1).new_tensor([1e-40]).item() == 0.0
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


@contextmanager
def _swapped(params: Sequence[torch.Tensor], ema: Sequence[torch.Tensor]) -> Iterator[None]:
    """The EMA weights in the model for the block (a snapshot), the live ones back after."""
    live = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                p.copy_(e)
        yield
    finally:
        with torch.no_grad():
            for v, p in zip(live, params, strict=True):
                p.copy_(v)


class _LoraAdapters:
    """Trainable low-rank adapters on a model's layers, added to their outputs by forward hooks
    (the weights stay untouched); ``factors()`` gives kohya's (down, up) per layer."""

    def __init__(self, layers: dict[str, nn.Module], rank: int, gen: torch.Generator) -> None:
        self.factors_by_name: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = []
        for name, layer in layers.items():
            fan_in = layer.weight.shape[1]
            dev = layer.weight.device
            down = (torch.randn(rank, fan_in, generator=gen) / math.sqrt(fan_in)).to(dev).requires_grad_(True)
            up = torch.zeros(layer.weight.shape[0], rank, device=dev, requires_grad=True)
            self.factors_by_name[name] = (down, up)
            self.handles.append(layer.register_forward_hook(self._hook(down, up)))

    @staticmethod
    def _hook(down: torch.Tensor, up: torch.Tensor):
        def add(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            if isinstance(module, nn.Conv2d):  # 1x1 convs (proj_in/proj_out)
                delta = torch.einsum("or,ri,bihw->bohw", up, down, x)
            else:
                delta = x @ down.T @ up.T
            return output + delta

        return add

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in self.factors_by_name.values() for t in pair]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def lora_targets(model: SDModel) -> dict[str, nn.Module]:
    """The layers a kohya LoRA trains by default: text-encoder attention/MLP and every Linear or
    1x1 conv of the UNet's transformer blocks."""
    out = {}
    for name, layer in model.layer_map().items():
        kxk = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
        if (name.startswith("lora_te") or "_attentions_" in name) and not kxk:
            out[name] = layer
    return out


def train_lora(
    model: SDModel,
    latents: torch.Tensor,
    captions: Sequence[str],
    budget: Budget,
    seed: int,
    rank: int = 4,
    report: Report | None = None,
    name: str = "lora",
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """DreamBooth-style LoRA (no prior preservation) on one identity's pictures; returns
    ``{kohya name: (down (r, in), up (out, r))}`` at alpha = rank, and a summary."""
    model.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    adapters = _LoraAdapters(lora_targets(model), rank, gen)
    ids = model.tokenize(list(captions))
    opt = _adamw(adapters.parameters(), 2e-3, 0.0)
    clock = _Clock(name, budget.lora_steps, report)
    try:
        for step in range(budget.lora_steps):
            for g in opt.param_groups:
                g["lr"] = _lr(step, budget.lora_steps, 2e-3, 20)
            idx = torch.randint(len(latents), (budget.lora_batch,), generator=gen)
            x, t, noise = _noisy(model, latents[idx].float(), gen)
            context = model.text_encoder(input_ids=ids[idx.to(ids.device)]).last_hidden_state
            loss = F.mse_loss(model.unet(x, t, encoder_hidden_states=context).sample, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            clock.tick(step, loss)
    finally:
        adapters.remove()
    factors = {n: (d.detach().cpu(), u.detach().cpu()) for n, (d, u) in adapters.factors_by_name.items()}
    return factors, {"steps": budget.lora_steps, "seconds": clock.seconds, "final_loss": clock.mean_loss(50)}


def frozen_copy(model: SDModel) -> SDModel:
    """A deep copy (for baking offsets into without touching the original)."""
    return copy.deepcopy(model)
