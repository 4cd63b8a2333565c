"""The captioned image set: discovery (metadata.jsonl / metadata.csv / .txt sidecars / one instance prompt),
an inspection that skips unusable images with a reason each instead of failing the run, the reference
recipe's transforms (resize, centre/random crop, random flip, normalise to [-1, 1]) on PIL + numpy, square or
to aspect-ratio buckets, plus caption dropout and tag shuffling.

Randomness is a pure function of (seed, epoch, index): each epoch's order is a permutation drawn from
(seed, epoch) and each sample's crop/flip/caption dropout from (seed, epoch, sample). A resumed run therefore
sees exactly the batches an uninterrupted run would, from nothing more than its step counter. The same
functions decide a sample's augmentation whether its pixels are transformed now or its latents come from
the cache, so both paths train on the same data.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections import Counter
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


# Why an image is left out of a run (the contract's SkipReason, by its short name).
CORRUPT, TOO_SMALL, UNREADABLE, NO_CAPTION, TOO_LARGE = "corrupt", "too_small", "unreadable", "no_caption", "too_large"


class ImageError(DataError):
    """One image that cannot be used, and why (one of the reasons above)."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str):
        super().__init__(f"image {str(path)!r} {detail}")
        self.reason = reason
        self.detail = detail  # without the path: reports name the image relative to its data set


@dataclass(frozen=True)
class Skipped:
    """An image (or its caption file) left out: its name in the data set, the reason and the detail."""
    name: str
    reason: str
    detail: str


def skipped_summary(skipped: list[Skipped]) -> str:
    """'3 corrupt (a.png, b.png, c.png), 1 no_caption (d.png)': the reasons, counted, with a few names each."""
    by: dict[str, list[str]] = {}
    for s in skipped:
        by.setdefault(s.reason, []).append(s.name)
    return ", ".join(f"{len(names)} {reason} ({', '.join(names[:5])}{', …' if len(names) > 5 else ''})"
                     for reason, names in by.items())


@dataclass(frozen=True)
class Example:
    path: Path | None  # a file; None for an image held in memory (Hugging Face data set)
    caption: str
    image: Any = None  # PIL image when path is None
    root: Path | None = None  # the set's real folder: what is opened must lie inside it

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<in-memory image>"


def caption_source(dataset_dir: str | os.PathLike, instance_prompt: str | None = None) -> str:
    """Where discover() takes a folder's captions from: "instance_prompt", "metadata.jsonl", "metadata.csv"
    or "txt" (sidecars)."""
    root = Path(dataset_dir)
    if instance_prompt:
        return "instance_prompt"
    for name in ("metadata.jsonl", "metadata.csv"):
        if (root / name).is_file():
            return name
    return "txt"


def _metadata_rows(path: Path, image_key: str, caption_column: str):
    """(line number, file name, caption) of each row of metadata.jsonl or metadata.csv; DataError for a row
    that cannot be read (a bad file is a mistake in the set, not one bad image)."""
    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix == ".csv":
            reader = csv.DictReader(f)
            for field in (image_key, caption_column):
                if field not in (reader.fieldnames or []):
                    raise DataError(f"{path}: no column {field!r} in its header (image_column is {image_key!r}, "
                                    f"caption_column {caption_column!r})")
            for row in reader:
                yield reader.line_num, row[image_key], row[caption_column]
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                name, text = rec[image_key], rec[caption_column]
                if not isinstance(name, str) or not isinstance(text, str):
                    raise TypeError(f"{image_key} and {caption_column} must be strings")
            except KeyError as e:
                raise DataError(f"{path}:{lineno}: no column {e.args[0]!r} (image_column is "
                                f"{image_key!r}, caption_column {caption_column!r})") from None
            except (ValueError, TypeError) as e:
                raise DataError(f"{path}:{lineno}: bad metadata line ({e})") from None
            yield lineno, name, text


