"""Making the lab's world: data, VAE, base model, one LoRA per identity, and the judge.

Each stage writes its result into the world folder and is skipped when that file exists, so an
interrupted build resumes where it stopped; everything is seeded. The finished folder holds what
the measurements and tests need (``WORLD_FILES``) plus ``manifest.json``, the note of how it was
made (budget, seeds, times, losses, the judge's accuracy).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lib_loraclr.clora.attention import map_size
from lib_loraclr.lab import gates
from lib_loraclr.lab import judge as jg
from lib_loraclr.lab import train as tr
from lib_loraclr.lab import world as w
from lib_loraclr.lab.generate import Sampling
from lib_loraclr.lab.grounding import Grounding, grounding_for
from lib_loraclr.lab.model import build_lab_model, load_lab_model, save_lab_model
from lib_loraclr.sd.checkpoint import atomic_save_safetensors
from lib_loraclr.sd.configs import LATENT_SCALE
from lib_loraclr.sd.model import SDModel

COMMITTED = Path(__file__).resolve().parent / "trained"
CHECKPOINT = "lab_sd15.safetensors"
JUDGE = "judge.safetensors"
MANIFEST = "manifest.json"
LORA_DIR = "loras"
LORA_RANK = 4


def lora_path(world: Path, identity: w.Identity) -> Path:
    return world / LORA_DIR / f"{identity.name}.safetensors"


def world_complete(world: Path) -> bool:
    files = [CHECKPOINT, JUDGE, MANIFEST, *(f"{LORA_DIR}/{i.name}.safetensors" for i in w.IDENTITIES)]
    return all((world / f).is_file() for f in files)


def write_lora(path: Path, factors: dict, identity: w.Identity, note: dict) -> None:
    """kohya layout (``lora_down``/``lora_up``/``alpha``, 1x1 convs 4-D), fp16, with the trigger
    phrase where A1111 and our loader look for it."""
    tensors = {}
    for name, (down, up) in factors.items():
        conv = name.endswith(("proj_in", "proj_out"))
        tensors[f"{name}.lora_down.weight"] = (down[..., None, None] if conv else down).half()
        tensors[f"{name}.lora_up.weight"] = (up[..., None, None] if conv else up).half()
        tensors[f"{name}.alpha"] = torch.tensor(float(LORA_RANK))
    meta = {
        "ss_output_name": identity.name,
        "ss_base_model_version": "sd_v1",
        "ss_network_dim": str(LORA_RANK),
        "ss_network_alpha": str(LORA_RANK),
        "modelspec.trigger_phrase": identity.phrase,
        "ss_tag_frequency": json.dumps({"lab": {identity.phrase: note.get("images", 0)}}),
        "loraclr_lab": json.dumps(note, sort_keys=True),
    }
    atomic_save_safetensors(tensors, path, meta)


def _identity_captions(identity: w.Identity, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    data = w.make_dataset(n, seed, identity=w.IDENTITIES.index(identity))
    return data["images"], data["captions"]


def _grounding(model: SDModel, captions: list[str], classes: np.ndarray, weight: float) -> Grounding | None:
    """The grounding targets of a training set at CLoRA's automatic map level in this world."""
    if weight <= 0:
        return None
    side = w.CANVAS // LATENT_SCALE
    return grounding_for(model.tokenizer, captions, classes, map_size(side, side), weight)


@dataclass(frozen=True)
class Training:
    """Where and how long the build trains: ``device`` for the base and the LoRAs (the VAE and
    the judge train on the CPU), ``seconds`` a time limit for the base (it stops there and a
    later run continues), ``gates`` False to stop after training (the next build measures them)."""

    device: str = "cpu"
    seconds: float | None = None
    gates: bool = True


def build_world(
    world: Path,
    budget: tr.Budget,
    seed: int = 0,
    report: Callable[[str], None] = print,
    sampling: Sampling | None = None,
    training: Training = Training(),
) -> dict:
    """Train everything into ``world`` (stages already there are kept), then measure its gates
    with ``sampling``; returns the manifest. Denormals are flushed meanwhile (see
    :func:`~lib_loraclr.lab.train.flushing_denormals`)."""
    with tr.flushing_denormals():
        return _build(world, budget, seed, report, sampling or Sampling(), training)


