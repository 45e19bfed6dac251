"""Tiny MNIST-format folders written by the tests: IDX files built byte by byte from the format's definition."""
import gzip
import os
import struct

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: 0x00 0x00, type 0x08, the number of dimensions, big-endian uint32 sizes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path: str, array: np.ndarray, gz: bool) -> str:
    """Write ``array`` to ``path`` (``path.gz``, gzipped, with ``gz``); returns the path written."""
    path = path + ".gz" if gz else path
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(idx_bytes(array))
    return path


def graded_digits(labels, size: int = 28, seed: int = 0) -> np.ndarray:
    """(N, size, size) uint8 images whose mean brightness grows with the label, plus strong noise and a bright
    square at a random place: neighbouring classes overlap, so a k-NN is neither perfect nor at chance."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    images = 70 + 15 * labels[:, None, None] + rng.integers(-60, 61, size=(len(labels), size, size))
    for image in images:
        y, x = rng.integers(0, size - 8, 2)
        image[y:y + 8, x:x + 8] += 80
    return np.clip(images, 0, 255).astype(np.uint8)


def make_mnist_folder(folder: str, train_labels, val_labels, gz: bool = True, size: int = 28,
                      seed: int = 0) -> dict:
    """``folder/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` with ``graded_digits`` images; returns
    ``{"train": (images, labels), "val": (images, labels)}`` as written."""
    os.makedirs(folder, exist_ok=True)
    written = {}
    for split, prefix, labels in (("train", "train", train_labels), ("val", "t10k", val_labels)):
        labels = np.asarray(labels, dtype=np.uint8)
        images = graded_digits(labels, size, seed + (split == "val"))
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), images, gz)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), labels, gz)
        written[split] = (images, labels)
    return written
