"""Synthetic multimodal data for the demo: coloured shapes on noisy backgrounds.

The task is chosen so that a model a few hundred kilobytes large can learn it on a CPU in
minutes, and so that learning it *requires* the vision path: the question text never reveals
the answer, colours and shapes are drawn independently and uniformly, and held-out images are
freshly drawn (new positions, sizes, colour jitter and noise). Everything is written in the
official XComposer2 finetuning format (JSON list of ``{"id", "image", "conversations"}``, roles
``user``/``assistant``, ``<ImageHere>`` placeholders, a ``data.txt`` with counts in thousands,
paths relative to the folder holding ``data.txt``), so the demo trains through exactly the same
data path as a user's run.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

__all__ = [
    "COLOURS",
    "QA",
    "QUESTIONS",
    "SHAPES",
    "DemoData",
    "draw_shape",
    "generate_dataset",
    "heldout_kind",
    "read_heldout",
]

#: Well-separated RGB centres; each drawn shape gets +-12 jitter per channel.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 50),
    "blue": (40, 70, 225),
    "yellow": (240, 215, 40),
    "purple": (135, 45, 175),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
#: The demo's shapes. ("ring", "line", "cross", "diamond" can be drawn too: a set chosen for
#: locally different patches, square/ring/cross/line, was not better; see README "The demo".)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

#: The question for each kind of sample. One phrasing per kind keeps the task about the image.
QUESTIONS: dict[str, str] = {
    "colour": "What colour is the shape?",
    "shape": "What shape is this?",
    "compare": "Are the two shapes the same colour?",
}

#: The CLIP normalisation mean in 8-bit RGB: a flat image of it normalises to (almost) zero.
CLIP_MEAN_RGB = (123, 117, 104)
#: Held-out files are ``heldout_<kind>.json`` beside the training files.
HELDOUT_PREFIX = "heldout_"

_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "left": "right", "day": "night", "yes": "no", "open": "closed"}


@dataclass(frozen=True)
class QA:
    """One held-out question: images (absolute paths), the question text and the one-word answer."""

    id: str
    kind: str  # colour | shape | compare | text
    images: tuple[str, ...]
    question: str
    answer: str


@dataclass
class DemoData:
    """Where the generated files are, and the held-out questions to score."""

    root: Path
    data_txt: Path
    train_files: dict[str, Path]
    train_counts: dict[str, int]
    heldout_txt: Path  # a data.txt of one held-out file per question kind
    heldout_blank: Path  # the colour questions with images that carry no information (the control)
    heldout: list[QA] = field(default_factory=list)


def _star(cx: float, cy: float, r: float, points: int = 5) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * points):
        rr = r if k % 2 == 0 else r * 0.45
        a = -np.pi / 2 + k * np.pi / points
        pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
    return pts


def draw_shape(
    colour: str, shape: str, rng: random.Random, size: int = 224, *, noise: float = 12.0, jitter: float = 0.08
) -> Image.Image:
    """Draw one ``shape`` filled with ``colour`` (jittered) near the centre, with random size, on a noisy grey background.

    ``jitter`` is the largest centre offset as a fraction of the image side.
    """
    nprng = np.random.default_rng(rng.getrandbits(32))
    bg = rng.randint(105, 150)
    base = np.full((size, size, 3), bg, dtype=np.float32) + nprng.normal(0.0, noise, (size, size, 3))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    fill = tuple(int(min(255, max(0, c + rng.randint(-12, 12)))) for c in COLOURS[colour])
    # small jitter around the centre: the task is about the shape, not about finding it
    r = size * rng.uniform(0.30, 0.32)  # half extent of the shape
    cx = size / 2 + size * rng.uniform(-jitter, jitter)
    cy = size / 2 + size * rng.uniform(-jitter, jitter)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r * 1.1), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, round(r * 0.22)))
    elif shape == "line":
        w = r * 0.2
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    elif shape == "cross":
        w = r * 0.33
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return img


def _text_qa(rng: random.Random) -> tuple[str, str]:
    """A text-only question with a one-word answer (small sums, weekdays, opposites)."""
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(0, 4), rng.randint(0, 5)
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 1:
        i = rng.randrange(7)
        return f"Which day comes after {_WEEKDAYS[i].capitalize()}?", _WEEKDAYS[(i + 1) % 7]
    word = rng.choice(sorted(_OPPOSITES))
    return f"What is the opposite of {word}?", _OPPOSITES[word]


class _Writer:
    """Draws images into ``images/`` and returns their paths relative to the data root."""

    def __init__(self, root: Path, img_size: int, blank: bool, draw_size: int | None = None) -> None:
        # drawn at >= 112 px (readable for people) unless a size is given; the model's preprocessing resizes
        self.root, self.img_size, self.blank, self.n = root, draw_size or max(112, img_size), blank, 0
        (root / "images").mkdir(parents=True, exist_ok=True)

    def image(self, prefix: str, colour: str, shape: str, rng: random.Random) -> str:
        img = draw_shape(colour, shape, rng, self.img_size)
        if self.blank:  # control experiment: the files exist, but carry no information
            img = Image.new("RGB", img.size, CLIP_MEAN_RGB)
        rel = f"images/{prefix}_{self.n:05d}.jpg"
        self.n += 1
        img.save(self.root / rel, quality=90)
        return rel


def _turn(role: str, value: str) -> dict[str, str]:
    return {"from": role, "value": value}


def generate_dataset(
    out_dir: str | Path,
    *,
    n_single: int = 1200,
    n_compare: int = 200,
    n_text: int = 100,
    n_heldout: int = 48,
    img_size: int = 224,
    seed: int = 0,
    blank_train_images: bool = False,
    shape_fraction: float = 0.5,
    shapes: Sequence[str] = SHAPES,
    draw_size: int | None = None,
) -> DemoData:
    """Write train files, ``data.txt`` and ``heldout.json`` under ``out_dir`` and return where they are.

    * ``shapes.json``: ``n_single`` one-image, single-turn samples, alternately asking the colour
      and the shape (single-turn like the held-out questions: the answer token then always sits
      at the same distance from the image, which a tiny decoder learns much faster).
    * ``compare.json``: ``n_compare`` two-image samples, "same colour?" -> yes/no (balanced).
    * ``text.json``: ``n_text`` text-only samples (sums, weekdays, opposites).
    * ``heldout.json``: ``n_heldout`` fresh images each asked about colour and about shape in
      separate single-turn samples, plus ``n_heldout // 4`` comparisons and text questions.

    ``blank_train_images`` replaces every *training* image by a flat grey one (a control: the
    model then cannot learn colours or shapes, whatever else is right). ``draw_size`` sets the
    pixel size of the image files (default: at least 112).
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    if not 0.0 <= shape_fraction <= 1.0:
        raise ValueError(f"shape_fraction {shape_fraction} must lie in [0, 1]")
    colours, shapes = sorted(COLOURS), list(shapes)
    train = _Writer(root, img_size, blank_train_images, draw_size)

    single = []
    for i in range(n_single):
        c, s = rng.choice(colours), rng.choice(shapes)
        img = train.image("train", c, s, rng)
        # deterministic interleaving: sample i asks the shape when the running share crosses an integer
        is_shape = int((i + 1) * shape_fraction) > int(i * shape_fraction)
        kind, ans = ("shape", s) if is_shape else ("colour", c)
        conv = [_turn("user", "<ImageHere>" + QUESTIONS[kind]), _turn("assistant", ans)]
        single.append({"id": f"{kind}-{i}", "image": [img], "conversations": conv})

    def compare_pair(prefix: str, writer: _Writer, r: random.Random) -> tuple[list[str], str]:
        same = r.random() < 0.5
        c1 = r.choice(colours)
        c2 = c1 if same else r.choice([c for c in colours if c != c1])
        imgs = [writer.image(prefix, c1, r.choice(shapes), r), writer.image(prefix, c2, r.choice(shapes), r)]
        return imgs, "yes" if same else "no"

    compare = []
    for i in range(n_compare):
        imgs, ans = compare_pair("train", train, rng)
        q = "Image1: <ImageHere>; Image2: <ImageHere>. " + QUESTIONS["compare"]
        compare.append({"id": f"compare-{i}", "image": imgs, "conversations": [_turn("user", q), _turn("assistant", ans)]})

    text = []
    for i in range(n_text):
        q, a = _text_qa(rng)
        text.append({"id": f"text-{i}", "conversations": [_turn("user", q), _turn("assistant", a)]})

    files = {"shapes": single, "compare": compare, "text": text}
    train_files, counts, lines = {}, {}, []
    for name, samples in files.items():
        if not samples:
            continue
        path = root / f"{name}.json"
        path.write_text(json.dumps(samples, indent=1))
        train_files[name], counts[name] = path, len(samples)
        lines.append(f"{path.name} {len(samples) / 1000:g}")
    data_txt = root / "data.txt"
    data_txt.write_text("\n".join(lines) + "\n")

    # held-out: fresh images (real even in the blank control: we measure what was learned)
    hrng = random.Random(seed + 7919)
    held = _Writer(root, img_size, False, draw_size)
    heldout_samples: list[dict] = []
    qas: list[QA] = []

    def add(kind: str, imgs: Sequence[str], question: str, answer: str) -> None:
        sid = f"heldout-{kind}-{len(qas)}"
        placeholders = "".join("<ImageHere>" for _ in imgs) if len(imgs) == 1 else ""
        value = placeholders + question
        sample = {"id": sid, "conversations": [_turn("user", value), _turn("assistant", answer)]}
        if imgs:
            sample["image"] = list(imgs)
        heldout_samples.append(sample)
        qas.append(QA(sid, kind, tuple(str(root / p) for p in imgs), value, answer))

    for i in range(n_heldout):
        # balanced over classes so that chance is exactly 1/len(colours) and 1/len(shapes)
        c, s = colours[i % len(colours)], shapes[(i // len(colours) + i) % len(shapes)]
        img = held.image("heldout", c, s, hrng)
        add("colour", [img], QUESTIONS["colour"], c)
        add("shape", [img], QUESTIONS["shape"], s)
    for _ in range(max(1, n_heldout // 4) if n_compare else 0):
        imgs, ans = compare_pair("heldout", held, hrng)
        add("compare", imgs, "Image1: <ImageHere>; Image2: <ImageHere>. " + QUESTIONS["compare"], ans)
    for _ in range(max(1, n_heldout // 4) if n_text else 0):
        add("text", [], *_text_qa(hrng))
    # one file per question kind, so that scores per data file are scores per kind
    heldout_lines = []
    for kind in dict.fromkeys(q.kind for q in qas):
        rows = [sample for sample, q in zip(heldout_samples, qas) if q.kind == kind]
        (root / f"{HELDOUT_PREFIX}{kind}.json").write_text(json.dumps(rows, indent=1))
        heldout_lines.append(f"{HELDOUT_PREFIX}{kind}.json {len(rows) / 1000:g}")
    heldout_txt = root / "heldout.txt"
    heldout_txt.write_text("\n".join(heldout_lines) + "\n")
    heldout_blank = _blank_copy(root, [s for s, q in zip(heldout_samples, qas) if q.kind == "colour"], held.img_size)
    logger.info(
        "demo data: %s (%s), %d held-out questions in %s",
        data_txt,
        ", ".join(f"{k} {v}" for k, v in counts.items()),
        len(qas),
        heldout_txt,
    )
    return DemoData(root, data_txt, train_files, counts, heldout_txt, heldout_blank, qas)


def _blank_copy(root: Path, samples: list[dict], size: int) -> Path:
    """The samples with every image replaced by a flat image of the CLIP mean colour (no visual information)."""
    blank = "images/blank.png"
    Image.new("RGB", (size, size), CLIP_MEAN_RGB).save(root / blank)
    rows = [{**s, "id": f"blank-{s['id']}", "image": [blank for _ in s.get("image", [])]} for s in samples]
    path = root / f"{HELDOUT_PREFIX}blank_colour.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def heldout_kind(source: str) -> str:
    """The question kind of a held-out file (``heldout_colour.json`` -> ``colour``, the blank copy too)."""
    return Path(source).stem.rsplit("_", 1)[-1]


def read_heldout(path: str | Path) -> list[QA]:
    """Read held-out questions written by :func:`generate_dataset` back (``heldout.txt`` or one of its files)."""
    path = Path(path)
    if path.suffix == ".txt":
        names = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
        return [qa for name in names for qa in read_heldout(path.parent / name)]
    out = []
    for s in json.loads(path.read_text()):
        conv = s["conversations"]
        imgs = s.get("image", [])
        imgs = [imgs] if isinstance(imgs, str) else imgs
        qa = QA(
            str(s["id"]), heldout_kind(path.name), tuple(str(path.parent / p) for p in imgs), conv[0]["value"], conv[1]["value"]
        )
        out.append(qa)
    return out
