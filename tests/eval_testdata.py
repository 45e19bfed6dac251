"""Helpers shared by the test files (plain functions; the fixtures are in conftest.py): generated images and
image folders, DINO training checkpoints, running a script or ``patch_wise_dino.main`` and reading what it
printed or logged, and the one-line error every script gives for bad input."""
import argparse
import builtins
import json
import os
import subprocess
import sys
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"blue": (20, 40, 220), "red": (220, 30, 20)}
# patch_wise_dino.py at its smallest: vit_tiny/8, 32 px global and 16 px local crops, out_dim 64, batch 2
TINY_TRAINING = ["--arch", "vit_tiny", "--patch_size", "8", "--global_size", "32", "--local_size", "16",
                 "--resize", "48", "--out_dim", "64", "--batch_size_per_gpu", "2", "--local_crops_number", "2",
                 "--num_workers", "0", "--use_fp16", "false", "--warmup_epochs", "1", "--print_freq", "1",
                 "--lr", "0.005"]


def make_image_folder(root: str, counts: Dict[str, Sequence[int]], size: int = 32, seed: int = 0) -> str:
    """``root/{train,val}/{blue,red}/*.png``: noisy images whose dominant colour is their class.

    ``counts`` maps a split to the number of images of each class, e.g. ``{"train": (7, 6)}``.
    """
    rng = np.random.default_rng(seed)
    for split, per_class in counts.items():
        for (name, colour), count in zip(sorted(COLOURS.items()), per_class):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                noise = rng.integers(-35, 36, size=(size, size, 3))
                pixels = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i:03d}.png"))
    return root


def write_images(folder, count: int, size: int = 80, seed: int = 0):
    """``folder/img{k}.png``: smooth colour gradients with a few rectangles, enough structure for crops to differ."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for k in range(count):
        img = np.stack([(np.sin(6 * xx * rng.uniform(0.5, 2) + c) + 1) * 120 * yy ** rng.uniform(0.2, 2)
                        for c in range(3)], -1)
        for _ in range(3):
            y, x = rng.integers(0, size - 20, 2)
            img[y:y + 20, x:x + 12] = rng.integers(0, 255, 3)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"img{k}.png"))


def write_awkward_images(folder) -> Image.Image:
    """In ``folder`` (a pathlib.Path): a truncated JPEG (the one bad file), a CMYK JPEG, a palette PNG with
    transparency, a grayscale PNG and 2 RGB ``write_images``; returns the RGB image the others are made from."""
    write_images(folder, 2)
    rgb = Image.open(folder / "img0.png")
    rgb.save(folder / "truncated.jpg", quality=90)
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[:len(data) // 3])
    rgb.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(folder / "palette.png", transparency=0)
    rgb.convert("L").save(folder / "gray.png")
    return rgb


def write_dino_checkpoint(path: str, arch: str = "vit_tiny", patch_size: int = 16, seed: int = 0) -> str:
    """A checkpoint in the DINO training layout whose teacher is a random ViT and whose student is NaN,
    so that evaluating the wrong key is refused (non-finite weights) instead of giving numbers."""
    import vision_transformer as vits

    torch.manual_seed(seed)
    backbone = vits.VIT_ARCHS[arch](patch_size=patch_size)
    head = vits.DINOHead(backbone.embed_dim, 64, hidden_dim=32, bottleneck_dim=16)
    teacher = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    teacher.update({f"head.{k}": v for k, v in head.state_dict().items()})
    student = {f"module.{k}": torch.full_like(v, float("nan")) for k, v in teacher.items()}
    torch.save({"student": student, "teacher": teacher, "optimizer": {}, "epoch": 1,
                "args": argparse.Namespace(arch=arch, patch_size=patch_size, out_dim=64)}, path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one CPU thread for a test module, its module fixtures included (conftest.py registers it for
    every test file): tiny models run fastest so and do not crawl when the CPUs are shared, and results are
    bit-identical only to those of the same thread count (the subprocesses' OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_teacher_student_checkpoint(path: str, patch_size: int, seed: int, same_student: bool = False):
    """A DINO training checkpoint of a random vit_tiny; returns the teacher backbone. The student has
    other weights, so loading the wrong entry changes the results (the teacher's with ``same_student``)."""
    import copy

    import vision_transformer as vits

    torch.manual_seed(seed)
    teacher, student = vits.vit_tiny(patch_size=patch_size), vits.vit_tiny(patch_size=patch_size)
    if same_student:
        student = copy.deepcopy(teacher)
    head = vits.DINOHead(192, 32, nlayers=2, hidden_dim=32, bottleneck_dim=16)
    teacher_sd = {f"backbone.{k}": v for k, v in teacher.state_dict().items()}
    teacher_sd.update({f"head.{k}": v for k, v in head.state_dict().items()})
    student_sd = {f"module.backbone.{k}": v for k, v in student.state_dict().items()}
    student_sd.update({f"module.head.{k}": v for k, v in head.state_dict().items()})
    torch.save({"teacher": teacher_sd, "student": student_sd, "optimizer": {}, "epoch": 3, "dino_loss": {},
                "args": argparse.Namespace(arch="vit_tiny", patch_size=patch_size)}, path)
    return teacher.eval()


def random_image(seed: int, size=(80, 60)) -> Image.Image:
    """A smooth random colour field (w x h = size)."""
    cells = (np.random.default_rng(seed).random((6, 8, 3)) * 255).astype(np.uint8)
    return Image.fromarray(cells).resize(size, Image.Resampling.BICUBIC)


def clean_env(threads: Optional[int] = None) -> dict:
    """The environment without distributed variables a surrounding launcher may have set, and with no GPU
    visible: the tests run on the CPU everywhere (two torchrun processes cannot share one GPU). With
    ``threads``, OMP_NUM_THREADS too."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def torchrun(nproc: int, *flags: str) -> list:
    """The command line that starts ``nproc`` processes with ``torchrun --standalone`` (then the script)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *flags]


