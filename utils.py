"""What two or more Patch-Wise DINO scripts share.

Distributed set-up (torchrun, SLURM, or a plain ``python`` process) and rank helpers that also answer
without a process group, schedules, ``MetricLogger`` with ETA, checkpoint save/restore (atomic writes,
``weights_only=True`` reads), building a ViT from its name and loading pretrained weights (official DINO
URLs as fallback; ``--arch``/``--patch_size`` from a checkpoint's saved args), image decoding with clear errors
and one image prepared for a ViT, a restricted unpickler, the datasets (image folders, CIFAR-10, MNIST-format
files) and the evaluation transform, distributed feature extraction, and DINO's weighted k-NN search and vote
(``eval_knn.py`` and the training's k-NN monitor). Code with a single user stays in that user's script.
"""
import argparse
import datetime
import gzip
import json
import math
import os
import pickle
import random
import re
import shutil
import struct
import sys
import time
import zipfile
import zlib
from collections import defaultdict, deque
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms as pth_transforms

import vision_transformer as vits
from transforms import IMAGENET_MEAN, IMAGENET_STD

REPO_DIR = os.path.dirname(os.path.abspath(__file__))  # the shipped test.png and data/sample are here

DINO_URL = "https://dl.fbaipublicfiles.com/dino/"
OFFICIAL_WEIGHTS = {
    ("vit_small", 16): "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    ("vit_small", 8): "dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
    ("vit_base", 16): "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    ("vit_base", 8): "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")  # formats whose Pillow mode "I" holds at most 16 bits
KNN_CHUNK_ELEMENTS = {"cpu": 2 ** 24, "cuda": 2 ** 28}  # largest similarity block held at once (64 MiB, 1 GiB)
KNN_MIN_TEST_ROWS = 256  # below this many test rows per block the train set is split too, to keep matmuls large


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, bad file): reported as one line, no traceback."""


def run_cli(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> Any:
    """Run ``main(args)`` and return its result; a ``UserError`` becomes ``error: ...`` on stderr and exit
    status 2, in every process (``print`` is silenced on all but rank 0, and a bad image may be read by any of
    them), with the rank when there are several."""
    try:
        return main(args)
    except UserError as exc:
        message = str(exc).strip()
        if "Traceback" in message:  # re-raised from a DataLoader worker: keep the original message
            message = message.splitlines()[-1].split("UserError: ", 1)[-1]
        where = f"[rank {get_rank()}] " if get_world_size() > 1 else ""
        sys.stderr.write(f"error: {where}{message}\n")
        sys.stderr.flush()
        sys.exit(2)
    finally:
        if is_dist_avail_and_initialized():
            dist.destroy_process_group()


def bool_flag(s: str) -> bool:
    """argparse type for booleans written as true/false, 1/0, yes/no, on/off."""
    value = s.lower()
    if value in {"on", "true", "1", "yes"}:
        return True
    if value in {"off", "false", "0", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {s!r}: use true or false")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, as every other error of the scripts: ``error: argument --x: ...``."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def bounded(kind: Callable[[str], Any], low: Optional[float] = None, high: Optional[float] = None,
            low_open: bool = False, high_open: bool = False, hint: str = "") -> Callable[[str], Any]:
    """argparse ``type`` of a number of ``kind`` (int, float) in [low, high] (``*_open``: that bound excluded)."""
    if low is not None and high is not None:
        rule = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        rule = ("positive" if low == 0 and low_open else f"at least {low}" if kind is int and low > 0
                else f"> {low}" if low_open else f">= {low}")
    else:
        rule = f"< {high}" if high_open else f"<= {high}"

    def parse(text: str):
        value = kind(text)  # a ValueError becomes argparse's "invalid int value"
        too_low = low is not None and (value < low or (low_open and value == low))
        too_high = high is not None and (value > high or (high_open and value == high))
        if too_low or too_high or value != value:  # NaN too
            raise argparse.ArgumentTypeError(f"must be {rule}{hint}, got {value}")
        return value

    parse.__name__ = kind.__name__
    return parse


def model_args(parser: argparse.ArgumentParser, arch: str = "vit_small", patch_size: int = 16,
               use_cuda_flag: bool = True,
               default_weights: str = "the official DINO weights for --arch and --patch_size",
               ) -> argparse.ArgumentParser:
    """Add the flags that choose the model: ``--pretrained_weights``, ``--arch``, ``--patch_size``,
    ``--checkpoint_key`` and, with ``use_cuda_flag``, ``--use_cuda`` (default true: run on the GPU when one is
    visible; false: on the CPU).

    ``--arch`` and ``--patch_size`` default to None: ``resolve_model_args`` takes them from the checkpoint's
    saved ``args``, else ``arch`` / ``patch_size``. ``default_weights`` says what an empty
    ``--pretrained_weights`` downloads. Returns ``parser``.
    """
    parser.add_argument("--pretrained_weights", default="", type=str, help="Path to the weights to evaluate "
                        f"(a DINO training checkpoint or a backbone state dict); empty: download {default_weights}.")
    if use_cuda_flag:
        parser.add_argument("--use_cuda", default=True, type=bool_flag,
                            help="Run on the GPU when one is available (false: always on the CPU).")
    parser.add_argument("--arch", default=None, type=str, help="Architecture: vit_tiny, vit_small or vit_base "
                        f"(default: the one saved in the checkpoint's args, else {arch}).")
    parser.add_argument("--patch_size", default=None, type=bounded(int, low=1),
                        help="Patch resolution of the model (default: "
                        f"the one saved in the checkpoint's args, else {patch_size}).")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help='Key of the checkpoint to evaluate (e.g. "teacher" or "student").')
    return parser


def eval_model_args(parser: argparse.ArgumentParser, arch: str = "vit_small", patch_size: int = 16,
                    use_cuda_flag: bool = True,
                    default_weights: str = "the official DINO weights for --arch and --patch_size",
                    ) -> argparse.ArgumentParser:
    """Add the flags every evaluation script shares: the model to evaluate (``model_args``) and the run
    set-up, ``--num_workers``, ``--dist_url`` and ``--local_rank``. Returns ``parser``."""
    model_args(parser, arch, patch_size, use_cuda_flag, default_weights)
    parser.add_argument("--num_workers", default=10, type=int, help="Data loading workers per process.")
    parser.add_argument("--dist_url", default="env://", type=str, help="URL used to set up distributed "
                        "evaluation; see https://pytorch.org/docs/stable/distributed.html")
    parser.add_argument("--local_rank", default=0, type=int, help="Ignored: the local rank comes from the "
                        "LOCAL_RANK environment variable set by torchrun.")
    return parser


def fix_random_seeds(seed: int = 0) -> None:
    """Seed torch (CPU and CUDA), numpy and random."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# ----------------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------------
