"""The judge: a small segmentation network that says, for every 4 x 4 px cell of a picture, which
class is there and which look it has (background, a base colour, or one of the identities).

Trained on the generator's ground truth only: scenes where every object takes a random class and
a random look (an identity's pattern may sit on any class, which is what bleeding looks like),
shown both clean and through the lab's VAE (so decoded samples are not out of distribution), with
blur and noise. :func:`read_objects` turns its maps into objects: a class is present where it
covers at least ``MIN_CELLS`` cells, and that object's look is the majority look of its cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lib_loraclr.lab import world as w

GRID = 16  # judge cells per side (4 x 4 px each)
MIN_CELLS = 10  # 160 px, a quarter of an object: fragments and smudges are not objects


class Judge(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(i, o, 3, stride, padding=dilation, dilation=dilation), nn.GroupNorm(8, o), nn.SiLU()
            )

        self.body = nn.Sequential(
            block(3, 32),
            block(32, 48, 2),
            block(48, 64, 2),
            block(64, 64, 1, 2),
            block(64, 64, 1, 4),
            block(64, 64, 1, 2),
        )
        self.classes = nn.Conv2d(64, 1 + len(w.CLASSES), 1)
        self.looks = nn.Conv2d(64, w.LOOKS, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` in [0, 1], (B, 3, 64, 64) -> class and look logits, (B, C, 16, 16) each."""
        h = self.body(images * 2 - 1)
        return self.classes(h), self.looks(h)


def judge_scene(rng: np.random.Generator) -> w.Scene:
    """Any class in any look: half the objects a base colour, half an identity's pattern."""
    n = int(rng.integers(1, 5))
    classes = rng.choice(w.CLASSES, size=n, replace=False)
    slots = rng.choice(4, size=n, replace=False)
    things = []
    for c, s in zip(classes, slots, strict=True):
        if rng.random() < 0.5:
            things.append(w.Thing(str(c), identity=int(rng.integers(len(w.IDENTITIES))), slot=int(s)))
        else:
            things.append(w.Thing(str(c), str(rng.choice(list(w.COLOURS))), slot=int(s)))
    jitter = tuple(
        (int(rng.integers(-2, 3)), int(rng.integers(-2, 3)), int(rng.integers(27, 33))) for _ in range(n)
    )
    return w.Scene(tuple(things), str(rng.choice(list(w.BACKGROUNDS))), True, jitter)


