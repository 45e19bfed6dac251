"""What two or more Patch-Wise DINO scripts share.

Distributed set-up (torchrun, SLURM, or a plain ``python`` process) and rank helpers that also answer
without a process group, schedules, ``MetricLogger`` with ETA, checkpoint save/restore (atomic writes,
``weights_only=True`` reads), building a ViT from its name and loading pretrained weights (official DINO
URLs as fallback), image decoding with clear errors, a restricted unpickler, the evaluation datasets and
distributed feature extraction. Code with a single user stays in that user's script.
"""
import argparse
import ctypes
import datetime
import json
import math
import os
import pickle
import random
import re
import sys
import time
from collections import defaultdict, deque
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

import vision_transformer as vits

DINO_URL = "https://dl.fbaipublicfiles.com/dino/"
OFFICIAL_WEIGHTS = {
    ("vit_small", 16): "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    ("vit_small", 8): "dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
    ("vit_base", 16): "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    ("vit_base", 8): "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")  # formats whose Pillow mode "I" holds at most 16 bits


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
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
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


def eval_model_args(parser: argparse.ArgumentParser, arch: str = "vit_small", patch_size: int = 16,
                    use_cuda_flag: bool = True,
                    default_weights: str = "the official DINO weights for --arch and --patch_size",
                    ) -> argparse.ArgumentParser:
    """Add the flags every evaluation script shares: the model to evaluate and the run set-up.

    ``--pretrained_weights``, ``--arch``, ``--patch_size``, ``--checkpoint_key``, ``--num_workers``,
    ``--dist_url``, ``--local_rank`` and, with ``use_cuda_flag``, ``--use_cuda`` (default true: run on the
    GPU when one is visible; false: on the CPU, through ``args.force_cpu``). ``default_weights`` says what
    an empty ``--pretrained_weights`` downloads. Returns ``parser``.
    """
    parser.add_argument("--pretrained_weights", default="", type=str, help="Path to the weights to evaluate "
                        f"(a DINO training checkpoint or a backbone state dict); empty: download {default_weights}.")
    if use_cuda_flag:
        parser.add_argument("--use_cuda", default=True, type=bool_flag,
                            help="Run on the GPU when one is available (false: always on the CPU).")
    parser.add_argument("--arch", default=arch, type=str, help="Architecture: vit_tiny, vit_small or vit_base.")
    parser.add_argument("--patch_size", default=patch_size, type=int, help="Patch resolution of the model.")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help='Key of the checkpoint to evaluate (e.g. "teacher" or "student").')
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


def keep_freed_memory() -> bool:
    """Stop glibc's malloc from handing large freed blocks back to the kernel (Linux; no-op elsewhere).

    A CPU step allocates and frees tensors of hundreds of MB (the (tokens, K) head outputs, targets and
    gradients). By default each is a fresh mmap that the kernel maps and zeroes page by page on first touch:
    a third of a vit_tiny/16, K=65536 patch-wise step (22.7 s -> 15.6 s with this). The process keeps its
    peak memory until it exits, which a training loop reaches every step anyway. Returns whether it applied.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt(3) parameter numbers
    # largest blocks served from the heap instead of mmap (older glibc caps this at 32 MB: keep its maximum)
    in_heap = mallopt(m_mmap_threshold, 2 ** 31 - 1) or mallopt(m_mmap_threshold, 32 * 2 ** 20)
    return bool(in_heap and mallopt(m_trim_threshold, -1))  # -1: never trim the heap


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


def load_checkpoint(path: str, map_location: Any = "cpu") -> Any:
    """Load a checkpoint as untrusted input: ``weights_only=True``, plus ``argparse.Namespace`` (DINO
    checkpoints store ``args``) and numpy scalars (other codebases store e.g. a best accuracy as one).
    A file holding other objects raises ``CheckpointRefused`` naming the first; missing, truncated or
    corrupt files raise ``UserError``."""
    if os.path.isdir(path):
        inside = sorted(f for f in os.listdir(path) if f.endswith((".pth", ".pt", ".tar", ".ckpt")))
        example = f" (e.g. {os.path.join(path, inside[0])})" if inside else ""
        raise UserError(f"{path} is a folder, not a checkpoint: pass the checkpoint file inside it{example}")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *_numpy_safe_globals()]):
            return torch.load(path, map_location=map_location, weights_only=True)
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
def build_backbone(arch: str, patch_size: int, **kwargs: Any) -> nn.Module:
    """A ViT from its name (``vit_tiny``, ``vit_small``, ``vit_base``) with the given patch size."""
    if arch not in vits.VIT_ARCHS:
        raise UserError(f"unknown --arch {arch!r}: choose one of {', '.join(vits.VIT_ARCHS)}")
    if patch_size <= 0:
        raise UserError(f"--patch_size must be positive, got {patch_size}")
    return vits.VIT_ARCHS[arch](patch_size=patch_size, **kwargs)


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
                            arch: str, patch_size: int, default_url: Optional[str] = None) -> None:
    """Load backbone weights into ``model``.

    From a file: take ``checkpoint_key`` (e.g. ``teacher``) when present, strip ``module.`` and
    ``backbone.``, resize position embeddings of another token grid (trained at another resolution),
    refuse weights of another architecture or patch size and NaN/inf weights (a diverged run), load with
    ``strict=False`` and report what did not match. With no file: download the official DINO weights for ``arch``/
    ``patch_size`` (or ``default_url``); offline this is a ``UserError`` telling to pass a file.
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
            raise UserError(f"there are no official DINO weights for {arch}/{patch_size}: pass "
                            f"--pretrained_weights /path/to/checkpoint.pth")
        print(f"No --pretrained_weights given: downloading the official DINO weights from {url}")
        try:
            state_dict = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
        except Exception as exc:  # urllib raises many types offline (URLError, socket errors, HTTPError)
            raise UserError(f"could not download the official DINO weights for {arch}/{patch_size} from "
                            f"{url} ({type(exc).__name__}: {exc}); pass --pretrained_weights "
                            f"/path/to/checkpoint.pth") from None
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
    """``data_path/<split>`` as ``ClassFolders`` (one sub-folder per class), or CIFAR-10's python batches."""
    require_folder(data_path)
    cifar = find_cifar10(data_path)
    if cifar is not None:
        return CIFAR10Python(cifar, train=split == "train", transform=transform)
    root = os.path.join(data_path, split)
    if not os.path.isdir(root):
        raise UserError(f"{root} not found: --data_path must hold '{split}' with one sub-folder per class "
                        f"(ImageFolder layout), or CIFAR-10's cifar-10-batches-py")
    return ClassFolders(root, transform)


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
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sample")


class ImageList(torch.utils.data.Dataset):
    """Image files without labels: items are ``(PIL image, 0)``."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return open_image(self.paths[index]), 0


def build_image_source(data_path: str) -> torch.utils.data.Dataset:
    """Items ``(PIL image, label)``: CIFAR-10's train batches, else every image under ``data_path``
    recursively (labels are not used). When the sub-folders are splits (``train`` beside ``val``, ``test``,
    ...), ``train`` is used alone and what is left out is printed; a held-out split folder (``val``,
    ``test``, Kaggle's ``val.X``) beside anything else is refused, since it would be trained on. A class
    folder that happens to be called ``train`` among other classes is just a class. Hidden files and
    folders are skipped, as in evaluation."""
    require_folder(data_path)
    cifar = find_cifar10(data_path)
    if cifar is not None:
        return CIFAR10Python(cifar, train=True)
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
                        f"images directly inside, or CIFAR-10's cifar-10-batches-py")
    return ImageList(paths)


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
