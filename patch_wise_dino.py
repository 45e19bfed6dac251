"""Patch-Wise DINO training: DINO self-distillation of a ViT plus a patch-level loss.

Reproduces the training of DINO (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021; facebookresearch/dino ``main_dino.py``) and adds the objective of Patch-Wise
DINO (Javidani et al., "Local-Global Self-Supervised Visual Representation Learning", 2023): besides
matching the [CLS] outputs of two views, the student matches the teacher on every pair of patch tokens
that show the same place of the image (``patch_matching.py``).

Differences from the reference code:
- every image gets its own crops (the Patch-Wise DINO reference shared one crop geometry across the
  batch); the data workers compute the token matches and the collate function pads them;
- the teacher head runs on every token of the global views, the student head only on the matched
  tokens, once per (image, student token) even when that token is matched against both teacher views;
- the center has one row per teacher token position: (1, 1+Ng, K);
- ``--patch_loss false`` is DINO exactly ([CLS] only, heads on [CLS] only, center (1, 1, K));
- mixed precision through ``torch.amp`` (float16 with a GradScaler, or bfloat16), fused AdamW on CUDA;
- per-epoch collapse diagnostics (teacher entropy, student-teacher KL) for [CLS] and patch tokens;
- long jobs: SIGTERM/SIGINT stop every process at the same iteration after a checkpoint that holds the
  position inside the epoch (and every process's generator states: the resumed run is bit-identical on the
  same hardware and thread count), ``--saveckp_iters``, the previous checkpoint kept as a fallback, and
  ``--skip_bad_images``; each image's crops depend on (--seed, epoch, index) only, not on the data workers.
"""
import argparse
import ctypes
import dataclasses
import datetime
import functools
import itertools
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import NamedTuple, Optional, Sequence

import cv2
import numpy as np
import torch
from torch import nn

import patch_matching
import utils
import vision_transformer as vits
from transforms import DataAugmentationPatchWiseDINO