def run_script(script: str, args: Sequence[str], nproc: Optional[int] = None, timeout: int = 240,
               threads: Optional[int] = None) -> subprocess.CompletedProcess:
    """Run a script (a path in the repository, or an absolute one) with ``python`` or, with ``nproc``, under
    ``torchrun --standalone``, in ``clean_env(threads)``."""
    launcher = [sys.executable] if nproc is None else torchrun(nproc)
    return subprocess.run(launcher + [os.path.join(REPO, script), *args], cwd=REPO, env=clean_env(threads),
                          capture_output=True, text=True, timeout=timeout)


def last_json(result: subprocess.CompletedProcess) -> dict:
    """The JSON object on the last line of stdout (asserting the run succeeded)."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_cli_here(main: Callable, parser: argparse.ArgumentParser, argv: Sequence[str],
                 capsys) -> subprocess.CompletedProcess:
    """What the command line ``argv`` of a script does when it fails, in this process: parse ``argv`` and run
    ``utils.run_cli(main, args)``; its exit status and what it printed, for ``assert_one_line_error``."""
    import utils

    saved_print = builtins.print  # patch_wise_dino.main wraps print
    try:
        with pytest.raises(SystemExit) as exit_info:  # argparse checks single flags, main the rest
            utils.run_cli(main, parser.parse_args(argv))
    finally:
        builtins.print = saved_print
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(argv), exit_info.value.code, captured.out, captured.err)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run failed with exit status 2 and a single ``error: ...`` line on stderr containing ``fragments``."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def train(argv: Sequence[str]):
    """``patch_wise_dino.main`` in this process, as its command line ``argv`` runs it; returns its state. The
    one-process group it joins and the ``print`` it wraps are undone afterwards."""
    import patch_wise_dino as pwd
    import utils

    saved_print = builtins.print
    try:
        return pwd.main(argparse.ArgumentParser(parents=[pwd.get_args_parser()]).parse_args(argv))
    finally:
        if utils.is_dist_avail_and_initialized():
            torch.distributed.destroy_process_group()
        builtins.print = saved_print


def read_log(output_dir) -> list:
    """The JSON lines of a training run's ``log.txt``."""
    with open(os.path.join(output_dir, "log.txt")) as f:
        return [json.loads(line) for line in f]


def assert_same_training(out_a, out_b):
    """Two training output folders hold the same checkpoint (position, weights, center) and log lines."""
    import utils

    a = utils.load_checkpoint(os.path.join(out_a, "checkpoint.pth"))
    b = utils.load_checkpoint(os.path.join(out_b, "checkpoint.pth"))
    assert (a["epoch"], a["iteration"]) == (b["epoch"], b["iteration"])
    for part in ("teacher", "student", "dino_loss"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part} {key}"
    assert [(line["epoch"], line["train_loss"]) for line in read_log(out_a)] == \
           [(line["epoch"], line["train_loss"]) for line in read_log(out_b)]


def fake_gpus(monkeypatch, count: int):
    """Torch sees ``count`` GPUs, and this process is local rank 1 of 2 (as torchrun would set)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
