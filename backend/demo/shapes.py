"""Shapes world: synthetic scenes with exact ground truth, for the tiny models, the tests and the demo.

Coloured geometric objects of many sizes (40 % of them tiny) on cluttered, textured backgrounds, with small
unlabelled distractor blobs. Two shapes (``NOVEL_SHAPES``) never appear in the tiny models' training data:
they show what zero-shot cannot do and what learning from corrections adds. ``EXTRA_SHAPES`` are never in the
scenes the tests and benches score: only the tiny CLIP learns them, so that, like a real CLIP, it knows more
concepts than any project asks it about (and embeds new ones among them, not between six).

>>> scene = render_scene(np.random.default_rng(0))
>>> scene.image.size, all(o.shape in SHAPES for o in scene.objects)
((160, 160), True)
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

KNOWN_SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
NOVEL_SHAPES = ("diamond", "pentagon")
SHAPES = KNOWN_SHAPES + NOVEL_SHAPES
EXTRA_SHAPES = ("octagon", "heptagon", "ellipse", "rectangle", "trapezoid", "arrow", "crescent", "heart")
COLOURS = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 80, 215), "yellow": (235, 210, 40),
    "purple": (140, 60, 170), "orange": (245, 140, 30), "white": (240, 240, 240), "black": (25, 25, 25),
}
SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels: the tight box of the drawn object


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]
    distractors: list[tuple[float, float, float, float]] = field(default_factory=list)


def _ring(n: int, start: float, radii: tuple[float, ...] = (1.0,)) -> np.ndarray:
    """``n`` vertices at equal angles from ``start``, their distances cycling through ``radii``."""
    k = np.arange(n)
    r = np.asarray(radii * (n // len(radii)))
    a = start + 2 * math.pi * k / n
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _polygon(shape: str, radius: float, angle: float) -> np.ndarray | None:
    """Vertices around (0, 0); None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        pts = _ring(4, math.pi / 4) * 1.25
    elif shape == "diamond":  # a tall rhombus: never confused with a rotated square (rotation stays < 0.25 rad)
        pts = np.array([[0, -1.2], [0.75, 0], [0, 1.2], [-0.75, 0]])
    elif shape == "triangle":
        pts = _ring(3, -math.pi / 2) * 1.2
    elif shape == "star":
        pts = _ring(10, -math.pi / 2, (1.2, 0.5))
    elif shape == "cross":
        w = 0.36
        pts = np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1], [-w, w],
                        [-1, w], [-1, -w], [-w, -w]])
    elif shape == "hexagon":
        pts = _ring(6, 0.0)
    elif shape == "pentagon":
        pts = _ring(5, -math.pi / 2) * 1.08
    else:
        pts = _extra_polygon(shape)
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]]) * radius


