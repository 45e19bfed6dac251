"""The k-NN monitor of patch_wise_dino.py (--knn_data_path): its numbers equal eval_knn.py on the saved teacher,
two torchrun processes give those of one, it runs when due, training is the same with or without it, and
plot_logs.py draws every curve of the log it leaves.

Training and monitor data are a tiny MNIST-format folder (tests/mnist_testdata.py); vit_tiny/8 at 32 px."""
import argparse
import contextlib
import io
import os

import numpy as np
import pytest
import torch

import datasets
import patch_wise_dino as pwd
import plot_logs
import utils
from eval_testdata import assert_one_line_error, last_json, read_log, run_cli_here, run_script
from eval_testdata import train as train_in_process
from mnist_testdata import make_mnist_folder

TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_size", "32", "--local_size", "16", "--resize", "48",
        "--out_dim", "64", "--batch_size_per_gpu", "4", "--local_crops_number", "0", "--num_workers", "0",
        "--use_fp16", "false", "--warmup_epochs", "1", "--print_freq", "100", "--lr", "0.005"]
TRAIN_LABELS = [0, 1, 2, 3] * 3 + [1, 2, 3]  # 15 images
VAL_LABELS = [3, 2, 1, 0, 0, 1, 2, 3, 2]  # 9: odd, so two processes get padded shares


def train(argv, capture=False):
    """``patch_wise_dino.main`` in this process; returns its printed output when ``capture``."""
    with contextlib.redirect_stdout(io.StringIO()) if capture else contextlib.nullcontext() as out:
        train_in_process(argv)
    return out.getvalue() if capture else ""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("monitor") / "mnist")
    make_mnist_folder(folder, TRAIN_LABELS, VAL_LABELS, gz=True)
    return folder


@pytest.fixture(scope="module")
def monitored(data, tmp_path_factory):
    """Two epochs with the monitor every third epoch, so after the last only; returns (output dir, console)."""
    out = str(tmp_path_factory.mktemp("monitored"))
    console = train(TINY + ["--data_path", data, "--output_dir", out, "--epochs", "2", "--knn_data_path", data,
                            "--knn_freq", "3"], capture=True)
    return out, console


def test_monitor_runs_when_due_and_logs_its_accuracy_and_time(monitored):
    out, console = monitored
    log = read_log(out)
    assert [line["epoch"] for line in log] == [0, 1]
    assert "knn_top1" not in log[0]
    assert 0 <= log[1]["knn_top1"] <= log[1]["knn_top5"] <= 100 and log[1]["knn_seconds"] > 0
    assert f"k-NN monitor after epoch 1: top-1 {log[1]['knn_top1']:.2f}" in console
    assert "k-NN monitor: 15 of 15 train and 9 of 9 val images" in console
    assert "eval_knn.py --resize_size 37 --crop_size 32" in console


def test_monitor_equals_eval_knn_on_the_saved_teacher(data, monitored):
    out, _ = monitored
    last = read_log(out)[-1]
    result = last_json(run_script("eval_knn.py", [
        "--data_path", data, "--pretrained_weights", os.path.join(out, "checkpoint.pth"), "--checkpoint_key",
        "teacher", "--arch", "vit_tiny", "--patch_size", "8", "--resize_size", "37", "--crop_size", "32",
        "--nb_knn", "20", "--batch_size_per_gpu", "4", "--num_workers", "0", "--use_cuda", "false"]))
    assert (result["knn"]["20"]["top1"], result["knn"]["20"]["top5"]) == (last["knn_top1"], last["knn_top5"])
    assert 100 / 4 < last["knn_top1"] < 100  # neither chance nor perfect: a misaligned label would show


def test_plot_logs_draws_every_curve_of_a_real_run(monitored, tmp_path):
    """The keys plot_logs.py looks for are those the training writes."""
    out, _ = monitored
    args = argparse.ArgumentParser(parents=[plot_logs.get_args_parser()]).parse_args(
        [out, "--output", str(tmp_path / "curves.png")])
    figure = plot_logs.main(args)
    assert len(figure.axes) == len(plot_logs.PANELS) and os.path.getsize(tmp_path / "curves.png") > 10000
    for ax, (_, parts) in zip(figure.axes, plot_logs.PANELS):
        curves = [line for line in ax.get_lines() if not line.get_label().startswith("ln K")]
        assert len(curves) == len(parts), ax.get_title()


