"""utils.py, the helpers the scripts share: command-line types and one-line errors, the optimiser helpers
(LARS, per-parameter clipping, parameter groups), distributed set-up under SLURM, atomic checkpoint writes,
untrusted-file loading, DINO checkpoint layouts and model arguments, and the Holidays/revisited average precision."""
import argparse
import os
import pathlib
import pickle
import platform
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import utils
import vision_transformer as vits
from eval_testdata import REPO, fake_gpus, write_dino_checkpoint, write_teacher_student_checkpoint


def test_bool_flag():
    assert utils.bool_flag("True") and utils.bool_flag("1") and not utils.bool_flag("off")
    with pytest.raises(argparse.ArgumentTypeError, match="^invalid boolean 'maybe': use true or false$"):
        utils.bool_flag("maybe")


def test_clip_gradients_clips_each_parameter_separately():
    model = torch.nn.Linear(4, 3)
    model.weight.grad = torch.full((3, 4), 1.0)  # norm 3.46
    model.bias.grad = torch.tensor([0.1, 0.0, 0.0])  # norm 0.1, under the limit
    norms = utils.clip_gradients(model, 0.5)
    np.testing.assert_allclose(norms.numpy(), [np.sqrt(12), 0.1], rtol=1e-6)
    assert model.weight.grad.norm().item() == pytest.approx(0.5, rel=1e-4)
    np.testing.assert_allclose(model.bias.grad.numpy(), [0.1, 0.0, 0.0])


def test_params_groups_exclude_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = utils.get_params_groups(model)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_lars_step_matches_formula():
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(3))
    w.grad, b.grad = torch.randn(3, 4), torch.randn(3)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    utils.LARS([{"params": [w, b]}], lr=0.5, weight_decay=0.1, momentum=0.9, eta=0.01).step()
    update = gw + 0.1 * w0
    update = update * 0.01 * w0.norm() / update.norm()
    torch.testing.assert_close(w.detach(), w0 - 0.5 * update)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)  # 1-D: no decay, no trust ratio


def test_each_slurm_task_uses_its_own_gpu_when_it_sees_only_that_one(monkeypatch, fresh_process_group):
    """srun --gpus-per-task=1 (or --gpu-bind): SLURM_LOCALID goes up to 7 while each task sees one GPU."""
    fake_gpus(monkeypatch, 1)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    for name, value in (("SLURM_PROCID", "3"), ("SLURM_NTASKS", "4"), ("SLURM_LOCALID", "3"),
                        ("MASTER_ADDR", "node1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    calls = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.setdefault("device", device))
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: calls.update(kw, backend=backend))
    args = argparse.Namespace(dist_url="env://")
    utils.init_distributed_mode(args)
    assert calls == {"device": 0, "backend": "nccl", "init_method": "env://", "world_size": 4, "rank": 3}
    assert (args.rank, args.world_size, args.gpu, str(args.device)) == (3, 4, 0, "cuda:0")
    # a batch script itself (one process) sees SLURM_NTASKS=4 but its step has one task: no waiting for 3 more
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls.clear()
    args = argparse.Namespace(dist_url="env://")
    utils.init_distributed_mode(args)
    assert args.world_size == 1 and calls["world_size"] == 1 and "init_method" not in calls  # a one-process group
    # more tasks on a node than the GPUs all of them see: refused, not two processes sharing a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    with pytest.raises(utils.UserError, match="local rank 3 needs a GPU but only 2 are visible: lower "
                                              "--ntasks-per-node"):
        utils.init_distributed_mode(argparse.Namespace(dist_url="env://"))