NUM_GLOBAL = 2
# exp(x) for x below about -87.3 is a subnormal float32 (or 0), for which the CPU's vectorised exp takes a slow path:
# up to 10x slower on the very negative log-probabilities of a 0.04-temperature teacher. Arguments are clamped to
# -80 first, which changes a probability by at most exp(-80) = 1.8e-35.
EXP_FLOOR = -80.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
CHECKPOINT, PREVIOUS_CHECKPOINT = "checkpoint.pth", "checkpoint.prev.pth"
MODEL_ARGS = ("arch", "patch_size", "out_dim", "use_bn_in_head", "norm_last_layer", "patch_loss", "optimizer")
HELD_OUT_SPLITS = {"val", "valid", "validation", "test"}  # never trained on


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Patch-Wise DINO", add_help=False)
    # Model
    parser.add_argument("--arch", default="vit_small", type=str,
                        help=f"ViT architecture: {', '.join(vits.VIT_ARCHS)}")
    parser.add_argument("--patch_size", default=16, type=int, help="side of a ViT patch in pixels")
    parser.add_argument("--out_dim", default=65536, type=int, help="dimensionality K of the DINO head output")
    parser.add_argument("--norm_last_layer", default=True, type=utils.bool_flag,
                        help="freeze the weight norm of the head's last layer (true is more stable)")
    parser.add_argument("--momentum_teacher", default=0.996, type=float,
                        help="base EMA momentum of the teacher, raised to 1 by a cosine schedule")
    parser.add_argument("--use_bn_in_head", default=False, type=utils.bool_flag,
                        help="batch norm in the head's MLP (SyncBatchNorm across GPUs)")
    # Temperature
    parser.add_argument("--warmup_teacher_temp", default=0.04, type=float, help="teacher temperature at epoch 0")
    parser.add_argument("--teacher_temp", default=0.04, type=float, help="teacher temperature after the warm-up")
    parser.add_argument("--warmup_teacher_temp_epochs", default=0, type=int,
                        help="epochs of linear warm-up of the teacher temperature")
    parser.add_argument("--center_momentum", default=0.9, type=float, help="EMA momentum of the center")
    # Optimisation
    parser.add_argument("--use_fp16", default=True, type=utils.bool_flag,
                        help="mixed precision on CUDA (see --amp_dtype); ignored on the CPU, which trains in fp32")
    parser.add_argument("--amp_dtype", default="float16", choices=["float16", "bfloat16"],
                        help="half type of --use_fp16: float16 uses a GradScaler, bfloat16 needs none (Ampere+)")
    parser.add_argument("--weight_decay", default=0.04, type=float, help="initial weight decay")
    parser.add_argument("--weight_decay_end", default=0.4, type=float, help="final weight decay (cosine schedule)")
    parser.add_argument("--clip_grad", default=3.0, type=float,
                        help="clip each parameter's gradient to this norm (0 disables)")
    parser.add_argument("--batch_size_per_gpu", default=64, type=int, help="images per process and step")
    parser.add_argument("--epochs", default=100, type=int, help="number of training epochs")
    parser.add_argument("--freeze_last_layer", default=1, type=int,
                        help="epochs during which the head's last layer is not updated")
    parser.add_argument("--lr", default=0.0005, type=float,
                        help="peak learning rate for a total batch of 256, scaled linearly with the total batch")
    parser.add_argument("--warmup_epochs", default=10, type=int, help="epochs of linear learning-rate warm-up")
    parser.add_argument("--min_lr", default=1e-6, type=float, help="learning rate at the end of the cosine")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "lars"],
                        help="adamw (recommended for ViTs), sgd or lars")
    parser.add_argument("--compile", default=False, type=utils.bool_flag,
                        help="compile every transformer block and the heads with torch.compile: the same loss, "
                             "faster steps after the first ones (which compile; so does each new crop size); on "
                             "the CPU it needs a C++ compiler. Drop-path masks then come from another generator")
    parser.add_argument("--drop_path_rate", default=0.1, type=float, help="stochastic depth rate of the student")
    # Multi-crop and the patch loss
    parser.add_argument("--global_crops_scale", default=(0.4, 1.0), type=float, nargs=2,
                        help="min and max area fraction of the global crops")
    parser.add_argument("--local_crops_number", default=8, type=int, help="number of local crops (0 disables)")
    parser.add_argument("--local_crops_scale", default=(0.05, 0.4), type=float, nargs=2,
                        help="min and max area fraction of the local crops")
    parser.add_argument("--global_size", default=224, type=int, help="side of the global crops in pixels")
    parser.add_argument("--local_size", default=96, type=int, help="side of the local crops in pixels")
    parser.add_argument("--resize", default=256, type=int,
                        help="resize every image to resize x resize before cropping (0: crop the original)")
    parser.add_argument("--patch_loss", default=True, type=utils.bool_flag,
                        help="add the loss on matched patch tokens; false trains vanilla DINO ([CLS] only)")
    # Data, outputs, distribution
    parser.add_argument("--data_path", default=None, type=str,
                        help="folder of images, read recursively (only its train/ when it has one), CIFAR-10's python "
                             "folder, or MNIST-format files (train-images-idx3-ubyte[.gz], ...) (default: data/sample)")
    parser.add_argument("--output_dir", default=".", type=str, help="where checkpoints and logs go")
    parser.add_argument("--saveckp_freq", default=20, type=int, help="keep checkpointNNNN.pth every this many epochs")
    parser.add_argument("--saveckp_iters", default=0, type=int,
                        help="also write checkpoint.pth every this many iterations, with the position inside the "
                             "epoch (0: only at the end of each epoch)")
    parser.add_argument("--skip_bad_images", default=False, type=utils.bool_flag,
                        help="skip images that cannot be decoded and count them per epoch (bad_images in log.txt) "
                             "instead of stopping with the file's name")
    parser.add_argument("--seed", default=0, type=int, help="random seed")
    utils.knn_monitor_args(parser)  # --knn_data_path, --knn_freq, --knn_max_images
    cpus_per_process = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    parser.add_argument("--num_workers", default=max(1, min(10, cpus_per_process)), type=int,
                        help="data loading processes per training process (default 10, or this node's CPUs "
                             "divided by its training processes if fewer)")
    parser.add_argument("--print_freq", default=10, type=int, help="print progress every this many iterations")
    parser.add_argument("--dist_url", default="env://", type=str, help="url of the distributed process group")
    parser.add_argument("--local_rank", "--local-rank", default=0, type=int,
                        help="ignored: the launcher sets LOCAL_RANK (accepted for torch.distributed.launch)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings that cannot work, with one line each."""
    if args.arch not in vits.VIT_ARCHS:
        raise utils.UserError(f"unknown --arch {args.arch!r}: choose one of {', '.join(vits.VIT_ARCHS)}")
    if args.patch_size <= 0:
        raise utils.UserError(f"--patch_size must be positive, got {args.patch_size}")
    for flag, size in (("--global_size", args.global_size), ("--local_size", args.local_size)):
        if size <= 0 or size % args.patch_size:
            raise utils.UserError(f"{flag} {size} is not a positive multiple of --patch_size {args.patch_size}")
    for flag, scale in (("--global_crops_scale", args.global_crops_scale),
                        ("--local_crops_scale", args.local_crops_scale)):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise utils.UserError(f"{flag} {scale[0]} {scale[1]} must satisfy 0 < min <= max <= 1")
    for flag in ("batch_size_per_gpu", "epochs", "out_dim", "print_freq", "knn_freq"):
        if getattr(args, flag) < 1:
            raise utils.UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("local_crops_number", "resize", "num_workers", "saveckp_freq", "saveckp_iters", "seed", "lr",
                 "min_lr", "clip_grad", "weight_decay", "weight_decay_end", "drop_path_rate",
                 "warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer", "knn_max_images"):
        if getattr(args, flag) < 0:
            raise utils.UserError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    for flag in ("teacher_temp", "warmup_teacher_temp"):
        if getattr(args, flag) <= 0:
            raise utils.UserError(f"--{flag} must be positive (DINO: 0.04 to 0.07), got {getattr(args, flag)}")
    for flag in ("momentum_teacher", "center_momentum"):
        if not 0 <= getattr(args, flag) <= 1:
            raise utils.UserError(f"--{flag} must be in [0, 1], got {getattr(args, flag)}")
    if args.drop_path_rate >= 1:
        raise utils.UserError(f"--drop_path_rate must be below 1, got {args.drop_path_rate}")


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
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
        return utils.open_image(self.paths[index]), 0


def build_image_source(data_path: str) -> torch.utils.data.Dataset:
    """Items ``(PIL image, label)``: the training set of CIFAR-10's python batches or of MNIST-format files
    (``utils.build_packed_dataset``), else every image under ``data_path``
    recursively (labels are not used). When the sub-folders are splits (``train`` beside ``val``, ``test``,
    ...), ``train`` is used alone and what is left out is printed; a held-out split folder (``val``,
    ``test``, Kaggle's ``val.X``) beside anything else is refused, since it would be trained on. A class
    folder that happens to be called ``train`` among other classes is just a class. Hidden files and
    folders are skipped, as in evaluation."""
    utils.require_folder(data_path)
    packed = utils.build_packed_dataset(data_path, "train", None)
    if packed is not None:
        return packed
    subdirs = sorted(e.name for e in os.scandir(data_path) if e.is_dir() and not utils.is_hidden(e.name))
    loose = len(utils.list_images(data_path))
    split_of = {name: name.lower().split(".")[0] for name in subdirs}  # val.X -> val
    held_out = [name for name in subdirs if split_of[name] in HELD_OUT_SPLITS]
    if "train" in subdirs and all(split in HELD_OUT_SPLITS | {"train"} for split in split_of.values()):
        ignored = [f"{name}/" for name in subdirs if name != "train"] + ([f"{loose} images"] if loose else [])
        data_path = os.path.join(data_path, "train")
        print(f"Training on {data_path} only"
              + (f" (ignored beside it: {utils.name_list(ignored)})" if ignored else ""))
    else:
        if held_out:
            raise utils.UserError(f"{data_path} holds {utils.name_list(held_out)} (held-out data) beside other "
                                  f"folders: pass the folder of training images as --data_path (Kaggle's "
                                  f"ImageNet-100: merge train.X1..X4 into train/ first)")
        if loose and subdirs:
            print(f"{data_path} holds {loose} images beside {len(subdirs)} sub-folders: training on all of them")
    paths = utils.list_images(data_path, recursive=True)
    if not paths:
        raise utils.UserError(f"no images found in --data_path {data_path}: expected class sub-folders of "
                              f"images, images directly inside, CIFAR-10's cifar-10-batches-py, or MNIST-format files")
    return ImageList(paths)


def cls_only_matches(num_views: int) -> list:
    """The view pairs of ``patch_matching.match_all_pairs`` with the [CLS] pair only (vanilla DINO)."""
    cls = np.zeros(1, dtype=np.int64)
    return [(i, v, cls, cls) for i in range(NUM_GLOBAL) for v in range(num_views) if v != i]


class MultiCropDataset(torch.utils.data.Dataset):
    """Items ``(crops, matches)``: the multi-crop views of one image and, for every (teacher global
    view i, student view v != i), the token indices ``(i, v, idx_teacher, idx_student)`` that match.

    An index may come with a seed, ``(index, seed)`` as ``ResumableSampler`` yields it: the crops then
    depend on that seed only, not on the process or data worker that draws them. With
    ``skip_bad_images`` an image that cannot be decoded gives ``None`` (and a warning) instead of an error."""

    def __init__(self, images: torch.utils.data.Dataset, transform: DataAugmentationPatchWiseDINO,
                 patch_size: int, patch_loss: bool, skip_bad_images: bool = False):
        self.images, self.transform = images, transform
        self.patch_size, self.patch_loss = patch_size, patch_loss
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        index, seed = index if isinstance(index, tuple) else (index, None)
        try:
            image = self.images[index][0]
        except utils.UserError as exc:
            if not self.skip_bad_images:
                raise
            sys.stderr.write(f"warning: skipped by --skip_bad_images: {exc}\n")
            return None
        if seed is None:
            crops, geometries = self.transform(image)
        else:
            with torch.random.fork_rng(devices=[]):  # the CPU generator only: CUDA's is the model's
                torch.default_generator.manual_seed(seed)
                crops, geometries = self.transform(image)
        if self.patch_loss:
            matches = patch_matching.match_all_pairs(geometries, self.patch_size, num_global=NUM_GLOBAL)
        else:
            matches = cls_only_matches(len(crops))
        return crops, matches


class MultiCropBatch(NamedTuple):
    """A collated batch: crops per view and the matches of every view pair, padded to M entries."""
    crops: list  # V tensors (B, 3, S_v, S_v), globals first
    pairs: torch.Tensor  # (P, 2) teacher global view i, student view v
    teacher_idx: torch.Tensor  # (P, B, M) token of teacher view i
    student_idx: torch.Tensor  # (P, B, M) token of student view v
    mask: torch.Tensor  # (P, B, M) True where a match exists, False on padding


def collate_multicrop(batch: Sequence) -> MultiCropBatch:
    """Stack the views of ``MultiCropDataset`` items and pad their matches into index tensors."""
    crops = [torch.stack(views) for views in zip(*(item[0] for item in batch))]
    pairs = [(i, v) for i, v, _, _ in batch[0][1]]
    if any([(i, v) for i, v, _, _ in item[1]] != pairs for item in batch):
        raise ValueError("all items of a batch must have the same view pairs")
    P, B = len(pairs), len(batch)
    M = max(len(m[2]) for item in batch for m in item[1])
    teacher_idx, student_idx = np.zeros((P, B, M), dtype=np.int64), np.zeros((P, B, M), dtype=np.int64)
    mask = np.zeros((P, B, M), dtype=bool)
    for b, item in enumerate(batch):
        for p, (_, _, idx_t, idx_s) in enumerate(item[1]):
            teacher_idx[p, b, :len(idx_t)], student_idx[p, b, :len(idx_s)] = idx_t, idx_s
            mask[p, b, :len(idx_t)] = True
    return MultiCropBatch(crops, torch.tensor(pairs, dtype=torch.long).view(P, 2), torch.from_numpy(teacher_idx),
                          torch.from_numpy(student_idx), torch.from_numpy(mask))


def collate_dropping_bad(items: Sequence) -> tuple:
    """``(batch, skipped)``: the items that decoded, collated (None when none did), and how many did not."""
    good = [item for item in items if item is not None]
    return (collate_multicrop(good) if good else None), len(items) - len(good)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of image ``index`` in ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class ResumableSampler(torch.utils.data.DistributedSampler):
    """``DistributedSampler``'s shuffled, padded order, split over the processes, that can begin an epoch
    after its first ``start`` samples (counted over all processes together), so a resumed epoch skips what
    was done without decoding it. Yields ``(index, seed)``: an image's crops depend on (--seed, epoch,
    index) only. With ``start`` 0 the indices are those of ``DistributedSampler``."""

    def __init__(self, dataset: torch.utils.data.Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def _remaining(self) -> int:
        return max(self.total_size - self.start, 0)

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        order = (order * math.ceil(self.total_size / len(order)))[:self.total_size]  # padded as DistributedSampler
        rest = order[self.start:]
        if rest:
            rest = (rest * math.ceil(len(self) * self.num_replicas / len(rest)))[:len(self) * self.num_replicas]
        for index in rest[self.rank::self.num_replicas]:
            yield index, item_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return math.ceil(self._remaining() / self.num_replicas)


def worker_init(worker_id: int, rank: int) -> None:
    """Seed numpy and ``random`` of a data worker from its torch seed and the rank.

    Ctrl-C (SIGINT to the whole process group) is left to the training process, which stops after its
    checkpoint and then shuts the workers down. On SIGTERM (the DataLoader's or multiprocessing's shutdown,
    or a scheduler stopping every process of the job) a worker leaves at once with status 0: a worker
    killed by the signal would make the DataLoader raise in the training process wherever it is, before the
    checkpoint is written."""
    seed = np.random.SeedSequence([torch.initial_seed(), rank, worker_id]).generate_state(2)
    np.random.seed(int(seed[0]))
    random.seed(int(seed[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _leave_quietly)


def _leave_quietly(signum: int, frame) -> None:
    os._exit(0)


def build_loader(args: argparse.Namespace) -> torch.utils.data.DataLoader:
    """Multi-crop data with matches, split over the processes by a shuffling DistributedSampler."""
    transform = DataAugmentationPatchWiseDINO(args.global_crops_scale, args.local_crops_scale,
                                              args.local_crops_number, args.patch_size, args.global_size,
                                              args.local_size, args.resize)
    data_path = args.data_path or default_data_path()
    dataset = MultiCropDataset(build_image_source(data_path), transform, args.patch_size, args.patch_loss,
                               args.skip_bad_images)
    total_batch = args.batch_size_per_gpu * args.world_size
    if len(dataset) < total_batch:
        raise utils.UserError(f"{data_path} has {len(dataset)} images, fewer than one batch of {total_batch} "
                              f"({args.world_size} processes x {args.batch_size_per_gpu}): "
                              f"lower --batch_size_per_gpu")
    sampler = ResumableSampler(dataset, num_replicas=args.world_size, rank=args.rank, seed=args.seed)
    if args.num_workers > 0:  # one OpenCV thread per worker, set before they are forked: a forked child that
        cv2.setNumThreads(1)  # stops a thread pool its parent had started deadlocks
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
        pin_memory=args.device.type == "cuda", drop_last=True, collate_fn=collate_dropping_bad,
        persistent_workers=args.num_workers > 0, worker_init_fn=functools.partial(worker_init, rank=args.rank))
    print(f"Data loaded: {len(dataset)} images from {data_path}; {transform}")
    return loader


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------
class MultiCropWrapper(nn.Module):
    """Backbone on crops of several resolutions (one pass per run of equal sizes), head on chosen rows.

    The backbone outputs of all views are laid out as one flat list of rows: view by view, image by
    image, token by token ([CLS] only unless ``all_tokens``), i.e. row ``start_v + b * T_v + t``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def features(self, crops: Sequence[torch.Tensor], all_tokens: bool) -> torch.Tensor:
        """Backbone outputs of all views as flat rows: (sum_v B * T_v, D)."""
        outputs = []
        for _, group in itertools.groupby(crops, key=lambda c: tuple(c.shape[-2:])):
            x = torch.cat(list(group))  # (n*B, 3, H, W)
            out = self.backbone.forward_tokens(x) if all_tokens else self.backbone(x)[:, None]  # (n*B, T, D)
            outputs.append(out.flatten(0, 1))  # (n*B*T, D)
        return torch.cat(outputs)

    def forward(self, crops: Sequence[torch.Tensor], rows: Optional[torch.Tensor] = None,
                all_tokens: bool = False) -> torch.Tensor:
        feats = self.features(crops, all_tokens)  # (R, D)
        if rows is not None:
            feats = feats.index_select(0, rows)  # (S, D)
        return self.head(feats)  # (S, K)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def cpp_compiler_available() -> bool:
    """Whether torch.compile's CPU backend (inductor) finds a C++ compiler."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++"))


def compile_blocks(model: MultiCropWrapper, device: torch.device) -> None:
    """torch.compile every transformer block and the head in place (``Module.compile``), so state-dict keys,
    DDP and checkpoints are unchanged. The heads see a different number of tokens each step: their first
    recompilation makes that dimension dynamic instead of compiling again for every count."""
    if device.type == "cpu" and not cpp_compiler_available():
        raise utils.UserError("--compile true on the CPU needs a C++ compiler (g++ or clang++, or set CXX): "
                              "install one, or train with --compile false")
    # The blocks run inside DDP's forward, whose own hooks bucket their gradients: dynamo's DDP graph splitter
    # is not needed, and it fails on the drop-path rate (a float input shared by all blocks' one graph).
    torch._dynamo.config.optimize_ddp = False
    for block in model.backbone.blocks:
        block.compile()
    model.head.compile()


def build_models(args: argparse.Namespace) -> tuple:
    """(student wrapped in DDP, teacher) with the teacher starting as a copy of the student."""
    student_backbone = utils.build_backbone(args.arch, args.patch_size, drop_path_rate=args.drop_path_rate)
    teacher_backbone = utils.build_backbone(args.arch, args.patch_size)
    dim = student_backbone.embed_dim
    student = MultiCropWrapper(student_backbone, vits.DINOHead(dim, args.out_dim, args.use_bn_in_head,
                                                               args.norm_last_layer))
    teacher = MultiCropWrapper(teacher_backbone, vits.DINOHead(dim, args.out_dim, args.use_bn_in_head))
    student, teacher = student.to(args.device), teacher.to(args.device)
    if args.use_bn_in_head and args.device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    student = nn.parallel.DistributedDataParallel(
        student, device_ids=[args.gpu] if args.device.type == "cuda" else None)
    teacher.load_state_dict(student.module.state_dict())  # after DDP has broadcast rank 0's weights
    for p in teacher.parameters():
        p.requires_grad = False
    if args.compile:
        compile_blocks(student.module, args.device)
        compile_blocks(teacher, args.device)
    print(f"Student and teacher are built: {args.arch}/{args.patch_size}, head out_dim {args.out_dim}, "
          f"{sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters each.")
    return student, teacher


# ----------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------
class LossPlan(NamedTuple):
    """Which student tokens the head runs on, and the matched (student, teacher) entries of the loss."""
    student_rows: torch.Tensor  # (S,) flat rows of the student backbone outputs (MultiCropWrapper layout)
    entry_student: torch.Tensor  # (E,) row of the student output (index into student_rows) of each entry
    entry_teacher: torch.Tensor  # (E,) row of the flat teacher output (i * B + b) * T + t of each entry
    entry_weight: torch.Tensor  # (E,) 1 / (view pairs * valid entries of the entry's pair, per process)
    entry_is_cls: torch.Tensor  # (E,) True for the [CLS]-[CLS] entries


def make_loss_plan(pairs: torch.Tensor, teacher_idx: torch.Tensor, student_idx: torch.Tensor,
                   mask: torch.Tensor, view_tokens: Sequence[int], teacher_tokens: int,
                   counts_over_processes: bool = False) -> LossPlan:
    """Flatten the padded matches of a batch into loss entries (padding dropped).

    ``view_tokens[v]`` is the number of backbone rows per image of student view v (1 + N_v, or 1 for
    [CLS] only); ``teacher_tokens`` the same for the teacher. Each distinct student row appears once in
    ``student_rows`` even when it is matched in several pairs.

    ``counts_over_processes`` (training under DDP; every process must call it): a pair's valid entries are
    counted over the whole batch of all processes (an all-reduce of P numbers), so that once DDP has
    averaged the gradients each entry weighs the same in every process, as if one process held the whole
    batch. Processes hold different numbers of matched patches; [CLS] entries weigh the same either way.
    """
    if len(view_tokens) < NUM_GLOBAL:
        raise ValueError(f"Patch-Wise DINO needs at least {NUM_GLOBAL} views (the global crops), "
                         f"got {len(view_tokens)}")
    P, B, M = mask.shape
    if P == 0 or tuple(pairs.shape) != (P, 2) or teacher_idx.shape != mask.shape or student_idx.shape != mask.shape:
        raise ValueError(f"inconsistent matches: pairs {tuple(pairs.shape)}, indices {tuple(teacher_idx.shape)}, "
                         f"{tuple(student_idx.shape)}, mask {tuple(mask.shape)}")
    device = mask.device
    tokens = torch.as_tensor(list(view_tokens), device=device)  # (V,)
    view_start = B * (torch.cumsum(tokens, 0) - tokens)  # (V,) first flat row of each view
    t_view, s_view = pairs[:, 0, None, None], pairs[:, 1, None, None]  # (P, 1, 1)
    bad = ((t_view < 0) | (t_view >= NUM_GLOBAL) | (s_view < 0) | (s_view >= len(view_tokens))).any()
    s_view = s_view.clamp(0, len(view_tokens) - 1)
    image = torch.arange(B, device=device)[None, :, None]  # (1, B, 1)
    bad |= (mask & ((teacher_idx < 0) | (teacher_idx >= teacher_tokens) | (student_idx < 0)
                    | (student_idx >= tokens[s_view]))).any()
    if bad.item():
        raise ValueError("matches refer to views or tokens that the crops do not have")
    teacher_rows = (t_view * B + image) * teacher_tokens + teacher_idx  # (P, B, M)
    student_rows = view_start[s_view] + image * tokens[s_view] + student_idx  # (P, B, M)
    per_pair = mask.sum((1, 2)).float()  # (P,) valid entries of each pair in this process
    if counts_over_processes:
        per_pair = utils.all_reduce_mean(per_pair)  # (P,) the same count per process for every process
    weight = (1.0 / (P * per_pair.clamp_min(1)))[:, None, None].expand(P, B, M)  # (P, B, M)
    keep = mask.flatten().nonzero().squeeze(1)  # (E,)
    rows, inverse = torch.unique(student_rows.flatten()[keep], return_inverse=True)  # (S,), (E,)
    return LossPlan(rows, inverse, teacher_rows.flatten()[keep], weight.flatten()[keep],
                    teacher_idx.flatten()[keep] == 0)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two (R, K) tensors without an (R, K) temporary: (R,)."""
    return torch.einsum("rk,rk->r", a, b)


class _PrecomputedGradient(torch.autograd.Function):
    """``value``, whose gradient with respect to ``logits`` is ``grad``, both computed by the caller.

    ``PatchWiseDINOLoss`` computes the soft-target cross-entropy and its gradient in one chunked pass, in
    place of the (S, K) targets, so that no log-softmax is stored and no second (S, K) buffer is made.
    The backward pass scales ``grad`` in place: it can run once.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        ctx.dtype = logits.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output).to(ctx.dtype), None, None


class PatchWiseDINOLoss(nn.Module):
    """DINO's cross-entropy between the sharpened, centred teacher and the student, on [CLS] and on
    every matched patch pair; one center row per teacher token position.

    For a view pair (teacher global view i, student view v) the loss is the mean over its valid
    (image, token) entries of ``-softmax((t - center) / teacher_temp) . log_softmax(s / student_temp)``;
    the total is the mean over view pairs. With [CLS]-only matches it is DINO's loss.
    """

    def __init__(self, out_dim: int, num_positions: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, chunk_elements: Optional[int] = None):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.chunk_elements = chunk_elements  # elements per (rows, K) temporary; None: 2^26 on GPU, 2^21 on CPU
        self.register_buffer("center", torch.zeros(1, num_positions, out_dim))
        warmup = max(0, min(warmup_teacher_temp_epochs, nepochs))
        self.teacher_temp_schedule = np.concatenate((np.linspace(warmup_teacher_temp, teacher_temp, warmup),
                                                     np.full(max(nepochs - warmup, 1), teacher_temp)))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, plan: LossPlan,
                epoch: int) -> tuple:
        """``student_out`` (S, K): head outputs at ``plan.student_rows``; ``teacher_out`` (2B, T, K).

        Returns the loss and a dict of detached diagnostics; updates the center."""
        _, T, K = teacher_out.shape
        if tuple(self.center.shape[1:]) != (T, K):
            raise ValueError(f"teacher output has {T} tokens of dim {K}; the center is {tuple(self.center.shape)}")
        if tuple(student_out.shape) != (len(plan.student_rows), K):
            raise ValueError(f"student output {tuple(student_out.shape)} does not match the plan's "
                             f"{len(plan.student_rows)} rows of dim {K}")
        temp = float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)])
        rows = max(1, (self.chunk_elements or (2 ** 26 if teacher_out.is_cuda else 2 ** 21)) // K)
        # float32 throughout, also under mixed precision: autocast would run the row dot products in half
        with torch.no_grad(), torch.autocast(student_out.device.type, enabled=False):
            targets, teacher_entropy = self._targets(teacher_out, plan, len(student_out), temp, rows)
            mass = torch.zeros(len(student_out), device=student_out.device)  # (S,) = sum_k targets
            mass.index_add_(0, plan.entry_student, plan.entry_weight)
            row_loss, grad = self._student_pass(student_out, targets, mass, rows)
        loss = _PrecomputedGradient.apply(student_out, row_loss.sum(), grad)
        stats = self._diagnostics(row_loss, mass, teacher_entropy.view(-1, T), plan)
        self.update_center(teacher_out)
        return loss, stats

    @torch.no_grad()
    def _targets(self, teacher_out: torch.Tensor, plan: LossPlan, num_student: int, temp: float,
                 rows: int) -> tuple:
        """Per student row, the weighted sum of the teacher distributions it is matched to (S, K), and the
        entropy of every teacher row (2B*T,). Teacher tokens are processed about ``rows`` at a time, in
        reused buffers: no float32 copy of the whole teacher output is ever held."""
        N, T, K = teacher_out.shape
        device = teacher_out.device
        images, span = max(1, rows // T), min(T, rows)  # a block: several whole images or part of one
        blocks = [(n, a) for n in range(0, N, images) for a in range(0, T, span)]
        starts = [n * T + a for n, a in blocks] + [N * T]  # blocks are contiguous ranges of flat rows
        order = torch.argsort(plan.entry_teacher)  # entries sorted by teacher row
        bounds = torch.searchsorted(plan.entry_teacher[order], torch.tensor(starts, device=device)).tolist()
        targets = torch.zeros(num_student, K, device=device)  # (S, K)
        entropy = torch.empty(N * T, device=device)  # (2B*T,)
        z_buf, log_q_buf = torch.empty(2, min(images * span, N * T), K, device=device)
        q_buf = torch.empty(max(b - a for a, b in zip(bounds[:-1], bounds[1:])), K, device=device)
        for k, (n, a) in enumerate(blocks):
            block = teacher_out[n:n + images, a:a + span]  # (n', t, K)
            z = z_buf[:block.shape[0] * block.shape[1]]  # (n'*t, K)
            torch.sub(block, self.center[:, a:a + span], out=z.view(block.shape)).div_(temp)
            log_q = torch.log_softmax(z, -1, out=log_q_buf[:len(z)])  # (n'*t, K)
            q = torch.clamp(log_q, min=EXP_FLOOR, out=z).exp_()  # (n'*t, K)
            entropy[starts[k]:starts[k] + len(q)] = -_row_dot(q, log_q)
            sel = order[bounds[k]:bounds[k + 1]]  # (e,) entries whose teacher row is in this block
            q_e = torch.index_select(q, 0, plan.entry_teacher[sel] - starts[k], out=q_buf[:len(sel)])  # (e, K)
            targets.index_add_(0, plan.entry_student[sel], q_e.mul_(plan.entry_weight[sel, None]))
        return targets, entropy

    @torch.no_grad()
    def _student_pass(self, student_out: torch.Tensor, targets: torch.Tensor, mass: torch.Tensor,
                      rows: int) -> tuple:
        """Per student row r, the weighted cross-entropy of its entries,
        ``mass_r * logsumexp(s_r / T) - targets_r . s_r / T`` (S,), and, in place of ``targets``, the
        gradient ``(mass_r * softmax(s_r / T) - targets_r) / T`` (S, K)."""
        S, K = student_out.shape
        row_loss = torch.empty(S, device=student_out.device)  # (S,)
        x_buf = torch.empty(min(rows, S), K, device=student_out.device)  # reused: no allocation per chunk
        for i in range(0, S, rows):
            t, m = targets[i:i + rows], mass[i:i + rows]  # (c, K), (c,)
            x = x_buf[:len(t)].copy_(student_out[i:i + rows]).div_(self.student_temp)  # (c, K) float32
            dot = _row_dot(t, x)  # (c,)
            x_max = x.amax(-1)  # (c,)
            sum_exp = x.sub_(x_max[:, None]).clamp_min_(EXP_FLOOR).exp_().sum(-1)  # (c,); x holds exp(x - max)
            row_loss[i:i + rows] = m * (x_max + sum_exp.log()) - dot
            x.mul_((m / sum_exp)[:, None])  # mass * softmax
            torch.sub(x, t, out=t).div_(self.student_temp)
        return row_loss, targets

    @staticmethod
    def _diagnostics(row_loss: torch.Tensor, mass: torch.Tensor, teacher_entropy: torch.Tensor,
                     plan: LossPlan) -> dict:
        """Cross-entropy, teacher entropy and KL(teacher || student) for [CLS] and for patch tokens.

        Cross-entropy and KL are means over the matched entries with the loss's own weights (so with
        [CLS] only, ``loss_cls`` is the loss); the entropy is the mean over all teacher tokens."""
        row_is_cls = torch.zeros_like(mass, dtype=torch.bool).index_put_((plan.entry_student,), plan.entry_is_cls)
        entry_entropy = plan.entry_weight * teacher_entropy.flatten()[plan.entry_teacher]  # (E,) weighted
        stats = {}
        for name, rows, entries in (("cls", row_is_cls, plan.entry_is_cls),
                                    ("patch", ~row_is_cls, ~plan.entry_is_cls)):
            if name == "patch" and teacher_entropy.shape[1] == 1:
                break
            weight = (mass * rows).sum().clamp_min(1e-12)
            ce = (row_loss * rows).sum() / weight
            stats[f"loss_{name}"] = ce
            stats[f"teacher_entropy_{name}"] = teacher_entropy[:, 0].mean() if name == "cls" else \
                teacher_entropy[:, 1:].mean()
            stats[f"kl_{name}"] = ce - (entry_entropy * entries).sum() / weight
        return stats

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA of the per-position batch mean of the teacher outputs, averaged over all processes."""
        batch_center = teacher_out.sum(0, keepdim=True, dtype=torch.float32) / len(teacher_out)  # (1, T, K)
        utils.all_reduce_mean(batch_center)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


# ----------------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------------
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


def build_optimizer(args: argparse.Namespace, student: nn.Module) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA), SGD or LARS over two groups: weights with decay, biases/norms without.
    The learning rate and weight decay are set at every step by the schedules."""
    groups = utils.get_params_groups(student)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, fused=args.device.type == "cuda")
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0, momentum=0.9)
    if args.optimizer == "lars":
        return LARS(groups)
    raise utils.UserError(f"unknown --optimizer {args.optimizer!r}: choose adamw, sgd or lars")


