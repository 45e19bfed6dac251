"""Linear semantic segmentation on frozen ViT patch tokens (a linear probe of the dense features).

The backbone is frozen. A 1x1 convolution (one linear layer shared by every patch) maps the patch tokens of the
last block (with ``--n_last_blocks n``, of the last n blocks concatenated) to class logits, which are upsampled
bilinearly to the mask and trained with cross-entropy, pixels marked 255 left out. As in ``eval_linear.py``: SGD
with momentum 0.9, no weight decay by default, learning rate ``lr * total_batch / 256`` decayed by a cosine over
the epochs, the head trained with DDP across ``torchrun`` processes, its checkpoint saved at each validation and
checked against the features it was trained on (resume, ``--evaluate``).

Images: ``--resize_mode crop`` resizes the shorter side to ``--image_size`` (bicubic) and cuts the central square,
``stretch`` resizes both sides to ``--image_size``; masks undergo the same by nearest neighbour, and the scores
are counted on those resized masks.

Features are cached (``--cache_features``, the default): the backbone being frozen, each process computes the patch
tokens of its share of the train and val images once, keeps them in float16 on the CPU, and every epoch only trains
the head. Train-time augmentation is then off: train images go through the val transform. With
``--cache_features false`` the backbone runs on every batch and each train image gets a random resized crop
(scale 0.25-1) and a horizontal flip, applied alike to its mask. Each process keeps its share of a cached split for
all epochs (shuffled within it every epoch). ``--evaluate`` computes the val features as training did (through the
float16 cache unless ``--cache_features false``), so it reproduces the scores of the last validation.

Scores, in percent, from the confusion matrix of the scored val pixels (ground truth != 255), summed over the
processes: pixel accuracy = correct / scored pixels; per-class IoU = TP / (TP + FP + FN); mIoU = the mean of the
per-class IoUs over the classes present in the ground truth or the prediction. A class absent from both
(TP + FP + FN = 0) has no IoU (``null`` in ``per_class_IoU``) and is left out of the mean; a class predicted but
absent from the ground truth counts, with IoU 0. The classes are the ids 0 .. the largest id in the train and val
masks (``--num_classes`` sets their number; a larger id is then an error). The last line of stdout is
``{"mIoU": .., "pixel_acc": .., "per_class_IoU": [..]}``.
"""
import argparse
import json
import os
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

import datasets
import utils
from transforms import IMAGENET_MEAN, IMAGENET_STD

