"""Patch-Wise DINO training: DINO self-distillation of a ViT plus a patch-level loss.

Reproduces the training of DINO (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021; facebookresearch/dino ``main_dino.py``) with the objective of Patch-Wise DINO
(Javidani et al., "Local-Global Self-Supervised Visual Representation Learning", 2023; the authors' code
defines the method): besides matching the [CLS] outputs of two views, the student matches the teacher on
every pair of patch tokens that show the same place of the image (``patch_matching.py``). The defaults are
the authors' (ViT-S/8, K = 10000, 6 images per GPU); everything else is DINO's. Read in DINO's order:
arguments, ``main`` (data, models, loss, optimizer, schedules, resume), ``train_one_epoch`` (the batch loop
with its stop point and mid-epoch checkpoints), the loss and its center, the multi-crop data with matches, the
models, the optimizer and schedules, and the k-NN monitor (``--knn_data_path``).

Deliberate differences from the authors' code are listed in the README (each image gets its own crops; the
student head runs only on matched tokens, which gives the same loss); ``run_control.py`` holds what long jobs need
(stop agreement, resumable sampler, checkpoints with fallback, random states); ``datasets.py`` reads the images.
"""
import argparse
import datetime
import functools
import json
import math
import os
import shutil
import sys
import time
from typing import NamedTuple, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import datasets
import eval_knn
import patch_matching
import run_control
import utils
import vision_transformer as vits
from transforms import DataAugmentationPatchWiseDINO