def build_schedules(args: argparse.Namespace, niter_per_ep: int) -> dict:
    """Per-iteration lr (linear scaling with the total batch, warm-up, cosine), weight decay, teacher momentum."""
    total_batch = args.batch_size_per_gpu * args.world_size
    return {
        "lr": utils.cosine_scheduler(args.lr * total_batch / 256.0, args.min_lr, args.epochs, niter_per_ep,
                                     warmup_epochs=args.warmup_epochs),
        "wd": utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter_per_ep),
        "momentum": utils.cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, niter_per_ep),
    }


class Precision(NamedTuple):
    """Autocast settings: ``dtype`` None trains in float32; ``scaler`` only with float16."""
    device_type: str
    dtype: Optional[torch.dtype]
    scaler: Optional[torch.amp.GradScaler]

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)


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


def setup_precision(args: argparse.Namespace) -> Precision:
    device_type = args.device.type
    if not args.use_fp16:
        return Precision(device_type, None, None)
    if device_type != "cuda":
        print("--use_fp16 asks for half precision, which needs a CUDA GPU: training in float32 on the CPU")
        return Precision(device_type, None, None)
    if args.amp_dtype == "bfloat16":
        if not torch.cuda.is_bf16_supported():
            raise utils.UserError("this GPU does not support bfloat16: use --amp_dtype float16")
        print("Mixed precision: bfloat16 autocast (no gradient scaler)")
        return Precision(device_type, torch.bfloat16, None)
    print("Mixed precision: float16 autocast with a gradient scaler")
    return Precision(device_type, torch.float16, torch.amp.GradScaler("cuda"))


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
class TrainState(NamedTuple):
    student: nn.Module  # MultiCropWrapper, DDP-wrapped in training
    teacher: nn.Module  # MultiCropWrapper, no gradients
    dino_loss: PatchWiseDINOLoss
    optimizer: torch.optim.Optimizer
    precision: Precision