def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all processes, in place; a no-op in a single process."""
    world_size = get_world_size()
    if world_size > 1:
        dist.all_reduce(tensor)
        tensor.div_(world_size)
    return tensor


def setup_for_distributed(is_master: bool) -> None:
    """Silence ``print`` on all but the master process (``print(..., force=True)`` still prints)."""
    import builtins

    builtin_print = builtins.print

    def rank_aware_print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = rank_aware_print


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Join the process group of this job and pick the device.

    Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or SLURM (``SLURM_PROCID``/``SLURM_NTASKS``)
    every process joins the group given by ``args.dist_url``; a plain ``python script.py`` gets a
    one-process group on an in-memory store, so DDP and collectives work the same everywhere. NCCL on
    CUDA, Gloo on CPU. Sets ``args.rank``, ``args.world_size``, ``args.gpu`` (local rank), ``args.device``
    and ``args.distributed``.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        launcher = "torchrun"
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS",
                                                             os.environ.get("SLURM_NTASKS", 1))) > 1:
        # tasks of this srun step (a batch script itself may see SLURM_NTASKS > 1 and run only one process)
        rank = int(os.environ["SLURM_PROCID"])
        world_size = int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", 1)))
        local_rank = int(os.environ.get("SLURM_LOCALID", 0))
        launcher = "slurm"
        if getattr(args, "dist_url", "env://") == "env://" and "MASTER_ADDR" not in os.environ:
            raise UserError("running under SLURM without MASTER_ADDR: export MASTER_ADDR (the first node's "
                            "host name) and MASTER_PORT, or pass --dist_url tcp://HOST:PORT")
        os.environ.setdefault("MASTER_PORT", "29500")
    else:
        rank, world_size, local_rank, launcher = 0, 1, 0, "single process"

    use_cuda = torch.cuda.is_available() and not getattr(args, "force_cpu", False)
    if use_cuda:
        gpus = torch.cuda.device_count()
        if launcher == "slurm" and gpus == 1:  # --gpus-per-task=1 or --gpu-bind: each task sees its own GPU
            local_rank = 0
        if local_rank >= gpus:
            fix = "--ntasks-per-node (or bind one GPU per task)" if launcher == "slurm" else "--nproc_per_node"
            raise UserError(f"process with local rank {local_rank} needs a GPU but only {gpus} are visible: "
                            f"lower {fix}")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"

    if not is_dist_avail_and_initialized():
        if launcher == "single process":
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            if launcher == "slurm":
                sys.stderr.write(f"rank {rank}: waiting for the {world_size} SLURM tasks to join at "
                                 f"{os.environ.get('MASTER_ADDR')}:{os.environ['MASTER_PORT']}\n")
            dist.init_process_group(backend, init_method=getattr(args, "dist_url", "env://"),
                                    world_size=world_size, rank=rank)
    args.rank, args.world_size, args.gpu, args.device = rank, world_size, local_rank, device
    args.distributed = world_size > 1
    print(f"| distributed init ({launcher}): rank {rank}/{world_size}, backend {backend}, device {device}",
          flush=True)
    setup_for_distributed(rank == 0)


# ----------------------------------------------------------------------------------------------------
# Schedules, logging
# ----------------------------------------------------------------------------------------------------
def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """Per-iteration values: linear warm-up from ``start_warmup_value`` to ``base_value`` over
    ``warmup_epochs`` (its last step reaches ``base_value``, as in DINO), then a half cosine from
    ``base_value`` down to ``final_value``."""
    total = epochs * niter_per_ep
    warmup_iters = min(warmup_epochs * niter_per_ep, total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    steps = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total
    return schedule


class SmoothedValue:
    """Tracks a series of values; gives the windowed median/average and the global average."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sum ``count`` and ``total`` over processes (the window stays local)."""
        if get_world_size() == 1:
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self) -> float:
        return float(np.median(self.deque)) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return float(np.mean(self.deque)) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Named ``SmoothedValue`` meters and a ``log_every`` iterator that prints progress with ETA."""

    def __init__(self, delimiter: str = "  "):
        self.meters: dict = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs: float) -> None:
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.meters[name].update(float(value))

    def __getattr__(self, attr: str) -> SmoothedValue:
        if attr in self.__dict__.get("meters", {}):
            return self.meters[attr]
        raise AttributeError(f"'MetricLogger' has no meter {attr!r}")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "",
                  total: Optional[int] = None, start: int = 0) -> Iterator:
        """Yield from ``iterable``, printing iteration, ETA, meters, time and memory every ``print_freq``.

        ``total`` and ``start`` let a resumed epoch report its true position."""
        total = len(iterable) if total is None else total
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        width = len(str(total))
        start_time = end = time.time()
        i = start
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if (i - start) % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [header, f"[{i:{width}d}/{total}]", f"eta: {eta}", str(self),
                         f"time: {iter_time}", f"data: {data_time}"]
                if torch.cuda.is_available():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}MB")
                print(self.delimiter.join(p for p in parts if p), flush=True)
            i += 1
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - start_time))
        print(f"{header} Total time: {elapsed} ({(time.time() - start_time) / max(i - start, 1):.4f} s / it)",
              flush=True)


def append_json_log(output_dir: str, stats: dict) -> None:
    """Append one JSON line to ``output_dir/log.txt`` (main process only)."""
    if is_main_process() and output_dir:
        with open(os.path.join(output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(stats) + "\n")


# ----------------------------------------------------------------------------------------------------
# Optimisation helpers
# ----------------------------------------------------------------------------------------------------
def get_params_groups(model: nn.Module) -> list:
    """Two parameter groups: weights with weight decay, biases and norm parameters (1-D) without."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim <= 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def clip_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """Clip each parameter's gradient to norm ``clip`` separately (DINO's rule); returns the norms."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads))  # (P,)
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0)  # (P,)
    torch._foreach_mul_(grads, list(coefs.unbind()))
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Drop the gradients of the head's last layer during the first ``freeze_last_layer`` epochs."""
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al., 2017) for weight matrices; 1-D
    parameters (biases, norms) get plain momentum SGD without weight decay, as in DINO."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = torch.where((p_norm > 0) & (u_norm > 0), group["eta"] * p_norm / u_norm,
                                        torch.ones_like(p_norm))
                    update = update * trust
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------
def atomic_save(obj: Any, path: str, previous: Optional[str] = None) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``: a reader
    sees either the old complete file or the new complete file, never a partial one.

    With ``previous``, the file that ``path`` held is kept there (replacing it) until the next save: a hard
    link made before the rename, so ``path`` always names a complete file; where the file system has no
    hard links, a rename (then, for an instant, only ``previous`` exists)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if previous and os.path.isfile(path):
            _keep_as_previous(path, previous)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError from an OSError
        cause = exc.__context__ if isinstance(exc, RuntimeError) and isinstance(exc.__context__, OSError) else exc
        raise UserError(f"could not write {path} ({str(cause).strip().splitlines()[0]}): free some space or "
                        f"choose another folder; the file it was to replace is unchanged") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _keep_as_previous(path: str, previous: str) -> None:
    link = os.path.join(os.path.dirname(os.path.abspath(previous)), f".{os.path.basename(previous)}.link{os.getpid()}")
    try:
        if os.path.lexists(link):
            os.remove(link)
        os.link(path, link)
        os.replace(link, previous)
    except OSError:
        if os.path.lexists(link):
            os.remove(link)
        os.replace(path, previous)


def remove_partial_writes(folder: str, prefix: str) -> None:
    """Delete the temporary files that ``atomic_save`` (``.<name>.tmp<pid>``) and ``_keep_as_previous``
    (``.<name>.link<pid>``) left in ``folder`` when their process was killed, for names starting with
    ``prefix``."""
    for name in os.listdir(folder):
        if re.fullmatch(rf"\.{re.escape(prefix)}[\w.]*\.(tmp|link)\d+", name):
            os.remove(os.path.join(folder, name))
            print(f"Removed {name}, left in {folder} by an interrupted write")


def save_on_master(obj: Any, path: str) -> None:
    if is_main_process():
        atomic_save(obj, path)


class CheckpointRefused(UserError):
    """A checkpoint file that is intact but holds objects ``weights_only`` loading does not allow."""