NUM_GLOBAL = 2
TRAIN_SUBSET_SEED = 0  # --max_images takes the same images whatever --seed is
KNN_MONITOR_K, KNN_MONITOR_T = 20, 0.07  # eval_knn.py's k = 20 result, DINO's temperature
KNN_MONITOR_SEED = 0  # the same image subset in every epoch and every run, so their curves compare
LR_REFERENCE_BATCH = 256  # --lr is the learning rate of a total batch of 256, scaled linearly (DINO)
# Elements of one (rows, K) float32 temporary of the loss: 256 MB on a GPU, 8 MB (cache-sized) on the CPU.
LOSS_CHUNK_ELEMENTS = {"cuda": 2 ** 26, "cpu": 2 ** 21}
# exp(x) for x below about -87.3 is a subnormal float32 (or 0), for which the CPU's vectorised exp takes a slow path:
# up to 10x slower on the very negative log-probabilities of a 0.04-temperature teacher. Arguments are clamped to
# -80 first, which changes a probability by at most exp(-80) = 1.8e-35.
EXP_FLOOR = -80.0
# A run continues only with the same model, head, method and optimizer (and crop size: the center has a row per
# position; and the number of per-patch ops when that augmentation is on).
SAME_SETTINGS = ("arch", "patch_size", "out_dim", "use_bn_in_head", "norm_last_layer", "patch_loss",
                 "patch_augmentation", "optimizer")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Patch-Wise DINO", add_help=False)
    at_least_1, at_least_0 = utils.bounded(int, low=1), utils.bounded(int, low=0)
    non_negative, fraction = utils.bounded(float, low=0), utils.bounded(float, low=0, high=1)
    temperature = utils.bounded(float, low=0, low_open=True, hint=" (DINO: 0.04 to 0.07)")
    # Model
    parser.add_argument("--arch", default="vit_small", choices=list(vits.VIT_ARCHS), help="ViT architecture")
    parser.add_argument("--patch_size", default=8, type=at_least_1,
                        help="side of a ViT patch in pixels (the authors' default 8; DINO's recipe: 16)")
    parser.add_argument("--out_dim", default=10000, type=at_least_1,
                        help="dimensionality K of the DINO head output (the authors' default 10000; DINO's: 65536)")
    parser.add_argument("--norm_last_layer", default=True, type=utils.bool_flag,
                        help="freeze the weight norm of the head's last layer (true is more stable)")
    parser.add_argument("--momentum_teacher", default=0.996, type=fraction,
                        help="base EMA momentum of the teacher, raised to 1 by a cosine schedule")
    parser.add_argument("--use_bn_in_head", default=False, type=utils.bool_flag,
                        help="batch norm in the head's MLP (SyncBatchNorm across GPUs)")
    # Temperature
    parser.add_argument("--warmup_teacher_temp", default=0.04, type=temperature, help="teacher temperature at epoch 0")
    parser.add_argument("--teacher_temp", default=0.04, type=temperature, help="teacher temperature after the warm-up")
    parser.add_argument("--warmup_teacher_temp_epochs", default=0, type=at_least_0,
                        help="epochs of linear warm-up of the teacher temperature")
    parser.add_argument("--center_momentum", default=0.9, type=fraction, help="EMA momentum of the center")
    # Optimisation
    parser.add_argument("--use_fp16", default=True, type=utils.bool_flag,
                        help="mixed precision on CUDA (see --amp_dtype); ignored on the CPU, which trains in fp32")
    parser.add_argument("--amp_dtype", default="float16", choices=["float16", "bfloat16"],
                        help="half type of --use_fp16: float16 uses a GradScaler, bfloat16 needs none (Ampere+)")
    parser.add_argument("--weight_decay", default=0.04, type=non_negative, help="initial weight decay")
    parser.add_argument("--weight_decay_end", default=0.4, type=non_negative,
                        help="final weight decay (cosine schedule)")
    parser.add_argument("--clip_grad", default=3.0, type=non_negative,
                        help="clip each parameter's gradient to this norm (0 disables)")
    parser.add_argument("--batch_size_per_gpu", default=6, type=at_least_1,
                        help="images per process and step (the authors' default 6; DINO's: 64)")
    parser.add_argument("--epochs", default=100, type=at_least_1, help="number of training epochs")
    parser.add_argument("--freeze_last_layer", default=1, type=at_least_0,
                        help="epochs during which the head's last layer is not updated")
    parser.add_argument("--lr", default=0.0005, type=non_negative,
                        help=f"peak learning rate for a total batch of {LR_REFERENCE_BATCH}, scaled linearly with "
                             f"the total batch")
    parser.add_argument("--warmup_epochs", default=10, type=at_least_0, help="epochs of linear learning-rate warm-up")
    parser.add_argument("--min_lr", default=1e-6, type=non_negative, help="learning rate at the end of the cosine")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "lars"],
                        help="adamw (recommended for ViTs), sgd or lars")
    parser.add_argument("--compile", default=False, type=utils.bool_flag,
                        help="torch.compile every block and the heads: the same loss, faster steps after the first "
                             "(which compile); needs a C++ compiler on the CPU; drop-path masks use another generator")
    parser.add_argument("--drop_path_rate", default=0.1, type=utils.bounded(float, low=0, high=1, high_open=True),
                        help="stochastic depth rate of the student")
    add_crop_and_data_args(parser)
    return parser