def test_atomic_save_replaces_the_file_and_keeps_the_previous_one_on_request(tmp_path, monkeypatch):
    path, previous = str(tmp_path / "checkpoint.pth"), str(tmp_path / "checkpoint.prev.pth")
    utils.atomic_save({"epoch": 1, "w": torch.ones(2)}, path, previous=previous)
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # nothing to keep yet, and no temporary file left
    utils.atomic_save({"epoch": 2, "w": torch.ones(2)}, path)
    assert utils.load_checkpoint(path)["epoch"] == 2 and os.listdir(tmp_path) == ["checkpoint.pth"]  # replaced
    utils.atomic_save({"epoch": 3}, path, previous=previous)
    assert utils.load_checkpoint(previous)["epoch"] == 2 and utils.load_checkpoint(path)["epoch"] == 3

    def no_hard_links(src, dst):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_hard_links)
    utils.atomic_save({"epoch": 4}, path, previous=previous)
    assert utils.load_checkpoint(previous)["epoch"] == 3 and utils.load_checkpoint(path)["epoch"] == 4
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.prev.pth", "checkpoint.pth"]


def test_interrupted_checkpoint_writes_leave_nothing_behind_after_a_restart(tmp_path):
    for name in (".checkpoint.pth.tmp1234", ".checkpoint.prev.pth.link99", ".checkpoint0040.pth.tmp7"):
        (tmp_path / name).write_bytes(b"partial")
    for name in ("checkpoint.pth", ".write_test", "notes.tmp1", ".other.pth.tmp12"):
        (tmp_path / name).write_bytes(b"keep")
    utils.remove_partial_writes(str(tmp_path), "checkpoint")
    assert sorted(os.listdir(tmp_path)) == [".other.pth.tmp12", ".write_test", "checkpoint.pth", "notes.tmp1"]


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    utils.atomic_save({"epoch": 1}, str(path))

    def disk_full(obj, f):  # what torch.save does when the write fails: a RuntimeError raised from the OSError
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(utils.UserError, match=r"could not write .*checkpoint.pth \(\[Errno 28\] No space left on "
                                              r"device\): free some space"):
        utils.atomic_save({"epoch": 2}, str(path))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint.pth"] and utils.load_checkpoint(str(path)) == {"epoch": 1}


def test_checkpoint_that_runs_code_is_refused(tmp_path, runs_code):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"teacher": runs_code(marker)}, path)
    with pytest.raises(utils.UserError, match="refused.*could run code .*system") as info:
        utils.load_checkpoint(str(path))
    assert not marker.exists()
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)


def test_checkpoint_with_numpy_scalars_loads(tmp_path):
    """Other DINO codebases store numpy scalars (a best accuracy, an epoch) next to the weights."""
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {"w": torch.ones(2)}, "best_acc": np.float64(71.5), "epoch": np.int64(3),
                "args": argparse.Namespace(lr=np.float32(0.5), flag=np.bool_(True))}, path)
    loaded = utils.load_checkpoint(str(path))
    assert loaded["best_acc"] == 71.5 and isinstance(loaded["best_acc"], np.float64) and loaded["epoch"] == 3
    assert loaded["args"].lr == np.float32(0.5) and loaded["args"].flag
    allowed = [g[0] if isinstance(g, tuple) else g for g in torch.serialization.get_safe_globals()]
    assert np.dtype not in allowed and argparse.Namespace not in allowed  # allowed while loading only


def test_checkpoints_load_with_a_numpy_older_than_its_dtypes_module(tmp_path, monkeypatch):
    """numpy < 1.25 (requirements allow 1.24) has no numpy.dtypes: loading must not depend on it."""
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.5)}, path)
    monkeypatch.setattr(utils, "np", argparse.Namespace(dtype=np.dtype))  # numpy as utils sees it, no .dtypes
    assert utils.load_checkpoint(str(path))["args"].lr == 0.5


def test_checkpoint_with_other_objects_is_refused_naming_them(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {"w": torch.ones(2)}, "args": argparse.Namespace(output_dir=pathlib.PosixPath("/x"))},
               path)
    with pytest.raises(utils.UserError, match=r"refused to load .*checkpoint.pth: it contains pathlib.PosixPath, "
                                              r"which weights_only loading does not allow.*re-save") as info:
        utils.load_checkpoint(str(path))
    assert "\n" not in str(info.value) and "not a readable" not in str(info.value)
    assert isinstance(info.value, utils.CheckpointRefused)