def view_token_counts(crops: Sequence[torch.Tensor], patch_size: int, all_tokens: bool) -> list:
    """Backbone output rows per image of each view: 1 + grid cells, or 1 for [CLS] only."""
    return [1 + (c.shape[-2] // patch_size) * (c.shape[-1] // patch_size) if all_tokens else 1 for c in crops]


class NonFiniteLoss(utils.UserError):
    """The loss is NaN or infinite (in any process: it is all-reduced first)."""

    def __init__(self, value: float, epoch: int):
        super().__init__(f"the loss is {value} at epoch {epoch}: training stopped before this update")
        self.value = value


def train_step(state: TrainState, batch: MultiCropBatch, epoch: int, lr: float, wd: float, momentum: float,
               args: argparse.Namespace) -> dict:
    """One optimisation step of the student and one EMA step of the teacher; returns the (all-reduced)
    loss and diagnostics as floats. Raises ``NonFiniteLoss`` on a non-finite loss, before any update."""
    student, teacher, dino_loss, optimizer, precision = state
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if i == 0:  # only the weights are regularised
            group["weight_decay"] = wd
    device = next(teacher.parameters()).device
    crops = [c.to(device, non_blocking=True) for c in batch.crops]  # V x (B, 3, S, S)
    patch_size, B = unwrap(student).backbone.patch_size, len(crops[0])
    view_tokens = view_token_counts(crops, patch_size, args.patch_loss)
    plan = make_loss_plan(*(t.to(device, non_blocking=True) for t in batch[1:]), view_tokens, view_tokens[0],
                          counts_over_processes=True)
    with precision.autocast():
        with torch.no_grad():
            teacher_out = teacher(crops[:NUM_GLOBAL], all_tokens=args.patch_loss)  # (2B*T, K)
        teacher_out = teacher_out.unflatten(0, (NUM_GLOBAL * B, view_tokens[0]))  # (2B, T, K)
        student_out = student(crops, plan.student_rows, all_tokens=args.patch_loss)  # (S, K)
        loss, stats = dino_loss(student_out, teacher_out, plan, epoch)
    del teacher_out, student_out  # the loss holds its gradient; free the (rows, K) outputs before backward
    values = utils.all_reduce_mean(torch.stack([loss.detach().float(), *stats.values()]))  # (1 + n,)
    values = dict(zip(["loss", *stats], values.tolist()))
    if not math.isfinite(values["loss"]):
        raise NonFiniteLoss(values["loss"], epoch)
    optimizer.zero_grad(set_to_none=True)
    scaler = precision.scaler
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None and args.clip_grad:
        scaler.unscale_(optimizer)  # clip the true gradients
    if args.clip_grad:
        utils.clip_gradients(student, args.clip_grad)
    utils.cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    update_teacher(student, teacher, momentum)
    return values


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    teacher_params = list(teacher.parameters())
    student_params = [p.detach() for p in unwrap(student).parameters()]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)


def epoch_seed(seed: int, epoch: int, rank: int, samples_done: int = 0) -> int:
    """The seed of the model's randomness (stochastic depth) in ``epoch`` on ``rank``; ``samples_done``
    when an epoch resumes in its middle without the saved generator states."""
    return int(np.random.SeedSequence([seed, epoch, rank] + ([samples_done] if samples_done else []))
               .generate_state(1)[0])


# ----------------------------------------------------------------------------------------------------
# Long runs: stop signals, checkpoints inside an epoch, resume
# ----------------------------------------------------------------------------------------------------
class StopFlag:
    """While active (``with``), SIGTERM and SIGINT only record the signal in ``signum``; the training loop
    checks it after each iteration, all processes agree, and they stop together after a checkpoint."""

    def __init__(self):
        self.signum = 0
        self._previous: dict = {}

    def _record(self, signum: int, frame) -> None:
        self.signum = signum

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():  # the only thread that may set handlers
            self._previous = {signum: signal.signal(signum, self._record) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclasses.dataclass
class RunControl:
    """Shared by the epochs of a run: the stop flag, and the last checkpoint written (named in messages)."""
    stop: StopFlag
    last_checkpoint: str = "none (nothing was saved yet)"


class ResumePoint(NamedTuple):
    """Where a run continues: in ``epoch``, after ``samples_done`` of its samples (all processes together)."""
    epoch: int = 0
    samples_done: int = 0
    rng: Optional[dict] = None  # this process's generator states at that point; None: seed afresh
    meters: Optional[list] = None  # [printed, diagnostics] {name: [total, count]} of the epoch so far
    bad_images: int = 0  # images skipped so far in the epoch, all processes


def sum_over_processes(value: int, device: torch.device) -> int:
    """Sum of an integer over all processes; a collective that every process must call."""
    if utils.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(tensor)
    return int(tensor.item())


def rng_states() -> dict:
    """This process's torch (CPU, current CUDA device), numpy and ``random`` generator states as tensors and
    numbers, which ``weights_only=True`` loads."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {"torch": torch.get_rng_state(), "numpy_key": torch.from_numpy(key.astype(np.int64)),
              "numpy_pos": int(pos), "numpy_gauss": [int(has_gauss), float(gauss)],
              "python": torch.tensor(internal, dtype=torch.int64), "python_version": version,
              "python_gauss": gauss_next}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    np.random.set_state(("MT19937", states["numpy_key"].numpy().astype(np.uint32), states["numpy_pos"],
                         *states["numpy_gauss"]))
    random.setstate((states["python_version"], tuple(states["python"].tolist()), states["python_gauss"]))


def gather_rng_states() -> list:
    """Every process's ``rng_states()`` in rank order; a collective."""
    if utils.get_world_size() == 1:
        return [rng_states()]
    states = [None] * utils.get_world_size()
    torch.distributed.all_gather_object(states, rng_states())
    return states


def save_checkpoint(args: argparse.Namespace, state: TrainState, epoch: int, progress: Optional[dict] = None,
                    archive: Optional[int] = None) -> str:
    """Write ``output_dir/checkpoint.pth`` (rank 0) and return ``"PATH (epoch E, iteration I)"``.

    DINO's layout: student (DDP keys), teacher, optimizer, ``epoch`` (the one to run next), args, center
    (``dino_loss``), scaler; plus ``iteration`` (done in ``epoch``) and ``world_size``. A checkpoint inside
    an epoch adds ``progress``: samples done, every process's generator states, the epoch's meter sums and
    skipped images. The file is replaced atomically and the one it replaces stays as ``checkpoint.prev.pth``.
    ``archive``: also keep a copy as ``checkpoint{archive:04}.pth``."""
    checkpoint = {"student": state.student.state_dict(), "teacher": state.teacher.state_dict(),
                  "optimizer": state.optimizer.state_dict(), "epoch": epoch, "args": args,
                  "dino_loss": state.dino_loss.state_dict(), "iteration": 0, "world_size": args.world_size,
                  **(progress or {})}
    if state.precision.scaler is not None:
        checkpoint["fp16_scaler"] = state.precision.scaler.state_dict()
    path = os.path.join(args.output_dir, CHECKPOINT)
    if utils.is_main_process():
        utils.atomic_save(checkpoint, path, previous=os.path.join(args.output_dir, PREVIOUS_CHECKPOINT))
        if archive is not None:
            utils.atomic_save(checkpoint, os.path.join(args.output_dir, f"checkpoint{archive:04}.pth"))
    return f"{path} (epoch {epoch}, iteration {checkpoint['iteration']})"


def load_run_checkpoint(args: argparse.Namespace) -> tuple:
    """``(checkpoint, path)`` of the run in ``output_dir`` to continue, or ``(None, "")`` for a new run.

    When ``checkpoint.pth`` cannot be read (truncated, corrupt), ``checkpoint.prev.pth`` is used with a
    warning and the bad file is moved to ``checkpoint.pth.corrupt``; when neither can be read the run stops
    rather than start over. A checkpoint refused as unsafe stops the run (it is intact: falling back would
    lose its progress). A checkpoint of another model is refused (``MODEL_ARGS``)."""
    path, previous = (os.path.join(args.output_dir, name) for name in (CHECKPOINT, PREVIOUS_CHECKPOINT))
    problems = []
    for candidate in (path, previous):
        if not os.path.isfile(candidate):
            continue
        try:
            checkpoint = utils.load_checkpoint(candidate)
        except utils.CheckpointRefused:
            raise
        except utils.UserError as exc:
            problems.append(str(exc))
            continue
        if not isinstance(checkpoint, dict) or not {"student", "teacher", "optimizer", "epoch"} <= set(checkpoint):
            problems.append(f"{candidate} is not a Patch-Wise DINO training checkpoint")
            continue
        check_same_model(args, checkpoint, candidate)
        if candidate == previous:
            print(f"WARNING: {problems[0] if problems else path + ' is missing'}; resuming from the previous "
                  f"checkpoint {previous}", file=sys.stderr, flush=True)
            utils.barrier()  # every process has read the files before the bad one is moved away
            if problems and utils.is_main_process() and os.path.isfile(path):
                os.replace(path, path + ".corrupt")
        return checkpoint, candidate
    if problems:
        raise utils.UserError(f"cannot continue the run in {args.output_dir}: {'; '.join(problems)}; to start a new "
                              f"run, move these files out of {args.output_dir} or pass another --output_dir")
    return None, ""


def check_same_model(args: argparse.Namespace, checkpoint: dict, path: str) -> None:
    """Refuse to continue a run whose model or optimizer settings differ from this run's, naming them."""
    saved = checkpoint.get("args")
    if not isinstance(saved, argparse.Namespace):
        return
    names = MODEL_ARGS + (("global_size",) if args.patch_loss else ())  # the center has a row per position
    differences = [f"--{name} {getattr(saved, name)} (this run: {getattr(args, name)})" for name in names
                   if hasattr(saved, name) and getattr(saved, name) != getattr(args, name)]
    if differences:
        raise utils.UserError(f"{path} was trained with {', '.join(differences)}: pass the same settings to "
                              f"continue that run, or another --output_dir for a new one")


def restore(args: argparse.Namespace, state: TrainState, checkpoint: Optional[dict], path: str) -> ResumePoint:
    """Load weights, optimizer, center and scaler from ``checkpoint``; returns where to continue."""
    if checkpoint is None:
        return ResumePoint()
    parts = {"student": state.student, "teacher": state.teacher, "optimizer": state.optimizer,
             "dino_loss": state.dino_loss, "fp16_scaler": state.precision.scaler}
    try:
        for name, part in parts.items():
            if part is not None and name in checkpoint:
                part.load_state_dict(checkpoint[name])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise utils.UserError(f"cannot resume from {path}, written with other settings "
                              f"({str(exc).strip().splitlines()[0][:200]}): pass the settings of that run or "
                              f"another --output_dir") from None
    epoch, iteration = int(checkpoint["epoch"]), int(checkpoint.get("iteration", 0))
    print(f"Resuming from {path}: epoch {epoch}, iteration {iteration}")
    if not iteration:
        return ResumePoint(epoch)
    rng = checkpoint.get("rng") or []
    same_layout = (checkpoint.get("world_size") == args.world_size == len(rng) and
                   getattr(checkpoint.get("args"), "batch_size_per_gpu", None) == args.batch_size_per_gpu)
    if not same_layout:
        print(f"Note: {path} was written with another number of processes or batch size: epoch {epoch} goes on "
              f"with the images it had not seen, but not bit-identically to an uninterrupted run")
    samples_done = checkpoint.get("samples_done", iteration * args.batch_size_per_gpu * args.world_size)
    return ResumePoint(epoch, int(samples_done), rng[args.rank] if same_layout else None,
                       checkpoint.get("epoch_meters"), int(checkpoint.get("bad_images", 0)))


def drop_log_lines_from(output_dir: str, epoch: int) -> None:
    """Keep only the ``log.txt`` lines of epochs before ``epoch``: a resumed run writes the later ones again."""
    path = os.path.join(output_dir, "log.txt")
    if not utils.is_main_process() or not os.path.isfile(path):
        return

    def earlier(line: str) -> bool:
        try:
            return json.loads(line)["epoch"] < epoch
        except (ValueError, TypeError, KeyError):
            return True  # not a line of ours: keep it

    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if earlier(line)]
    if len(kept) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
def loggers_from(sums: Optional[list]) -> tuple:
    """The printed and the diagnostic ``MetricLogger`` of an epoch, holding the sums saved mid-epoch."""
    loggers = utils.MetricLogger(delimiter="  "), utils.MetricLogger()
    loggers[0].add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.3e}"))  # warm-up lrs are ~1e-6
    for logger, saved in zip(loggers, sums or ({}, {})):
        for name, (total, count) in saved.items():
            logger.meters[name].total, logger.meters[name].count = float(total), int(count)
    return loggers


