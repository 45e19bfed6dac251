"""Long jobs and hostile input for patch_wise_dino.py (CPU): SIGTERM mid-epoch and exact resume, elastic
restart after SIGKILL under torchrun, corrupt and unsafe checkpoints, bad images, one-line errors.

Tiny settings (vit_tiny, patch 8, 32/16 px crops, 6 generated images, batch 2: 3 iterations per epoch).
"""
import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import patch_matching
import patch_wise_dino as pwd
import run_control
import utils
from eval_testdata import (REPO, TINY_TRAINING, assert_one_line_error, assert_same_training, clean_env, read_log,
                           fake_gpus, run_cli_here, run_script, torchrun, train, write_awkward_images,
                           write_images)

TINY = [*TINY_TRAINING, "--seed", "3"]
# One CPU thread here as in the subprocesses (OMP_NUM_THREADS=1): results are bit-identical only for the same
# thread count (and fast on a loaded machine).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 2-epoch run: (its argv without --output_dir, its output folder)."""
    root = tmp_path_factory.mktemp("straight")
    write_images(root / "data", 6)
    argv = TINY + ["--data_path", str(root / "data"), "--epochs", "2"]
    assert torch.get_num_threads() == 1  # as in the runs it is compared with
    train(argv + ["--output_dir", str(root / "out")])
    return argv, root / "out"


SIGNAL_SCRIPT = """
import argparse, os, signal, sys
sys.path.insert(0, {repo!r})
import patch_wise_dino as pwd, utils

real_step, calls = pwd.train_step, []

def step(*args, **kwargs):  # a scheduler's SIGTERM to the whole job (trainer and data workers) during a step
    calls.append(1)
    if len(calls) == {at_step}:
        os.killpg(os.getpgid(0), signal.SIGTERM)
    return real_step(*args, **kwargs)

pwd.train_step = step
utils.run_cli(pwd.main, argparse.ArgumentParser(parents=[pwd.get_args_parser()]).parse_args())
"""