def discover(dataset_dir: str | os.PathLike, image_column: str | None = None,
             caption_column: str = "text", skipped: list[Skipped] | None = None, *,
             instance_prompt: str | None = None, require_some: bool = True) -> list[Example]:
    """Captioned images of a folder, captions from (the first that applies) `instance_prompt` for every image,
    metadata.jsonl, metadata.csv (the file-name and caption keys are `image_column`, default "file_name", and
    `caption_column`), or same-named .txt sidecars.

    An image that cannot be used here (no caption, named by metadata but missing, a symbolic link leading out
    of the folder) is left out and appended to `skipped` with its reason. Nothing is read from outside the
    set's folder: a metadata file, or a row naming a file, whose real path leaves the folder is an error.
    With `require_some`, a folder left with no image raises DataError saying why."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DataError(f"dataset_dir {str(root)!r} is not a folder")
    real_root = root.resolve()
    skipped = skipped if skipped is not None else []

    def inside(p: Path) -> bool:
        real = p.resolve()
        return real == real_root or real_root in real.parents

    image_key = image_column or "file_name"
    examples: list[Example] = []
    source = caption_source(root, instance_prompt)
    if source.startswith("metadata."):
        metadata = root / source
        if not inside(metadata):
            raise DataError(f"{metadata} is a symbolic link leading outside the data set")
        for lineno, name, text in _metadata_rows(metadata, image_key, caption_column):
            path = (root / name).resolve()
            if real_root not in path.parents:
                raise DataError(f"{metadata}:{lineno}: {image_key} {name!r} points outside the data set")
            if not path.is_file():
                skipped.append(Skipped(name, UNREADABLE, f"{source} line {lineno} names it; it does not exist"))
                continue
            examples.append(Example(path, text, root=real_root))
    else:
        for path in sorted(root.iterdir()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
                continue
            sidecar = path.with_suffix(".txt")
            if not inside(path):
                skipped.append(Skipped(path.name, UNREADABLE, "a symbolic link leading outside the data set"))
                continue
            if instance_prompt:
                examples.append(Example(path, instance_prompt, root=real_root))
                continue
            if not sidecar.is_file():
                skipped.append(Skipped(path.name, NO_CAPTION, f"no caption file {sidecar.name}"))
                continue
            if not inside(sidecar):
                skipped.append(Skipped(sidecar.name, UNREADABLE, "a symbolic link leading outside the data set"))
                continue
            try:
                with open(sidecar, "rb") as cf:
                    if not opened_inside(cf, real_root):
                        skipped.append(Skipped(sidecar.name, UNREADABLE, "a symbolic link leading outside the data set"))
                        continue
                    text = cf.read().decode("utf-8").strip()
                examples.append(Example(path, text, root=real_root))
            except (OSError, UnicodeDecodeError) as e:
                skipped.append(Skipped(path.name, NO_CAPTION, f"caption file {sidecar.name} unreadable: {e}"))
    if not examples and require_some:
        raise no_usable_images(skipped)
    return examples


def no_usable_images(skipped: list[Skipped]) -> DataError:
    """The error of a data set with nothing to train on, saying why (without its folder: an uploaded set's
    folder is the worker's business)."""
    why = (f": every image was skipped: {skipped_summary(skipped)}" if skipped
           else " (need images with metadata.jsonl, metadata.csv or same-named .txt captions, or instance_prompt)")
    return DataError(f"the data set holds no captioned images{why}")


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
            with open(ex.path, "rb") as f:
                if ex.root is not None and not opened_inside(f, ex.root):
                    raise DataError(f"{ex.path.name} became a symbolic link leading outside the data set")
                h.update(f.read())
        else:
            h.update(np.asarray(ex.image.convert("RGB")).tobytes())
        h.update(b"\1")
    return h.hexdigest()


def opened_path(fd: int) -> str:
    """The real path of what descriptor `fd` has open (Linux: /proc/self/fd), whatever name it was opened by."""
    return os.readlink(f"/proc/self/fd/{fd}")


def opened_inside(f: Any, real_root: Path) -> bool:
    """Whether the file object `f` opened lies inside `real_root`, judged on what was opened (opened_path), so a
    name changed into a link after discover() checked it cannot lead out."""
    try:
        real = Path(opened_path(f.fileno()))
    except OSError:
        real = Path(f.name).resolve()
    return real_root in real.parents


def open_rgb(example: Example | Path) -> Image.Image:
    """Open, size-check (before decoding), decode and convert to RGB; ImageError naming the file and the reason
    (unreadable, too large, corrupt) otherwise."""
    if isinstance(example, Example) and example.path is None:
        return example.image.convert("RGB")
    path = example.path if isinstance(example, Example) else example
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ImageError(path, UNREADABLE, f"cannot be read: {e.strerror or type(e).__name__}") from None
    root = example.root if isinstance(example, Example) else None
    if root is not None and not opened_inside(f, root):
        f.close()
        raise ImageError(path, UNREADABLE, "a symbolic link leading outside the data set")
    try:
        with f, Image.open(f) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ImageError(path, TOO_LARGE, f"is too large ({w}x{h} pixels)")
            img.load()
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for corrupt files; their text may name the file
        why = str(e).replace(str(path), Path(path).name).replace(repr(f), "the file")
        raise ImageError(path, CORRUPT, f"cannot be decoded: {type(e).__name__}: {why}") from None


def check_all(examples: list[Example]) -> list[tuple[int, int]]:
    """Decode every image once; each image's (width, height) after EXIF rotation. Raises on the first bad one
    (inspect() skips them instead)."""
    return [open_rgb(ex).size for ex in examples]


def inspect(examples: list[Example], min_side: int = 1, root: str | os.PathLike | None = None
            ) -> tuple[list[Example], list[tuple[int, int]], list[Skipped]]:
    """Decode every image once at start-up, so a bad file is found now, not hours in: (the usable examples,
    their (width, height) after EXIF rotation, the skipped ones with the reason each). An image whose shorter
    side is below `min_side` is skipped as too small. Names are relative to `root` where given."""
    kept, sizes, skipped = [], [], []
    for ex in examples:
        name = ex.name
        if root is not None and ex.path is not None:
            try:
                name = ex.path.relative_to(Path(root).resolve()).as_posix()
            except ValueError:
                name = ex.path.name
        try:
            size = open_rgb(ex).size
        except ImageError as e:
            skipped.append(Skipped(name, e.reason, e.detail))
            continue
        if min(size) < min_side:
            skipped.append(Skipped(name, TOO_SMALL, f"{size[0]}x{size[1]} pixels, shorter side below "
                                                    f"min_image_side {min_side}"))
            continue
        kept.append(ex)
        sizes.append(size)
    return kept, sizes, skipped


def size_histogram(sizes: list[tuple[int, int]], limit: int = 100) -> tuple[list[tuple[tuple[int, int], int]], int]:
    """The most common sizes with their counts (at most `limit`), and how many images have another size."""
    common = Counter(sizes).most_common()
    return common[:limit], sum(n for _, n in common[limit:])


# ------------------------------------------------------------------------------------------------ buckets


def make_buckets(resolution: int, step: int, min_side: int, max_side: int, max_aspect: float) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (width, height) as kohya's sd-scripts lays them out: for each width in steps of
    `step` within the sides, the largest height in steps that keeps the area at most resolution²; both
    orientations; only those within the sides and `max_aspect`."""
    area = resolution * resolution
    first = -(-min_side // step) * step
    out = set()
    for w in range(first, max_side + 1, step):
        h = min(max_side, area // w // step * step)
        if h < first or max(w, h) / min(w, h) > max_aspect:
            continue
        out.update({(w, h), (h, w)})
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest the image's (on a log scale, so 2:1 and 1:2 are
    equally far from 1:1); among equals the one nearest in area."""
    w, h = size
    ar = math.log(w / h)
    return min(range(len(buckets)), key=lambda k: (round(abs(ar - math.log(buckets[k][0] / buckets[k][1])), 9),
                                                    abs(buckets[k][0] * buckets[k][1] - w * h)))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0]).permutation(n)