def add_crop_and_data_args(parser: argparse.ArgumentParser) -> None:
    """The multi-crop, patch-loss, data, output and distribution flags of ``get_args_parser``."""
    at_least_1, at_least_0 = utils.bounded(int, low=1), utils.bounded(int, low=0)
    # Multi-crop and the patch loss
    parser.add_argument("--global_crops_scale", default=(0.4, 1.0), type=float, nargs=2,
                        help="min and max area fraction of the global crops")
    parser.add_argument("--local_crops_number", default=8, type=at_least_0, help="number of local crops (0 disables)")
    parser.add_argument("--local_crops_scale", default=(0.05, 0.4), type=float, nargs=2,
                        help="min and max area fraction of the local crops")
    parser.add_argument("--global_size", default=224, type=at_least_1,
                        help="side of the global crops in pixels (a multiple of --patch_size)")
    parser.add_argument("--local_size", default=96, type=at_least_1,
                        help="side of the local crops in pixels (a multiple of --patch_size)")
    parser.add_argument("--resize", default=256, type=at_least_0,
                        help="resize every image to resize x resize before cropping, as the authors (0: crop the "
                             "original)")
    parser.add_argument("--patch_loss", default=True, type=utils.bool_flag,
                        help="add the loss on matched patch tokens; false trains vanilla DINO ([CLS] only)")
    parser.add_argument("--patch_augmentation", default=False, type=utils.bool_flag,
                        help="the authors' later per-patch augmentation: every patch of every view gets random "
                             "photometric ops of its own (colour jitter, vertical blur, sharpness, posterize) before "
                             "normalisation")
    parser.add_argument("--patch_augmentation_ops", default=4, type=utils.bounded(int, low=0, high=4),
                        help="how many of the 4 per-patch ops each patch gets, drawn without replacement and applied "
                             "in a random order (the authors': 4)")
    # Data, outputs, distribution
    parser.add_argument("--data_path", default=None, type=str,
                        help="folder of images, read recursively (only its train/ when it has one), CIFAR-10's python "
                             "folder, or MNIST-format files (train-images-idx3-ubyte[.gz], ...) (default: data/sample)")
    parser.add_argument("--output_dir", default=".", type=str, help="where checkpoints and logs go")
    parser.add_argument("--saveckp_freq", default=20, type=at_least_0,
                        help="keep checkpointNNNN.pth every this many epochs")
    parser.add_argument("--saveckp_iters", default=0, type=at_least_0,
                        help="also write checkpoint.pth every this many iterations, with the position inside the "
                             "epoch (0: only at the end of each epoch)")
    parser.add_argument("--skip_bad_images", default=False, type=utils.bool_flag,
                        help="skip images that cannot be decoded and count them per epoch (bad_images in log.txt) "
                             "instead of stopping with the file's name")
    parser.add_argument("--max_images", default=0, type=at_least_0,
                        help="train on a fixed random subset of at most this many images, the same for every --seed "
                             "(0: all of them), for short runs")
    parser.add_argument("--seed", default=0, type=at_least_0, help="random seed")
    knn_monitor_args(parser)  # --knn_data_path, --knn_freq, --knn_max_images
    cpus_per_process = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    parser.add_argument("--num_workers", default=max(1, min(10, cpus_per_process)), type=at_least_0,
                        help="data loading processes per training process (default 10, or this node's CPUs "
                             "divided by its training processes if fewer)")
    parser.add_argument("--print_freq", default=10, type=at_least_1, help="print progress every this many iterations")
    parser.add_argument("--dist_url", default="env://", type=str, help="url of the distributed process group")
    parser.add_argument("--local_rank", "--local-rank", default=0, type=int,
                        help="ignored: the launcher sets LOCAL_RANK (accepted for torch.distributed.launch)")


def check_args(args: argparse.Namespace) -> None:
    """The rules between flags (argparse checks each flag alone), one line each."""
    for flag, size in (("--global_size", args.global_size), ("--local_size", args.local_size)):
        if size % args.patch_size:
            raise utils.UserError(f"{flag} {size} is not a positive multiple of --patch_size {args.patch_size}")
    if args.patch_augmentation and args.patch_size < 3:
        raise utils.UserError(f"--patch_augmentation true needs --patch_size >= 3 (its 5-tap blur reflects 2 rows "
                              f"inside each patch), got {args.patch_size}")
    for flag, scale in (("--global_crops_scale", args.global_crops_scale),
                        ("--local_crops_scale", args.local_crops_scale)):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise utils.UserError(f"{flag} {scale[0]} {scale[1]} must satisfy 0 < min <= max <= 1")