CHECKPOINT_NAME = "checkpoint.pth.tar"
IGNORE = datasets.SEGMENTATION_IGNORE
TRAIN_CROP_SCALE = (0.25, 1.0)  # area range of the random crops without the feature cache
SHAPE_FLAGS = "--arch/--n_last_blocks/--num_classes"  # what the head's shape depends on


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Linear segmentation on frozen patch tokens", add_help=False)
    parser.add_argument("--n_last_blocks", default=1, type=utils.bounded(int, low=1), help="Concatenate the patch "
                        "tokens of the last n blocks.")
    parser.add_argument("--epochs", default=100, type=utils.bounded(int, low=1), help="Number of epochs of training.")
    parser.add_argument("--lr", default=0.2, type=utils.bounded(float, low=0), help="Learning rate at the start of "
                        "training for a total batch of 256 (scaled linearly with batch_size_per_gpu x processes).")
    parser.add_argument("--weight_decay", default=0.0, type=utils.bounded(float, low=0),
                        help="SGD weight decay of the linear layer.")
    parser.add_argument("--batch_size_per_gpu", default=16, type=utils.bounded(int, low=1),
                        help="Per-process batch size (images).")
    parser.add_argument("--image_size", default=448, type=utils.bounded(int, low=1), help="Side of the square fed "
                        "to the network, a multiple of --patch_size; masks are resized alike.")
    parser.add_argument("--resize_mode", default="crop", choices=["crop", "stretch"], help="crop: resize the "
                        "shorter side to --image_size, then cut the central square; stretch: resize both sides.")
    parser.add_argument("--cache_features", default=True, type=utils.bool_flag, help="Compute the frozen features "
                        "once and train on them (no train-time augmentation); false: run the backbone on every "
                        "batch, with random resized crops and flips of the train images.")
    parser.add_argument("--data_path", default="/path/to/segmentation/", type=str, help="Pascal VOC folder "
                        "(JPEGImages/, SegmentationClass/, ImageSets/Segmentation/{train,val}.txt) or a folder with "
                        "train/images, train/masks, val/images, val/masks (masks: PNGs of class ids, 255 = ignore).")
    parser.add_argument("--num_classes", default=None, type=utils.bounded(int, low=1), help="Number of classes "
                        "(default: the largest class id in the train and val masks + 1).")
    parser.add_argument("--val_freq", default=10, type=utils.bounded(int, low=1),
                        help="Validate (and save) every val_freq epochs, and after the last.")
    parser.add_argument("--output_dir", default=".", type=str, help="Where the head's checkpoint "
                        f"({CHECKPOINT_NAME}) and log.txt are written; a run restarts from the checkpoint.")
    parser.add_argument("--evaluate", default=False, type=utils.bool_flag, nargs="?", const=True,
                        help="Only validate the head saved in --output_dir.")
    parser.add_argument("--seed", default=0, type=int, help="Random seed.")
    utils.eval_model_args(parser, use_cuda_flag=False)
    return parser


class LinearSegmentationHead(nn.Module):
    """A 1x1 convolution from patch features to class logits (weights N(0, 0.01), zero bias, as DINO's
    linear classifier)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, num_classes, kernel_size=1)
        self.conv.weight.data.normal_(mean=0.0, std=0.01)
        self.conv.bias.data.zero_()

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.conv(feats)  # (B, C, h, w)


def patch_features(model: nn.Module, images: torch.Tensor, n_last_blocks: int) -> torch.Tensor:
    """The patch tokens of the last ``n_last_blocks`` blocks, concatenated, as a map: (B, n*D, H/p, W/p)."""
    with torch.no_grad():
        outputs = model.get_intermediate_layers(images, n_last_blocks)  # n x (B, 1+h*w, D)
        tokens = torch.cat([x[:, 1:] for x in outputs], dim=-1)  # (B, h*w, n*D)
    h, w = images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size
    return tokens.transpose(1, 2).reshape(len(images), -1, h, w).contiguous()  # (B, n*D, h, w)


def upsampled_logits(head: nn.Module, feats: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The head's logits resized bilinearly to the mask size: (B, C, H, W)."""
    return F.interpolate(head(feats), size=tuple(size), mode="bilinear", align_corners=False)  # (B, C, H, W)


