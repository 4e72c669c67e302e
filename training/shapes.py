"""The shapes world of docs/shapes.md: seeded pictures and their captions.

One picture is one shape (circle, square, upright isosceles triangle) of one palette colour on a
plain background, 64 x 64, drawn at 4x with PIL and box-filtered down (anti-aliasing).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 190),
    "orange": (250, 130, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, tuple[int, int]] = {"small": (14, 22), "large": (30, 42)}

SIZE_DROP_PROB = 0.3
CAPTION_DROP_PROB = 0.1


@dataclass(frozen=True)
class Scene:
    """What one picture shows; the caption is a function of it."""

    size: str
    colour: str
    shape: str
    background: str
    box: int  # side of the shape's bounding box, pixels
    left: int
    top: int

    def caption(self, with_size: bool = True) -> str:
        return caption_for(self.colour, self.shape, self.background, self.size if with_size else None)


def caption_for(colour: str, shape: str, background: str, size: str | None = None) -> str:
    size_word = f"{size} " if size else ""
    return f"a {size_word}{colour} {shape} on a {background} background"


def all_captions(with_size: bool = True) -> list[str]:
    """The grammar's captions: 54 with a size word, or the 18 without."""
    sizes: list[str | None] = list(SIZES) if with_size else [None]
    return [
        caption_for(colour, shape, background, size)
        for size in sizes
        for colour in COLOURS
        for shape in SHAPES
        for background in BACKGROUNDS
    ]


def parse_caption(caption: str) -> dict[str, str | None]:
    """Inverse of caption_for: {'size', 'colour', 'shape', 'background'} (size may be None)."""
    words = caption.split()
    if len(words) not in (7, 8) or words[0] != "a" or words[-1] != "background":
        raise ValueError(
            f"caption must follow 'a [small|large] <colour> <shape> on a <background> background', got {caption!r}"
        )
    size = words[1] if len(words) == 8 else None
    colour, shape, _on, _a, background = words[-6:-1]
    if size not in (None, *SIZES) or colour not in COLOURS or shape not in SHAPES or background not in BACKGROUNDS:
        raise ValueError(f"caption has a word outside the grammar: {caption!r}")
    return {"size": size, "colour": colour, "shape": shape, "background": background}


def random_scene(rng: random.Random, **fixed: str) -> Scene:
    """A random scene; keyword arguments (size, colour, shape, background) pin attributes."""
    size = fixed.get("size") or rng.choice(list(SIZES))
    colour = fixed.get("colour") or rng.choice(list(COLOURS))
    shape = fixed.get("shape") or rng.choice(SHAPES)
    background = fixed.get("background") or rng.choice(list(BACKGROUNDS))
    low, high = SIZES[size]
    box = rng.randint(low, high)
    left = rng.randint(0, IMAGE_SIZE - box)
    top = rng.randint(0, IMAGE_SIZE - box)
    return Scene(size, colour, shape, background, box, left, top)


def render(scene: Scene) -> Image.Image:
    """Draw the scene at SUPERSAMPLE x and box-filter it down to IMAGE_SIZE."""
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(canvas)
    x0, y0 = scene.left * s, scene.top * s
    x1, y1 = (scene.left + scene.box) * s - 1, (scene.top + scene.box) * s - 1
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # upright isosceles triangle, base at the bottom, apex centred on top
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def training_caption(scene: Scene, rng: random.Random) -> str:
    """The caption with the training dropout of docs/shapes.md: '' w.p. 0.1, else size dropped w.p. 0.3."""
    if rng.random() < CAPTION_DROP_PROB:
        return ""
    return scene.caption(with_size=rng.random() >= SIZE_DROP_PROB)


class ShapesWorld:
    """Deterministic stream of (picture, scene) from a seed."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def sample(self, **fixed: str) -> tuple[Image.Image, Scene]:
        scene = random_scene(self.rng, **fixed)
        return render(scene), scene

    def batch(self, n: int) -> tuple[np.ndarray, list[Scene]]:
        """n pictures as uint8 (n, 64, 64, 3) and their scenes."""
        scenes = [random_scene(self.rng) for _ in range(n)]
        pixels = np.stack([np.asarray(render(scene)) for scene in scenes])
        return pixels, scenes