# ----------------------------------------------------------------------------------------------------
# Set-up and training loop
# ----------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace, stop_signals: Sequence[int] = run_control.STOP_SIGNALS) -> "TrainState":
    """Train; ``stop_signals`` stop the run at an agreed point after a checkpoint (``run_control``), and the
    returned state's ``stopped_by`` names those that did (empty when the run reached --epochs)."""
    check_args(args)
    run_control.prepare_output_dir(args.output_dir)
    utils.init_distributed_mode(args)
    args.total_batch = args.batch_size_per_gpu * args.world_size
    utils.fix_random_seeds(args.seed)  # the same initial weights in every process
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    names = (SAME_SETTINGS + (("global_size",) if args.patch_loss else ())
             + (("patch_augmentation_ops",) if args.patch_augmentation else ()))
    run = run_control.RunControl(args, same_settings=names, stop_signals=stop_signals)
    run.load()  # before any work: a run of another model is refused
    if utils.is_main_process():
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1, default=str)

    # ============ data, student and teacher, loss, optimizer, schedules ... ============
    loader = build_loader(args)
    monitor = KNNMonitor(args.knn_data_path, args.global_size, args.knn_freq, args.epochs, args.knn_max_images,
                               args.batch_size_per_gpu, args.num_workers) if args.knn_data_path else None
    student, teacher = build_models(args)
    num_positions = 1 + (args.global_size // args.patch_size) ** 2 if args.patch_loss else 1
    dino_loss = PatchWiseDINOLoss(args.out_dim, num_positions, args.warmup_teacher_temp, args.teacher_temp,
                                  args.warmup_teacher_temp_epochs, args.epochs,
                                  center_momentum=args.center_momentum).to(args.device)
    state = TrainState(student, teacher, dino_loss, build_optimizer(args, student), setup_precision(args))
    schedules = build_schedules(args, len(loader))
    print(f"Total batch size {args.total_batch} ({args.world_size} processes x {args.batch_size_per_gpu}); "
          f"effective lr {args.lr * args.total_batch / LR_REFERENCE_BATCH:.3g} (--lr {args.lr} x "
          f"{args.total_batch}/{LR_REFERENCE_BATCH}); {len(loader)} steps/epoch")
    print(f"Loss: {'[CLS] + matched patch tokens' if args.patch_loss else '[CLS] only (vanilla DINO)'}; center "
          f"{tuple(dino_loss.center.shape)}. Collapse check: a loss stuck at ln(K) = {math.log(args.out_dim):.2f} "
          f"with KL ~ 0 is collapse (uniform if teacher entropy ~ ln(K), one-hot if ~ 0)")

    # ============ optionally resume training, then train ... ============
    start = run.restore({"student": student, "teacher": teacher, "optimizer": state.optimizer,
                         "dino_loss": dino_loss, "fp16_scaler": state.precision.scaler})
    start_time = time.time()
    print(f"Starting Patch-Wise DINO training from epoch {start.epoch} to {args.epochs}")
    with run, run.failures_explained():
        for epoch in range(start.epoch, args.epochs):
            train_stats = train_one_epoch(state, loader, schedules, epoch, args, run)
            if run.stopped:
                break
            knn = monitor.after_epoch(teacher.backbone, epoch, args.device) if monitor else {}
            if not run.end_epoch(epoch, {**{f"train_{k}": v for k, v in train_stats.items()}, **knn}):
                break
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    return state._replace(stopped_by=run.stopped_by)


def epoch_loggers() -> tuple:
    """The printed and the diagnostic ``MetricLogger`` of an epoch."""
    logger = utils.MetricLogger(delimiter="  ")
    logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.3e}"))  # warm-up lrs are ~1e-6
    return logger, utils.MetricLogger()


