"""Synthetic CIFAR-10 and TinyImageNet written in their original on-disk formats.

The real files cannot be fetched on the machines that test this project, so the loaders
(``poisonreach.data.cifar`` and ``.tinyimagenet``) are exercised on files written here: the same
layout, file formats and naming, any number of images, seeded. The images carry class structure
(each class has its own blocky colour pattern, plus Gaussian pixel noise), so a model trained on them
learns something; they say nothing about the real data sets.

Used by the tests and by ``bench/run_resnet_profiles.py``, and by anyone who wants to try a
pipeline on these formats before the real files are at hand.

    write_cifar(root / "cifar10" / "cifar-10-batches-py", per_batch=10_000)        # full size
    write_tinyimagenet(root / "tinyimagenet" / "tiny-imagenet-200", wnids=200, train_per_class=500,
                       val_per_class=50)                                              # full size
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PATTERN_CELLS = 4  # a class pattern is a 4x4 grid of colours, scaled up to the image size


def class_patterns(num_classes: int, size: int, seed: int) -> np.ndarray:
    """One float (3, size, size) pattern per class in [0, 255]: a random 4x4 grid of colours, each
    cell a block of size/4 pixels. Depends only on (num_classes, size, seed), so the training and
    test files of one seed share their classes."""
    if size % PATTERN_CELLS:
        raise ValueError(f"image size {size} is not a multiple of {PATTERN_CELLS}")
    cells = np.random.default_rng([seed, num_classes]).uniform(0, 255, (num_classes, 3, PATTERN_CELLS, PATTERN_CELLS))
    block = size // PATTERN_CELLS
    return cells.repeat(block, axis=2).repeat(block, axis=3)


def class_images(labels: np.ndarray, patterns: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """uint8 images (N, 3, H, W): each label's pattern plus Gaussian noise of std ``noise`` (in
    pixel levels), rounded and clipped to 0..255."""
    images = patterns[labels] + rng.normal(0.0, noise, (len(labels), *patterns.shape[1:])) if noise else patterns[labels]
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def write_cifar(folder: Path, per_batch: int = 10, *, test_size: int | None = None, seed: int = 1,
                noise: float = 48.0) -> dict[str, dict]:
    """Write cifar-10-batches-py: data_batch_1..5 with ``per_batch`` images each, test_batch with
    ``test_size`` (default ``per_batch``) and batches.meta, as the original Python pickles (protocol
    2, bytes keys; b"data" uint8 (N, 3072), rows the red, green, blue 32x32 planes; b"labels" a list
    of ints 0-9). Returns the batches by file name. The original has 10,000 images per file."""
    rng = np.random.default_rng(seed)
    patterns = class_patterns(len(CIFAR_CLASSES), 32, seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for index, name in enumerate((*CIFAR_BATCHES, CIFAR_TEST)):
        n = per_batch if name != CIFAR_TEST or test_size is None else test_size
        labels = rng.integers(0, len(CIFAR_CLASSES), n)
        label_text = f"training batch {index + 1} of 5" if name != CIFAR_TEST else "testing batch 1 of 1"
        batch = {b"batch_label": label_text.encode(),
                 b"labels": [int(v) for v in labels],
                 b"data": class_images(labels, patterns, rng, noise).reshape(n, 3072),
                 b"filenames": [f"synthetic_{index}_{i}.png".encode() for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches[name] = batch
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return batches


def write_tinyimagenet(top: Path, *, wnids: int | Sequence[str] = 200, train_per_class: int = 500,
                       val_per_class: int = 50, seed: int = 0, noise: float = 48.0,
                       colours: Sequence[tuple[int, int, int]] | None = None) -> list[str]:
    """Write the tiny-imagenet-200 tree the loader reads, in the original layout and naming:

        wnids.txt, words.txt
        train/<wnid>/images/<wnid>_<i>.JPEG, train/<wnid>/<wnid>_boxes.txt
        val/images/val_<i>.JPEG, val/val_annotations.txt (file, wnid, box; tab-separated)

    64x64 RGB JPEGs; ``wnids`` is a count (names n00000000, n00000001, ...) or the names themselves,
    written to wnids.txt in the order given. ``colours`` (one RGB per wnid) makes every image of a
    class that solid colour instead of a noisy class pattern. The unlabelled test/ folder is not
    written (the loader does not read it). Full size is 200 classes, 500 + 50 images each.
    Returns the wnids."""
    names = [f"n{i:08d}" for i in range(wnids)] if isinstance(wnids, int) else list(wnids)
    rng = np.random.default_rng(seed)
    if colours is None:
        patterns = class_patterns(len(names), 64, seed)
    else:
        patterns = np.broadcast_to(np.asarray(colours, dtype=float)[:, :, None, None], (len(names), 3, 64, 64))
        noise = 0.0
    (top / "val" / "images").mkdir(parents=True, exist_ok=True)
    (top / "wnids.txt").write_text("".join(f"{w}\n" for w in names))
    (top / "words.txt").write_text("".join(f"{w}\tsynthetic class {i}\n" for i, w in enumerate(names)))
    annotations = []
    for index, wnid in enumerate(names):
        folder = top / "train" / wnid
        (folder / "images").mkdir(parents=True, exist_ok=True)
        train = class_images(np.full(train_per_class, index), patterns, rng, noise)
        for i, image in enumerate(train):
            _save_jpeg(image, folder / "images" / f"{wnid}_{i}.JPEG")
        (folder / f"{wnid}_boxes.txt").write_text("".join(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(train_per_class)))
        for image in class_images(np.full(val_per_class, index), patterns, rng, noise):
            name = f"val_{len(annotations)}.JPEG"
            _save_jpeg(image, top / "val" / "images" / name)
            annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63\n")
    (top / "val" / "val_annotations.txt").write_text("".join(annotations))
    return names


def _save_jpeg(image: np.ndarray, path: Path) -> None:
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), "RGB").save(path, "JPEG")