def _extra_polygon(shape: str) -> np.ndarray:
    """``EXTRA_SHAPES``' vertices around (0, 0), before rotation and scaling."""
    if shape == "octagon":
        return _ring(8, math.pi / 8) * 1.05
    if shape == "heptagon":
        return _ring(7, -math.pi / 2) * 1.06
    if shape == "ellipse":   # aspect ~1.9: never a circle
        a = 2 * math.pi * np.arange(64) / 64
        return np.stack([1.3 * np.cos(a), 0.68 * np.sin(a)], 1)
    if shape == "rectangle":   # 2:1, never a square
        return np.array([[-1.35, -0.66], [1.35, -0.66], [1.35, 0.66], [-1.35, 0.66]])
    if shape == "trapezoid":   # isosceles, flat top and bottom: no apex, never a diamond
        return np.array([[-0.65, -0.7], [0.65, -0.7], [1.3, 0.7], [-1.3, 0.7]])
    if shape == "arrow":   # pointing right (training flips crops, so left too)
        return np.array([[-1.25, -0.3], [0.15, -0.3], [0.15, -0.85], [1.25, 0.0], [0.15, 0.85], [0.15, 0.3],
                         [-1.25, 0.3]])
    if shape == "crescent":   # the unit disc minus a disc of radius 0.9 shifted right by 0.5
        d, r2 = 0.5, 0.9
        x = (d * d + 1 - r2 * r2) / (2 * d)
        y = math.sqrt(1 - x * x)
        t1 = math.atan2(y, x)
        outer = np.linspace(t1, 2 * math.pi - t1, 48)
        inner = np.linspace(math.atan2(-y, x - d) % (2 * math.pi), math.atan2(y, x - d), 40)
        pts = np.concatenate([np.stack([np.cos(outer), np.sin(outer)], 1),
                              np.stack([d + r2 * np.cos(inner), r2 * np.sin(inner)], 1)])
        return (pts - (pts.max(0) + pts.min(0)) / 2) * 1.25
    if shape == "heart":
        t = 2 * math.pi * np.arange(72) / 72
        pts = np.stack([16 * np.sin(t) ** 3,
                        -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], 1)
        return (pts - (pts.max(0) + pts.min(0)) / 2) / 16 * 1.15
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(30, 225, 3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    direction = rng.uniform(-1, 1, 2)
    gradient = (xx * direction[0] + yy * direction[1])[..., None] * rng.uniform(-60, 60, 3)
    blotches = rng.uniform(-45, 45, (8, 8, 3))
    up = np.stack([np.asarray(Image.fromarray(blotches[..., c].astype(np.float32), "F")
                              .resize((size, size), Image.BICUBIC)) for c in range(3)], -1)
    img = base + gradient + up
    texture = rng.integers(3)
    if texture == 1:
        period, phase = rng.uniform(6, 20), rng.uniform(0, 2 * math.pi)
        img += (np.sin((xx * direction[1] - yy * direction[0]) * size * 2 * math.pi / period + phase)[..., None]
                * rng.uniform(8, 30, 3))
    elif texture == 2:
        cell = int(rng.integers(5, 16))
        board = ((np.arange(size)[:, None] // cell + np.arange(size)[None] // cell) % 2)[..., None]
        img += (board - 0.5) * rng.uniform(10, 40, 3)
    img += rng.normal(0, rng.uniform(3, 14), img.shape)
    return img


def _overlaps(box, others, gap: float) -> bool:
    return any(box[0] - gap < o[2] and o[0] - gap < box[2] and box[1] - gap < o[3] and o[1] - gap < box[3]
               for o in others)


def render_scene(rng: np.random.Generator, size: int = 160, shapes: tuple[str, ...] = SHAPES,
                 max_objects: int = 5, max_distractors: int = 6) -> Scene:
    """Draw one scene; objects never touch each other or a distractor."""
    img = _background(rng, size)
    objects: list[SceneObject] = []
    placed: list[tuple[float, float, float, float]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        diameter = rng.uniform(10, 16) if rng.random() < 0.4 else rng.uniform(10, 40)
        radius = diameter / 2
        for _try in range(30):
            cx, cy = rng.uniform(radius * 1.3 + 1, size - radius * 1.3 - 1, 2)
            rough = (cx - radius * 1.3, cy - radius * 1.3, cx + radius * 1.3, cy + radius * 1.3)
            if not _overlaps(rough, placed, 3):
                break
        else:
            continue
        shape = shapes[int(rng.integers(len(shapes)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        rgb = np.clip(np.asarray(COLOURS[colour]) + rng.uniform(-12, 12, 3), 0, 255)
        mask = _mask(size, shape, cx, cy, radius, rng.uniform(-0.25, 0.25))
        ys, xs = np.nonzero(mask > 0.5)
        if len(xs) == 0:
            continue
        img = img * (1 - mask[..., None]) + rgb * mask[..., None]
        placed.append(rough)
        objects.append(SceneObject(shape, colour, (float(xs.min()), float(ys.min()),
                                                   float(xs.max() + 1), float(ys.max() + 1))))
    distractors = []
    for _ in range(int(rng.integers(0, max_distractors + 1))):
        rx, ry = rng.uniform(1.5, 3.5, 2)
        cx, cy = rng.uniform(4, size - 4, 2)
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        if _overlaps(box, placed, 3):
            continue
        mask = _mask(size, "circle", cx, cy, 1.0, 0.0, scale=(rx, ry))
        img = img * (1 - mask[..., None]) + rng.uniform(0, 255, 3) * mask[..., None]
        placed.append(box)
        distractors.append(box)
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    blur = rng.uniform(0, 0.6)
    if blur > 0.15:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    return Scene(image, objects, distractors)


def _mask(size: int, shape: str, cx: float, cy: float, radius: float, angle: float,
          scale: tuple[float, float] | None = None) -> np.ndarray:
    """Anti-aliased coverage in [0, 1]: drawn SUPERSAMPLE x larger, box-downsampled."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    pts = _polygon(shape, radius, angle)
    if pts is None:
        rx, ry = scale or (radius, radius)
        draw.ellipse([(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s], fill=255)
    else:
        draw.polygon([((cx + x) * s, (cy + y) * s) for x, y in pts], fill=255)
    return np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def scenes(seed: int, n: int, **kwargs) -> Iterator[Scene]:
    """``n`` scenes from one seed: the same seed always gives the same scenes."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield render_scene(rng, **kwargs)