def test_folder_given_as_checkpoint_says_so(tmp_path):
    with pytest.raises(utils.UserError, match=f"{tmp_path} is a folder.*checkpoint file inside it"):
        utils.load_checkpoint(str(tmp_path))
    torch.save({"w": torch.ones(1)}, tmp_path / "checkpoint.pth")
    with pytest.raises(utils.UserError, match=f"{tmp_path} is a folder.*e.g. {tmp_path}/checkpoint.pth"):
        utils.load_pretrained_weights(utils.build_backbone("vit_tiny", 16), str(tmp_path), "teacher", "vit_tiny", 16)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(utils.UserError, match="not a readable checkpoint .truncated, corrupt"):
        utils.load_checkpoint(str(path))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all " * 8, pickle.dumps({"epoch": 1}, protocol=4)],
                         ids=["empty", "text", "plain-pickle"])
def test_file_that_is_not_a_checkpoint_is_called_corrupt_not_dangerous(tmp_path, content):
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(content)
    with pytest.raises(utils.UserError, match="not a readable checkpoint") as info:
        utils.load_checkpoint(str(path))
    assert "run code" not in str(info.value)


def test_training_layout_checkpoint_loads_teacher_and_student(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    source = write_teacher_student_checkpoint(path, 16, seed=0, same_student=True)  # student: module.backbone.*
    x = torch.randn(2, 3, 32, 32)
    for key in ("teacher", "student"):
        target = utils.build_backbone("vit_tiny", 16)
        utils.load_pretrained_weights(target, path, key, "vit_tiny", 16)
        source.eval(), target.eval()
        torch.testing.assert_close(target(x), source(x))


def test_checkpoint_of_another_patch_size_or_arch_is_refused(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    write_teacher_student_checkpoint(path, 8, seed=0)
    for arch, patch_size, shapes in (
            ("vit_tiny", 16, "pos_embed: (1, 785, 192) in the file, (1, 197, 192) in the model"),
            ("vit_small", 8, "cls_token: (1, 1, 192) in the file, (1, 1, 384) in the model")):
        message = (f"{path} holds a ViT of width 192 with patch size 8, which does not fit {arch}/{patch_size} "
                   f"({shapes}): pass the --arch and --patch_size it was trained with")
        with pytest.raises(utils.UserError, match=f"^{re.escape(message)}$"):
            utils.load_pretrained_weights(utils.build_backbone(arch, patch_size), path, "teacher", arch, patch_size)
    with pytest.raises(utils.UserError, match=f"^{path} has no entry 'nope': pass --checkpoint_key with one of "
                                              f"teacher, student, optimizer, epoch, dino_loss, args$"):
        utils.load_pretrained_weights(utils.build_backbone("vit_tiny", 8), path, "nope", "vit_tiny", 8)


def test_position_embeddings_of_another_grid_are_resized(tmp_path, capsys):
    """A ViT trained at 384 px (e.g. timm's vit_tiny/16 at 384: pos_embed (1, 577, 192)) fits vit_tiny/16."""
    source = utils.build_backbone("vit_tiny", 16, img_size=384)
    path = tmp_path / "vit_tiny_384.pth"
    torch.save(source.state_dict(), path)
    target = utils.build_backbone("vit_tiny", 16)
    utils.load_pretrained_weights(target, str(path), "teacher", "vit_tiny", 16)
    expected = vits.resize_pos_embed(source.pos_embed.detach(), (24, 24), (14, 14))  # (1, 197, 192)
    torch.testing.assert_close(target.pos_embed.detach(), expected)
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert f"Resized the position embeddings of {path} from a 24x24 to the model's 14x14 token grid" in \
        capsys.readouterr().out


def test_non_finite_weights_are_refused(tmp_path):
    source = utils.build_backbone("vit_tiny", 16)
    state_dict = source.state_dict()
    state_dict["blocks.1.norm1.weight"][3] = float("nan")
    state_dict["blocks.2.mlp.fc1.bias"][0] = float("inf")
    path = tmp_path / "diverged.pth"
    torch.save({"teacher": state_dict}, path)
    target = utils.build_backbone("vit_tiny", 16)
    before = target.state_dict()["blocks.1.norm1.weight"].clone()
    expected = r"holds NaN or inf values in 2 tensors \(blocks.1.norm1.weight, blocks.2.mlp.fc1.bias\).*another " \
               r"checkpoint or another --checkpoint_key"
    with pytest.raises(utils.UserError, match=expected):
        utils.load_pretrained_weights(target, str(path), "teacher", "vit_tiny", 16)
    torch.testing.assert_close(target.state_dict()["blocks.1.norm1.weight"], before)  # nothing loaded


def test_diverged_student_of_the_eval_fixture_is_refused(tmp_path):
    """The eval tests' checkpoint has a NaN student: evaluating that key is an error, the teacher loads."""
    path = write_dino_checkpoint(str(tmp_path / "checkpoint.pth"))
    with pytest.raises(utils.UserError, match=r"in \d+ tensors \(cls_token, pos_embed, .*, \.\.\.\)"):
        utils.load_pretrained_weights(utils.build_backbone("vit_tiny", 16), path, "student", "vit_tiny", 16)
    utils.load_pretrained_weights(utils.build_backbone("vit_tiny", 16), path, "teacher", "vit_tiny", 16)


def test_unknown_arch_lists_choices():
    with pytest.raises(utils.UserError, match="^unknown --arch 'resnet9000': choose one of vit_tiny, vit_small, "
                                              "vit_base$"):
        utils.build_backbone("resnet9000", 16)


def test_no_official_weights_for_tiny_says_pass_a_file():
    with pytest.raises(utils.UserError, match="^there are no official DINO weights for vit_tiny/16: pass "
                                              "--pretrained_weights /path/to/checkpoint.pth$"):
        utils.load_pretrained_weights(utils.build_backbone("vit_tiny", 16), None, "teacher", "vit_tiny", 16)


def test_offline_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached
    model = utils.build_backbone("vit_small", 16)
    with pytest.raises(utils.UserError, match="could not download.*--pretrained_weights"):
        utils.load_pretrained_weights(model, None, "teacher", "vit_small", 16,
                                      default_url="http://127.0.0.1:9/dino_deitsmall16_pretrain.pth")


def test_run_cli_prints_one_line_without_traceback(tmp_path):
    code = ("import utils\n"
            "def main(args):\n    raise utils.UserError('something is wrong: do this')\n"
            "utils.run_cli(main, None)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: something is wrong: do this"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_freed_memory_is_reused_without_page_faults():
    """What a data worker gains: blocks of a few MB freed and allocated again reuse mapped pages (by default glibc
    trims or unmaps them, and each new block faults in fresh zeroed pages: ~20,000 faults here)."""
    code = ("import resource, numpy as np, utils\n"
            "assert utils.keep_freed_memory()\n"
            "def work():\n"
            "    arrays = [np.ones(1 << 20, np.float32) for _ in range(4)]  # 4 x 4 MiB, freed together\n"
            "    return sum(float(a[-1]) for a in arrays)\n"
            "assert work() == 4\n"
            "start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "assert sum(work() for _ in range(10)) == 40\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) < 400  # 10 x 16 MiB written = 40,960 pages: under 1% faulted


EVAL_MODEL_FLAGS = {  # the shared block's defaults; --arch/--patch_size fall back to these without saved args
    "eval_knn": dict(arch="vit_small", patch_size=16, use_cuda=torch.cuda.is_available()),
    "eval_linear": dict(arch="vit_small", patch_size=16),
    "eval_image_retrieval": dict(arch="vit_small", patch_size=16, use_cuda=True),
    "eval_copy_detection": dict(arch="vit_base", patch_size=8, use_cuda=True),
}


@pytest.mark.parametrize("script", sorted(EVAL_MODEL_FLAGS))
def test_eval_scripts_keep_their_model_flag_defaults(script):
    module = __import__(script)
    parser = argparse.ArgumentParser(script, parents=[module.get_args_parser()])
    fallback = EVAL_MODEL_FLAGS[script]
    expected = dict(pretrained_weights="", checkpoint_key="teacher", num_workers=10, dist_url="env://",
                    local_rank=0, **{**fallback, "arch": None, "patch_size": None})
    defaults = vars(parser.parse_args([]))
    assert {k: defaults[k] for k in expected} == expected
    assert ("use_cuda" in defaults) == ("use_cuda" in expected)
    parsed = vars(parser.parse_args(["--patch_size", "4", "--num_workers", "0", "--local_rank", "3"]
                                    + (["--use_cuda", "false"] if "use_cuda" in expected else [])))
    assert (parsed["patch_size"], parsed["num_workers"], parsed["local_rank"]) == (4, 0, 3)
    assert parsed.get("use_cuda", False) is False
    help_text = " ".join(parser.format_help().split())
    for flag in expected:
        assert f"--{flag}" in help_text
    assert "official" in help_text  # what an empty --pretrained_weights loads
    assert f"else {fallback['arch']})" in help_text and f"else {fallback['patch_size']})" in help_text


def test_bounded_argparse_types():
    at_least_1 = utils.bounded(int, low=1)
    assert at_least_1("3") == 3
    for text, message in (("0", "must be at least 1, got 0"), ("x", "invalid literal")):
        with pytest.raises((argparse.ArgumentTypeError, ValueError), match=message):
            at_least_1(text)
    temperature = utils.bounded(float, low=0, low_open=True, hint=" (DINO: 0.04 to 0.07)")
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be positive \(DINO: 0.04 to 0.07\), got 0.0"):
        temperature("0")
    below_one = utils.bounded(float, low=0, high=1, high_open=True)
    assert below_one("0") == 0.0
    for text in ("1", "nan", "-0.1"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"must be in \[0, 1\)"):
            below_one(text)


def test_argument_errors_are_one_line(capsys):
    parser = utils.ArgumentParser("prog")
    parser.add_argument("--epochs", type=utils.bounded(int, low=1), default=1)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--epochs", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: argument --epochs: must be at least 1, got 0 (see --help)\n"


def _model_flags(pretrained_weights="", arch=None, patch_size=None):
    return argparse.Namespace(pretrained_weights=pretrained_weights, arch=arch, patch_size=patch_size)


def test_model_args_come_from_the_checkpoint_when_not_passed(tmp_path, capsys):
    path = write_dino_checkpoint(str(tmp_path / "checkpoint.pth"), patch_size=8)
    args = _model_flags(path)
    utils.resolve_model_args(args)
    assert (args.arch, args.patch_size) == ("vit_tiny", 8)
    assert "--arch vit_tiny and --patch_size 8 from the checkpoint's args" in capsys.readouterr().out
    args = _model_flags(path, arch="vit_tiny")  # agreeing flags are kept, the other is filled
    utils.resolve_model_args(args, "vit_base", 16)
    assert (args.arch, args.patch_size) == ("vit_tiny", 8)
    assert capsys.readouterr().out.strip() == "--patch_size 8 from the checkpoint's args"


@pytest.mark.parametrize("flags, fragments", [
    (dict(patch_size=16), ("--patch_size 16", "--patch_size 8")),
    (dict(arch="vit_small"), ("--arch vit_small", "--arch vit_tiny")),
    (dict(arch="vit_tiny", patch_size=4), ("--patch_size 4", "--patch_size 8")),
])
def test_flags_that_contradict_the_checkpoint_are_refused_naming_both(tmp_path, flags, fragments):
    path = write_dino_checkpoint(str(tmp_path / "checkpoint.pth"), patch_size=8)
    with pytest.raises(utils.UserError) as error:
        utils.resolve_model_args(_model_flags(path, **flags))
    message = str(error.value)
    assert "\n" not in message and "contradicts" in message and path in message
    for fragment in fragments:
        assert fragment in message


def test_model_args_fall_back_without_saved_args(tmp_path, capsys):
    path = tmp_path / "state_dict.pth"
    torch.save(utils.build_backbone("vit_tiny", 8).state_dict(), path)  # a plain state dict: no args
    for weights, fallback in ((str(path), ("vit_small", 16)), ("", ("vit_small", 16))):
        args = _model_flags(weights)
        utils.resolve_model_args(args)
        assert (args.arch, args.patch_size) == fallback
    args = _model_flags(str(path))
    utils.resolve_model_args(args, "vit_base", 8)
    assert (args.arch, args.patch_size) == ("vit_base", 8)
    args = _model_flags(str(path), arch="vit_tiny", patch_size=8)  # nothing saved to contradict
    utils.resolve_model_args(args)
    assert (args.arch, args.patch_size) == ("vit_tiny", 8)
    out = capsys.readouterr().out
    assert "--arch vit_small and --patch_size 16 by default (not saved in the checkpoint's args)" in out
    assert "--arch vit_small and --patch_size 16 by default (no --pretrained_weights)" in out


def test_saved_args_of_other_codebases(tmp_path):
    """DINO's own full checkpoints name ViT-S "deit_small" (its main_dino.py reads deit as vit); a dict of args
    works like a Namespace; an architecture we cannot build is named as the checkpoint's."""
    path = str(tmp_path / "checkpoint.pth")
    for saved, expected in ((argparse.Namespace(arch="deit_small", patch_size=16), ("vit_small", 16)),
                            ({"arch": "vit_base", "patch_size": 8}, ("vit_base", 8))):
        torch.save({"teacher": {}, "args": saved}, path)
        args = _model_flags(path)
        utils.resolve_model_args(args)
        assert (args.arch, args.patch_size) == expected
    torch.save({"teacher": {}, "args": argparse.Namespace(arch="resnet50", patch_size=16)}, path)
    with pytest.raises(utils.UserError, match=r"unknown --arch 'resnet50' \(saved in the checkpoint's args\)"):
        utils.resolve_model_args(_model_flags(path))


def test_peeking_at_the_args_maps_the_file_instead_of_reading_it(tmp_path, monkeypatch):
    """The saved args are read with mmap (the tensors stay on disk); files in torch's old format, which
    cannot be mapped, are read whole."""
    zipped, legacy = str(tmp_path / "zip.pth"), str(tmp_path / "legacy.pth")
    checkpoint = {"teacher": {"w": torch.arange(4.0)}, "args": argparse.Namespace(arch="vit_tiny", patch_size=8)}
    torch.save(checkpoint, zipped)
    torch.save(checkpoint, legacy, _use_new_zipfile_serialization=False)
    real_load, mapped = torch.load, {}

    def spy(path, *args, **kwargs):
        mapped[path] = kwargs.get("mmap", False)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for path in (zipped, legacy):
        args = _model_flags(path)
        utils.resolve_model_args(args)
        assert (args.arch, args.patch_size) == ("vit_tiny", 8)
        assert utils.load_checkpoint(path, mmap=True)["teacher"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert mapped == {zipped: True, legacy: False}


def test_average_precision_hand_worked():
    """The trapezoid AP of the Holidays and revisited protocols (retrieval and copy detection share it)."""
    assert utils.average_precision([0], 1) == pytest.approx(1.0)
    assert utils.average_precision([1], 1) == pytest.approx(0.25)  # (0/1 + 1/2) / 2
    assert utils.average_precision([0, 2], 2) == pytest.approx(0.5 * (1 + 1) / 2 + 0.5 * (1 / 2 + 2 / 3) / 2)
    assert utils.average_precision([0], 2) == pytest.approx(0.5)  # the other positive was never retrieved
    assert utils.average_precision([], 3) == 0.0
    assert utils.average_precision([0, 1, 2], 3) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="^num_positives must be positive, got 0$"):
        utils.average_precision([0], 0)
