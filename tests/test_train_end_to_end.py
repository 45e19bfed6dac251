"""patch_wise_dino.py end to end on the CPU: training, checkpoints, resume, compiled blocks, CIFAR-10 batches,
a non-finite loss, torchrun, --max_images (bad settings and hostile input: test_reliability.py).

Tiny settings throughout (vit_tiny/8 at 32 px, out_dim 64, generated images) so the file runs in about a minute.
"""
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

import patch_wise_dino as pwd
import utils
from eval_testdata import REPO, assert_same_training, read_log, run_script, train, write_images
from eval_testdata import TINY_TRAINING as TINY


def test_train_two_epochs_then_resume_for_a_third(tmp_path):
    write_images(tmp_path / "data" / "class_a", 3)
    write_images(tmp_path / "data" / "class_b", 3, seed=1)
    out = str(tmp_path / "out")
    argv = TINY + ["--data_path", str(tmp_path / "data"), "--output_dir", out, "--saveckp_freq", "2"]
    train(argv + ["--epochs", "2", "--num_workers", "1"])
    assert len(read_log(out)) == 2
    train(argv + ["--epochs", "3"])

    log = read_log(out)
    assert [line["epoch"] for line in log] == [0, 1, 2]
    for line in log:
        for key in ("train_loss", "train_lr", "train_wd", "train_loss_cls", "train_loss_patch",
                    "train_teacher_entropy_cls", "train_teacher_entropy_patch", "train_kl_cls", "train_kl_patch"):
            assert math.isfinite(line[key]), key
        assert 0 < line["train_loss"] < 2 * math.log(64)
    files = set(os.listdir(out))
    assert {"args.json", "checkpoint.pth", "checkpoint0000.pth", "checkpoint0002.pth", "log.txt"} <= files
    assert "checkpoint0001.pth" not in files  # --saveckp_freq 2
    ckpt = utils.load_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert {"student", "teacher", "optimizer", "epoch", "args", "dino_loss"} <= set(ckpt)  # DINO's layout
    assert "fp16_scaler" not in ckpt  # float32 on the CPU: no scaler
    assert ckpt["epoch"] == 3 and ckpt["args"].arch == "vit_tiny"
    assert all(k.startswith(("module.backbone.", "module.head.")) for k in ckpt["student"])
    assert all(k.startswith(("backbone.", "head.")) for k in ckpt["teacher"])
    assert {"head.last_layer.weight_g", "head.last_layer.weight_v", "backbone.cls_token"} <= set(ckpt["teacher"])
    assert {f"module.{k}" for k in ckpt["teacher"]} == set(ckpt["student"])
    assert ckpt["dino_loss"]["center"].shape == (1, 1 + 4 * 4, 64)  # one row per teacher token position
    assert ckpt["dino_loss"]["center"].abs().sum() > 0
    model = utils.build_backbone("vit_tiny", 8)  # what the evaluation scripts load
    utils.load_pretrained_weights(model, os.path.join(out, "checkpoint.pth"), "teacher", "vit_tiny", 8)
    torch.testing.assert_close(model.cls_token, ckpt["teacher"]["backbone.cls_token"])


@pytest.mark.parametrize("epochs,extra", [(3, []), (2, ["--patch_augmentation", "true"])])
def test_resume_gives_the_same_teacher_as_an_uninterrupted_run(tmp_path, monkeypatch, epochs, extra):
    write_images(tmp_path / "data", 4)
    argv = TINY + ["--data_path", str(tmp_path / "data"), "--epochs", str(epochs), "--seed", "7"] + extra
    train(argv + ["--output_dir", str(tmp_path / "straight")])

    real_epoch = pwd.train_one_epoch

    def interrupted(state, loader, schedules, epoch, args, *rest, **kwargs):
        if epoch == epochs - 1:
            raise KeyboardInterrupt
        return real_epoch(state, loader, schedules, epoch, args, *rest, **kwargs)

    monkeypatch.setattr(pwd, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(argv + ["--output_dir", str(tmp_path / "resumed")])
    assert utils.load_checkpoint(str(tmp_path / "resumed" / "checkpoint.pth"))["epoch"] == epochs - 1
    monkeypatch.setattr(pwd, "train_one_epoch", real_epoch)
    train(argv + ["--output_dir", str(tmp_path / "resumed")])
    assert_same_training(tmp_path / "straight", tmp_path / "resumed")
    if extra:  # a run with the per-patch augmentation continues only with the same number of ops
        assert json.loads((tmp_path / "resumed" / "args.json").read_text())["patch_augmentation"] is True
        with pytest.raises(utils.UserError, match=r"--patch_augmentation_ops 4 \(this run: 2\)"):
            train(argv + ["--output_dir", str(tmp_path / "resumed"), "--patch_augmentation_ops", "2"])


@pytest.mark.skipif(not pwd.cpp_compiler_available(), reason="torch.compile on the CPU needs a C++ compiler")
def test_compile_gives_the_same_losses_and_checkpoint_layout(tmp_path):
    """--compile true compiles blocks and heads in place: same losses and weights as eager, same state-dict keys."""
    write_images(tmp_path / "data", 4)
    argv = TINY + ["--data_path", str(tmp_path / "data"), "--epochs", "2", "--drop_path_rate", "0"]
    train(argv + ["--output_dir", str(tmp_path / "eager")])
    try:
        state = train(argv + ["--output_dir", str(tmp_path / "compiled"), "--compile", "true"])
        assert all(hasattr(block, "_compiled_call_impl") and block._compiled_call_impl is not None
                   for block in state.teacher.backbone.blocks)
    finally:
        torch._dynamo.reset()
    eager = read_log(tmp_path / "eager")
    compiled = read_log(tmp_path / "compiled")
    for key in ("train_loss", "train_loss_cls", "train_loss_patch"):
        assert [line[key] for line in compiled] == pytest.approx([line[key] for line in eager], rel=1e-4), key
    a = utils.load_checkpoint(str(tmp_path / "eager" / "checkpoint.pth"))
    b = utils.load_checkpoint(str(tmp_path / "compiled" / "checkpoint.pth"))
    for part in ("student", "teacher"):
        assert list(a[part]) == list(b[part])  # no "_orig_mod." keys: evaluation scripts load it as usual
        for key, value in a[part].items():
            torch.testing.assert_close(b[part][key], value, atol=1e-4, rtol=1e-3, msg=f"{part} {key}")
    torch.testing.assert_close(b["dino_loss"]["center"], a["dino_loss"]["center"], atol=1e-4, rtol=1e-3)


def write_fake_cifar(folder, per_batch=3):
    rng = np.random.default_rng(0)
    os.makedirs(folder)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist()}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)


