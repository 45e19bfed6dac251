"""Test data for the evaluation scripts: a generated two-class image folder and a DINO training checkpoint."""
import argparse
import json
import os
import subprocess
import sys
from typing import Dict, Optional, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"blue": (20, 40, 220), "red": (220, 30, 20)}


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


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not crawl when the CPUs are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_teacher_student_checkpoint(path: str, patch_size: int, seed: int):
    """A DINO training checkpoint of a random vit_tiny; returns the teacher backbone. The student has
    other weights, so loading the wrong entry changes the results."""
    import vision_transformer as vits

    torch.manual_seed(seed)
    teacher, student = vits.vit_tiny(patch_size=patch_size), vits.vit_tiny(patch_size=patch_size)
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


def clean_env() -> dict:
    """The environment without distributed variables a surrounding launcher may have set, and with no GPU
    visible: the tests run on the CPU everywhere (two torchrun processes cannot share one GPU)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_script(script: str, args: Sequence[str], nproc: Optional[int] = None,
               timeout: int = 240) -> subprocess.CompletedProcess:
    """Run a repository script with ``python`` or, with ``nproc``, under ``torchrun --standalone``."""
    launcher = [sys.executable] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(launcher + [os.path.join(REPO, script), *args], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def last_json(result: subprocess.CompletedProcess) -> dict:
    """The JSON object on the last line of stdout (asserting the run succeeded)."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run failed with exit status 2 and a single ``error: ...`` line on stderr containing ``fragments``."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
