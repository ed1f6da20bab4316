"""The lab's world: 64 x 64 pictures of up to four simple objects, with captions and pixel labels.

Small enough that an SD1.x-architecture model learns it on two CPU cores, rich enough that the
papers' failure modes show: several objects per picture (who gets which look), and identities
that the base model never sees (a class plus a two-colour pattern in colours the base palette
lacks), so an identity in a picture can only come from its LoRA. Every picture comes with the
ground truth the judge trains on: a class and a look per pixel.

Objects sit in the cells of a 2 x 2 grid (32 px each, jittered), so four subjects fit and the
8 x 8 latent gives each object a 4 x 4 patch: coarse, but what CLoRA's masks work at here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 64
CELL = CANVAS // 2
CLASSES = ("cat", "dog", "hat", "car")
COLOURS = {
    "red": (210, 40, 40),
    "blue": (40, 70, 215),
    "yellow": (240, 215, 40),
    "white": (245, 245, 245),
}
BACKGROUNDS = {
    "grass": (90, 140, 70),
    "sand": (200, 180, 135),
}
# Identity colours: none is in the base palette, so only a LoRA can put them in a picture.
_ID_COLOURS = {
    "pink": (255, 120, 200),
    "cyan": (30, 220, 230),
    "brown": (115, 65, 25),
    "lime": (165, 245, 40),
    "teal": (0, 120, 120),
    "magenta": (200, 0, 140),
}
PATTERNS = ("stripes", "split", "checker", "spot", "halves", "ring")


@dataclass(frozen=True)
class Identity:
    """A concept the base never sees: ``trigger`` + class, drawn in its own two colours and pattern."""

    trigger: str
    cls: str
    colours: tuple[str, str]
    pattern: str

    @property
    def phrase(self) -> str:
        """The LoRA's trigger phrase, as a prompt names the concept ("sks cat")."""
        return f"{self.trigger} {self.cls}"

    @property
    def name(self) -> str:
        """File name stem of its LoRA."""
        return f"{self.trigger}_{self.cls}"


IDENTITIES = (
    Identity("sks", "cat", ("pink", "cyan"), "stripes"),
    Identity("zwx", "dog", ("brown", "lime"), "split"),
    Identity("qrt", "hat", ("cyan", "magenta"), "checker"),
    Identity("pkv", "car", ("lime", "pink"), "spot"),
    Identity("vqe", "cat", ("brown", "cyan"), "checker"),
    Identity("ylf", "dog", ("teal", "magenta"), "stripes"),
    Identity("mdx", "hat", ("teal", "pink"), "halves"),
    Identity("bnj", "car", ("magenta", "lime"), "ring"),
)
# Look labels per pixel: 0 background, 1 a base (solid) colour, 2 + k identity k.
LOOK_BACKGROUND, LOOK_PLAIN = 0, 1
LOOKS = 2 + len(IDENTITIES)


@dataclass(frozen=True)
class Thing:
    """One object of a scene: its class, look (a base colour name, or an identity index) and slot."""

    cls: str
    colour: str | None = None  # base colour; None with an identity, or "unnamed" for the caption
    identity: int | None = None
    slot: int = 0
    named: bool = True  # whether the caption names its colour


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str
    background_named: bool = True
    jitter: tuple[tuple[int, int, int], ...] = field(default=())  # per thing: dx, dy, size

    def caption(self, order: tuple[int, ...] | None = None, photo: bool = True) -> str:
        """Plain words: "a photo of a red cat and sks dog on grass" (order as given, not by slot)."""
        parts = []
        for i in order or range(len(self.things)):
            t = self.things[i]
            if t.identity is not None:
                parts.append(IDENTITIES[t.identity].phrase)
            elif t.named and t.colour:
                parts.append(f"{'an' if t.colour[0] in 'aeiou' else 'a'} {t.colour} {t.cls}")
            else:
                parts.append(f"a {t.cls}")
        text = " and ".join(parts)
        if self.background_named:
            text += f" on {self.background}"
        return f"a photo of {text}" if photo else text