def train_one_epoch(state: TrainState, loader: torch.utils.data.DataLoader, schedules: dict, epoch: int,
                    args: argparse.Namespace, start: Optional[ResumePoint] = None,
                    control: Optional[RunControl] = None) -> Optional[dict]:
    """Train for one epoch, or its rest from ``start`` (the sampler already set to it); returns the epoch
    averages of the printed and diagnostic meters and ``bad_images``, or None when a stop signal ended the
    epoch early (after a checkpoint). Writes ``checkpoint.pth`` every ``--saveckp_iters`` iterations.

    Before each step all processes agree on whether to stop: a signal that arrived during the previous
    step (or data workers gone with it) stops every process at the same iteration."""
    start, control = start or ResumePoint(epoch), control or RunControl(StopFlag())
    total_batch = args.batch_size_per_gpu * args.world_size
    niter, first = len(schedules["lr"]) // args.epochs, start.samples_done // total_batch
    total = first + len(loader)
    batches = iter(loader)  # making it draws the data workers' base seed from torch's generator: seed after
    if start.rng is not None:
        set_rng_states(start.rng)
    else:
        torch.manual_seed(epoch_seed(args.seed, epoch, args.rank, start.samples_done))
    logger, diagnostics = loggers_from(start.meters)
    bad_images = start.bad_images if utils.is_main_process() else 0
    last = time.time()

    def checkpoint_after(done: int) -> None:  # a collective: the generator states of all processes
        sums = [{name: [m.total, m.count] for name, m in lg.meters.items()} for lg in (logger, diagnostics)]
        control.last_checkpoint = save_checkpoint(args, state, epoch, {
            "iteration": done, "samples_done": start.samples_done + (done - first) * total_batch,
            "rng": gather_rng_states(), "epoch_meters": sums,
            "bad_images": sum_over_processes(bad_images, args.device)})

    progress = logger.log_every(until_stopped(batches, control.stop), args.print_freq,
                                f"Epoch: [{epoch}/{args.epochs}]", total, first)
    for it, item in enumerate(progress, start=first):
        if sum_over_processes(int(item is None or control.stop.signum != 0), args.device):
            checkpoint_after(it)
            report_stop(control, f"epoch {epoch}, iteration {it} of {total}")
            return None
        batch, skipped = item
        bad_images += skipped
        if not (args.skip_bad_images and sum_over_processes(int(batch is None), args.device)):
            step = min(niter * epoch + it, len(schedules["lr"]) - 1)
            lr, wd = float(schedules["lr"][step]), float(schedules["wd"][step])
            try:
                values = train_step(state, batch, epoch, lr, wd, float(schedules["momentum"][step]), args)
            except NonFiniteLoss as exc:
                raise utils.UserError(
                    f"the loss is {exc.value} at epoch {epoch}, iteration {it}: training stopped; the last "
                    f"checkpoint is {control.last_checkpoint} (continue from it with a lower --lr, --clip_grad, or "
                    f"--use_fp16 false; if the loss is again not finite at the same iteration, its weights had "
                    f"already diverged: copy checkpoint.prev.pth over checkpoint.pth and continue from that)") from None
            now = time.time()
            shown = {k: values.pop(k) for k in ("loss", "loss_cls", "loss_patch") if k in values}
            logger.update(**shown, lr=lr, wd=wd, img_s=total_batch / max(now - last, 1e-9))
            diagnostics.update(**values)
            last = now
        if args.saveckp_iters and (it + 1) % args.saveckp_iters == 0 and it + 1 < total:
            checkpoint_after(it + 1)
    bad_images = sum_over_processes(bad_images, args.device)
    print(f"Averaged stats: {logger}" + (f"  bad_images: {bad_images}" if args.skip_bad_images else ""))
    averages = {name: meter.global_avg for name, meter in {**logger.meters, **diagnostics.meters}.items()}
    return {**averages, "bad_images": bad_images}