@dataclass(frozen=True)
class Augment:
    """How one sample is cut from its image: resized size, crop window (in the resized image) and flip."""
    resized: tuple[int, int]  # (width, height)
    left: int
    top: int
    flip: bool
    crop: tuple[int, int] | None = None  # the window's (width, height); None: resolution x resolution


Target = int | tuple[int, int]  # a training size: resolution (square) or a bucket's (width, height)


def _wh(target: Target) -> tuple[int, int]:
    return (target, target) if isinstance(target, int) else target


def resized_size(size: tuple[int, int], target: Target) -> tuple[int, int]:
    """The size an image is resized to before its crop: the smallest that covers the target, aspect kept
    (for a square target: the shorter side equals the resolution, as the reference recipe resizes)."""
    (w, h), (tw, th) = size, _wh(target)
    scale = max(tw / w, th / h)
    return max(tw, round(w * scale)), max(th, round(h * scale))


def draw_augment(size: tuple[int, int], target: Target, center_crop: bool, random_flip: bool,
                 rng: np.random.Generator) -> Augment:
    tw, th = _wh(target)
    new_w, new_h = resized_size(size, target)
    if center_crop:
        left = int(round((new_w - tw) / 2.0))
        top = int(round((new_h - th) / 2.0))
    else:
        left = int(rng.integers(0, new_w - tw + 1))
        top = int(rng.integers(0, new_h - th + 1))
    flip = bool(random_flip and rng.random() < 0.5)
    return Augment((new_w, new_h), left, top, flip, None if isinstance(target, int) else (tw, th))


def apply_augment(img: Image.Image, resolution: int, aug: Augment, interpolation: str = "bilinear") -> np.ndarray:
    """PIL RGB image -> float32 CHW array in [-1, 1] of the augment's crop size (resolution x resolution when
    it has none)."""
    tw, th = aug.crop or (resolution, resolution)
    if aug.resized != img.size:
        img = img.resize(aug.resized, RESAMPLING[interpolation])
    img = img.crop((aug.left, aug.top, aug.left + tw, aug.top + th))
    if aug.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def transform(img: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
              rng: np.random.Generator, interpolation: str = "bilinear") -> np.ndarray:
    """One image through the recipe's transforms (kept for callers that hold only an image)."""
    return apply_augment(img, resolution, draw_augment(img.size, resolution, center_crop, random_flip, rng),
                         interpolation)


