"""The captioned image set: discovery, fail-fast checks, and the reference recipe's transforms
(resize shorter side, centre/random crop, random flip, normalise to [-1, 1]) on PIL + numpy.

Randomness is a pure function of (seed, epoch, index): each epoch's order is a permutation drawn from
(seed, epoch) and each sample's crop/flip from (seed, epoch, sample). A resumed run therefore sees exactly
the batches an uninterrupted run would, from nothing more than its step counter.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Refuse images bigger than this before decoding them (decompression bombs, absurd uploads).
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


class DataError(Exception):
    """Bad input data: missing/empty data set, unreadable image, invalid base model folder."""


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str


def discover(dataset_dir: str | os.PathLike) -> list[Example]:
    """Captioned images from metadata.jsonl (preferred when present) or same-named .txt sidecars."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DataError(f"dataset_dir {str(root)!r} is not a folder")
    examples: list[Example] = []
    metadata = root / "metadata.jsonl"
    if metadata.is_file():
        with open(metadata, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    name, text = rec["file_name"], rec["text"]
                    if not isinstance(name, str) or not isinstance(text, str):
                        raise TypeError("file_name and text must be strings")
                except (ValueError, KeyError, TypeError) as e:
                    raise DataError(f"{metadata}:{lineno}: bad metadata line ({e})") from None
                path = (root / name).resolve()
                if root.resolve() not in path.parents:
                    raise DataError(f"{metadata}:{lineno}: file_name {name!r} points outside the data set")
                if not path.is_file():
                    raise DataError(f"{metadata}:{lineno}: image {str(path)!r} does not exist")
                examples.append(Example(path, text))
    else:
        for path in sorted(root.iterdir()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
                continue
            sidecar = path.with_suffix(".txt")
            if not sidecar.is_file():
                raise DataError(f"image {str(path)!r} has no caption file {sidecar.name!r}")
            examples.append(Example(path, sidecar.read_text(encoding="utf-8").strip()))
    if not examples:
        raise DataError(f"dataset_dir {str(root)!r} holds no captioned images "
                        "(need metadata.jsonl or image + same-named .txt)")
    return examples


def open_rgb(path: Path) -> Image.Image:
    """Open, size-check (before decoding), decode and convert to RGB; DataError naming the file otherwise."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise DataError(f"image {str(path)!r} is too large ({w}x{h} pixels)")
            img.load()
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except DataError:
        raise
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(f"image {str(path)!r} cannot be decoded: {type(e).__name__}: {e}") from None


def check_all(examples: list[Example]) -> None:
    """Decode every image once at start-up, so a corrupt file fails the job now, not hours in."""
    for ex in examples:
        open_rgb(ex.path)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0]).permutation(n)


def transform(img: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
              rng: np.random.Generator) -> np.ndarray:
    """PIL RGB image -> float32 CHW array in [-1, 1], resolution x resolution."""
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if center_crop:
        left = int(round((new_w - resolution) / 2.0))
        top = int(round((new_h - resolution) / 2.0))
    else:
        left = int(rng.integers(0, new_w - resolution + 1))
        top = int(rng.integers(0, new_h - resolution + 1))
    img = img.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class CaptionedImages:
    def __init__(self, examples: list[Example], resolution: int, center_crop: bool, random_flip: bool,
                 seed: int):
        self.examples = examples
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed

    def __len__(self) -> int:
        return len(self.examples)

    def batches_per_epoch(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)  # the last batch may be short, as in the reference

    def batch(self, epoch: int, batch_index: int, batch_size: int) -> tuple[np.ndarray, list[str]]:
        """The `batch_index`-th batch of `epoch`: (N,3,H,W) float32 pixels and captions."""
        order = epoch_order(self.seed, epoch, len(self))
        ids = order[batch_index * batch_size:(batch_index + 1) * batch_size]
        pixels, captions = [], []
        for i in ids:
            ex = self.examples[int(i)]
            rng = np.random.default_rng([self.seed, epoch, int(i), 1])
            pixels.append(transform(open_rgb(ex.path), self.resolution, self.center_crop, self.random_flip, rng))
            captions.append(ex.caption)
        return np.stack(pixels), captions
