"""MNIST-format folders (Fashion-MNIST as Debian ships it) as --data_path: the right images and labels in
training and in evaluation, gzipped and not, the same arrays as torchvision's reader, and a one-line error
naming a truncated, mismatched, damaged or missing file."""
import argparse
import gzip
import os

import numpy as np
import pytest
import torch
from torchvision.datasets import mnist as tv_mnist

import datasets
import eval_knn
import eval_linear
import utils
from eval_testdata import assert_one_line_error, run_script, write_dino_checkpoint
from mnist_testdata import idx_bytes, make_mnist_folder, write_idx

TRAIN_LABELS = [3, 0, 1, 4, 1, 2, 0]
VAL_LABELS = [2, 0, 1, 0, 3]  # no 4: the class list still comes out the same as train's


@pytest.fixture(params=[True, False], ids=["gzipped", "plain"])
def mnist_folder(request, tmp_path):
    folder = str(tmp_path / "fashion-mnist")
    return folder, make_mnist_folder(folder, TRAIN_LABELS, VAL_LABELS, gz=request.param)


def rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)  # (H, W, 3)


def test_evaluation_reads_train_and_t10k_with_their_labels(mnist_folder):
    folder, written = mnist_folder
    for split in ("train", "val"):
        dataset = datasets.build_eval_dataset(folder, split, None)
        images, labels = written[split]
        assert dataset.targets == labels.tolist()
        assert dataset.classes == ["0", "1", "2", "3", "4"]
        for i in (0, len(labels) - 1):
            image, label = dataset[i]
            assert image.mode == "RGB" and label == labels[i]
            assert np.array_equal(np.asarray(image), rgb(images[i]))


def test_training_reads_the_train_files_with_their_labels(mnist_folder):
    folder, written = mnist_folder
    images, labels = written["train"]
    source = datasets.build_image_source(folder)
    assert len(source) == len(TRAIN_LABELS)
    for i in range(len(source)):
        image, label = source[i]
        assert label == labels[i] and np.array_equal(np.asarray(image), rgb(images[i]))


def test_eval_scripts_build_their_datasets_from_an_mnist_folder(mnist_folder):
    folder, written = mnist_folder
    args = argparse.Namespace(data_path=folder, resize_size=32, crop_size=28, image_size=28, evaluate=False,
                              device=torch.device("cpu"), batch_size_per_gpu=2, num_workers=0, seed=0)
    train, val = eval_knn.build_datasets(args)
    assert train[0][0].shape == (3, 28, 28) and val.targets == list(VAL_LABELS)
    _, val_loader, num_classes = eval_linear.build_loaders(args)
    assert num_classes == 5
    assert torch.cat([labels for _, labels in val_loader]).tolist() == list(VAL_LABELS)


def test_reader_agrees_with_torchvision(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(4, 5, 3), dtype=np.uint8)  # not square
    labels = np.array([9, 0, 7, 255], dtype=np.uint8)
    image_path = write_idx(str(tmp_path / "images"), images, gz=False)
    label_path = write_idx(str(tmp_path / "labels"), labels, gz=False)
    assert np.array_equal(datasets.read_idx(image_path, 3), tv_mnist.read_image_file(image_path).numpy())
    assert np.array_equal(datasets.read_idx(label_path, 1), tv_mnist.read_label_file(label_path).numpy())


def test_a_folder_with_only_the_training_files_trains(tmp_path):
    folder = tmp_path / "mnist"
    make_mnist_folder(str(folder), TRAIN_LABELS, VAL_LABELS, gz=False)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        os.remove(folder / name)
    assert len(datasets.build_image_source(str(folder))) == len(TRAIN_LABELS)
    with pytest.raises(utils.UserError, match="holds MNIST-format files but not t10k-images-idx3-ubyte"):
        datasets.build_eval_dataset(str(folder), "val", None)


def damage(folder, name, how):
    """Damage ``folder/name`` (gzipped when it ends in .gz) in one of several ways; returns its path."""
    path = os.path.join(folder, name)
    with open(path, "rb") as f:
        raw = f.read()
    if how == "cut gzip stream":  # the compressed stream itself ends early
        with open(path, "wb") as f:
            f.write(raw[:len(raw) // 2])
        return path
    data = gzip.decompress(raw) if name.endswith(".gz") else raw
    data = {"truncated": data[:-7], "extra bytes": data + b"\x00",
            "labels as images": idx_bytes(np.zeros(3, np.uint8))}[how]
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if name.endswith(".gz") else data)
    return path


@pytest.mark.parametrize("name, how, fragment", [
    ("train-images-idx3-ubyte", "truncated", "is truncated"),
    ("train-images-idx3-ubyte.gz", "truncated", "is truncated"),
    ("train-labels-idx1-ubyte.gz", "extra bytes", "is longer than its header says"),
    ("train-images-idx3-ubyte.gz", "labels as images", "is not an MNIST-format file of unsigned bytes with 3"),
    ("train-images-idx3-ubyte.gz", "cut gzip stream", "cannot read"),
])
def test_a_damaged_file_is_named(tmp_path, name, how, fragment):
    folder = str(tmp_path / "mnist")
    make_mnist_folder(folder, TRAIN_LABELS, VAL_LABELS, gz=name.endswith(".gz"))
    path = damage(folder, name, how)
    for build in (lambda: datasets.build_image_source(folder), lambda: datasets.build_eval_dataset(folder, "train", None)):
        with pytest.raises(utils.UserError, match=fragment) as error:
            build()
        assert path in str(error.value) and "\n" not in str(error.value)


def test_labels_of_another_split_are_a_mismatch_naming_both_files(tmp_path):
    folder = str(tmp_path / "mnist")
    make_mnist_folder(folder, TRAIN_LABELS, VAL_LABELS, gz=False)
    write_idx(os.path.join(folder, "train-labels-idx1-ubyte"), np.array(VAL_LABELS, np.uint8), gz=False)
    with pytest.raises(utils.UserError, match=r"train-labels-idx1-ubyte holds 5 labels but .*"
                                              r"train-images-idx3-ubyte holds 7 images"):
        datasets.build_eval_dataset(folder, "train", None)


def test_eval_knn_reports_a_truncated_file_in_one_line(tmp_path):
    folder = str(tmp_path / "mnist")
    make_mnist_folder(folder, TRAIN_LABELS, VAL_LABELS, gz=True)
    path = damage(folder, "t10k-images-idx3-ubyte.gz", "truncated")
    checkpoint = write_dino_checkpoint(str(tmp_path / "checkpoint.pth"))
    result = run_script("eval_knn.py", ["--data_path", folder, "--pretrained_weights", checkpoint, "--arch",
                                        "vit_tiny", "--num_workers", "0", "--use_cuda", "false"])
    assert_one_line_error(result, path, "is truncated")