# ----------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 pixel counts, row = ground-truth class, column = predicted class; pixels whose target is
    255 are left out. ``pred`` and ``target`` hold class ids of the same shape."""
    scored = target != IGNORE  # (...)
    index = target[scored].long() * num_classes + pred[scored].long()  # (P,)
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor) -> Dict[str, object]:
    """mIoU, pixel accuracy and per-class IoU (percent) of a confusion matrix (see the module docstring): a class
    with no pixel in the ground truth nor the prediction has IoU None and is left out of the mean."""
    confusion = confusion.double()  # (C, C)
    hits = confusion.diagonal()  # (C,) TP
    union = confusion.sum(0) + confusion.sum(1) - hits  # (C,) TP + FP + FN
    per_class = [100.0 * tp / u if u > 0 else None for tp, u in zip(hits.tolist(), union.tolist())]
    present = [iou for iou in per_class if iou is not None]
    return {"mIoU": sum(present) / len(present), "pixel_acc": 100.0 * hits.sum().item() / confusion.sum().item(),
            "per_class_IoU": per_class}


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
class PairTransform:
    """The same geometry for an image and its mask (the mask by nearest neighbour, torchvision's rule for
    ``tv_tensors.Mask``), then the image to an ImageNet-normalised tensor: ``(image (3, S, S), mask (S, S) uint8)``.
    Train: random resized crop + flip; val: ``--resize_mode``."""

    def __init__(self, image_size: int, resize_mode: str, train: bool) -> None:
        bicubic = v2.InterpolationMode.BICUBIC
        if train:
            geometry = [v2.RandomResizedCrop(image_size, scale=TRAIN_CROP_SCALE, interpolation=bicubic),
                        v2.RandomHorizontalFlip()]
        elif resize_mode == "crop":
            geometry = [v2.Resize(image_size, interpolation=bicubic), v2.CenterCrop(image_size)]
        else:
            geometry = [v2.Resize((image_size, image_size), interpolation=bicubic)]
        self.pipeline = v2.Compose([*geometry, v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                                    v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __call__(self, image: Image.Image, mask: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.pipeline(image, tv_tensors.Mask(torch.from_numpy(mask)))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)  # (3, S, S), (S, S)


def split_loader(dataset: datasets.SegmentationFolder, shuffle: bool, pad: bool,
                 args: argparse.Namespace) -> torch.utils.data.DataLoader:
    """A loader of this process's share: padded to equal shares for training (every process takes as many DDP
    steps), exact for validation (the confusion matrices are summed)."""
    rank, world_size = utils.get_rank(), utils.get_world_size()
    if pad:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                                      seed=args.seed)
    else:
        sampler = list(range(rank, len(dataset), world_size))
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=args.batch_size_per_gpu,
                                       num_workers=args.num_workers, pin_memory=args.device.type == "cuda")


def count_classes(loaders: Sequence[torch.utils.data.DataLoader], requested: Optional[int],
                  device: torch.device) -> int:
    """``requested`` (``--num_classes``), or the largest class id in the masks + 1. Each process reads the masks of
    its shares; the largest ids are all-reduced. An id >= ``requested`` is a ``UserError`` naming its mask."""
    largest, where = max(loader.dataset.largest_class_id(list(loader.sampler)) for loader in loaders)
    if requested is not None and largest >= requested:
        raise utils.UserError(f"mask {where} holds class {largest}, out of range for --num_classes {requested} "
                              f"(class ids 0..{requested - 1}, {IGNORE} = ignore)")
    found = torch.tensor(largest, device=device)
    if utils.get_world_size() > 1:
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
    if found.item() < 0:
        raise utils.UserError(f"the masks hold no class ids, only {IGNORE} (ignore)")
    print(f"Class ids found in the masks: 0..{found.item()}")
    return requested or int(found.item()) + 1


def build_loaders(args: argparse.Namespace) -> tuple:
    """(train loader or None with --evaluate, val loader, number of classes)."""
    val_set = datasets.build_segmentation_dataset(args.data_path, "val",
                                                  PairTransform(args.image_size, args.resize_mode, train=False))
    val_loader = split_loader(val_set, shuffle=False, pad=False, args=args)
    train_loader = None
    if not args.evaluate:
        augment = not args.cache_features
        train_set = datasets.build_segmentation_dataset(args.data_path, "train",
                                                        PairTransform(args.image_size, args.resize_mode, augment))
        train_loader = split_loader(train_set, shuffle=augment, pad=True, args=args)
        print(f"Data loaded with {len(train_set)} train and {len(val_set)} val images.")
    loaders = [loader for loader in (train_loader, val_loader) if loader is not None]
    return train_loader, val_loader, count_classes(loaders, args.num_classes, args.device)


class FeatureBatches:
    """Batches ``(frozen features (B, F, h, w) float32, masks (B, S, S) int64)`` of one process's share of a split,
    on the device: from a cache computed once (float16, CPU) when ``cache``, else by running the backbone on each
    batch of ``loader``."""

    def __init__(self, model: nn.Module, loader: torch.utils.data.DataLoader, cache: bool,
                 args: argparse.Namespace) -> None:
        self.model, self.loader, self.args = model, loader, args
        self.cached = cache
        self.feats = self.masks = None
        if cache:
            self._fill_cache()

    def _fill_cache(self) -> None:
        size, done = len(self.loader.sampler), 0
        for images, masks in utils.MetricLogger().log_every(self.loader, 20, "Caching features:"):
            feats = patch_features(self.model, images.to(self.args.device), self.args.n_last_blocks)  # (B, F, h, w)
            if self.feats is None:
                self.feats = torch.empty((size, *feats.shape[1:]), dtype=torch.float16)  # (N, F, h, w)
                self.masks = torch.empty((size, *masks.shape[1:]), dtype=masks.dtype)  # (N, S, S)
            self.feats[done:done + len(feats)] = feats.cpu()
            self.masks[done:done + len(masks)] = masks
            done += len(feats)

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self, epoch: Optional[int] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """One pass over the share, shuffled anew for each ``epoch`` (None: in order)."""
        device = self.args.device
        if not self.cached:
            if epoch is not None:
                self.loader.sampler.set_epoch(epoch)
            for images, masks in self.loader:
                yield patch_features(self.model, images.to(device), self.args.n_last_blocks), masks.to(device).long()
            return
        if self.feats is None:  # an empty share
            return
        order = torch.arange(len(self.feats)) if epoch is None else \
            torch.randperm(len(self.feats), generator=torch.Generator().manual_seed(self.args.seed + epoch))
        for start in range(0, len(order), self.loader.batch_size):
            index = order[start:start + self.loader.batch_size]  # (B,)
            yield self.feats[index].to(device).float(), self.masks[index].to(device).long()


# ----------------------------------------------------------------------------------------------------
# Training and validation
# ----------------------------------------------------------------------------------------------------
def train_one_epoch(head: nn.Module, optimizer: torch.optim.Optimizer, train: FeatureBatches,
                    epoch: int) -> Dict[str, float]:
    def loss_of(feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        logits = upsampled_logits(head, feats, masks.shape[-2:])  # (B, C, S, S)
        scored = (masks != IGNORE).sum().clamp(min=1)
        return F.cross_entropy(logits, masks, ignore_index=IGNORE, reduction="sum") / scored  # mean over pixels

    return utils.train_head_one_epoch(head, optimizer, train.batches(epoch), epoch, loss_of, total=len(train))


@torch.no_grad()
def validate(head: nn.Module, val: FeatureBatches, num_classes: int, device: torch.device) -> Dict[str, object]:
    """Scores of the head on the whole val split: the processes' confusion matrices are summed."""
    head.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)  # (C, C)
    for feats, masks in utils.MetricLogger().log_every(val.batches(), 20, "Test:", total=len(val)):
        pred = upsampled_logits(head, feats, masks.shape[-2:]).argmax(dim=1)  # (B, S, S)
        confusion += confusion_matrix(pred, masks, num_classes)
    if utils.get_world_size() > 1:
        dist.all_reduce(confusion)
    if confusion.sum() == 0:
        raise utils.UserError(f"the val masks hold no class ids, only {IGNORE} (ignore): nothing to score")
    scores = segmentation_scores(confusion.cpu())
    print(f"* mIoU {scores['mIoU']:.2f} pixel accuracy {scores['pixel_acc']:.2f}")
    return scores