def train_one_epoch(state: "TrainState", loader: torch.utils.data.DataLoader, schedules: dict, epoch: int,
                    args: argparse.Namespace, run: run_control.RunControl) -> dict:
    """Train for one epoch (or its rest after a resume); returns the epoch averages of the printed and
    diagnostic meters (partial when a stop signal ended the epoch early: ``run.stopped``)."""
    logger, diagnostics = epoch_loggers()
    meters = (logger, diagnostics)
    first, batches = run.start_epoch(epoch, loader, meters)  # sampler, random state and meters of a resume
    total = first + len(loader)
    niter = len(schedules["lr"]) // args.epochs
    last = time.time()
    for it, item in enumerate(logger.log_every(batches, args.print_freq, f"Epoch: [{epoch}/{args.epochs}]", total,
                                               first), start=first):
        if run.should_stop(item):  # a stop signal reached some process: all stop here, after a checkpoint
            run.save_in_epoch(epoch, it, meters)
            run.report_stop(f"epoch {epoch}, iteration {it} of {total}")
            break
        batch = run.batch_to_train(item, epoch, it)  # None: some process's images all failed to decode
        if batch is not None:
            step = min(niter * epoch + it, len(schedules["lr"]) - 1)  # global training iteration
            lr, wd, momentum = (float(schedules[name][step]) for name in ("lr", "wd", "momentum"))
            values = train_step(state, batch, epoch, lr, wd, momentum, args)
            shown = {k: values.pop(k) for k in ("loss", "loss_cls", "loss_patch") if k in values}
            now = time.time()
            logger.update(**shown, lr=lr, wd=wd, img_s=args.total_batch / max(now - last, 1e-9))
            diagnostics.update(**values)
            last = now
        if run.checkpoint_due(it + 1, total):  # every --saveckp_iters
            run.save_in_epoch(epoch, it + 1, meters)
    else:
        bad_images = run.finish_epoch()
        print(f"Averaged stats: {logger}" + (f"  bad_images: {bad_images}" if args.skip_bad_images else ""))
    return {name: meter.global_avg for name, meter in {**logger.meters, **diagnostics.meters}.items()}


class TrainState(NamedTuple):
    student: nn.Module  # MultiCropWrapper, DDP-wrapped in training
    teacher: nn.Module  # MultiCropWrapper, no gradients
    dino_loss: "PatchWiseDINOLoss"
    optimizer: torch.optim.Optimizer
    precision: "Precision"
    stopped_by: tuple = ()  # the signals that stopped the run early (any process); () when it ran to its end