class _Scenes:
    """The base's training scenes, rendered on first use and cached in the world (a build whose
    base is finished never renders them)."""

    def __init__(self, world: Path, n: int, seed: int, report: Callable[[str], None]) -> None:
        self.file, self.n, self.seed, self.report = world / "cache" / "base_data.npz", n, seed, report
        self._data: tuple[np.ndarray, list[str], np.ndarray] | None = None

    def get(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """``(images, captions, class maps)``; a cache from before class maps were kept is rendered again."""
        if self._data is None:
            if not self.file.is_file() or "classes" not in np.load(self.file).files:
                started = time.perf_counter()
                data = w.make_dataset(self.n, self.seed)
                captions = np.array(data["captions"])
                np.savez(self.file, images=data["images"], captions=captions, classes=data["classes"])
                self.report(f"world: {self.n} scenes rendered in {time.perf_counter() - started:.1f} s")
            stored = np.load(self.file)
            self._data = stored["images"], [str(c) for c in stored["captions"]], stored["classes"]
        return self._data


def _build(
    world: Path,
    budget: tr.Budget,
    seed: int,
    report: Callable[[str], None],
    sampling: Sampling,
    training: Training,
) -> dict:
    torch.manual_seed(seed)
    (world / "cache").mkdir(parents=True, exist_ok=True)
    manifest_path = world / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest.update(budget=asdict(budget), seed=seed, torch=torch.__version__, machine=platform.machine())

    def save_manifest() -> None:
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))

    scenes = _Scenes(world, budget.base_images, seed, report)
    model = _autoencoder(world, manifest, budget, scenes, seed, report, save_manifest)
    model = _base(world, manifest, model, scenes, budget, seed, report, save_manifest, training)
    base_steps = manifest["base"]["steps"]
    _loras(world, manifest, model, budget, seed, report, save_manifest, training.device)
    if not (world / JUDGE).is_file():
        manifest["judge"] = judge_stage(world, model, budget, seed, report)
        save_manifest()
    if training.gates and manifest.get("gates", {}).get("base_steps") != base_steps:
        manifest["gates"] = gates_stage(world, model, budget, sampling, report)
        manifest["gates"]["base_steps"] = base_steps
        save_manifest()
    return manifest


def _loras(world: Path, manifest: dict, model: SDModel, budget, seed: int, report, save, device: str) -> None:
    """One LoRA per identity on ``model`` (trained on ``device``), each kept while the base it was
    trained on is the world's."""
    loras = manifest.setdefault("loras", {})
    base_steps = manifest["base"]["steps"]
    for k, identity in enumerate(w.IDENTITIES):
        path = lora_path(world, identity)
        if path.is_file() and loras.get(identity.name, {}).get("base_steps") == base_steps:
            continue
        pics, texts = _identity_captions(identity, budget.lora_images, seed + 100 + k)
        latents = tr.encode_all(model, pics)
        model.to(device)
        try:
            factors, summary = tr.train_lora(
                model,
                latents,
                texts,
                budget,
                seed + 200 + k,
                rank=LORA_RANK,
                report=report,
                name=identity.name,
            )
        finally:
            model.to("cpu")
        summary.update(images=budget.lora_images, base_steps=base_steps, device=device)
        write_lora(path, factors, identity, summary)
        loras[identity.name] = summary
        save()


def gates_stage(
    world: Path, model: SDModel, budget: tr.Budget, sampling: Sampling, report: Callable[[str], None]
) -> dict:
    """The world's gates (lab/gates.py) on its base, LoRAs and judge, as the tables will use them."""
    from lib_loraclr.lora.file import load_lora

    loras = {i.name: load_lora(lora_path(world, i)) for i in w.IDENTITIES}
    setup = gates.GateSetup(model, loras, load_judge(world), sampling, budget.gate_pictures)
    return gates.measure_gates(setup, report)