def _polygon(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, pts) -> None:
    draw.polygon([(cx + u * s, cy + v * s) for u, v in pts], fill=255)


def _ellipse(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, u0, v0, u1, v1) -> None:
    draw.ellipse([cx + u0 * s, cy + v0 * s, cx + u1 * s, cy + v1 * s], fill=255)


def silhouette(cls: str, cx: float, cy: float, s: float) -> np.ndarray:
    """Boolean mask of one object of class ``cls``, size ``s`` px, centred at (cx, cy)."""
    img = Image.new("L", (CANVAS, CANVAS), 0)
    d = ImageDraw.Draw(img)
    if cls == "cat":  # round head, two pointed ears
        _ellipse(d, cx, cy, s, -0.48, -0.28, 0.48, 0.5)
        _polygon(d, cx, cy, s, [(-0.48, 0.0), (-0.42, -0.5), (-0.05, -0.2)])
        _polygon(d, cx, cy, s, [(0.48, 0.0), (0.42, -0.5), (0.05, -0.2)])
    elif cls == "dog":  # square head, ears hanging at the sides, snout below
        d.rounded_rectangle([cx - 0.34 * s, cy - 0.42 * s, cx + 0.34 * s, cy + 0.3 * s], radius=3, fill=255)
        d.rectangle([cx - 0.5 * s, cy - 0.38 * s, cx - 0.34 * s, cy + 0.2 * s], fill=255)
        d.rectangle([cx + 0.34 * s, cy - 0.38 * s, cx + 0.5 * s, cy + 0.2 * s], fill=255)
        _ellipse(d, cx, cy, s, -0.24, 0.05, 0.24, 0.5)
    elif cls == "hat":  # tall crown on a wide flat brim
        _polygon(d, cx, cy, s, [(-0.34, 0.2), (-0.28, -0.5), (0.28, -0.5), (0.34, 0.2)])
        d.rectangle([cx - 0.5 * s, cy + 0.14 * s, cx + 0.5 * s, cy + 0.44 * s], fill=255)
    elif cls == "car":  # long body, cabin on top, two wheels
        d.rectangle([cx - 0.5 * s, cy - 0.12 * s, cx + 0.5 * s, cy + 0.28 * s], fill=255)
        _polygon(d, cx, cy, s, [(-0.4, -0.12), (-0.26, -0.46), (0.28, -0.46), (0.42, -0.12)])
        _ellipse(d, cx, cy, s, -0.42, 0.1, -0.1, 0.46)
        _ellipse(d, cx, cy, s, 0.1, 0.1, 0.42, 0.46)
    else:
        raise ValueError(f"unknown class {cls!r}")
    return np.asarray(img) > 127


