"""datasets.py: how data folders and image files are read, the same in training and evaluation. Hidden names
are skipped, linked folders followed once, training takes train/ only and says what it ignored; image modes and
16-bit grayscale are converted to 8-bit RGB, and a file that cannot be decoded is named; CIFAR-10's python
batches and MNIST-format folders (Fashion-MNIST as Debian ships it, gzipped and not) give the right images and
labels, the same arrays as torchvision's reader, and a one-line error naming a truncated, mismatched, damaged or
missing file; pickled ground truth is read without running code."""
import argparse
import gzip
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import mnist as tv_mnist

import datasets
import eval_knn
import eval_linear
import utils
from eval_testdata import (assert_one_line_error, make_image_folder, run_cli_here, run_script, write_awkward_images,
                           write_dino_checkpoint, write_images)
from mnist_testdata import idx_bytes, make_mnist_folder, write_idx


# ----------------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------------
def write_image(path, value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)


def names(paths, root):
    return sorted(os.path.relpath(p, root) for p in paths)


@pytest.fixture
def hidden_layout(tmp_path):
    """train/ and val/ with one class each, plus a macOS AppleDouble file and a notebook checkpoint folder."""
    for split in ("train", "val"):
        write_image(str(tmp_path / split / "a" / "x.jpg"))
        (tmp_path / split / "a" / "._x.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        write_image(str(tmp_path / split / ".ipynb_checkpoints" / "y.jpg"))
        write_image(str(tmp_path / split / "a" / ".ipynb_checkpoints" / "z.jpg"))
    return tmp_path


def test_hidden_files_and_folders_are_not_data(hidden_layout):
    root = hidden_layout
    assert names(datasets.list_images(str(root / "train" / "a"), recursive=True), root) == ["train/a/x.jpg"]
    dataset = datasets.build_eval_dataset(str(root), "train", None)
    assert dataset.classes == ["a"]
    assert names([p for p, _ in dataset.samples], root) == ["train/a/x.jpg"]
    for source in (datasets.build_image_source(str(root)), datasets.build_image_source(str(root / "train"))):
        assert names(source.paths, root) == ["train/a/x.jpg"]
        source[0]  # the AppleDouble file would be "cannot decode image"


def test_linked_folders_are_followed_once_and_cycles_end(tmp_path):
    write_image(str(tmp_path / "elsewhere" / "sub" / "z.jpg"))
    write_image(str(tmp_path / "data" / "a" / "x.jpg"))
    os.symlink(tmp_path / "elsewhere" / "sub", tmp_path / "data" / "linked")
    os.symlink(tmp_path / "data" / "a", tmp_path / "data" / "same_as_a")  # the same real folder twice
    os.symlink(tmp_path / "data", tmp_path / "data" / "a" / "loop")  # a cycle
    paths = datasets.list_images(str(tmp_path / "data"), recursive=True)
    assert names(paths, tmp_path / "data") == ["a/x.jpg", "linked/z.jpg"]


def test_training_uses_only_train_and_says_what_it_ignored(tmp_path, capsys):
    for folder in ("train/a", "val/a", "test"):
        write_image(str(tmp_path / folder / "1.jpg"))
    write_image(str(tmp_path / "loose.jpg"))
    source = datasets.build_image_source(str(tmp_path))
    assert names(source.paths, tmp_path) == ["train/a/1.jpg"]
    out = capsys.readouterr().out
    assert f"Training on {tmp_path / 'train'} only (ignored beside it: test/, val/, 1 images)" in out


def test_a_class_called_train_is_just_a_class(tmp_path):
    """CIFAR-100 or PASCAL VOC exported as class folders have a class named "train"."""
    for folder in ("apple", "bus", "train", "tulip"):
        write_image(str(tmp_path / folder / "1.jpg"))
    assert len(datasets.build_image_source(str(tmp_path)).paths) == 4


def test_training_refuses_held_out_data_beside_other_folders(tmp_path):
    for folder in ("train/a", "val/a", "extra"):  # is extra/ a split or a class? val/ must not be trained on
        write_image(str(tmp_path / folder / "1.jpg"))
    with pytest.raises(utils.UserError, match=r"holds val \(held-out data\) beside other folders"):
        datasets.build_image_source(str(tmp_path))


def test_training_takes_images_beside_sub_folders_too(tmp_path, capsys):
    write_image(str(tmp_path / "top.jpg"))
    write_image(str(tmp_path / "sub" / "deeper" / "s.jpg"))
    assert names(datasets.build_image_source(str(tmp_path)).paths, tmp_path) == ["sub/deeper/s.jpg", "top.jpg"]
    assert "1 images beside 1 sub-folders: training on all of them" in capsys.readouterr().out


def test_training_refuses_a_held_out_split_without_train(tmp_path):
    for folder in ("train.X1/a", "train.X2/b", "val.X/a"):  # Kaggle's ImageNet-100
        write_image(str(tmp_path / folder / "1.jpg"))
    with pytest.raises(utils.UserError, match=r"holds val\.X \(held-out data\) beside other folders: pass"):
        datasets.build_image_source(str(tmp_path))


@pytest.mark.parametrize("script", ["eval_knn", "eval_linear"])
def test_train_and_val_classes_are_named_when_they_differ(tmp_path, script):
    for folder in ("train/red", "train/green", "val/red", "val/blue"):
        write_image(str(tmp_path / folder / "1.jpg"))
    args = argparse.Namespace(data_path=str(tmp_path), resize_size=8, crop_size=8, image_size=8, evaluate=False,
                              device=torch.device("cpu"), batch_size_per_gpu=1, num_workers=0, seed=0)
    build = eval_knn.build_datasets if script == "eval_knn" else eval_linear.build_loaders
    with pytest.raises(utils.UserError, match=r"\(val lacks: green; train lacks: blue\)"):
        build(args)


def test_flat_val_folder_asks_for_class_folders(tmp_path):
    write_image(str(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG"))
    with pytest.raises(utils.UserError, match="holds 1 images but no class sub-folders: it needs one sub-folder "
                                              "per class"):
        datasets.build_eval_dataset(str(tmp_path), "val", None)


def test_an_archive_is_named_as_a_file(tmp_path):
    archive = tmp_path / "imagenet.tar.gz"
    archive.write_bytes(b"\x1f\x8b not extracted")
    for build in (lambda: datasets.build_eval_dataset(str(archive), "train", None),
                  lambda: datasets.build_image_source(str(archive))):
        with pytest.raises(utils.UserError, match="is a file, not a folder: extract the archive"):
            build()


def test_training_sources_by_layout(tmp_path):
    """A flat folder, class folders, train/val splits (train only), the shipped sample photos; a missing or
    empty --data_path is an error naming it."""
    write_images(tmp_path / "flat", 2)
    assert isinstance(datasets.build_image_source(str(tmp_path / "flat")), datasets.ImageList)
    write_images(tmp_path / "classes" / "a", 2)
    write_images(tmp_path / "classes" / "b", 1)
    assert len(datasets.build_image_source(str(tmp_path / "classes"))) == 3
    write_images(tmp_path / "splits" / "train" / "a", 2)
    write_images(tmp_path / "splits" / "val" / "a", 1)
    assert len(datasets.build_image_source(str(tmp_path / "splits"))) == 2  # train only, never val
    image, _ = datasets.build_image_source(datasets.default_data_path())[0]  # the shipped sample photos
    assert image.mode == "RGB"
    os.makedirs(tmp_path / "empty")
    with pytest.raises(utils.UserError, match=f"^--data_path {tmp_path}/missing does not exist$"):
        datasets.build_image_source(str(tmp_path / "missing"))
    with pytest.raises(utils.UserError, match=f"^no images found in --data_path {tmp_path}/empty: expected class "
                                              f"sub-folders of images, images directly inside, CIFAR-10's "
                                              f"cifar-10-batches-py, or MNIST-format files$"):
        datasets.build_image_source(str(tmp_path / "empty"))


def test_missing_split_folder_names_the_layouts_it_needs(tmp_path):
    with pytest.raises(utils.UserError, match=f"^{tmp_path}/train not found: --data_path must hold 'train' with one "
                                              f"sub-folder per class \\(ImageFolder layout\\), CIFAR-10's "
                                              f"cifar-10-batches-py, or MNIST-format files$"):
        datasets.build_eval_dataset(str(tmp_path), "train", None)


def test_an_empty_class_folder_is_kept_as_a_class_but_an_empty_split_is_refused(tmp_path, capsys):
    """Train and val keep the same class list when a class has no images in either (eval_knn checks that)."""
    data = make_image_folder(str(tmp_path / "data"), {"train": (2, 2), "val": (1, 1)})
    for split in ("train", "val"):
        os.makedirs(os.path.join(data, split, "green"))
    train, val = eval_knn.build_datasets(argparse.Namespace(data_path=data, resize_size=32, crop_size=32))
    assert train.classes == val.classes == ["blue", "green", "red"]
    assert train.targets == [0, 0, 2, 2] and val.targets == [0, 2] and train[2][1] == 2
    assert "no images in the class folders green" in capsys.readouterr().out
    os.makedirs(tmp_path / "empty" / "val" / "green")
    os.makedirs(tmp_path / "empty" / "val" / "red")
    with pytest.raises(utils.UserError, match=f"^{tmp_path}/empty/val holds 2 class folders but no images$"):
        datasets.build_eval_dataset(str(tmp_path / "empty"), "val", None)


# ----------------------------------------------------------------------------------------------------
# Image files
# ----------------------------------------------------------------------------------------------------
def test_image_modes_are_converted_to_rgb(tmp_path):
    rgb = write_awkward_images(tmp_path)
    reference = np.asarray(rgb, dtype=np.float64)
    for name, tolerance in (("cmyk.jpg", 8.0), ("palette.png", 20.0)):
        image = datasets.open_image(str(tmp_path / name))
        assert image.mode == "RGB" and np.abs(np.asarray(image) - reference).mean() < tolerance, name
    gray = np.asarray(datasets.open_image(str(tmp_path / "gray.png")))
    assert gray.shape == reference.shape and (gray == gray[..., :1]).all()


RAMP16 = np.arange(64 * 64).reshape(64, 64) * 16  # the whole 16-bit range


@pytest.mark.parametrize("name, dtype, stored, expected", [
    ("dark16.pgm", np.uint16, 200 * 257, 200),  # Pillow mode "I" from a 16-bit PGM
    ("dark16b.pgm", np.uint16, 200, 1),  # dark 16-bit: not left 257 times too bright
    ("dark16.png", np.uint16, 200, 1),  # mode "I;16"
    ("ramp16.png", np.uint16, RAMP16, RAMP16 / 257),  # scaled, not clipped
    ("int32.tif", np.int32, 1000, 255),  # 32-bit: 8-bit levels, clipped as torchvision's loader does
])
def test_16_bit_grayscale_is_scaled_by_bit_depth_not_by_values(tmp_path, name, dtype, stored, expected):
    Image.fromarray(np.broadcast_to(stored, (64, 64)).astype(dtype)).save(tmp_path / name)
    image = datasets.open_image(str(tmp_path / name))
    pixels = np.asarray(image)
    assert image.mode == "RGB" and (pixels == pixels[..., :1]).all()
    np.testing.assert_allclose(pixels[..., 0], np.broadcast_to(expected, (64, 64)), atol=0.5)


def test_an_image_that_cannot_be_decoded_is_named(tmp_path, monkeypatch):
    write_awkward_images(tmp_path)  # truncated.jpg
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    for name in ("truncated.jpg", "garbage.jpg"):
        with pytest.raises(utils.UserError, match=f"^cannot decode image {tmp_path}/{name}: ") as error:
            datasets.open_image(str(tmp_path / name))
        assert "\n" not in str(error.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a decompression bomb: over twice the limit
    with pytest.raises(utils.UserError, match=f"^cannot decode image {tmp_path}/gray.png: .*decompression bomb"):
        datasets.open_image(str(tmp_path / "gray.png"))


def test_evaluation_datasets_name_an_undecodable_image_read_by_a_data_worker(tmp_path, capsys):
    for split in ("train", "val"):
        write_images(tmp_path / split / "class_a", 2)
    (tmp_path / "val" / "class_a" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    dataset = datasets.build_eval_dataset(str(tmp_path), "val", transform=None)
    with pytest.raises(utils.UserError, match=f"cannot decode image {tmp_path}/val/class_a/zz_broken.jpg"):
        [dataset[i] for i in range(len(dataset))]

    def extract(_args):  # what the k-NN and linear scripts do, with a data worker
        loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=lambda items: items)
        list(loader)

    result = run_cli_here(extract, argparse.ArgumentParser(), [], capsys)
    assert_one_line_error(result, f"cannot decode image {tmp_path}/val/class_a/zz_broken.jpg")


# ----------------------------------------------------------------------------------------------------
# CIFAR-10 python batches
# ----------------------------------------------------------------------------------------------------
def test_cifar10_python_folder_is_read_directly(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 3) for i in range(1, 6)] + [("test_batch", 2)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    train = datasets.build_eval_dataset(str(tmp_path), "train", None)
    test = datasets.build_eval_dataset(str(tmp_path), "val", None)
    assert len(train) == 15 and len(test) == 2
    img, label = test[1]
    assert img.size == (32, 32) and label == 1
    # Channel-major rows: pixel (0, 0) takes bytes 0, 1024, 2048 of the row.
    raw = pickle.loads((folder / "test_batch").read_bytes())[b"data"][1]
    assert img.getpixel((0, 0)) == (raw[0], raw[1024], raw[2048])


# ----------------------------------------------------------------------------------------------------
# MNIST-format folders
# ----------------------------------------------------------------------------------------------------
MNIST_TRAIN_LABELS = [3, 0, 1, 4, 1, 2, 0]
MNIST_VAL_LABELS = [2, 0, 1, 0, 3]  # no 4: the class list still comes out the same as train's


@pytest.fixture(params=[True, False], ids=["gzipped", "plain"])
def mnist_folder(request, tmp_path):
    folder = str(tmp_path / "fashion-mnist")
    return folder, make_mnist_folder(folder, MNIST_TRAIN_LABELS, MNIST_VAL_LABELS, gz=request.param)


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
    assert len(source) == len(MNIST_TRAIN_LABELS)
    for i in range(len(source)):
        image, label = source[i]
        assert label == labels[i] and np.array_equal(np.asarray(image), rgb(images[i]))


def test_eval_scripts_build_their_datasets_from_an_mnist_folder(mnist_folder):
    folder, written = mnist_folder
    args = argparse.Namespace(data_path=folder, resize_size=32, crop_size=28, image_size=28, evaluate=False,
                              device=torch.device("cpu"), batch_size_per_gpu=2, num_workers=0, seed=0)
    train, val = eval_knn.build_datasets(args)
    assert train[0][0].shape == (3, 28, 28) and val.targets == list(MNIST_VAL_LABELS)
    _, val_loader, num_classes = eval_linear.build_loaders(args)
    assert num_classes == 5
    assert torch.cat([labels for _, labels in val_loader]).tolist() == list(MNIST_VAL_LABELS)


def test_reader_agrees_with_torchvision(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(4, 5, 3), dtype=np.uint8)  # not square
    labels = np.array([9, 0, 7, 255], dtype=np.uint8)
    image_path = write_idx(str(tmp_path / "images"), images, gz=False)
    label_path = write_idx(str(tmp_path / "labels"), labels, gz=False)
    assert np.array_equal(datasets.read_idx(image_path, 3), tv_mnist.read_image_file(image_path).numpy())
    assert np.array_equal(datasets.read_idx(label_path, 1), tv_mnist.read_label_file(label_path).numpy())


def test_a_folder_with_only_the_training_files_trains(tmp_path):
    folder = tmp_path / "mnist"
    make_mnist_folder(str(folder), MNIST_TRAIN_LABELS, MNIST_VAL_LABELS, gz=False)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        os.remove(folder / name)
    assert len(datasets.build_image_source(str(folder))) == len(MNIST_TRAIN_LABELS)
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
    make_mnist_folder(folder, MNIST_TRAIN_LABELS, MNIST_VAL_LABELS, gz=name.endswith(".gz"))
    path = damage(folder, name, how)
    for build in (lambda: datasets.build_image_source(folder), lambda: datasets.build_eval_dataset(folder, "train", None)):
        with pytest.raises(utils.UserError, match=fragment) as error:
            build()
        assert path in str(error.value) and "\n" not in str(error.value)


def test_labels_of_another_split_are_a_mismatch_naming_both_files(tmp_path):
    folder = str(tmp_path / "mnist")
    make_mnist_folder(folder, MNIST_TRAIN_LABELS, MNIST_VAL_LABELS, gz=False)
    write_idx(os.path.join(folder, "train-labels-idx1-ubyte"), np.array(MNIST_VAL_LABELS, np.uint8), gz=False)
    with pytest.raises(utils.UserError, match=r"train-labels-idx1-ubyte holds 5 labels but .*"
                                              r"train-images-idx3-ubyte holds 7 images"):
        datasets.build_eval_dataset(folder, "train", None)


def test_eval_knn_reports_a_truncated_file_in_one_line(tmp_path):
    folder = str(tmp_path / "mnist")
    make_mnist_folder(folder, MNIST_TRAIN_LABELS, MNIST_VAL_LABELS, gz=True)
    path = damage(folder, "t10k-images-idx3-ubyte.gz", "truncated")
    checkpoint = write_dino_checkpoint(str(tmp_path / "checkpoint.pth"))
    result = run_script("eval_knn.py", ["--data_path", folder, "--pretrained_weights", checkpoint, "--arch",
                                        "vit_tiny", "--num_workers", "0", "--use_cuda", "false"])
    assert_one_line_error(result, path, "is truncated")


# ----------------------------------------------------------------------------------------------------
# Pickles
# ----------------------------------------------------------------------------------------------------
def test_pickle_that_runs_code_is_refused_and_plain_data_loads(tmp_path, runs_code):
    marker = tmp_path / "pwned"
    evil = tmp_path / "gnd_evil.pkl"
    evil.write_bytes(pickle.dumps({"imlist": ["a"], "x": runs_code(marker)}))
    with pytest.raises(utils.UserError, match=f"^refused to load {evil}: global '\\w+.system' is forbidden "
                                              r"\(only plain data and numpy arrays are allowed\)$"):
        datasets.safe_pickle_load(str(evil))
    assert not marker.exists()
    good = tmp_path / "gnd_good.pkl"
    data = {"imlist": ["a", "b"], "gnd": [{"bbx": [1.0, 2.0, 3.0, 4.0], "easy": np.array([0, 1]),
                                           "hard": np.array([], dtype=np.int64), "junk": {2}}]}
    good.write_bytes(pickle.dumps(data, protocol=2))
    loaded = datasets.safe_pickle_load(str(good))
    assert loaded["imlist"] == ["a", "b"]
    np.testing.assert_array_equal(loaded["gnd"][0]["easy"], [0, 1])