def _autoencoder(
    world: Path, manifest: dict, budget: tr.Budget, scenes: _Scenes, seed: int, report, save
) -> SDModel:
    """The model with a trained VAE: the world's checkpoint if there is one (a continued or
    warm-started world), else a fresh model whose VAE is trained on base scenes; then, once per
    world, tuned on scenes of every look (a VAE must draw every colour and pattern, though the
    base never sees identities)."""
    cache, ckpt = world / "cache", world / CHECKPOINT
    model = load_lab_model(ckpt) if ckpt.is_file() else build_lab_model(seed)
    stages = [("vae", True, budget.vae_steps, seed), ("vae_tune", False, budget.vae_tune_steps, seed + 11)]
    for name, base_scenes, steps, stage_seed in stages:
        if name in manifest or (name == "vae" and ckpt.is_file()):
            continue
        stored = cache / f"{name}.pt"
        if stored.is_file():
            model.vae.load_state_dict(torch.load(stored))
        else:
            data = (
                scenes.get()[0]
                if base_scenes
                else jg.judge_data(budget.base_images // 2, seed + 10)["images"]
            )
            manifest[name] = tr.train_vae(model, data, steps, budget.vae_batch, stage_seed, report)
            torch.save(model.vae.state_dict(), stored)
            (cache / "latents.pt").unlink(missing_ok=True)
        save()
    model.vae.eval().requires_grad_(False)
    return model


def _base(
    world: Path,
    manifest: dict,
    model: SDModel,
    scenes: _Scenes,
    budget: tr.Budget,
    seed: int,
    report,
    save,
    training: Training,
) -> SDModel:
    """Train the base (UNet + text encoder) up to ``budget.base_steps``, continuing from the
    world's checkpoint where an earlier run stopped (``manifest["base"]["steps"]``); the
    checkpoint and manifest are rewritten every few hundred steps, so an interrupted run loses
    little. Trains on ``training.device`` until ``training.seconds``. Returns the model as stored
    (fp16-rounded, on the CPU), which the LoRAs then train on."""
    ckpt, latents_file = world / CHECKPOINT, world / "cache" / "latents.pt"
    base = manifest.setdefault("base", {"steps": 0, "seconds": 0.0})
    done = int(base.get("steps", 0)) if ckpt.is_file() else 0
    if done >= budget.base_steps and ckpt.is_file():
        return load_lab_model(ckpt)
    images, captions, classes = scenes.get()
    grounding = _grounding(model, captions, classes, budget.base_grounding)
    model.to(training.device)
    if latents_file.is_file():
        latents = torch.load(latents_file)
    else:
        latents = tr.encode_all(model, images)
        torch.save(latents, latents_file)

    def snapshot(step: int) -> None:
        save_lab_model(model, ckpt, {"budget": asdict(budget), "seed": seed, "base_steps": step})
        base.update(steps=step)
        save()

    summary = tr.train_base(
        model,
        latents,
        captions,
        budget,
        seed + 1,
        report,
        done,
        snapshot,
        seconds=training.seconds,
        grounding=grounding,
    )
    run = {"from": done, "to": summary["steps"], "device": training.device, "batch": budget.base_batch}
    run["grounding"] = budget.base_grounding
    base.setdefault("runs", []).append({**run, "seconds": round(summary["seconds"], 1)})
    summary["seconds"] += float(base.get("seconds", 0.0))
    base.update(summary)
    snapshot(summary["steps"])
    model.to("cpu")
    return load_lab_model(ckpt)  # train on what is stored (fp16-rounded), like any user would


def judge_stage(world: Path, model, budget: tr.Budget, seed: int, report: Callable[[str], None]) -> dict:
    """Train the judge on ground truth (half of it through ``model``'s VAE), score it on held-out
    ground truth, store it; returns its summary (accuracies, seconds)."""
    data = jg.judge_data(budget.judge_images, seed + 300)

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return model.decode(model.encode_image(x))

    started = time.perf_counter()
    judge = jg.train_judge(data, budget.judge_steps, budget.judge_batch, seed + 301, reconstruct, report)
    held_out = jg.judge_data(max(64, budget.judge_images // 6), seed + 302)
    summary = {
        "seconds": time.perf_counter() - started,
        "held_out_clean": jg.accuracy(judge, held_out),
        "held_out_through_vae": jg.accuracy(judge, held_out, reconstruct),
    }
    atomic_save_safetensors({k: v.half() for k, v in judge.state_dict().items()}, world / JUDGE)
    return summary


def load_judge(world: Path) -> jg.Judge:
    from safetensors.torch import load_file

    judge = jg.Judge()
    judge.load_state_dict({k: v.float() for k, v in load_file(world / JUDGE).items()})
    return judge.eval().requires_grad_(False)
