"""What two or more Patch-Wise DINO scripts share.

Command-line helpers (one-line errors, bounded argparse types, the model flags of the evaluations), distributed
set-up (torchrun, SLURM, or a plain ``python`` process) and rank helpers that also answer without a process
group, ``MetricLogger`` with ETA and the JSON log, DINO's optimiser helpers (parameter groups, gradient clipping,
the frozen last layer, LARS), checkpoint save/restore (atomic writes, ``weights_only=True`` reads, linear heads
checked against the features they were trained on), building a ViT from its name and loading pretrained weights
(official DINO URLs as fallback; ``--arch``/``--patch_size`` from a checkpoint's saved args), and average
precision. Reading user data lives in ``datasets.py``; feature extraction and the k-NN search and vote in
``eval_knn.py``; code with a single user stays in that user's script.
"""
import argparse
import ctypes
import datetime
import hashlib
import json
import math
import os
import pickle
import random
import re
import sys
import time
import zipfile
from collections import defaultdict, deque
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import vision_transformer as vits

REPO_DIR = os.path.dirname(os.path.abspath(__file__))  # the shipped test.png and data/sample are here

DINO_URL = "https://dl.fbaipublicfiles.com/dino/"
OFFICIAL_WEIGHTS = {
    ("vit_small", 16): "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    ("vit_small", 8): "dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
    ("vit_base", 16): "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    ("vit_base", 8): "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
}


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


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Let glibc's malloc keep freed memory for the next allocations instead of handing it back to the system.

    A data worker allocates the same numpy/OpenCV temporaries of a few MB for every image; by default glibc maps
    each anew (or trims the heap after it), so every call pays page faults on fresh zeroed pages (an op of the
    per-patch augmentation on a whole image's patches runs several times slower that way). Blocks under
    ``mmap_threshold`` bytes (glibc's maximum: 32 MiB on 64-bit) then come from the heap, which is trimmed only
    beyond ``trim_threshold`` free bytes: a worker keeps about its peak heap. Returns False (and changes nothing)
    off glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(mallopt(m_trim_threshold, trim_threshold))


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
    CUDA, Gloo on CPU. Sets ``args.rank``, ``args.world_size``, ``args.gpu`` (local rank) and ``args.device``.
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
    print(f"| distributed init ({launcher}): rank {rank}/{world_size}, backend {backend}, device {device}",
          flush=True)
    setup_for_distributed(rank == 0)


# ----------------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------------


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


def linear_probe_optimizer(params: Iterable[torch.Tensor], lr: float, epochs: int,
                           weight_decay: float) -> Tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """DINO's optimiser for a linear head on frozen features: SGD with momentum 0.9, ``lr`` decayed by a cosine over
    ``epochs`` (the scheduler is stepped once per epoch and computes the factor from the epoch, so a run resumed
    with more epochs follows the new schedule; see ``restart_schedule``)."""
    optimizer = torch.optim.SGD(params, lr, momentum=0.9, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lambda epoch: 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)))
    return optimizer, scheduler


def restart_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float,
                     start_epoch: int) -> None:
    """After a saved optimizer and scheduler are restored: go on from ``start_epoch`` with the current ``lr`` (and
    number of epochs), not the saved run's."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = lr * factor(start_epoch)


def train_head_one_epoch(head: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable, epoch: int,
                         loss_of: Callable[..., torch.Tensor], total: Optional[int] = None) -> dict:
    """One epoch of a linear head on frozen features: for each batch of ``batches`` (``total`` of them, default
    ``len(batches)``), the loss ``loss_of(*batch)``, a step of ``optimizer``, the loss and lr logged; a non-finite
    loss is a ``UserError``. Returns the loss and lr averaged over the epoch and the processes."""
    head.train()
    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    for batch in metric_logger.log_every(batches, 20, f"Epoch: [{epoch}]", total=total):
        loss = loss_of(*batch)
        if not math.isfinite(loss.item()):
            raise UserError(f"the loss is {loss.item()} at epoch {epoch}: lower --lr or check the pretrained weights")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        metric_logger.update(loss=loss.item(), lr=optimizer.param_groups[0]["lr"])
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {name: meter.global_avg for name, meter in metric_logger.meters.items()}


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


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's weights (names and float32 values): identifies a frozen backbone by its weights, not
    by the path of the file they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def restore_linear_head(path: str, checkpoint: Any, head: nn.Module, setup: dict, shape_flags: str,
                        optimizer: Optional[torch.optim.Optimizer] = None,
                        scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None) -> dict:
    """Restore a linear head trained on frozen features (and its optimizer, scheduler) from ``checkpoint``, read
    from ``path``, after checking that its saved ``setup`` (what its features depend on: the backbone's
    ``weights_digest`` and the flags that shape them) equals ``setup``; a checkpoint without one is loaded
    unchecked, with a note. A head of another shape is a ``UserError`` naming ``shape_flags``. Returns
    ``checkpoint``."""
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path} is not a linear classifier checkpoint (no 'state_dict')")
    saved = checkpoint.get("setup")
    if isinstance(saved, dict):
        differ = [key if key == "backbone weights" else f"{key} {value} (saved: {saved.get(key)})"
                  for key, value in setup.items() if saved.get(key) != value]
        if differ:
            raise UserError(f"{path} holds a classifier trained on other features: {', '.join(differ)}. "
                            f"Use another --output_dir for this backbone, or delete that checkpoint to retrain")
    else:
        print(f"{path} does not record the backbone it was trained on (a released head?): not checked")
    try:
        head.load_state_dict(checkpoint["state_dict"])
    except RuntimeError:
        shapes = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if torch.is_tensor(v)}
        raise UserError(f"{path} holds a classifier of another shape {shapes}: it was trained with other "
                        f"{shape_flags}; use those or another --output_dir") from None
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None and name in checkpoint:
            obj.load_state_dict(checkpoint[name])
    print(f"Restored the linear classifier from {path} (epoch {checkpoint.get('epoch', 0)})")
    return checkpoint


# ----------------------------------------------------------------------------------------------------
# Models and weights
# ----------------------------------------------------------------------------------------------------


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


def frozen_backbone(args: argparse.Namespace, n_last_blocks: int = 1) -> nn.Module:
    """The ViT of ``args.arch``/``args.patch_size`` with the weights the model flags name (``model_args``), on
    ``args.device``, in eval mode and without gradients: a backbone that a probe reads the last ``n_last_blocks``
    blocks of (more blocks than it has is a ``UserError``)."""
    model = build_backbone(args.arch, args.patch_size)
    if n_last_blocks > len(model.blocks):
        raise UserError(f"--n_last_blocks {n_last_blocks} exceeds the {len(model.blocks)} blocks of {args.arch}")
    load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
    model.to(args.device).eval()
    model.requires_grad_(False)
    print(f"Model {args.arch} {args.patch_size}x{args.patch_size} built.")
    return model


# ----------------------------------------------------------------------------------------------------
# Messages and evaluation metrics
# ----------------------------------------------------------------------------------------------------
def name_list(names: Sequence[str], limit: int = 5) -> str:
    """``a, b, c`` for a message, with ``and N more`` past ``limit`` names."""
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


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