def test_vanilla_dino_on_cifar_python_batches(tmp_path):
    write_fake_cifar(tmp_path / "cifar-10-batches-py")
    out = str(tmp_path / "out")
    train(["--arch", "vit_tiny", "--patch_size", "8", "--global_size", "32", "--local_size", "16", "--resize", "0",
         "--out_dim", "32", "--batch_size_per_gpu", "4", "--local_crops_number", "2", "--num_workers", "0",
         "--epochs", "1", "--patch_loss", "false", "--data_path", str(tmp_path), "--output_dir", out])
    ckpt = utils.load_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert ckpt["dino_loss"]["center"].shape == (1, 1, 32)  # [CLS] only
    (line,) = read_log(out)
    assert math.isfinite(line["train_loss"]) and "train_loss_patch" not in line


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    write_images(tmp_path / "data", 2)
    out = str(tmp_path / "out")
    argv = TINY + ["--data_path", str(tmp_path / "data"), "--output_dir", out]
    train(argv + ["--epochs", "1"])
    good = utils.load_checkpoint(os.path.join(out, "checkpoint.pth"))
    loss_forward = pwd.PatchWiseDINOLoss.forward

    def diverged(self, *args, **kwargs):
        loss, stats = loss_forward(self, *args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(pwd.PatchWiseDINOLoss, "forward", diverged)
    with pytest.raises(utils.UserError, match=f"the loss is nan at epoch 1, iteration 0: training stopped; the last "
                                              f"checkpoint is {out}/checkpoint.pth \\(epoch 1, iteration 0\\).*"
                                              f"copy checkpoint.prev.pth over checkpoint.pth"):
        train(argv + ["--epochs", "2"])
    kept = utils.load_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert kept["epoch"] == 1 and torch.equal(kept["teacher"]["backbone.pos_embed"],
                                              good["teacher"]["backbone.pos_embed"])
    assert len(read_log(out)) == 1


TORCHRUN_SCRIPT = """
import argparse, sys
import torch
sys.path.insert(0, {repo!r})
import patch_wise_dino as pwd, utils

def run(args):
    state = pwd.main(args)
    torch.save({{"teacher": state.teacher.state_dict(), "center": state.dino_loss.center,
                "world_size": utils.get_world_size()}}, f"{{args.output_dir}}/rank{{args.rank}}.pt")

utils.run_cli(run, argparse.ArgumentParser(parents=[pwd.get_args_parser()]).parse_args())
"""


def test_torchrun_two_processes_on_cpu(tmp_path):
    write_images(tmp_path / "data", 8)
    script = tmp_path / "train_and_dump.py"
    script.write_text(TORCHRUN_SCRIPT.format(repo=REPO))
    out = tmp_path / "out"
    proc = run_script(str(script), [*TINY, "--epochs", "2", "--data_path", str(tmp_path / "data"), "--output_dir",
                                    str(out)], nproc=2, timeout=600, threads=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    for key, value in ranks[0]["teacher"].items():
        assert torch.equal(value, ranks[1]["teacher"][key]), key
    assert torch.equal(ranks[0]["center"], ranks[1]["center"]) and ranks[0]["center"].abs().sum() > 0
    assert len(read_log(out)) == 2
    assert "Total batch size 4 (2 processes x 2)" in proc.stdout


def test_max_images_trains_on_a_fixed_subset(tmp_path, capsys):
    """--max_images 4 of 6 images: 2 steps per epoch of batch 2, the same 4 images whatever --seed is."""
    write_images(tmp_path / "data", 6)
    argv = TINY + ["--data_path", str(tmp_path / "data"), "--epochs", "1", "--max_images", "4"]
    train(argv + ["--output_dir", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert "subset of 4 of the 6 images" in out and "2 steps/epoch" in out, out
    first = pwd.subset_indices(6, 4, (pwd.TRAIN_SUBSET_SEED,))
    assert len(first) == 4 and first == sorted(set(first)) and first == pwd.subset_indices(6, 4, (0,))
    assert pwd.subset_indices(6, 0, (0,)) is None and pwd.subset_indices(6, 6, (0,)) is None
    train(argv + ["--output_dir", str(tmp_path / "b"), "--seed", "3", "--max_images", "6"])
    assert "6 images from" in capsys.readouterr().out  # as many as there are: all of them