def shuffle_tags(caption: str, keep: int, rng: np.random.Generator) -> str:
    """The caption's comma-separated tags with all but the first `keep` in a random order (kohya's
    shuffle_caption with keep_tokens)."""
    tags = [t.strip() for t in caption.split(",")]
    rest = tags[keep:]
    order = rng.permutation(len(rest))
    return ", ".join(tags[:keep] + [rest[k] for k in order])


class CaptionedImages:
    """The training set as the loop reads it: which images form each batch of each epoch, how each sample is
    cut, and its caption. Without buckets every sample is a resolution x resolution crop and an epoch is one
    seeded permutation cut into batches (the reference's order). With `buckets`, image i trains at
    buckets[bucket_of[i]]; an epoch shuffles each bucket's images, cuts them into batches (the last of a
    bucket may be short), and shuffles the batches."""

    def __init__(self, examples: list[Example], resolution: int, center_crop: bool, random_flip: bool,
                 seed: int, *, interpolation: str = "bilinear", caption_dropout: float = 0.0,
                 sizes: list[tuple[int, int]] | None = None, buckets: list[tuple[int, int]] | None = None,
                 shuffle_tags: bool = False, keep_tags: int = 0):
        self.examples = examples
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.interpolation = interpolation
        self.caption_dropout = caption_dropout
        self.shuffle_tags = shuffle_tags
        self.keep_tags = keep_tags
        self.sizes = sizes if sizes is not None else [open_rgb(ex).size for ex in examples]
        self.buckets = buckets
        self.bucket_of = [nearest_bucket(sz, buckets) for sz in self.sizes] if buckets else [0] * len(examples)
        used = sorted(set(self.bucket_of))
        # Each used bucket's images, in data set order.
        self.members = {b: [i for i, k in enumerate(self.bucket_of) if k == b] for b in used}
        self._epoch_batches: tuple[int, int, list[list[int]]] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def target(self, i: int) -> Target:
        """Image i's training size: the resolution (square), or its bucket's (width, height)."""
        return self.buckets[self.bucket_of[i]] if self.buckets else self.resolution

    def batches_per_epoch(self, batch_size: int) -> int:
        if self.buckets:
            return sum(-(-len(m) // batch_size) for m in self.members.values())
        return -(-len(self) // batch_size)  # the last batch may be short, as in the reference

    def _bucket_batches(self, epoch: int, batch_size: int) -> list[list[int]]:
        if self._epoch_batches is None or self._epoch_batches[:2] != (epoch, batch_size):
            batches = []
            for b, members in self.members.items():
                order = np.random.default_rng([self.seed, epoch, b, 4]).permutation(len(members))
                ids = [members[k] for k in order]
                batches += [ids[s:s + batch_size] for s in range(0, len(ids), batch_size)]
            order = np.random.default_rng([self.seed, epoch, 5]).permutation(len(batches))
            self._epoch_batches = (epoch, batch_size, [batches[k] for k in order])
        return self._epoch_batches[2]

    def batch_ids(self, epoch: int, batch_index: int, batch_size: int) -> list[int]:
        if self.buckets:
            return list(self._bucket_batches(epoch, batch_size)[batch_index])
        order = epoch_order(self.seed, epoch, len(self))
        return [int(i) for i in order[batch_index * batch_size:(batch_index + 1) * batch_size]]

    def augment(self, epoch: int, i: int) -> Augment:
        rng = np.random.default_rng([self.seed, epoch, i, 1])
        return draw_augment(self.sizes[i], self.target(i), self.center_crop, self.random_flip, rng)

    def caption(self, epoch: int, i: int) -> str:
        """The sample's caption: "" when caption dropout drops it this epoch, its tags shuffled when asked."""
        if self.caption_dropout > 0 and np.random.default_rng([self.seed, epoch, i, 2]).random() < self.caption_dropout:
            return ""
        caption = self.examples[i].caption
        if self.shuffle_tags:
            caption = shuffle_tags(caption, self.keep_tags, np.random.default_rng([self.seed, epoch, i, 3]))
        return caption

    def pixels(self, i: int, aug: Augment) -> np.ndarray:
        return apply_augment(open_rgb(self.examples[i]), self.resolution, aug, self.interpolation)

    def batch(self, epoch: int, batch_index: int, batch_size: int) -> tuple[np.ndarray, list[str]]:
        """The `batch_index`-th batch of `epoch`: (N,3,H,W) float32 pixels and captions."""
        ids = self.batch_ids(epoch, batch_index, batch_size)
        pixels = [self.pixels(i, self.augment(epoch, i)) for i in ids]
        return np.stack(pixels), [self.caption(epoch, i) for i in ids]