def train_probe(model: nn.Module, head: nn.Module, loaders: tuple, saved: Optional[dict], setup: Dict[str, object],
                args: argparse.Namespace) -> Dict[str, object]:
    """Resume from ``saved`` (the checkpoint in --output_dir), then train with validation, checkpoint and log
    every ``val_freq`` epochs and after the last; returns the last scores."""
    train_loader, val_loader, num_classes = loaders
    lr = args.lr * args.batch_size_per_gpu * utils.get_world_size() / 256.0
    optimizer, scheduler = utils.linear_probe_optimizer(head.parameters(), lr, args.epochs, args.weight_decay)
    checkpoint_path = os.path.join(args.output_dir, CHECKPOINT_NAME)
    start_epoch, best, scores = 0, 0.0, None
    if saved is not None:
        utils.restore_linear_head(checkpoint_path, saved, head, setup, SHAPE_FLAGS, optimizer, scheduler)
        start_epoch, best = int(saved.get("epoch", 0)), float(saved.get("best_mIoU", 0.0))
        utils.restart_schedule(optimizer, scheduler, lr, start_epoch)  # the current --lr, batch and --epochs
    val = FeatureBatches(model, val_loader, args.cache_features, args)
    train = FeatureBatches(model, train_loader, args.cache_features, args) if start_epoch < args.epochs else None
    for epoch in range(start_epoch, args.epochs):
        train_stats = train_one_epoch(head, optimizer, train, epoch)
        scheduler.step()
        if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
            scores = validate(head, val, num_classes, args.device)
            best = max(best, scores["mIoU"])
            print(f"mIoU at epoch {epoch}: {scores['mIoU']:.2f} (best so far: {best:.2f})")
            utils.save_on_master({"epoch": epoch + 1, "state_dict": head.state_dict(),
                                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                  "best_mIoU": best, "num_classes": num_classes, "setup": setup}, checkpoint_path)
            utils.append_json_log(args.output_dir, {**{f"train_{k}": v for k, v in train_stats.items()},
                                                    "test_mIoU": scores["mIoU"],
                                                    "test_pixel_acc": scores["pixel_acc"], "epoch": epoch})
    return scores if scores is not None else validate(head, val, num_classes, args.device)


