"""The captioned image set: discovery, fail-fast checks, and the reference recipe's transforms
(resize shorter side, centre/random crop, random flip, normalise to [-1, 1]) on PIL + numpy, plus caption
dropout.

Randomness is a pure function of (seed, epoch, index): each epoch's order is a permutation drawn from
(seed, epoch) and each sample's crop/flip/caption dropout from (seed, epoch, sample). A resumed run therefore
sees exactly the batches an uninterrupted run would, from nothing more than its step counter. The same
functions decide a sample's augmentation whether its pixels are transformed now or its latents come from
the cache, so both paths train on the same data.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Refuse images bigger than this before decoding them (decompression bombs, absurd uploads).
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


class DataError(Exception):
    """Bad input data: missing/empty data set, unreadable image, invalid base model folder."""


@dataclass(frozen=True)
class Example:
    path: Path | None  # a file; None for an image held in memory (Hugging Face data set)
    caption: str
    image: Any = None  # PIL image when path is None

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<in-memory image>"


def discover(dataset_dir: str | os.PathLike, image_column: str | None = None,
             caption_column: str = "text", skipped: list[str] | None = None) -> list[Example]:
    """Captioned images from metadata.jsonl (preferred when present; the file-name and caption keys are
    `image_column` (default "file_name") and `caption_column`) or same-named .txt sidecars.

    Nothing is read from outside the set's folder: a metadata.jsonl or an image it names whose real path
    leaves the folder is an error; an image or .txt caption that is a symlink leading out is skipped and its
    name appended to `skipped`."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DataError(f"dataset_dir {str(root)!r} is not a folder")
    real_root = root.resolve()

    def inside(p: Path) -> bool:
        real = p.resolve()
        return real == real_root or real_root in real.parents

    image_key = image_column or "file_name"
    examples: list[Example] = []
    metadata = root / "metadata.jsonl"
    if metadata.is_file() and not inside(metadata):
        raise DataError(f"{metadata} is a symbolic link leading outside the data set")
    if metadata.is_file():
        with open(metadata, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    name, text = rec[image_key], rec[caption_column]
                    if not isinstance(name, str) or not isinstance(text, str):
                        raise TypeError(f"{image_key} and {caption_column} must be strings")
                except KeyError as e:
                    raise DataError(f"{metadata}:{lineno}: no column {e.args[0]!r} (image_column is "
                                    f"{image_key!r}, caption_column {caption_column!r})") from None
                except (ValueError, TypeError) as e:
                    raise DataError(f"{metadata}:{lineno}: bad metadata line ({e})") from None
                path = (root / name).resolve()
                if real_root not in path.parents:
                    raise DataError(f"{metadata}:{lineno}: {image_key} {name!r} points outside the data set")
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
            outside = [p.name for p in (path, sidecar) if not inside(p)]
            if outside:
                if skipped is not None:
                    skipped.extend(outside)
                continue
            examples.append(Example(path, sidecar.read_text(encoding="utf-8").strip()))
    if not examples:
        raise DataError(f"dataset_dir {str(root)!r} holds no captioned images "
                        "(need metadata.jsonl or image + same-named .txt)")
    return examples


def load_hub_dataset(name: str, image_column: str | None, caption_column: str) -> list[Example]:
    """A Hugging Face hub data set's "train" split. Refused unless the host allows the hub
    (LORAFORGE_ALLOW_HUB=1 and HF_HUB_OFFLINE unset) and the `datasets` package is installed."""
    if os.environ.get("LORAFORGE_ALLOW_HUB") != "1" or os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        raise DataError(f"dataset_name {name!r}: this host does not allow downloads from the Hugging Face hub "
                        "(set LORAFORGE_ALLOW_HUB=1 and HF_HUB_OFFLINE=0 where it has network), or use dataset_dir")
    try:
        import datasets  # noqa: PLC0415 - optional dependency, only for hub data sets
    except ImportError:
        raise DataError(f"dataset_name {name!r}: the `datasets` package is not installed "
                        "(pip install datasets), or use dataset_dir") from None
    try:
        split = datasets.load_dataset(name, split="train")
    except Exception as e:  # network, unknown name, auth: one readable line
        raise DataError(f"dataset_name {name!r} cannot be loaded from the Hugging Face hub: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    image_key = image_column or "image"
    for key, what in ((image_key, "image_column"), (caption_column, "caption_column")):
        if key not in split.column_names:
            raise DataError(f"dataset_name {name!r} has no column {key!r} ({what}); columns: "
                            f"{', '.join(split.column_names)}")
    examples = []
    for row in split:
        caption = row[caption_column]
        if isinstance(caption, (list, tuple)):  # several captions: the reference takes the first in training
            caption = caption[0] if caption else ""
        examples.append(Example(None, str(caption), row[image_key]))
    if not examples:
        raise DataError(f"dataset_name {name!r} has no rows")
    return examples


def select_samples(examples: list[Example], max_train_samples: int | None, seed: int) -> list[Example]:
    """At most `max_train_samples` examples: a seeded random subset (as the reference's shuffle + select),
    kept in data set order."""
    if max_train_samples is None or max_train_samples >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng([seed, 0, 0, 7]).permutation(len(examples))[:max_train_samples])
    return [examples[int(i)] for i in keep]


def dataset_fingerprint(examples: list[Example]) -> str:
    """sha256 over every (caption, image bytes) pair in order: names the data a LoRA was trained on."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.caption.encode("utf-8") + b"\0")
        if ex.path is not None:
            h.update(ex.path.read_bytes())
        else:
            h.update(np.asarray(ex.image.convert("RGB")).tobytes())
        h.update(b"\1")
    return h.hexdigest()


def open_rgb(example: Example | Path) -> Image.Image:
    """Open, size-check (before decoding), decode and convert to RGB; DataError naming the file otherwise."""
    if isinstance(example, Example) and example.path is None:
        return example.image.convert("RGB")
    path = example.path if isinstance(example, Example) else example
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


def check_all(examples: list[Example]) -> list[tuple[int, int]]:
    """Decode every image once at start-up, so a corrupt file fails the job now, not hours in.
    Returns each image's (width, height) after EXIF rotation."""
    return [open_rgb(ex).size for ex in examples]


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0]).permutation(n)