def until_stopped(batches, stop: StopFlag):
    """The items of ``batches``, then None in place of an error if a stop signal has arrived (data workers
    that got the signal too are gone: the iteration cannot be fetched, but a checkpoint can be written)."""
    while True:
        try:
            item = next(batches)
        except StopIteration:
            return
        except Exception:
            if not stop.signum:
                raise
            yield None
            return
        yield item


def report_stop(control: RunControl, where: str) -> None:
    name = signal.Signals(control.stop.signum).name if control.stop.signum else "a signal to another process"
    print(f"Stopped by {name} after {where}: checkpoint saved to {control.last_checkpoint}; run the same "
          f"command to continue from there", flush=True)


def train(state: TrainState, loader: torch.utils.data.DataLoader, schedules: dict, args: argparse.Namespace,
          start: ResumePoint, control: RunControl, monitor: Optional[utils.KNNMonitor] = None) -> None:
    """Epochs ``start.epoch`` to ``--epochs``, each ended by the k-NN ``monitor`` (when due), a ``log.txt``
    line and a checkpoint; returns early when a stop signal arrives (after a checkpoint)."""
    for epoch in range(start.epoch, args.epochs):
        resume_point = start if epoch == start.epoch else ResumePoint(epoch)
        loader.sampler.set_epoch(epoch)
        loader.sampler.set_start(resume_point.samples_done)
        try:
            stats = train_one_epoch(state, loader, schedules, epoch, args, resume_point, control)
        except RuntimeError as exc:  # raised wherever the main thread is when torch learns a worker died
            if "DataLoader worker (pid" not in str(exc):
                raise
            raise utils.UserError(f"{str(exc).strip().splitlines()[0].strip()} (out of memory?): lower "
                                  f"--num_workers and run the same command to continue from the last checkpoint, "
                                  f"{control.last_checkpoint}") from None
        if stats is None:
            return
        bad_images = stats.pop("bad_images")
        knn = monitor.after_epoch(state.teacher.backbone, epoch, args.device) if monitor else {}
        # The log line goes first: a run stopped between the two redoes the epoch and rewrites its line.
        utils.append_json_log(args.output_dir, {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch,
                                                "bad_images": bad_images, **knn})
        archive = epoch if args.saveckp_freq and epoch % args.saveckp_freq == 0 else None
        control.last_checkpoint = save_checkpoint(args, state, epoch + 1, archive=archive)
        if sum_over_processes(int(control.stop.signum != 0), args.device) and epoch + 1 < args.epochs:
            report_stop(control, f"epoch {epoch}")
            return