def main(args: argparse.Namespace) -> Dict[str, object]:
    utils.init_distributed_mode(args)
    utils.resolve_model_args(args)
    if args.image_size % args.patch_size:
        raise utils.UserError(f"--image_size {args.image_size} is not a multiple of --patch_size {args.patch_size}")
    utils.fix_random_seeds(args.seed + utils.get_rank())
    print("\n".join(f"{key}: {value}" for key, value in sorted(vars(args).items())))
    checkpoint_path = os.path.join(args.output_dir, CHECKPOINT_NAME)
    saved = utils.load_checkpoint(checkpoint_path) if os.path.isfile(checkpoint_path) else None
    if args.evaluate and saved is None:
        raise utils.UserError(f"--evaluate needs a trained head but {checkpoint_path} does not exist: train first "
                              f"(without --evaluate) or pass its --output_dir")
    os.makedirs(args.output_dir, exist_ok=True)
    model = utils.frozen_backbone(args, args.n_last_blocks)
    loaders = build_loaders(args)
    head = LinearSegmentationHead(model.embed_dim * args.n_last_blocks, loaders[2]).to(args.device)
    head = nn.parallel.DistributedDataParallel(head, device_ids=[args.gpu] if args.device.type == "cuda" else None)
    setup = {"backbone weights": utils.weights_digest(model), "--arch": args.arch, "--patch_size": args.patch_size,
             "--n_last_blocks": args.n_last_blocks, "--image_size": args.image_size, "--resize_mode": args.resize_mode}
    if args.evaluate:
        utils.restore_linear_head(checkpoint_path, saved, head, setup, SHAPE_FLAGS)
        val = FeatureBatches(model, loaders[1], args.cache_features, args)  # the features training validated on
        scores = validate(head, val, loaders[2], args.device)
    else:
        scores = train_probe(model, head, loaders, saved, setup, args)
    print(json.dumps(scores), flush=True)
    return scores


if __name__ == "__main__":
    parser = utils.ArgumentParser("Linear segmentation on frozen patch tokens", parents=[get_args_parser()])
    utils.run_cli(main, parser.parse_args())