def view_token_counts(crops: Sequence[torch.Tensor], patch_size: int, all_tokens: bool) -> list:
    """Backbone output rows per image of each view: 1 + grid cells, or 1 for [CLS] only."""
    return [1 + (c.shape[-2] // patch_size) * (c.shape[-1] // patch_size) if all_tokens else 1 for c in crops]


def train_step(state: "TrainState", batch: "MultiCropBatch", epoch: int, lr: float, wd: float, momentum: float,
               args: argparse.Namespace) -> dict:
    """One optimisation step of the student and one EMA step of the teacher; returns the (all-reduced)
    loss and diagnostics as floats. Raises ``NonFiniteLoss`` on a non-finite loss, before any update."""
    student, teacher, dino_loss = state.student, state.teacher, state.dino_loss
    optimizer, precision = state.optimizer, state.precision
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if i == 0:  # only the weights are regularised
            group["weight_decay"] = wd
    device = next(teacher.parameters()).device
    crops = [c.to(device, non_blocking=True) for c in batch.crops]  # V x (B, 3, S, S)
    patch_size, B = unwrap(student).backbone.patch_size, len(crops[0])
    view_tokens = view_token_counts(crops, patch_size, args.patch_loss)
    plan = make_loss_plan(*(t.to(device, non_blocking=True) for t in batch[1:]), view_tokens, view_tokens[0])
    with precision.autocast():
        with torch.no_grad():
            teacher_out = teacher(crops[:NUM_GLOBAL], all_tokens=args.patch_loss)  # (2B*T, K)
        teacher_out = teacher_out.unflatten(0, (NUM_GLOBAL * B, view_tokens[0]))  # (2B, T, K)
        student_out = student(crops, plan.student_rows, all_tokens=args.patch_loss)  # (S, K)
        loss, stats = dino_loss(student_out, teacher_out, plan, epoch)
    del teacher_out, student_out  # the loss holds its gradient; free the (rows, K) outputs before backward
    values = all_reduce_mean(torch.stack([loss.detach().float(), *stats.values()]))  # (1 + n,)
    values = dict(zip(["loss", *stats], values.tolist()))
    if not math.isfinite(values["loss"]):
        raise run_control.NonFiniteLoss(values["loss"], epoch)
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


# ----------------------------------------------------------------------------------------------------
# Loss and center
# ----------------------------------------------------------------------------------------------------
class LossPlan(NamedTuple):
    """Which student tokens the head runs on, and the matched (student, teacher) entries of the loss."""
    student_rows: torch.Tensor  # (S,) flat rows of the student backbone outputs (MultiCropWrapper layout)
    entry_student: torch.Tensor  # (E,) row of the student output (index into student_rows) of each entry
    entry_teacher: torch.Tensor  # (E,) row of the flat teacher output (i * B + b) * T + t of each entry
    entry_weight: torch.Tensor  # (E,) 1 / (view pairs * images * valid entries of the entry's image and pair)
    entry_is_cls: torch.Tensor  # (E,) True for the [CLS]-[CLS] entries


def reference_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, plan: LossPlan, center: torch.Tensor,
                   teacher_temp: float, student_temp: float = 0.1) -> torch.Tensor:
    """The loss, plainly: ``sum_e w_e * H(softmax((t_e - c_e) / teacher_temp), log_softmax(s_e / student_temp))``
    over the entries e of ``plan`` (weights ``entry_weight``), with t_e the teacher output at the entry's
    teacher token, c_e the center row of that token position and s_e the student output of the entry.

    ``student_out`` (S, K) at ``plan.student_rows``, ``teacher_out`` (2B, T, K), ``center`` (1, T, K).
    Holds (E, K) tensors: ``PatchWiseDINOLoss`` computes the same in chunks, with its gradient."""
    T = teacher_out.shape[1]
    t = teacher_out.flatten(0, 1)[plan.entry_teacher].float()  # (E, K)
    q = torch.softmax((t - center[0, plan.entry_teacher % T]) / teacher_temp, dim=-1)  # (E, K)
    log_p = torch.log_softmax(student_out[plan.entry_student].float() / student_temp, dim=-1)  # (E, K)
    return (plan.entry_weight * -(q * log_p).sum(-1)).sum()


def make_loss_plan(pairs: torch.Tensor, teacher_idx: torch.Tensor, student_idx: torch.Tensor,
                   mask: torch.Tensor, view_tokens: Sequence[int], teacher_tokens: int) -> LossPlan:
    """Flatten the padded matches of a batch into loss entries (padding dropped).

    ``view_tokens[v]`` is the number of backbone rows per image of student view v (1 + N_v, or 1 for
    [CLS] only); ``teacher_tokens`` the same for the teacher. Each distinct student row appears once in
    ``student_rows`` even when it is matched in several pairs.

    Weights, as the authors' loss: for each view pair, the mean over the images of the mean over that
    image's valid entries ([CLS] counts as one), then the mean over pairs. Under DDP, which averages the
    gradients of equal local batches, every image of the global batch weighs 1 / (total batch): no count
    crosses processes.
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
    per_image = mask.sum(2, keepdim=True).float()  # (P, B, 1) valid entries of each image in each pair
    weight = (1.0 / (P * B * per_image.clamp_min(1))).expand(P, B, M)  # (P, B, M)
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

    For a view pair (teacher global view i, student view v) and an image, the loss is the mean over that
    image's matched token pairs ([CLS] included) of ``-softmax((t - center) / teacher_temp) .
    log_softmax(s / student_temp)``; it is averaged over the images, then over the view pairs, as in the
    authors' code. With [CLS]-only matches it is DINO's loss.

    ``forward`` is ``reference_loss`` computed in chunks of teacher and student rows, in float32, with its
    gradient in the same pass: no (E, K) or second (S, K) tensor is ever held. It also updates the center.
    """

    def __init__(self, out_dim: int, num_positions: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, chunk_elements: Optional[int] = None):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.chunk_elements = chunk_elements  # elements per (rows, K) temporary; None: LOSS_CHUNK_ELEMENTS
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
        rows = max(1, (self.chunk_elements or LOSS_CHUNK_ELEMENTS[teacher_out.device.type]) // K)
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
        all_reduce_mean(batch_center)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


# ----------------------------------------------------------------------------------------------------
# Multi-crop data with matches
# ----------------------------------------------------------------------------------------------------
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
            matches = patch_matching.cls_only_matches(len(crops), num_global=NUM_GLOBAL)
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


def subset_indices(size: int, max_items: int, seed: Sequence[int]) -> Optional[list]:
    """Sorted indices of a random subset of ``max_items`` of ``size`` items, the same for the same ``seed``;
    None when ``max_items`` is 0 or not below ``size`` (keep everything)."""
    if not 0 < max_items < size:
        return None
    return np.sort(np.random.default_rng(list(seed)).choice(size, max_items, replace=False)).tolist()


def build_loader(args: argparse.Namespace) -> torch.utils.data.DataLoader:
    """Multi-crop data with matches, split over the processes by a shuffling, resumable sampler."""
    transform = DataAugmentationPatchWiseDINO(args.global_crops_scale, args.local_crops_scale,
                                              args.local_crops_number, args.patch_size, args.global_size,
                                              args.local_size, args.resize,
                                              patch_ops=args.patch_augmentation_ops if args.patch_augmentation else 0)
    data_path = args.data_path or datasets.default_data_path()
    images = datasets.build_image_source(data_path)
    keep = subset_indices(len(images), args.max_images, (TRAIN_SUBSET_SEED,))
    if keep is not None:
        print(f"Training on a fixed random subset of {len(keep)} of the {len(images)} images (--max_images)")
        images = torch.utils.data.Subset(images, keep)
    dataset = MultiCropDataset(images, transform, args.patch_size, args.patch_loss, args.skip_bad_images)
    if len(dataset) < args.total_batch:
        raise utils.UserError(f"{data_path} has {len(dataset)} images, fewer than one batch of {args.total_batch} "
                              f"({args.world_size} processes x {args.batch_size_per_gpu}): "
                              f"lower --batch_size_per_gpu")
    sampler = run_control.ResumableSampler(dataset, num_replicas=args.world_size, rank=args.rank, seed=args.seed)
    if args.num_workers > 0:  # one OpenCV thread per worker, set before they are forked: a forked child that
        cv2.setNumThreads(1)  # stops a thread pool its parent had started deadlocks
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
        pin_memory=args.device.type == "cuda", drop_last=True, collate_fn=collate_dropping_bad,
        persistent_workers=args.num_workers > 0,
        worker_init_fn=functools.partial(run_control.worker_init, rank=args.rank))
    print(f"Data loaded: {len(dataset)} images from {data_path}; {transform}")
    return loader


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def cpp_compiler_available() -> bool:
    """Whether torch.compile's CPU backend (inductor) finds a C++ compiler."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++"))


def compile_blocks(model: vits.MultiCropWrapper, device: torch.device) -> None:
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
    student = vits.MultiCropWrapper(student_backbone, vits.DINOHead(dim, args.out_dim, args.use_bn_in_head,
                                                                    args.norm_last_layer))
    teacher = vits.MultiCropWrapper(teacher_backbone, vits.DINOHead(dim, args.out_dim, args.use_bn_in_head))
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
# Optimizer, schedules, precision
# ----------------------------------------------------------------------------------------------------
def build_optimizer(args: argparse.Namespace, student: nn.Module) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA), SGD or LARS over two groups: weights with decay, biases/norms without.
    The learning rate and weight decay are set at every step by the schedules."""
    groups = utils.get_params_groups(student)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, fused=args.device.type == "cuda")
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0, momentum=0.9)
    return utils.LARS(groups)  # --optimizer lars: argparse allows nothing else


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