def _numpy_safe_globals() -> list:
    """What pickled numpy scalars need: ``scalar`` (under its numpy 2 and numpy 1 names), ``dtype`` and the
    dtype classes (rebuilding a dtype checks its class)."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25
    dtype_classes = [getattr(dtypes, name) for name in getattr(dtypes, "__all__", ())]
    return [(scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar"), np.dtype,
            *(cls for cls in dtype_classes if isinstance(cls, type))]


# Refused globals that run code. Builtins appear in torch's message without "builtins.".
_CODE_RUNNING_MODULES = ("os", "posix", "nt", "sys", "subprocess", "commands", "runpy", "importlib", "shutil")
_CODE_RUNNING_BUILTINS = ("eval", "exec", "compile", "__import__", "getattr", "setattr", "open", "breakpoint")


def _runs_code(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    return module.split(".")[0] in _CODE_RUNNING_MODULES or (module in ("", "builtins")
                                                              and attr in _CODE_RUNNING_BUILTINS)


def load_checkpoint(path: str, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """Load a checkpoint as untrusted input: ``weights_only=True``, plus ``argparse.Namespace`` (DINO
    checkpoints store ``args``) and numpy scalars (other codebases store e.g. a best accuracy as one).
    A file holding other objects raises ``CheckpointRefused`` naming the first; missing, truncated or
    corrupt files raise ``UserError``. With ``mmap`` the tensors of a file in torch's zip format stay on disk
    until they are read (cheap to look at a large checkpoint's ``args``); files in the older format are
    read whole."""
    if os.path.isdir(path):
        inside = sorted(f for f in os.listdir(path) if f.endswith((".pth", ".pt", ".tar", ".ckpt")))
        example = f" (e.g. {os.path.join(path, inside[0])})" if inside else ""
        raise UserError(f"{path} is a folder, not a checkpoint: pass the checkpoint file inside it{example}")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *_numpy_safe_globals()]):
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:  # the unpickler raises KeyError, IndexError, ... on arbitrary bytes
        message = str(exc)
        blocked = re.search(r"GLOBAL ([\w.]+)", message) if isinstance(exc, pickle.UnpicklingError) else None
        if blocked and (_runs_code(blocked.group(1)) or "is blocked" in message):
            raise CheckpointRefused(f"refused to load {path}: it contains objects other than tensors and plain "
                                    f"containers, which could run code ({blocked.group(1)})") from None
        if blocked:
            raise CheckpointRefused(f"refused to load {path}: it contains {blocked.group(1)}, which weights_only "
                                    f"loading does not allow; if you trust its source, load it with torch.load("
                                    f"path, weights_only=False) and re-save just the weights, e.g. torch.save("
                                    f"checkpoint['teacher'], 'teacher.pth')") from None
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation",
                       "(1) In PyTorch", "(2) Alternatively")
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        detail = next((line for line in lines if not line.startswith(boilerplate)), "").split(". ")[0]
        detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        raise UserError(f"{path} is not a readable checkpoint (truncated, corrupt, or not written by "
                        f"torch.save): {detail}") from None


# ----------------------------------------------------------------------------------------------------
# Models and weights
# ----------------------------------------------------------------------------------------------------
def cpp_compiler_available() -> bool:
    """Whether torch.compile's CPU backend (inductor) finds a C++ compiler."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++"))


def build_backbone(arch: str, patch_size: int, **kwargs: Any) -> nn.Module:
    """A ViT from its name (``vit_tiny``, ``vit_small``, ``vit_base``) with the given patch size."""
    if arch not in vits.VIT_ARCHS:
        raise UserError(f"unknown --arch {arch!r}: choose one of {', '.join(vits.VIT_ARCHS)}")
    if patch_size <= 0:
        raise UserError(f"--patch_size must be positive, got {patch_size}")
    return vits.VIT_ARCHS[arch](patch_size=patch_size, **kwargs)


def _saved_model_args(checkpoint: Any) -> dict:
    """``arch`` and ``patch_size`` from the ``args`` a training checkpoint saves (a Namespace, or a dict), with
    DINO's old ``deit_*`` names read as ``vit_*`` as its ``main_dino.py`` does; empty without saved args."""
    saved = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    if not isinstance(saved, dict):
        return {}
    found = {}
    if isinstance(saved.get("arch"), str):
        found["arch"] = saved["arch"].replace("deit", "vit")
    if isinstance(saved.get("patch_size"), int) and not isinstance(saved.get("patch_size"), bool):
        found["patch_size"] = saved["patch_size"]
    return found


def resolve_model_args(args: argparse.Namespace, arch: str = "vit_small", patch_size: int = 16) -> None:
    """Fill ``args.arch`` and ``args.patch_size`` left at None (flags of ``model_args``) from the ``args`` saved in
    the ``args.pretrained_weights`` checkpoint, else with ``arch`` / ``patch_size`` (no file: the official
    weights; a plain state dict saves no args), and print where they came from.

    A flag given explicitly that differs from the checkpoint's saved value is a ``UserError`` naming both. The
    checkpoint is opened with ``mmap``, so its tensors are not read here."""
    source = args.pretrained_weights
    saved = _saved_model_args(load_checkpoint(source, mmap=True)) if source else {}
    from_checkpoint, from_defaults = [], []
    for name, fallback in (("arch", arch), ("patch_size", patch_size)):
        given = getattr(args, name)
        if given is not None and name in saved and given != saved[name]:
            raise UserError(f"--{name} {given} contradicts {source}, whose saved args give --{name} "
                            f"{saved[name]}: drop --{name} (or pass {saved[name]}) to evaluate that model")
        if given is None:
            setattr(args, name, saved.get(name, fallback))
            (from_checkpoint if name in saved else from_defaults).append(f"--{name} {getattr(args, name)}")
    if from_checkpoint:
        print(f"{' and '.join(from_checkpoint)} from the checkpoint's args")
    if from_defaults:
        why = "not saved in the checkpoint's args" if source else "no --pretrained_weights"
        print(f"{' and '.join(from_defaults)} by default ({why})")
    if args.arch not in vits.VIT_ARCHS:
        origin = " (saved in the checkpoint's args)" if args.arch == saved.get("arch") else ""
        raise UserError(f"unknown --arch {args.arch!r}{origin}: choose one of {', '.join(vits.VIT_ARCHS)}")


def _strip_prefixes(state_dict: dict, prefixes: Sequence[str] = ("module.", "backbone.")) -> dict:
    out = {}
    for key, value in state_dict.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _describe_checkpoint_vit(state_dict: dict) -> str:
    weight = state_dict.get("patch_embed.proj.weight")
    if weight is None or weight.ndim != 4:
        return "an unknown architecture"
    return f"a ViT of width {weight.shape[0]} with patch size {weight.shape[-1]}"


def _fit_pos_embed(state_dict: dict, expected: dict, source: str) -> dict:
    """Resize ``pos_embed`` to the model's token grid when only the grid differs (same width and patch
    size, e.g. weights trained at 384 px loaded into a 224 px model); otherwise leave it to be refused."""
    pos, want = state_dict.get("pos_embed"), expected.get("pos_embed")
    patch, want_patch = state_dict.get("patch_embed.proj.weight"), expected.get("patch_embed.proj.weight")
    if not (torch.is_tensor(pos) and torch.is_tensor(want) and pos.ndim == 3 and pos.shape[0] == 1
            and pos.shape[1:] != want.shape[1:] and pos.shape[2] == want.shape[2]
            and torch.is_tensor(patch) and torch.is_tensor(want_patch) and patch.shape == want_patch.shape):
        return state_dict
    old, new = math.isqrt(pos.shape[1] - 1), math.isqrt(want.shape[1] - 1)
    if old * old != pos.shape[1] - 1 or new * new != want.shape[1] - 1:
        return state_dict
    print(f"Resized the position embeddings of {source} from a {old}x{old} to the model's {new}x{new} token grid")
    return {**state_dict, "pos_embed": vits.resize_pos_embed(pos, (old, old), (new, new))}  # (1, 1+new*new, D)


def load_pretrained_weights(model: nn.Module, pretrained_weights: Optional[str], checkpoint_key: Optional[str],
                            arch: str, patch_size: int, default_url: Optional[str] = None,
                            hint: str = "pass --pretrained_weights /path/to/checkpoint.pth") -> None:
    """Load backbone weights into ``model``.

    From a file: take ``checkpoint_key`` (e.g. ``teacher``) when present, strip ``module.`` and
    ``backbone.``, resize position embeddings of another token grid (trained at another resolution),
    refuse weights of another architecture or patch size and NaN/inf weights (a diverged run), load with
    ``strict=False`` and report what did not match. With no file: download the official DINO weights for ``arch``/
    ``patch_size`` (or ``default_url``); offline this is a ``UserError`` ending with ``hint`` (how to pass a file
    instead: the flag for the scripts, an argument for torch.hub).
    """
    if pretrained_weights:
        state_dict = load_checkpoint(pretrained_weights)
        source = pretrained_weights
        if checkpoint_key and isinstance(state_dict, dict) and checkpoint_key in state_dict:
            print(f"Take key {checkpoint_key} in provided checkpoint dict")
            state_dict = state_dict[checkpoint_key]
        elif checkpoint_key and isinstance(state_dict, dict) and not any(
                torch.is_tensor(v) for v in state_dict.values()):
            raise UserError(f"{pretrained_weights} has no entry {checkpoint_key!r}: pass --checkpoint_key "
                            f"with one of {', '.join(map(str, state_dict))}")
    else:
        url = default_url or (DINO_URL + OFFICIAL_WEIGHTS[(arch, patch_size)]
                              if (arch, patch_size) in OFFICIAL_WEIGHTS else None)
        if url is None:
            raise UserError(f"there are no official DINO weights for {arch}/{patch_size}: {hint}")
        print(f"No --pretrained_weights given: downloading the official DINO weights from {url}")
        try:
            state_dict = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
        except Exception as exc:  # urllib raises many types offline (URLError, socket errors, HTTPError)
            raise UserError(f"could not download the official DINO weights for {arch}/{patch_size} from "
                            f"{url} ({type(exc).__name__}: {exc}); {hint}") from None
        source = url
    if not isinstance(state_dict, dict):
        raise UserError(f"{source} does not hold a state dict")
    state_dict = _strip_prefixes(state_dict)
    expected = model.state_dict()
    state_dict = _fit_pos_embed(state_dict, expected, source)
    for key, value in state_dict.items():
        if key in expected and torch.is_tensor(value) and value.shape != expected[key].shape:
            raise UserError(f"{source} holds {_describe_checkpoint_vit(state_dict)}, which does not fit "
                            f"{arch}/{patch_size} ({key}: {tuple(value.shape)} in the file, "
                            f"{tuple(expected[key].shape)} in the model): pass the --arch and --patch_size "
                            f"it was trained with")
    non_finite = [key for key, value in state_dict.items() if key in expected and torch.is_tensor(value)
                  and value.is_floating_point() and not torch.isfinite(value).all()]
    if non_finite:
        names = ", ".join(non_finite[:3]) + (", ..." if len(non_finite) > 3 else "")
        raise UserError(f"{source} holds NaN or inf values in {len(non_finite)} tensors ({names}), as a diverged "
                        f"run leaves them: pass another checkpoint or another --checkpoint_key")
    msg = model.load_state_dict(state_dict, strict=False)
    if len(msg.missing_keys) == len(expected):
        raise UserError(f"{source} has no weights for {arch}: none of its keys match the model "
                        f"(is --checkpoint_key right?)")
    print(f"Pretrained weights found at {source} and loaded with msg: {msg}")


# ----------------------------------------------------------------------------------------------------
# Images, pickles and datasets
# ----------------------------------------------------------------------------------------------------
def open_image(path: str) -> Image.Image:
    """Decode an image file to 8-bit RGB; any failure is a ``UserError`` naming the file.

    Grayscale, palette, CMYK and alpha images are converted as torchvision's loader does (alpha is
    dropped). 16-bit grayscale (Pillow modes ``I;16*``, and ``I`` from PNG or PGM/PPM, which hold at
    most 16 bits) is scaled to 8 bits (65535 -> 255) whatever its pixel values, instead of clipped.
    Other ``I`` images (32-bit integer TIFF) have no standard white level: their values are taken as
    8-bit levels and clipped to 0..255, as torchvision's loader does. Images over twice PIL's
    ``Image.MAX_IMAGE_PIXELS`` (about 179 Mpixels) are refused as decompression bombs."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "I" or img.mode.startswith("I;16"):
                values = np.asarray(img, dtype=np.float64)  # (H, W) 16 or 32-bit integers
                if img.mode != "I" or img.format in SIXTEEN_BIT_I_FORMATS:
                    values = values / 257.0  # 16 bits to 8: 65535 -> 255
                return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
            if img.mode == "P" and "transparency" in img.info:
                return img.convert("RGBA").convert("RGB")  # the palette colours, without PIL's warning
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot decode image {path}: {exc}") from None


def image_for_vit(path: str, image_size: Sequence[int], patch_size: int) -> Tuple[Image.Image, torch.Tensor]:
    """Read one image for a ViT: decoded to RGB (``open_image``), resized (bicubic) to ``image_size`` = (H, W),
    or with one value its shorter side to that size keeping the aspect ratio, then cut at the bottom and right to
    multiples of ``patch_size``. Returns the cut image and its ImageNet-normalised tensor (3, H', W'). A missing
    file, a file that is not an image, or a size under one patch is a ``UserError``."""
    if len(image_size) not in (1, 2) or min(image_size) < 1:
        raise UserError(f"--image_size takes one positive size (the shorter side) or two (height width), got "
                        f"{' '.join(map(str, image_size))}")
    if not os.path.isfile(path):
        raise UserError(f"image {path} not found: pass an image file")
    image = open_image(path)
    if len(image_size) == 2:
        height, width = image_size
    else:
        scale = image_size[0] / min(image.size)
        width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    if height < patch_size or width < patch_size:
        raise UserError(f"{path} resized to {height}x{width} is smaller than one {patch_size}-pixel patch: raise "
                        f"--image_size")
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    image = image.crop((0, 0, width - width % patch_size, height - height % patch_size))
    tensor = pth_transforms.functional.to_tensor(image)  # (3, H', W') in [0, 1]
    return image, pth_transforms.functional.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)  # (3, H', W')


def is_hidden(name: str) -> bool:
    """File and folder names starting with '.' are never data: macOS ``._*`` AppleDouble files,
    ``.DS_Store``, ``.ipynb_checkpoints``, ``.git``."""
    return name.startswith(".")


def name_list(names: Sequence[str], limit: int = 5) -> str:
    """``a, b, c`` for a message, with ``and N more`` past ``limit`` names."""
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def require_folder(path: str, what: str = "--data_path") -> None:
    """A ``UserError`` unless ``path`` is a folder; a file (an archive, say) is named as such."""
    if os.path.isfile(path):
        raise UserError(f"{what} {path} is a file, not a folder: extract the archive (if it is one) and pass "
                        f"the extracted folder")
    if not os.path.isdir(path):
        raise UserError(f"{what} {path} does not exist")


def list_images(folder: str, recursive: bool = False) -> list:
    """Sorted paths of the image files in ``folder`` (and its sub-folders when ``recursive``).

    Hidden files and folders (``is_hidden``) are skipped. Linked sub-folders are followed, as
    torchvision's ImageFolder does, but every real folder is listed once, so link cycles end."""
    require_folder(folder, "image folder")
    paths, seen = [], {os.path.realpath(folder)}
    for root, dirs, files in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(dirs):
            real = os.path.realpath(os.path.join(root, name))
            if not is_hidden(name) and real not in seen:
                seen.add(real)
                kept.append(name)
        dirs[:] = kept
        paths += [os.path.join(root, f) for f in sorted(files)
                  if not is_hidden(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
        if not recursive:
            break
    return paths


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits plain containers, numbers, strings and numpy arrays; anything else is refused."""

    ALLOWED = {
        ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"), ("builtins", "bytearray"),
        ("builtins", "slice"), ("builtins", "bytes"), ("collections", "OrderedDict"), ("_codecs", "encode"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol-2 names
        if (module, name) in self.ALLOWED or (module.startswith("numpy") and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is forbidden")


def safe_pickle_load(path: str, encoding: str = "ASCII") -> Any:
    """Unpickle a data file (ground truth, CIFAR batch) without letting it run code."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding=encoding).load()
    except pickle.UnpicklingError as exc:
        raise UserError(f"refused to load {path}: {exc} (only plain data and numpy arrays are allowed)") \
            from None
    except (EOFError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"{path} is not a readable pickle: {exc}") from None


def find_cifar10(data_path: str) -> Optional[str]:
    """The ``cifar-10-batches-py`` folder at or directly under ``data_path``, else None."""
    for folder in (data_path, os.path.join(data_path, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(folder, "data_batch_1")) and \
                os.path.isfile(os.path.join(folder, "test_batch")):
            return folder
    return None


class CIFAR10Python(torch.utils.data.Dataset):
    """CIFAR-10 read directly from its python batches (``data_batch_1..5``, ``test_batch``)."""

    def __init__(self, folder: str, train: bool = True, transform: Optional[Callable] = None):
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        data, labels = [], []
        for name in names:
            batch = safe_pickle_load(os.path.join(folder, name), encoding="bytes")
            data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels += list(batch[b"labels"])
        self.data = np.concatenate(data).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
        self.targets = labels
        self.classes = [str(i) for i in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index])
        return (self.transform(img) if self.transform else img), self.targets[index]


MNIST_PREFIXES = {"train": "train", "val": "t10k"}  # file-name prefix of each split of an MNIST-format folder


def _mnist_file(folder: str, name: str) -> Optional[str]:
    """``folder/name``, else ``folder/name.gz``, else None."""
    for path in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
        if os.path.isfile(path):
            return path
    return None


def find_mnist(data_path: str) -> Optional[str]:
    """``data_path`` when it holds MNIST-format images (``train-`` or ``t10k-images-idx3-ubyte``, gzipped or
    not: MNIST, Fashion-MNIST, KMNIST), else None."""
    if any(_mnist_file(data_path, f"{prefix}-images-idx3-ubyte") for prefix in MNIST_PREFIXES.values()):
        return data_path
    return None


def read_idx(path: str, ndim: int) -> np.ndarray:
    """The unsigned-byte array of an IDX file (the MNIST format), gunzipped when its name ends in ``.gz``.

    torchvision's ``read_image_file``/``read_label_file`` read no ``.gz`` and check the header with ``assert``,
    so this parses the format itself: a header of two zero bytes, type 0x08 (unsigned byte), ``ndim``, then
    ``ndim`` big-endian uint32 sizes, then the data. A wrong header, a truncated file or extra bytes is a
    ``UserError`` naming the file."""
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise UserError(f"cannot read {path} ({exc}): the file is truncated or damaged, download it again") \
            from None
    start = 4 + 4 * ndim
    if len(data) < start or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise UserError(f"{path} is not an MNIST-format file of unsigned bytes with {ndim} dimension"
                        f"{'s' if ndim > 1 else ''} (its header is {data[:4].hex() or 'missing'}, expected "
                        f"00000801 for labels or 00000803 for images): the file is damaged or of another kind")
    shape = struct.unpack(f">{ndim}I", data[4:start])
    expected = start + math.prod(shape)
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise UserError(f"{path} is {state}: its header gives {'x'.join(map(str, shape))} bytes of data "
                        f"({expected} bytes with the header), the file holds {len(data)}: download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(shape)


class MNISTFolder(torch.utils.data.Dataset):
    """A split of an MNIST-format folder: ``train-images-idx3-ubyte`` with ``train-labels-idx1-ubyte``
    for train, the ``t10k-`` pair for any other split, each gzipped or not. Items are ``(RGB image, label)``:
    grayscale repeated over three channels. ``classes`` are the labels 0 .. the largest label of either
    split (the same list for train and val, so a split that lacks a class keeps it)."""

    def __init__(self, folder: str, train: bool = True, transform: Optional[Callable] = None):
        prefix = MNIST_PREFIXES["train" if train else "val"]
        images_path = self._require(folder, f"{prefix}-images-idx3-ubyte")
        labels_path = self._require(folder, f"{prefix}-labels-idx1-ubyte")
        self.data = read_idx(images_path, 3)  # (N, H, W) uint8
        labels = read_idx(labels_path, 1)  # (N,)
        if len(labels) != len(self.data):
            raise UserError(f"{labels_path} holds {len(labels)} labels but {images_path} holds {len(self.data)} "
                            f"images: both must be the same split of the same dataset")
        if not len(labels):
            raise UserError(f"{images_path} holds no images")
        largest = int(labels.max())
        for other in MNIST_PREFIXES.values():
            other_path = _mnist_file(folder, f"{other}-labels-idx1-ubyte")
            if other != prefix and other_path:
                largest = max(largest, int(read_idx(other_path, 1).max(initial=0)))
        self.targets = labels.astype(np.int64).tolist()
        self.classes = [str(i) for i in range(largest + 1)]
        self.transform = transform

    @staticmethod
    def _require(folder: str, name: str) -> str:
        path = _mnist_file(folder, name)
        if path is None:
            raise UserError(f"{folder} holds MNIST-format files but not {name} (nor {name}.gz): the folder needs "
                            f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                            f"t10k-labels-idx1-ubyte, gzipped or not")
        return path

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index]).convert("RGB")
        return (self.transform(img) if self.transform else img), self.targets[index]


def build_packed_dataset(data_path: str, split: str,
                         transform: Optional[Callable]) -> Optional[torch.utils.data.Dataset]:
    """CIFAR-10's python batches or MNIST-format files found at ``data_path`` (their training set for
    ``split`` ``train``, their test set for any other), else None: a folder of image files."""
    cifar = find_cifar10(data_path)
    if cifar is not None:
        return CIFAR10Python(cifar, train=split == "train", transform=transform)
    mnist = find_mnist(data_path)
    if mnist is not None:
        return MNISTFolder(mnist, train=split == "train", transform=transform)
    return None


class ClassFolders(torch.utils.data.Dataset):
    """Items ``(image, class index)`` from one sub-folder per class, as torchvision's ``ImageFolder``
    (same ``classes``, ``class_to_idx``, ``samples``, ``targets``), but with the file rules of training:
    images listed by ``list_images`` (hidden names skipped, linked folders followed once). A class
    folder may be empty (noted) as long as the split holds images; images beside the class folders
    are noted and ignored."""

    def __init__(self, root: str, transform: Optional[Callable] = None):
        self.root, self.transform = root, transform
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not is_hidden(e.name))
        loose = list_images(root)
        if not self.classes:
            if loose:
                raise UserError(f"{root} holds {len(loose)} images but no class sub-folders: it needs one "
                                f"sub-folder per class (sort ImageNet's val images into class folders first)")
            raise UserError(f"{root} holds no class sub-folders: it needs one sub-folder of images per class")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        per_class = [list_images(os.path.join(root, name), recursive=True) for name in self.classes]
        self.samples = [(path, i) for i, paths in enumerate(per_class) for path in paths]
        self.targets = [label for _, label in self.samples]
        if not self.samples:
            raise UserError(f"{root} holds {len(self.classes)} class folders but no images")
        empty = [name for name, paths in zip(self.classes, per_class) if not paths]
        if empty:
            print(f"Note: {root}: no images in the class folders {name_list(empty)} (kept as classes)")
        if loose:
            print(f"Note: {root}: ignored {len(loose)} images directly inside, outside the class folders")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = open_image(path)
        return (self.transform(image) if self.transform else image), label


def build_eval_dataset(data_path: str, split: str, transform: Optional[Callable]) -> torch.utils.data.Dataset:
    """``data_path/<split>`` as ``ClassFolders`` (one sub-folder per class), or CIFAR-10's python batches, or
    MNIST-format files (``build_packed_dataset``)."""
    require_folder(data_path)
    packed = build_packed_dataset(data_path, split, transform)
    if packed is not None:
        return packed
    root = os.path.join(data_path, split)
    if not os.path.isdir(root):
        raise UserError(f"{root} not found: --data_path must hold '{split}' with one sub-folder per class "
                        f"(ImageFolder layout), CIFAR-10's cifar-10-batches-py, or MNIST-format files")
    return ClassFolders(root, transform)


def eval_transform(resize_size: int, crop_size: int) -> pth_transforms.Compose:
    """The evaluation transform of DINO: resize the shorter side (bicubic), center crop, ImageNet normalisation."""
    return pth_transforms.Compose([
        pth_transforms.Resize(resize_size, interpolation=pth_transforms.InterpolationMode.BICUBIC),
        pth_transforms.CenterCrop(crop_size),
        pth_transforms.ToTensor(),
        pth_transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def check_same_classes(train: torch.utils.data.Dataset, val: torch.utils.data.Dataset) -> None:
    """A ``UserError`` naming the classes each split lacks when train and val class lists differ."""
    train_classes, val_classes = list(train.classes), list(val.classes)
    if train_classes == val_classes:
        return
    lacks = [f"{split} lacks: {name_list(missing)}" for split, missing in (
        ("val", [name for name in train_classes if name not in set(val_classes)]),
        ("train", [name for name in val_classes if name not in set(train_classes)])) if missing]
    raise UserError(f"train and val hold different class folders ({'; '.join(lacks)}): both need the same "
                    f"class folders")


class ReturnIndexDataset(torch.utils.data.Dataset):
    """Wraps a dataset so that items are ``(sample, index)``: feature extraction gathers by index."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        return (sample[0] if isinstance(sample, tuple) else sample), index


def feature_loader(dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int,
                   collate_fn: Optional[Callable] = None) -> torch.utils.data.DataLoader:
    """A loader for ``extract_features``: dataset wrapped with indices, split over processes in order."""
    dataset = ReturnIndexDataset(dataset)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(),
                                                  shuffle=False)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(), drop_last=False,
                                       collate_fn=collate_fn, persistent_workers=False)


@torch.inference_mode()
def extract_features(model: nn.Module, data_loader: torch.utils.data.DataLoader, device: torch.device,
                     feature_fn: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
                     print_freq: int = 10) -> torch.Tensor:
    """Features of every item of ``data_loader`` (built by ``feature_loader``), in dataset order.

    Each process runs its share; every batch is all-gathered with its indices, so every process ends
    with the full ``(N, D)`` float32 CPU tensor. ``feature_fn(model, images)`` defaults to ``model(images)``.
    """
    feature_fn = feature_fn or (lambda m, x: m(x))
    world_size = get_world_size()
    gather_device = device if device.type == "cuda" else torch.device("cpu")
    features = None
    logger = MetricLogger()
    for images, index in logger.log_every(data_loader, print_freq, header="Features:"):
        images = images.to(device, non_blocking=True)
        index = index.to(gather_device)  # (B,)
        feats = feature_fn(model, images).float().to(gather_device)  # (B, D)
        if features is None:
            features = torch.zeros(len(data_loader.dataset), feats.shape[-1])  # (N, D)
        if world_size > 1:
            index_all = [torch.empty_like(index) for _ in range(world_size)]
            feats_all = [torch.empty_like(feats) for _ in range(world_size)]
            dist.all_gather(index_all, index)
            dist.all_gather(feats_all, feats)
            index, feats = torch.cat(index_all), torch.cat(feats_all)
        features[index.cpu()] = feats.cpu()
    if features is None:
        raise UserError("no images to extract features from")
    return features


HELD_OUT_SPLITS = {"val", "valid", "validation", "test"}  # never trained on


def default_data_path() -> str:
    """The sample photos shipped with the code."""
    return os.path.join(REPO_DIR, "data", "sample")


class ImageList(torch.utils.data.Dataset):
    """Image files without labels: items are ``(PIL image, 0)``."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return open_image(self.paths[index]), 0


def build_image_source(data_path: str) -> torch.utils.data.Dataset:
    """Items ``(PIL image, label)``: the training set of CIFAR-10's python batches or of MNIST-format files
    (``build_packed_dataset``), else every image under ``data_path`` recursively (labels are not used). When the
    sub-folders are splits (``train`` beside ``val``, ``test``, ...), ``train`` is used alone and what is left out
    is printed; a held-out split folder (``val``, ``test``, Kaggle's ``val.X``) beside anything else is refused,
    since it would be trained on. A class folder that happens to be called ``train`` among other classes is just
    a class. Hidden files and folders are skipped, as in evaluation."""
    require_folder(data_path)
    packed = build_packed_dataset(data_path, "train", None)
    if packed is not None:
        return packed
    subdirs = sorted(e.name for e in os.scandir(data_path) if e.is_dir() and not is_hidden(e.name))
    loose = len(list_images(data_path))
    split_of = {name: name.lower().split(".")[0] for name in subdirs}  # val.X -> val
    held_out = [name for name in subdirs if split_of[name] in HELD_OUT_SPLITS]
    if "train" in subdirs and all(split in HELD_OUT_SPLITS | {"train"} for split in split_of.values()):
        ignored = [f"{name}/" for name in subdirs if name != "train"] + ([f"{loose} images"] if loose else [])
        data_path = os.path.join(data_path, "train")
        print(f"Training on {data_path} only"
              + (f" (ignored beside it: {name_list(ignored)})" if ignored else ""))
    else:
        if held_out:
            raise UserError(f"{data_path} holds {name_list(held_out)} (held-out data) beside other folders: pass "
                            f"the folder of training images as --data_path (Kaggle's ImageNet-100: merge "
                            f"train.X1..X4 into train/ first)")
        if loose and subdirs:
            print(f"{data_path} holds {loose} images beside {len(subdirs)} sub-folders: training on all of them")
    paths = list_images(data_path, recursive=True)
    if not paths:
        raise UserError(f"no images found in --data_path {data_path}: expected class sub-folders of images, "
                        f"images directly inside, CIFAR-10's cifar-10-batches-py, or MNIST-format files")
    return ImageList(paths)


# ----------------------------------------------------------------------------------------------------
# Weighted k-NN classification (DINO's protocol; eval_knn.py and the training's k-NN monitor)
# ----------------------------------------------------------------------------------------------------
def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """``torch`` or ``faiss``: ``auto``/None means torch for CUDA features and faiss for CPU features."""
    if backend in (None, "auto"):
        return "torch" if device.type == "cuda" else "faiss"
    if backend not in ("torch", "faiss"):
        raise UserError(f"unknown k-NN backend {backend!r}: choose auto, torch or faiss")
    return backend


def _search_torch(train_features: torch.Tensor, test_features: torch.Tensor,
                  k: int, chunk_elements: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tiled matmul + top-k: a block of test rows against a block of train columns at a time, merging each
    block's top-k into the running top-k, so large training sets stay compute-bound and memory-bounded."""
    num_train, num_test = train_features.shape[0], test_features.shape[0]
    rows = max(1, min(num_test, max(KNN_MIN_TEST_ROWS, chunk_elements // num_train)))
    cols = max(k, chunk_elements // rows)
    sims, indices = [], []
    for start in range(0, num_test, rows):
        queries = test_features[start:start + rows]  # (b, D)
        best_sims = best_idx = None
        for first in range(0, num_train, cols):
            block = queries @ train_features[first:first + cols].T  # (b, c)
            top_sims, top_idx = block.topk(min(k, block.shape[1]), dim=1)  # (b, <=k)
            top_idx += first
            if best_sims is not None:
                top_sims, top_idx = torch.cat((best_sims, top_sims), 1), torch.cat((best_idx, top_idx), 1)
                top_sims, position = top_sims.topk(k, dim=1)  # (b, k)
                top_idx = top_idx.gather(1, position)  # (b, k)
            best_sims, best_idx = top_sims, top_idx
        sims.append(best_sims)
        indices.append(best_idx)
    return torch.cat(sims), torch.cat(indices)  # (N_test, k), most similar first


def _search_faiss(train_features: torch.Tensor, test_features: torch.Tensor,
                  k: int, chunk_elements: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """faiss's exact inner-product search (BLAS in cache-sized blocks) straight on the feature arrays:
    no index, so the training features are not copied."""
    import faiss  # imported here: only this backend needs it

    database = train_features.detach().cpu().float().contiguous().numpy()  # (N_train, D), shares memory
    queries = test_features.detach().cpu().float().contiguous()  # (N_test, D)
    rows = max(1, chunk_elements // k)  # bounds the result arrays
    sims, indices = [], []
    for start in range(0, queries.shape[0], rows):
        top_sims, top_idx = faiss.knn(queries[start:start + rows].numpy(), database, k,
                                      metric=faiss.METRIC_INNER_PRODUCT)  # (b, k) each
        sims.append(torch.from_numpy(top_sims))
        indices.append(torch.from_numpy(top_idx))
    return torch.cat(sims), torch.cat(indices).long()  # (N_test, k), most similar first


def chunk_budget(device: torch.device, chunk_elements: Optional[int] = None) -> int:
    """``chunk_elements``, or the default for the device (64 MiB of float32 on CPU, 1 GiB on CUDA)."""
    return chunk_elements or KNN_CHUNK_ELEMENTS.get(device.type, KNN_CHUNK_ELEMENTS["cpu"])


@torch.no_grad()
def knn_search(train_features: torch.Tensor, test_features: torch.Tensor, k: int, backend: Optional[str] = None,
               chunk_elements: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` train features of largest inner product with each test feature, most similar first.

    Returns ``(similarities, indices)``, both (N_test, k), on the CPU for faiss and on the features'
    device for torch. At most about ``chunk_elements`` similarities are held at once (default: see
    ``chunk_budget``).
    """
    if train_features.dim() != 2 or test_features.dim() != 2 or train_features.shape[1] != test_features.shape[1]:
        raise UserError(f"train and test features must be (N, D) with the same D, got "
                        f"{tuple(train_features.shape)} and {tuple(test_features.shape)}")
    if not 1 <= k <= train_features.shape[0]:
        raise UserError(f"k must be in [1, {train_features.shape[0]}] (the training-set size), got {k}")
    backend = resolve_backend(backend, train_features.device)
    search = _search_torch if backend == "torch" else _search_faiss
    return search(train_features, test_features.to(train_features.device), k,
                  chunk_budget(train_features.device, chunk_elements))


@torch.no_grad()
def knn_vote(similarities: torch.Tensor, neighbor_labels: torch.Tensor, test_labels: torch.Tensor, k: int,
             T: float, num_classes: int, chunk_elements: Optional[int] = None) -> Tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of the weighted vote of the first ``k`` neighbours.

    ``similarities`` and ``neighbor_labels`` are (N_test, >=k), most similar first. Each neighbour adds
    ``exp(s / T)`` to its label's score; classes are ranked by score, ties by class index; top-5 counts
    the first ``min(5, k, num_classes)`` predictions.
    """
    num_test = test_labels.shape[0]
    if num_test == 0:
        raise UserError("there are no test features to classify")
    top_n = min(5, k, num_classes)
    rows = max(1, chunk_budget(similarities.device, chunk_elements) // max(num_classes, k))
    correct1 = correct5 = 0
    for start in range(0, num_test, rows):
        sims = similarities[start:start + rows, :k].float()  # (b, k)
        labels = neighbor_labels[start:start + rows, :k].to(sims.device)  # (b, k)
        targets = test_labels[start:start + rows].to(sims.device)  # (b,)
        weights = ((sims - sims[:, :1]) / T).exp()  # (b, k); the first neighbour is the most similar
        scores = torch.zeros(sims.shape[0], num_classes, device=sims.device).scatter_add_(1, labels, weights)
        predictions = scores.sort(dim=1, descending=True, stable=True).indices[:, :top_n]  # (b, top_n)
        hits = predictions == targets[:, None]  # (b, top_n)
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
    return 100.0 * correct1 / num_test, 100.0 * correct5 / num_test


def check_knn_labels(train_labels: torch.Tensor, test_labels: torch.Tensor, num_train: int, num_test: int,
                     num_classes: Optional[int]) -> int:
    """Validate the label vectors; return ``num_classes`` (default: largest label + 1)."""
    if train_labels.shape != (num_train,) or test_labels.shape != (num_test,):
        raise UserError(f"labels do not match the features: {num_train} train and {num_test} test "
                        f"features, labels of shape {tuple(train_labels.shape)} and {tuple(test_labels.shape)}")
    labels = torch.cat((train_labels.cpu(), test_labels.cpu()))  # (N_train + N_test,)
    if labels.numel() and labels.min().item() < 0:
        raise UserError(f"labels must be non-negative, found {labels.min().item()}")
    largest = int(labels.max().item()) if labels.numel() else 0
    if num_classes is None:
        return largest + 1
    if largest >= num_classes:
        raise UserError(f"labels must be in [0, {num_classes}), found label {largest}")
    return num_classes


@torch.no_grad()
def knn_classifier(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, k: int, T: float, num_classes: Optional[int] = None,
                   backend: Optional[str] = None, chunk_elements: Optional[int] = None) -> Tuple[float, float]:
    """Weighted k-NN (DINO): top-1 and top-5 accuracy in percent.

    Features are (N, D), L2-normalised (so inner product = cosine similarity); labels are (N,) integers.
    ``k`` is clamped to the training-set size; ``num_classes`` defaults to the largest label + 1;
    ``backend`` is ``torch``, ``faiss`` or None/``auto`` (torch on CUDA, faiss on CPU).
    """
    num_classes = check_knn_labels(train_labels, test_labels, train_features.shape[0], test_features.shape[0],
                                   num_classes)
    k = min(k, train_features.shape[0])
    similarities, indices = knn_search(train_features, test_features, k, backend, chunk_elements)
    neighbor_labels = train_labels.to(indices.device)[indices]  # (N_test, k)
    return knn_vote(similarities, neighbor_labels, test_labels, k, T, num_classes, chunk_elements)


# ----------------------------------------------------------------------------------------------------
# k-NN monitor of a training run
# ----------------------------------------------------------------------------------------------------
KNN_MONITOR_K, KNN_MONITOR_T = 20, 0.07  # eval_knn.py's k = 20 result, DINO's temperature
KNN_MONITOR_SEED = 0  # the same image subset in every epoch and every run, so their curves compare


def knn_monitor_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags of the training's k-NN monitor (``KNNMonitor``) to ``parser``; returns it."""
    parser.add_argument("--knn_data_path", default=None, type=str,
                        help="labelled dataset (any layout eval_knn.py reads) on which the teacher's weighted 20-NN "
                             "accuracy is measured at --global_size: knn_top1/knn_top5 in log.txt (default: none)")
    parser.add_argument("--knn_freq", default=1, type=bounded(int, low=1),
                        help="run the k-NN monitor after every this many epochs, and after the last")
    parser.add_argument("--knn_max_images", default=0, type=bounded(int, low=0),
                        help="k-NN monitor on a fixed random subset of at most this many train and as many val "
                             "images, to keep it cheap (0: all of them)")
    return parser


def eval_resize_size(crop_size: int) -> int:
    """DINO's evaluation resize for a center crop of ``crop_size``: 256 for 224, the same ratio otherwise."""
    return round(crop_size * 256 / 224)


def subset_indices(size: int, max_items: int, seed: Sequence[int]) -> Optional[list]:
    """Sorted indices of a random subset of ``max_items`` of ``size`` items, the same for the same ``seed``;
    None when ``max_items`` is 0 or not below ``size`` (keep everything)."""
    if not 0 < max_items < size:
        return None
    return np.sort(np.random.default_rng(list(seed)).choice(size, max_items, replace=False)).tolist()


def seeded_subset(dataset: torch.utils.data.Dataset, max_items: int,
                  seed: Sequence[int]) -> Tuple[torch.utils.data.Dataset, torch.Tensor]:
    """``dataset`` and its labels (N,), or with ``0 < max_items < len(dataset)`` a random subset of
    ``max_items`` of its items (in dataset order, the same for the same ``seed``) and their labels."""
    labels = torch.as_tensor(dataset.targets, dtype=torch.long)  # (N,)
    keep = subset_indices(len(dataset), max_items, seed)
    if keep is not None:
        dataset, labels = torch.utils.data.Subset(dataset, keep), labels[keep]
    return dataset, labels


class KNNMonitor:
    """The weighted k-NN accuracy of a backbone's [CLS] features (k = 20, T = 0.07), to watch a training run.

    The train and val splits of ``data_path`` (any layout ``build_eval_dataset`` reads) pass through the
    evaluation transform at ``image_size`` (resize ``eval_resize_size(image_size)``, center crop); with
    ``max_images`` each split is cut to a fixed random subset of at most that many images. Features are
    extracted as in ``eval_knn.py`` (split over the processes, gathered by index: every image counts once)
    and classified by the same ``knn_classifier``, so without a cap the numbers are those of
    ``eval_knn.py --nb_knn 20 --resize_size R --crop_size S`` on the same weights. It runs after every
    ``freq``-th epoch and after the last of ``epochs``; every process must call it (extraction is a collective).
    """

    def __init__(self, data_path: str, image_size: int, freq: int, epochs: int, max_images: int = 0,
                 batch_size: int = 64, num_workers: int = 0):
        require_folder(data_path, "--knn_data_path")
        resize = eval_resize_size(image_size)
        train = build_eval_dataset(data_path, "train", eval_transform(resize, image_size))
        val = build_eval_dataset(data_path, "val", eval_transform(resize, image_size))
        check_same_classes(train, val)
        self.splits = [seeded_subset(dataset, max_images, (KNN_MONITOR_SEED, i))  # [(dataset, labels (N,))]
                       for i, dataset in enumerate((train, val))]
        self.num_classes, self.freq, self.epochs = len(train.classes), freq, epochs
        self.batch_size, self.num_workers = batch_size, num_workers
        (train_used, _), (val_used, _) = self.splits
        whole = len(train_used) == len(train) and len(val_used) == len(val)
        same = f": the numbers of eval_knn.py --resize_size {resize} --crop_size {image_size}" if whole else ""
        print(f"k-NN monitor: {len(train_used)} of {len(train)} train and {len(val_used)} of {len(val)} val images "
              f"from {data_path}, resized to {resize} and center-cropped to {image_size}, k = {KNN_MONITOR_K}, "
              f"after {'every epoch' if freq == 1 else f'every {freq} epochs and after the last'}{same}")

    def due(self, epoch: int) -> bool:
        """Whether the monitor runs after ``epoch`` (0-based)."""
        return (epoch + 1) % self.freq == 0 or epoch + 1 == self.epochs

    def accuracy(self, backbone: nn.Module, device: torch.device) -> Tuple[float, float]:
        """Top-1 and top-5 accuracy (percent) of ``backbone``; its train/eval mode is left as it was."""
        training, features = backbone.training, []
        backbone.eval()
        try:
            for dataset, _ in self.splits:
                loader = feature_loader(dataset, self.batch_size, self.num_workers)
                feats = extract_features(backbone, loader, device, print_freq=10 ** 9)  # (N, D)
                features.append(F.normalize(feats, dim=1).to(device))  # (N, D)
        finally:
            backbone.train(training)
        (_, train_labels), (_, val_labels) = self.splits
        return knn_classifier(features[0], train_labels.to(device), features[1], val_labels.to(device),
                              KNN_MONITOR_K, KNN_MONITOR_T, num_classes=self.num_classes)

    def after_epoch(self, backbone: nn.Module, epoch: int, device: torch.device) -> dict:
        """``{}`` when the monitor does not run after ``epoch``; else ``knn_top1``, ``knn_top5`` and
        ``knn_seconds`` (the time it took), also printed."""
        if not self.due(epoch):
            return {}
        start = time.time()
        top1, top5 = self.accuracy(backbone, device)
        seconds = time.time() - start
        print(f"k-NN monitor after epoch {epoch}: top-1 {top1:.2f}  top-5 {top5:.2f} ({KNN_MONITOR_K}-NN of "
              f"{len(self.splits[1][0])} val among {len(self.splits[0][0])} train images, {seconds:.1f} s)",
              flush=True)
        return {"knn_top1": top1, "knn_top5": top5, "knn_seconds": seconds}


# ----------------------------------------------------------------------------------------------------
# Evaluation metrics
# ----------------------------------------------------------------------------------------------------
def average_precision(positive_ranks: Sequence[int], num_positives: int) -> float:
    """Average precision of one ranked list by the trapezoid rule of the Holidays/revisitop scoring.

    ``positive_ranks`` are the 0-based positions of the retrieved positives in the ranking (junk
    already removed); ``num_positives`` counts all positives of the query, found or not. Each positive
    adds a trapezoid of width ``1 / num_positives`` between the precision just before it
    (``found / rank``, 1 at rank 0) and just after it (``(found + 1) / (rank + 1)``).
    """
    if num_positives <= 0:
        raise ValueError(f"num_positives must be positive, got {num_positives}")
    ranks = np.sort(np.asarray(positive_ranks, dtype=np.float64))  # (P,)
    found = np.arange(len(ranks), dtype=np.float64)  # (P,) positives seen before each one
    before = np.where(ranks == 0, 1.0, found / np.maximum(ranks, 1.0))  # (P,)
    after = (found + 1.0) / (ranks + 1.0)  # (P,)
    return float((before + after).sum() / (2.0 * num_positives))