def _pattern(pattern: str, cx: float, cy: float, s: float) -> np.ndarray:
    """Where the second colour goes (boolean, canvas-sized) for an identity's pattern."""
    y, x = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)
    u, v = (x + 0.5 - cx) / s, (y + 0.5 - cy) / s
    if pattern == "stripes":  # three horizontal bands, the middle one second colour
        return np.abs(v) < 0.14
    if pattern == "split":  # left half / right half
        return u > 0
    if pattern == "checker":  # 2 x 2 checks
        return (u > 0) ^ (v > 0)
    if pattern == "spot":  # a disc in the middle
        return u**2 + v**2 < 0.2**2
    if pattern == "halves":  # top / bottom
        return v > 0.05
    if pattern == "ring":  # a thick border in the second colour
        return np.maximum(np.abs(u), np.abs(v)) > 0.26
    raise ValueError(f"unknown pattern {pattern!r}")


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image uint8 HxWx3, class map int HxW (0 = background, 1 + class index), look map)``."""
    image = np.empty((CANVAS, CANVAS, 3), np.float32)
    image[:] = BACKGROUNDS[scene.background]
    classes = np.zeros((CANVAS, CANVAS), np.int64)
    looks = np.zeros((CANVAS, CANVAS), np.int64)
    jitter = scene.jitter or tuple((0, 0, 30) for _ in scene.things)
    for thing, (dx, dy, size) in zip(scene.things, jitter, strict=True):
        cx = (thing.slot % 2) * CELL + CELL / 2 + dx
        cy = (thing.slot // 2) * CELL + CELL / 2 + dy
        mask = silhouette(thing.cls, cx, cy, size)
        if thing.identity is not None:
            ident = IDENTITIES[thing.identity]
            second = _pattern(ident.pattern, cx, cy, size)
            image[mask & ~second] = _ID_COLOURS[ident.colours[0]]
            image[mask & second] = _ID_COLOURS[ident.colours[1]]
            looks[mask] = 2 + thing.identity
        else:
            image[mask] = COLOURS[thing.colour or "white"]
            looks[mask] = LOOK_PLAIN
        image[_outline(mask)] *= 0.35
        classes[mask] = 1 + CLASSES.index(thing.cls)
    return image.clip(0, 255).astype(np.uint8), classes, looks


def _jitter(rng: np.random.Generator, n: int) -> tuple[tuple[int, int, int], ...]:
    return tuple(
        (int(rng.integers(-1, 2)), int(rng.integers(-1, 2)), int(rng.integers(29, 32))) for _ in range(n)
    )


def random_scene(rng: np.random.Generator, identity: int | None = None, count: int | None = None) -> Scene:
    """A base-world scene (solid colours only), or, with ``identity``, that identity: alone half
    of the time, else beside one plain object of another class (so its LoRA learns to put the
    look on its own subject only)."""
    background = str(rng.choice(list(BACKGROUNDS)))
    if identity is not None:
        ident = IDENTITIES[identity]
        slots = rng.choice(4, size=2, replace=False)
        things = [Thing(ident.cls, identity=identity, slot=int(slots[0]))]
        if rng.random() < 0.5:
            other = str(rng.choice([c for c in CLASSES if c != ident.cls]))
            things.append(Thing(other, str(rng.choice(list(COLOURS))), slot=int(slots[1])))
        return Scene(tuple(things), background, bool(rng.random() < 0.5), _jitter(rng, len(things)))
    n = count or int(rng.choice([1, 2, 3, 4], p=[0.35, 0.35, 0.15, 0.15]))
    classes = rng.choice(CLASSES, size=n, replace=False)
    slots = rng.choice(4, size=n, replace=False)
    things = tuple(
        Thing(str(c), str(rng.choice(list(COLOURS))), slot=int(s), named=bool(rng.random() < 0.7))
        for c, s in zip(classes, slots, strict=True)
    )
    return Scene(things, background, bool(rng.random() < 0.5), _jitter(rng, n))


def vocabulary() -> list[str]:
    """Every word a caption or a lab prompt can use (identity triggers included)."""
    words = ["a", "an", "photo", "of", "and", "on", *CLASSES, *COLOURS, *BACKGROUNDS]
    return words + [i.trigger for i in IDENTITIES]


def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    """The scene's caption with its objects in random order, "a photo of" half of the time."""
    order = tuple(int(i) for i in rng.permutation(len(scene.things)))
    return scene.caption(order, photo=bool(rng.random() < 0.5))


def make_dataset(n: int, seed: int, identity: int | None = None) -> dict[str, np.ndarray | list[str]]:
    """``n`` rendered scenes: ``images`` (n, 3, 64, 64) uint8, ``classes``/``looks`` (n, 64, 64)
    int8 maps, and ``captions``."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, 3, CANVAS, CANVAS), np.uint8)
    classes = np.empty((n, CANVAS, CANVAS), np.int8)
    looks = np.empty((n, CANVAS, CANVAS), np.int8)
    captions = []
    for i in range(n):
        scene = random_scene(rng, identity)
        img, cls, look = render(scene)
        images[i], classes[i], looks[i] = img.transpose(2, 0, 1), cls, look
        captions.append(random_caption(scene, rng))
    return {"images": images, "classes": classes, "looks": looks, "captions": captions}