def build_schedules(args: argparse.Namespace, niter_per_ep: int) -> dict:
    """Per-iteration lr (linear scaling with the total batch, warm-up, cosine), weight decay, teacher momentum."""
    return {
        "lr": cosine_scheduler(args.lr * args.total_batch / LR_REFERENCE_BATCH, args.min_lr, args.epochs,
                                     niter_per_ep, warmup_epochs=args.warmup_epochs),
        "wd": cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter_per_ep),
        "momentum": cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, niter_per_ep),
    }


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all processes, in place; a no-op in a single process."""
    world_size = utils.get_world_size()
    if world_size > 1:
        torch.distributed.all_reduce(tensor)
        tensor.div_(world_size)
    return tensor


class Precision(NamedTuple):
    """Autocast settings: ``dtype`` None trains in float32; ``scaler`` only with float16."""
    device_type: str
    dtype: Optional[torch.dtype]
    scaler: Optional[torch.amp.GradScaler]

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)


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
# k-NN monitor of the teacher during training
# ----------------------------------------------------------------------------------------------------
def knn_monitor_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags of the training's k-NN monitor (``KNNMonitor``) to ``parser``; returns it."""
    parser.add_argument("--knn_data_path", default=None, type=str,
                        help="labelled dataset (any layout eval_knn.py reads) on which the teacher's weighted 20-NN "
                             "accuracy is measured at --global_size: knn_top1/knn_top5 in log.txt (default: none)")
    parser.add_argument("--knn_freq", default=1, type=utils.bounded(int, low=1),
                        help="run the k-NN monitor after every this many epochs, and after the last")
    parser.add_argument("--knn_max_images", default=0, type=utils.bounded(int, low=0),
                        help="k-NN monitor on a fixed random subset of at most this many train and as many val "
                             "images, to keep it cheap (0: all of them)")
    return parser


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

    The train and val splits of ``data_path`` (any layout ``datasets.build_eval_dataset`` reads) pass through the
    evaluation transform at ``image_size`` (resize ``datasets.eval_resize_size(image_size)``, center crop); with
    ``max_images`` each split is cut to a fixed random subset of at most that many images. Features are
    extracted as in ``eval_knn.py`` (split over the processes, gathered by index: every image counts once)
    and classified by the same ``eval_knn.knn_classifier``, so without a cap the numbers are those of
    ``eval_knn.py --nb_knn 20 --resize_size R --crop_size S`` on the same weights. It runs after every
    ``freq``-th epoch and after the last of ``epochs``; every process must call it (extraction is a collective).
    """

    def __init__(self, data_path: str, image_size: int, freq: int, epochs: int, max_images: int = 0,
                 batch_size: int = 64, num_workers: int = 0):
        datasets.require_folder(data_path, "--knn_data_path")
        resize = datasets.eval_resize_size(image_size)
        train = datasets.build_eval_dataset(data_path, "train", datasets.eval_transform(resize, image_size))
        val = datasets.build_eval_dataset(data_path, "val", datasets.eval_transform(resize, image_size))
        datasets.check_same_classes(train, val)
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
                loader = eval_knn.feature_loader(dataset, self.batch_size, self.num_workers)
                feats = eval_knn.extract_features(backbone, loader, device, print_freq=10 ** 9)  # (N, D)
                features.append(F.normalize(feats, dim=1).to(device))  # (N, D)
        finally:
            backbone.train(training)
        (_, train_labels), (_, val_labels) = self.splits
        return eval_knn.knn_classifier(features[0], train_labels.to(device), features[1], val_labels.to(device),
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


if __name__ == "__main__":
    utils.run_cli(main, utils.ArgumentParser("Patch-Wise DINO", parents=[get_args_parser()]).parse_args())