def judge_data(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = np.empty((n, 3, w.CANVAS, w.CANVAS), np.uint8)
    classes = np.empty((n, GRID, GRID), np.int64)
    looks = np.empty((n, GRID, GRID), np.int64)
    for i in range(n):
        img, cls, look = w.render(judge_scene(rng))
        images[i] = img.transpose(2, 0, 1)
        classes[i], looks[i] = _cells(cls), _cells(look)
    return {"images": images, "classes": classes, "looks": looks}


def _cells(labels: np.ndarray) -> np.ndarray:
    """Per 4 x 4 cell: the most common label (objects win ties over background)."""
    k = w.CANVAS // GRID
    blocks = labels.reshape(GRID, k, GRID, k).transpose(0, 2, 1, 3).reshape(GRID, GRID, k * k)
    counts = (blocks[..., None] == np.arange(int(labels.max()) + 1)).sum(2)
    counts[..., 0] -= 1  # ties go to the object
    return counts.argmax(-1)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b = len(x)
    blur = torch.rand(b, 1, 1, 1, generator=gen) < 0.5
    soft = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    x = torch.where(blur, 0.5 * x + 0.5 * soft, x)
    x = x * (1 + 0.1 * (torch.rand(b, 3, 1, 1, generator=gen) - 0.5))
    return (x + 0.03 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def train_judge(
    data: dict[str, np.ndarray], steps: int, batch: int, seed: int, reconstruct=None, report=None
) -> Judge:
    """``reconstruct``: images -> the VAE's reconstruction of them (half of each batch goes through it)."""
    torch.manual_seed(seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(data["images"]).float() / 255
    classes, looks = torch.from_numpy(data["classes"]), torch.from_numpy(data["looks"])
    if reconstruct is not None:
        with torch.no_grad():
            rec = torch.cat([reconstruct(images[i : i + 256]) for i in range(0, len(images), 256)])
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.randint(len(images), (batch,), generator=gen)
        x = images[idx]
        if reconstruct is not None:
            half = torch.rand(batch, generator=gen) < 0.5
            x = torch.where(half.reshape(-1, 1, 1, 1), rec[idx], x)
        c_logits, l_logits = judge(_augment(x, gen))
        loss = F.cross_entropy(c_logits, classes[idx]) + F.cross_entropy(l_logits, looks[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if report and (step % 200 == 0 or step == steps - 1):
            report(f"judge: step {step + 1}/{steps}  loss {float(loss):.4f}")
    return judge.eval().requires_grad_(False)


@dataclass(frozen=True)
class Seen:
    """One object the judge reads in a picture: its class, look and cells."""

    cls: str
    look: int  # 1 = a base colour, 2 + k = identity k
    cells: np.ndarray  # (16, 16) bool

    @property
    def identity(self) -> int | None:
        return self.look - 2 if self.look >= 2 else None


@torch.no_grad()
def read_maps(judge: Judge, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    c_logits, l_logits = judge(images.float().clamp(0, 1))
    return c_logits.argmax(1).numpy(), l_logits.argmax(1).numpy()


def read_objects(class_map: np.ndarray, look_map: np.ndarray) -> list[Seen]:
    out = []
    for c in range(1, 1 + len(w.CLASSES)):
        cells = class_map == c
        if cells.sum() < MIN_CELLS:
            continue
        votes = np.bincount(look_map[cells], minlength=w.LOOKS)
        votes[0] = 0
        out.append(Seen(w.CLASSES[c - 1], int(votes.argmax()) if votes.any() else 1, cells))
    return out


def _components(cells: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of a boolean cell map (a flood fill; the maps are 16 x 16)."""
    todo, out = cells.copy(), []
    for start in zip(*np.nonzero(cells), strict=True):
        if not todo[start]:
            continue
        region, stack = np.zeros_like(cells), [start]
        todo[start] = False
        while stack:
            y, x = stack.pop()
            region[y, x] = True
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < cells.shape[0] and 0 <= nx < cells.shape[1] and todo[ny, nx]:
                    todo[ny, nx] = False
                    stack.append((ny, nx))
        out.append(region)
    return out


def count_objects(class_map: np.ndarray) -> int:
    """Objects in a picture: connected regions of one class of at least ``MIN_CELLS`` cells (two
    objects of one class count twice unless they touch)."""
    return sum(
        int(region.sum() >= MIN_CELLS)
        for c in range(1, 1 + len(w.CLASSES))
        for region in _components(class_map == c)
    )


def colour_of(image: torch.Tensor, cells: np.ndarray) -> str:
    """The base colour nearest to an object's median pixel (its cells' inner pixels), by name:
    the judge's look head says "a base colour", this says which."""
    k = w.CANVAS // GRID
    mask = torch.from_numpy(np.kron(cells, np.ones((k, k), dtype=bool)))
    pixels = image.float().clamp(0, 1)[:, mask].T * 255  # (n, 3)
    median = pixels.median(0).values if len(pixels) else torch.zeros(3)
    palette = torch.tensor(list(w.COLOURS.values()), dtype=torch.float32)
    return list(w.COLOURS)[int((palette - median).norm(dim=1).argmin())]


def accuracy(judge: Judge, data: dict[str, np.ndarray], reconstruct=None) -> dict[str, float]:
    """Held-out ground truth: share of objects whose class is found, and whose look is read right;
    also per-cell accuracies. ``reconstruct``: judge the VAE's reconstructions instead."""
    images = torch.from_numpy(data["images"]).float() / 255
    if reconstruct is not None:
        images = torch.cat([reconstruct(images[i : i + 256]) for i in range(0, len(images), 256)])
    class_maps, look_maps = [], []
    for i in range(0, len(images), 256):
        c, lk = read_maps(judge, images[i : i + 256])
        class_maps.append(c)
        look_maps.append(lk)
    class_map, look_map = np.concatenate(class_maps), np.concatenate(look_maps)
    found = looks_right = total = 0
    for i in range(len(images)):
        truth = read_objects(data["classes"][i], data["looks"][i])
        seen = {s.cls: s for s in read_objects(class_map[i], look_map[i])}
        for t in truth:
            total += 1
            if t.cls in seen:
                found += 1
                looks_right += seen[t.cls].look == t.look
    return {
        "objects": total,
        "class_found": found / max(total, 1),
        "look_right": looks_right / max(total, 1),
        "cell_class": float((class_map == data["classes"]).mean()),
        "cell_look": float((look_map == data["looks"]).mean()),
    }