def test_sigterm_mid_epoch_checkpoints_exits_0_and_resumes_exactly(tmp_path, straight, monkeypatch):
    argv, straight_out = straight
    out = tmp_path / "out"
    script = tmp_path / "train_then_sigterm.py"
    script.write_text(SIGNAL_SCRIPT.format(repo=REPO, at_step=2))
    proc = subprocess.run([sys.executable, str(script), *argv, "--num_workers", "1", "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=300, env=clean_env(threads=1),
                          start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"Stopped by SIGTERM after epoch 0, iteration 2 of 3: checkpoint saved to {out}/checkpoint.pth " \
           f"(epoch 0, iteration 2)" in proc.stdout
    ckpt = utils.load_checkpoint(str(out / "checkpoint.pth"))
    assert (ckpt["epoch"], ckpt["iteration"], ckpt["samples_done"], ckpt["world_size"]) == (0, 2, 4, 1)
    assert len(ckpt["rng"]) == 1 and not (out / "log.txt").exists()

    decoded = []
    real_getitem = pwd.MultiCropDataset.__getitem__
    monkeypatch.setattr(pwd.MultiCropDataset, "__getitem__", lambda self, i: decoded.append(i) or real_getitem(self, i))
    train(argv + ["--output_dir", str(out)])  # without data workers: the crops do not depend on them
    assert len(decoded) == 2 + 6  # the rest of epoch 0, then epoch 1: the 4 images already done are not decoded
    assert_same_training(straight_out, out)


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, straight, capsys):
    argv, straight_out = straight
    out = tmp_path / "out"
    shutil.copytree(straight_out, out)
    assert utils.load_checkpoint(str(out / "checkpoint.prev.pth"))["epoch"] == 1  # kept when epoch 1 ended
    data = (out / "checkpoint.pth").read_bytes()
    (out / "checkpoint.pth").write_bytes(data[:len(data) // 2])  # truncated
    train(argv + ["--output_dir", str(out)])
    err = capsys.readouterr().err
    assert f"WARNING: {out}/checkpoint.pth is not a readable checkpoint (truncated, corrupt" in err
    assert f"resuming from the previous checkpoint {out}/checkpoint.prev.pth" in err
    assert (out / "checkpoint.pth.corrupt").read_bytes() == data[:len(data) // 2]
    assert_same_training(straight_out, out)  # epoch 1 redone from its start: same weights, same log lines

    (out / "checkpoint.prev.pth").write_bytes(data[:1000])
    (out / "checkpoint.pth").write_bytes(data[:100])
    with pytest.raises(utils.UserError, match=f"cannot continue the run in {out}: .*checkpoint.pth is not a readable "
                                              f"checkpoint.*checkpoint.prev.pth is not a readable checkpoint.*; to "
                                              f"start a new run, move these files out of {out}"):
        train(argv + ["--output_dir", str(out)])
    assert len(read_log(out)) == 2  # nothing trained


def test_checkpoint_that_would_run_code_is_refused(tmp_path, runs_code):
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"student": {}, "teacher": {}, "optimizer": runs_code(tmp_path / "pwned"), "epoch": 1},
               out / "checkpoint.pth")
    write_images(tmp_path / "data", 2)
    with pytest.raises(utils.UserError, match="refused to load .*checkpoint.pth: it contains objects other than"):
        train(TINY + ["--data_path", str(tmp_path / "data"), "--output_dir", str(out)])
    assert not (tmp_path / "pwned").exists()


def test_an_intact_but_refused_checkpoint_stops_the_run_instead_of_falling_back(tmp_path, straight):
    """Falling back to checkpoint.prev.pth would silently lose an epoch and call an intact file corrupt."""
    argv, straight_out = straight
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(straight_out / "checkpoint.pth", out / "checkpoint.prev.pth")
    checkpoint = utils.load_checkpoint(str(straight_out / "checkpoint.pth"))
    checkpoint["args"].output_dir = pathlib.PurePosixPath(out)  # an object weights_only loading refuses
    torch.save(checkpoint, out / "checkpoint.pth")
    with pytest.raises(utils.CheckpointRefused, match="refused to load .*checkpoint.pth: it contains pathlib"):
        train(argv + ["--output_dir", str(out), "--epochs", "3"])
    assert sorted(os.listdir(out)) == ["checkpoint.prev.pth", "checkpoint.pth"]


def test_resuming_another_model_is_refused_naming_the_difference(tmp_path, straight):
    argv, straight_out = straight
    out = tmp_path / "out"
    shutil.copytree(straight_out, out)
    with pytest.raises(utils.UserError) as error:
        train(argv + ["--output_dir", str(out), "--arch", "vit_small", "--out_dim", "128", "--epochs", "3"])
    assert str(error.value) == (f"{out}/checkpoint.pth was trained with --arch vit_tiny (this run: vit_small), "
                                f"--out_dim 64 (this run: 128): pass the same settings to continue that run, or "
                                f"another --output_dir for a new one")
    assert json.loads((out / "args.json").read_text())["arch"] == "vit_tiny"  # the run's record is untouched


def test_resuming_without_the_same_patch_augmentation_is_refused(tmp_path, straight):
    argv, straight_out = straight
    out = tmp_path / "out"
    shutil.copytree(straight_out, out)
    with pytest.raises(utils.UserError) as error:
        train(argv + ["--output_dir", str(out), "--patch_augmentation", "true", "--epochs", "3"])
    assert str(error.value) == (f"{out}/checkpoint.pth was trained with --patch_augmentation False (this run: True): "
                                f"pass the same settings to continue that run, or another --output_dir for a new one")
    assert json.loads((out / "args.json").read_text())["patch_augmentation"] is False


def child_pids(pid):
    """Processes whose parent is ``pid`` (from /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return children


def rank_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        variables = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    return int(variables.get(b"RANK", -1))


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_elastic_restart_after_a_worker_is_killed(tmp_path):
    write_images(tmp_path / "data", 8)
    out = tmp_path / "out"
    proc = subprocess.Popen(torchrun(2, "--max-restarts=1") + [
                                os.path.join(REPO, "patch_wise_dino.py"), *TINY, "--epochs", "3", "--saveckp_iters",
                                "1", "--data_path", str(tmp_path / "data"), "--output_dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**clean_env(threads=1), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    try:
        deadline = time.time() + 240
        while not (out / "checkpoint.pth").exists():  # written after the first iteration
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.02)
        (victim,) = [pid for pid in child_pids(proc.pid) if rank_of(pid) == 0]  # the one writing checkpoints
        os.kill(victim, signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "torchrun restart 1: continuing from the last checkpoint" in output
    assert "Resuming from " in output and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in output
    assert [line["epoch"] for line in read_log(out)] == [0, 1, 2]
    assert utils.load_checkpoint(str(out / "checkpoint.pth"))["epoch"] == 3


def test_bad_image_stops_training_by_default_and_is_skipped_on_request(tmp_path, capfd):
    write_awkward_images(tmp_path / "data")
    argv = TINY + ["--data_path", str(tmp_path / "data"), "--epochs", "1", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(utils.UserError, match=f"cannot decode image {tmp_path}/data/truncated.jpg: "):
        train(argv)
    train(argv + ["--skip_bad_images", "true"])
    (line,) = read_log(tmp_path / "out")
    assert line["bad_images"] == 1 and np.isfinite(line["train_loss"])
    captured = capfd.readouterr()
    assert "bad_images: 1" in captured.out
    assert f"warning: skipped by --skip_bad_images: cannot decode image {tmp_path}/data/truncated.jpg" in captured.err


def test_collate_drops_bad_items_and_an_empty_batch_is_none():
    item = ([torch.zeros(3, 4, 4)] * 3, patch_matching.cls_only_matches(3))
    batch, skipped = pwd.collate_dropping_bad([item, None, item])
    assert skipped == 1 and batch.crops[0].shape == (2, 3, 4, 4) and batch.mask.shape[1] == 2
    assert pwd.collate_dropping_bad([None, None]) == (None, 2)


def test_resumable_sampler_continues_the_distributed_order():
    dataset = list(range(11))
    for world in (1, 3):
        for rank in range(world):
            reference = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, seed=5)
            sampler = run_control.ResumableSampler(dataset, num_replicas=world, rank=rank, seed=5)
            reference.set_epoch(2)
            sampler.set_epoch(2)
            order = list(reference)
            assert [i for i, _ in sampler] == order and len(sampler) == len(order)
            sampler.set_start(2 * world)  # two samples per process done
            assert [i for i, _ in sampler] == order[2:] and len(sampler) == len(order) - 2
    seeds = dict(run_control.ResumableSampler(dataset, 1, 0, seed=5))
    assert len(set(seeds.values())) == 11 and seeds[4] == run_control.item_seed(5, 0, 4)


def bad_input(name, extra, needle, visible_gpus=None):
    return pytest.param(extra, needle, visible_gpus, id=name)


@pytest.mark.parametrize("extra, needle, visible_gpus", [  # {tmp}: the test's folder, with data/, empty/, a_file
    bad_input("missing_data", ["--data_path", "{tmp}/missing"], "--data_path {tmp}/missing does not exist"),
    bad_input("empty_data", ["--data_path", "{tmp}/empty"], "no images found in --data_path {tmp}/empty"),
    bad_input("unwritable_output", ["--output_dir", "{tmp}/a_file/out"],
              "--output_dir {tmp}/a_file/out is not a writable folder"),
    bad_input("global_crop_not_multiple", ["--global_size", "36"],
              "--global_size 36 is not a positive multiple of --patch_size 8"),
    bad_input("local_crop_not_multiple", ["--local_size", "20"],
              "--local_size 20 is not a positive multiple of --patch_size 8"),
    bad_input("more_gpus_than_exist", [], "process with local rank 1 needs a GPU but only 1 are visible: lower "
                                          "--nproc_per_node", visible_gpus=1),
    bad_input("batch_larger_than_data", ["--batch_size_per_gpu", "4"],
              "has 3 images, fewer than one batch of 4 (1 processes x 4): lower --batch_size_per_gpu"),
    bad_input("negative_saveckp_iters", ["--saveckp_iters", "-1"], "argument --saveckp_iters: must be >= 0, got -1"),
    bad_input("zero_teacher_temp", ["--teacher_temp", "0"],
              "argument --teacher_temp: must be positive (DINO: 0.04 to 0.07), got 0.0"),
    bad_input("momentum_above_one", ["--momentum_teacher", "1.5"], "argument --momentum_teacher: must be in [0, 1], "
                                                                   "got 1.5"),
    bad_input("unknown_arch", ["--arch", "vit_huge"], "argument --arch: invalid choice: 'vit_huge'"),
    bad_input("patch_augmentation_on_tiny_patches", ["--patch_augmentation", "true", "--patch_size", "2",
                                                      "--global_size", "32", "--local_size", "16"],
              "--patch_augmentation true needs --patch_size >= 3"),
])
def test_bad_settings_are_one_line_errors(tmp_path, monkeypatch, capsys, extra, needle, visible_gpus):
    """Bad flags, data or hardware stop patch_wise_dino.py before training with one line that names what to fix
    (argparse checks single flags, main the rest)."""
    write_images(tmp_path / "data", 3)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    if visible_gpus is not None:
        fake_gpus(monkeypatch, visible_gpus)
    argv = TINY + ["--data_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
                   *[flag.format(tmp=tmp_path) for flag in extra]]
    result = run_cli_here(pwd.main, utils.ArgumentParser(parents=[pwd.get_args_parser()]), argv, capsys)
    assert_one_line_error(result, needle.format(tmp=tmp_path))
    assert not (tmp_path / "out" / "log.txt").exists()


def test_the_command_line_reports_a_bad_image_read_by_a_data_worker_in_one_line(tmp_path):
    """patch_wise_dino.py as a script: an image a data worker cannot decode is one line, not a traceback."""
    write_images(tmp_path / "data", 1)
    (tmp_path / "data" / "zz_broken.png").write_bytes(b"\x89PNG garbage")
    result = run_script("patch_wise_dino.py", [*TINY, "--epochs", "1", "--data_path", str(tmp_path / "data"),
                                               "--num_workers", "1", "--output_dir", str(tmp_path / "out")],
                        timeout=300, threads=1)
    assert_one_line_error(result, f"cannot decode image {tmp_path}/data/zz_broken.png: ")


DIFFERENT_STARTS_SCRIPT = """
import argparse, sys
sys.path.insert(0, {repo!r})
import run_control, utils

def main(args):
    utils.init_distributed_mode(args)
    start = run_control.ResumePoint(epoch=2 * args.rank, samples_done=0)  # as if each node read its own --output_dir
    run_control.check_same_start(start, f"out{{args.rank}}/checkpoint.pth", args.device)

utils.run_cli(main, argparse.Namespace(dist_url="env://"))
"""


def test_ranks_resuming_from_different_points_stop_and_every_rank_says_why(tmp_path):
    """Every process reports its error (print is silenced on ranks > 0), prefixed with its rank."""
    script = tmp_path / "different_starts.py"
    script.write_text(DIFFERENT_STARTS_SCRIPT.format(repo=REPO))
    proc = run_script(str(script), [], nproc=2, timeout=300, threads=1)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"error: [rank {rank}] the processes resume from different points (here: epoch {2 * rank}, sample " \
               f"0 from out{rank}/checkpoint.pth; rank 0: epoch 0, sample 0): --output_dir must be one folder " \
               f"that every node shares" in proc.stderr, proc.stderr[-3000:]


def test_killed_data_workers_are_a_one_line_error_naming_the_last_checkpoint(monkeypatch):
    """torch raises a killed worker (e.g. by the out-of-memory killer) wherever the main thread is, inside
    the training step too: one line that says what to do, not a traceback; other errors pass through."""
    run = run_control.RunControl(argparse.Namespace(), same_settings=())
    run.last_checkpoint = "out/checkpoint.pth (epoch 3, iteration 0)"
    with pytest.raises(utils.UserError) as error:
        with run.failures_explained():
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. \nmore details")
    assert str(error.value) == ("DataLoader worker (pid 4242) is killed by signal: Killed. (out of memory?): lower "
                                "--num_workers and run the same command to continue from the last checkpoint, "
                                "out/checkpoint.pth (epoch 3, iteration 0)")
    with pytest.raises(RuntimeError, match="size"):
        with run.failures_explained():
            torch.zeros(2) @ torch.zeros(3)


def test_progress_shows_small_learning_rates():
    logger, _ = pwd.epoch_loggers()
    logger.update(loss=1.0, lr=1.95e-06)
    assert "lr: 1.950e-06" in str(logger)


def test_a_log_line_cut_off_while_being_appended_is_dropped_on_resume(tmp_path):
    """A run killed while appending its log line leaves a last line without its newline; the resumed run's line
    must not be glued onto it (plot_logs could not read that epoch)."""
    lines = [json.dumps({"epoch": e, "train_loss": 1.0}) + "\n" for e in range(3)]
    (tmp_path / "log.txt").write_text("a note of the user's\n" + "".join(lines[:2]) + lines[2][:12])
    run_control.drop_log_lines_from(str(tmp_path), 2)
    utils.append_json_log(str(tmp_path), {"epoch": 2, "train_loss": 0.5})
    text = (tmp_path / "log.txt").read_text().splitlines()
    assert text[0] == "a note of the user's" and [json.loads(line)["epoch"] for line in text[1:]] == [0, 1, 2]
    run_control.drop_log_lines_from(str(tmp_path), 1)  # a resume at epoch 1 drops the lines of epochs 1 and 2
    assert [json.loads(line)["epoch"] for line in (tmp_path / "log.txt").read_text().splitlines()[1:]] == [0]


def test_a_checkpoint_inside_an_epoch_before_its_first_step_keeps_its_position(tmp_path):
    """Resumed with a larger total batch, a run may stop before its first step: its checkpoint says iteration 0
    but samples_done > 0, and the next run must continue after those samples, not redo the epoch."""
    args = argparse.Namespace(world_size=1, rank=0, batch_size_per_gpu=8, total_batch=8, output_dir=str(tmp_path))
    run = run_control.RunControl(args, same_settings=())
    run.parts = {}
    for iteration, samples_done, expected in ((0, 6, 6), (0, 0, 0), (3, 30, 30)):
        checkpoint = {"epoch": 4, "iteration": iteration, "samples_done": samples_done, "world_size": 1,
                      "rng": [None], "args": argparse.Namespace(batch_size_per_gpu=4)}
        start = run._restore_parts(checkpoint, "checkpoint.pth")
        assert (start.epoch, start.samples_done) == (4, expected)
