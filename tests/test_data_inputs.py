"""How data folders and image files are read, the same in training and evaluation: hidden names skipped,
linked folders followed once, which folders training uses, one-line errors naming what to fix, and 16-bit
grayscale scaled by bit depth."""
import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import eval_knn
import eval_linear
import utils


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


def test_empty_class_folder_is_kept_but_an_empty_split_is_refused(tmp_path, capsys):
    write_image(str(tmp_path / "train" / "red" / "1.jpg"))
    os.makedirs(tmp_path / "train" / "green")
    dataset = datasets.build_eval_dataset(str(tmp_path), "train", None)
    assert dataset.classes == ["green", "red"] and dataset.targets == [1] and dataset[0][1] == 1
    assert "no images in the class folders green" in capsys.readouterr().out
    os.makedirs(tmp_path / "val" / "green")
    os.makedirs(tmp_path / "val" / "red")
    with pytest.raises(utils.UserError, match="holds 2 class folders but no images"):
        datasets.build_eval_dataset(str(tmp_path), "val", None)


def test_an_archive_is_named_as_a_file(tmp_path):
    archive = tmp_path / "imagenet.tar.gz"
    archive.write_bytes(b"\x1f\x8b not extracted")
    for build in (lambda: datasets.build_eval_dataset(str(archive), "train", None),
                  lambda: datasets.build_image_source(str(archive))):
        with pytest.raises(utils.UserError, match="is a file, not a folder: extract the archive"):
            build()


@pytest.mark.parametrize("name, dtype, stored, expected", [
    ("dark16.pgm", np.uint16, 200 * 257, 200),  # Pillow mode "I" from a 16-bit PGM
    ("dark16b.pgm", np.uint16, 200, 1),  # dark 16-bit: not left 257 times too bright
    ("dark16.png", np.uint16, 200, 1),  # mode "I;16"
    ("int32.tif", np.int32, 1000, 255),  # 32-bit: 8-bit levels, clipped as torchvision's loader does
])
def test_16_bit_grayscale_is_scaled_by_bit_depth_not_by_values(tmp_path, name, dtype, stored, expected):
    Image.fromarray(np.full((4, 4), stored, dtype)).save(tmp_path / name)
    image = datasets.open_image(str(tmp_path / name))
    assert image.mode == "RGB" and np.asarray(image).min() == np.asarray(image).max() == expected