def test_training_is_the_same_without_the_monitor(data, monitored, tmp_path):
    out, _ = monitored
    plain = str(tmp_path / "plain")
    train(TINY + ["--data_path", data, "--output_dir", plain, "--epochs", "2"])
    for with_monitor, without in zip(read_log(out), read_log(plain)):
        assert {k: v for k, v in with_monitor.items() if not k.startswith(("knn_", "train_img_s"))} == \
            {k: v for k, v in without.items() if k != "train_img_s"}
    ours, theirs = (utils.load_checkpoint(os.path.join(d, "checkpoint.pth")) for d in (out, plain))
    for part in ("student", "teacher"):
        for key, value in ours[part].items():
            assert torch.equal(value, theirs[part][key]), (part, key)


def test_two_processes_give_the_numbers_of_one(data, tmp_path):
    """The teacher stays at its initial weights (--momentum_teacher 1), the same in both runs; 11 of the 15
    train images and the 9 val images split unevenly over two processes."""
    flags = TINY + ["--data_path", data, "--epochs", "1", "--momentum_teacher", "1", "--knn_data_path", data,
                    "--knn_max_images", "11"]
    single, double = str(tmp_path / "one"), str(tmp_path / "two")
    console = train(flags + ["--output_dir", single], capture=True)
    assert "k-NN monitor: 11 of 15 train and 9 of 9 val images" in console
    result = run_script("patch_wise_dino.py", flags + ["--output_dir", double, "--batch_size_per_gpu", "2"],
                        nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = read_log(single)[-1], read_log(double)[-1]
    assert (one["knn_top1"], one["knn_top5"]) == (two["knn_top1"], two["knn_top5"])
    assert "Total batch size 4 (2 processes x 2)" in result.stdout


def test_monitor_runs_every_freq_epochs_and_after_the_last(data):
    monitor = pwd.KNNMonitor(data, 32, freq=3, epochs=7)
    assert [epoch for epoch in range(7) if monitor.due(epoch)] == [2, 5, 6]
    assert monitor.num_classes == 4 and [len(dataset) for dataset, _ in monitor.splits] == [15, 9]


def test_subset_is_fixed_and_keeps_labels_with_their_images(data):
    dataset = datasets.build_eval_dataset(data, "train", None)
    subset, labels = pwd.seeded_subset(dataset, 6, (0, 0))
    again, _ = pwd.seeded_subset(dataset, 6, (0, 0))
    assert len(subset) == 6 and subset.indices == again.indices
    assert labels.tolist() == [subset[i][1] for i in range(6)]
    assert [np.asarray(subset[i][0]).sum() for i in range(6)] == \
        [np.asarray(dataset[j][0]).sum() for j in subset.indices]
    whole, all_labels = pwd.seeded_subset(dataset, 0, (0, 0))
    assert whole is dataset and all_labels.tolist() == TRAIN_LABELS


@pytest.mark.parametrize("flags, message", [
    (["--knn_freq", "0"], "argument --knn_freq: must be at least 1"),
    (["--knn_max_images", "-1"], "argument --knn_max_images: must be >= 0"),
])
def test_bad_monitor_flags_are_one_line_argument_errors(flags, message, capsys):
    result = run_cli_here(pwd.main, utils.ArgumentParser(parents=[pwd.get_args_parser()]), TINY + flags, capsys)
    assert result.stderr.startswith(f"error: {message}")
    assert_one_line_error(result, message)


def test_missing_monitor_data_stops_before_training(data, tmp_path):
    with pytest.raises(utils.UserError, match="--knn_data_path /nonexistent/knn does not exist"):
        train(TINY + ["--data_path", data, "--output_dir", str(tmp_path), "--epochs", "1", "--knn_data_path",
                      "/nonexistent/knn"])
    assert not os.path.exists(tmp_path / "log.txt")