def check_same_start(start: ResumePoint, checkpoint_path: Optional[str], device: torch.device) -> None:
    """Refuse to train when the processes resumed from different points (each node read its own
    --output_dir, e.g. a node-local disk): they would train different models in lockstep. A collective."""
    if utils.get_world_size() == 1:
        return
    mine = torch.tensor([start.epoch, start.samples_done], dtype=torch.int64, device=device)
    first = mine.clone()
    torch.distributed.broadcast(first, 0)
    if sum_over_processes(int(not torch.equal(mine, first)), device):
        raise utils.UserError(f"the processes resume from different points (here: epoch {start.epoch}, sample "
                              f"{start.samples_done} from {checkpoint_path or 'no checkpoint'}; rank 0: epoch "
                              f"{int(first[0])}, sample {int(first[1])}): --output_dir must be one folder that "
                              f"every node shares")


def prepare_output_dir(path: str) -> None:
    """Create ``path`` and check that a file can be written there."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):
            pass
    except OSError as exc:
        raise utils.UserError(f"--output_dir {path} is not a writable folder ({exc.strerror or exc}): "
                              f"choose another --output_dir") from None


def main(args: argparse.Namespace) -> TrainState:
    check_args(args)
    prepare_output_dir(args.output_dir)
    utils.init_distributed_mode(args)
    if args.device.type == "cpu" and keep_freed_memory():
        print("CPU training: freed memory is kept for reuse (glibc mallopt) instead of being mapped afresh each step")
    utils.fix_random_seeds(args.seed)  # the same initial weights in every process
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    checkpoint, checkpoint_path = load_run_checkpoint(args)  # before any work: a run of another model is refused
    if utils.is_main_process():
        utils.remove_partial_writes(args.output_dir, "checkpoint")  # checkpoint.pth, .prev, checkpointNNNN
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1, default=str)
    precision = setup_precision(args)
    loader = build_loader(args)
    monitor = utils.KNNMonitor(args.knn_data_path, args.global_size, args.knn_freq, args.epochs, args.knn_max_images,
                               args.batch_size_per_gpu, args.num_workers) if args.knn_data_path else None
    student, teacher = build_models(args)
    num_positions = 1 + (args.global_size // args.patch_size) ** 2 if args.patch_loss else 1
    dino_loss = PatchWiseDINOLoss(args.out_dim, num_positions, args.warmup_teacher_temp, args.teacher_temp,
                                  args.warmup_teacher_temp_epochs, args.epochs,
                                  center_momentum=args.center_momentum).to(args.device)
    state = TrainState(student, teacher, dino_loss, build_optimizer(args, student), precision)
    schedules = build_schedules(args, len(loader))
    total_batch = args.batch_size_per_gpu * args.world_size
    print(f"Total batch size {total_batch} ({args.world_size} processes x {args.batch_size_per_gpu}); effective "
          f"lr {args.lr * total_batch / 256:.3g} (--lr {args.lr} x {total_batch}/256); {len(loader)} steps/epoch")
    print(f"Loss: {'[CLS] + matched patch tokens' if args.patch_loss else '[CLS] only (vanilla DINO)'}; center "
          f"{tuple(dino_loss.center.shape)}. Collapse check: a loss stuck at ln(K) = {math.log(args.out_dim):.2f} "
          f"with KL ~ 0 is collapse (uniform if teacher entropy ~ ln(K), one-hot if ~ 0)")
    start = restore(args, state, checkpoint, checkpoint_path)
    check_same_start(start, checkpoint_path, args.device)
    control = RunControl(StopFlag())
    if checkpoint is not None:
        control.last_checkpoint = f"{checkpoint_path} (epoch {start.epoch}, iteration {checkpoint.get('iteration', 0)})"
    del checkpoint
    drop_log_lines_from(args.output_dir, start.epoch)
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)):
        print(f"torchrun restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: continuing from the last checkpoint")
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        print("WARNING: with torchrun's shared rendezvous store, restarted workers can find the addresses of the "
              "dead ones and fail to connect (pytorch/pytorch#135712): launch with "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --max-restarts=...", file=sys.stderr)
    start_time = time.time()
    print(f"Starting Patch-Wise DINO training from epoch {start.epoch} to {args.epochs}")
    with control.stop:
        train(state, loader, schedules, args, start, control, monitor)
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    return state


if __name__ == "__main__":
    utils.run_cli(main, argparse.ArgumentParser("Patch-Wise DINO", parents=[get_args_parser()]).parse_args())