@dataclass(frozen=True)
class Augment:
    """How one sample is cut from its image: resized size, crop window (in the resized image) and flip."""
    resized: tuple[int, int]  # (width, height)
    left: int
    top: int
    flip: bool


def resized_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    w, h = size
    scale = resolution / min(w, h)
    return max(resolution, round(w * scale)), max(resolution, round(h * scale))


def draw_augment(size: tuple[int, int], resolution: int, center_crop: bool, random_flip: bool,
                 rng: np.random.Generator) -> Augment:
    new_w, new_h = resized_size(size, resolution)
    if center_crop:
        left = int(round((new_w - resolution) / 2.0))
        top = int(round((new_h - resolution) / 2.0))
    else:
        left = int(rng.integers(0, new_w - resolution + 1))
        top = int(rng.integers(0, new_h - resolution + 1))
    flip = bool(random_flip and rng.random() < 0.5)
    return Augment((new_w, new_h), left, top, flip)


def apply_augment(img: Image.Image, resolution: int, aug: Augment, interpolation: str = "bilinear") -> np.ndarray:
    """PIL RGB image -> float32 CHW array in [-1, 1], resolution x resolution."""
    if aug.resized != img.size:
        img = img.resize(aug.resized, RESAMPLING[interpolation])
    img = img.crop((aug.left, aug.top, aug.left + resolution, aug.top + resolution))
    if aug.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def transform(img: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
              rng: np.random.Generator, interpolation: str = "bilinear") -> np.ndarray:
    """One image through the recipe's transforms (kept for callers that hold only an image)."""
    return apply_augment(img, resolution, draw_augment(img.size, resolution, center_crop, random_flip, rng),
                         interpolation)


class CaptionedImages:
    def __init__(self, examples: list[Example], resolution: int, center_crop: bool, random_flip: bool,
                 seed: int, *, interpolation: str = "bilinear", caption_dropout: float = 0.0,
                 sizes: list[tuple[int, int]] | None = None):
        self.examples = examples
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.interpolation = interpolation
        self.caption_dropout = caption_dropout
        self.sizes = sizes if sizes is not None else [open_rgb(ex).size for ex in examples]

    def __len__(self) -> int:
        return len(self.examples)

    def batches_per_epoch(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)  # the last batch may be short, as in the reference

    def batch_ids(self, epoch: int, batch_index: int, batch_size: int) -> list[int]:
        order = epoch_order(self.seed, epoch, len(self))
        return [int(i) for i in order[batch_index * batch_size:(batch_index + 1) * batch_size]]

    def augment(self, epoch: int, i: int) -> Augment:
        rng = np.random.default_rng([self.seed, epoch, i, 1])
        return draw_augment(self.sizes[i], self.resolution, self.center_crop, self.random_flip, rng)

    def caption(self, epoch: int, i: int) -> str:
        """The sample's caption, or "" when caption dropout drops it this epoch."""
        if self.caption_dropout > 0 and np.random.default_rng([self.seed, epoch, i, 2]).random() < self.caption_dropout:
            return ""
        return self.examples[i].caption

    def pixels(self, i: int, aug: Augment) -> np.ndarray:
        return apply_augment(open_rgb(self.examples[i]), self.resolution, aug, self.interpolation)

    def batch(self, epoch: int, batch_index: int, batch_size: int) -> tuple[np.ndarray, list[str]]:
        """The `batch_index`-th batch of `epoch`: (N,3,H,W) float32 pixels and captions."""
        ids = self.batch_ids(epoch, batch_index, batch_size)
        pixels = [self.pixels(i, self.augment(epoch, i)) for i in ids]
        return np.stack(pixels), [self.caption(epoch, i) for i in ids]
