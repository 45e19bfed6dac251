"""Linear classification on frozen ViT features (the DINO linear evaluation protocol).

Reproduces the linear probe of Caron et al., "Emerging Properties in Self-Supervised Vision Transformers"
(ICCV 2021), as in the reference ``eval_linear.py``: the backbone is frozen; one linear layer is trained on
the concatenated [CLS] outputs of the last ``n`` blocks (4 for ViT-S, 1 for ViT-B), optionally with the
average-pooled patch tokens of the last block; SGD with momentum 0.9, no weight decay, learning rate
``lr * total_batch / 256`` with a cosine decay over the epochs; RandomResizedCrop + horizontal flip for
training, resize 256 + center crop 224 for validation; DDP across ``torchrun`` processes.

Deliberate differences from the reference:
- ``--image_size`` (and ``--resize_size``) let 32-pixel datasets such as CIFAR-10 be evaluated at their own
  resolution or upsampled;
- with more than one block, the pooled patch tokens follow the [CLS] features (the reference cannot pool
  then); with one block they are interleaved as in the reference, whose released heads therefore apply;
- the classifier checkpoint records what its features depend on (backbone weights, --arch, --patch_size,
  --n_last_blocks, --avgpool_patchtokens, --image_size), and a run whose features differ refuses to resume
  or --evaluate it instead of silently reusing another model's classifier;
- a resumed run uses the current --lr and number of processes (and --epochs) for the rest of the schedule;
- validation is split over the processes without padding and the counts are summed, so the accuracy is
  exact for any number of processes;
- the cosine schedule is computed from the epoch (``LambdaLR``), so a run resumed with more ``--epochs``
  follows the new schedule;
- ``--evaluate`` validates the classifier saved in ``--output_dir`` (the reference downloads official
  linear weights); the last line of stdout is a JSON object with ``top1``, ``top5`` and ``best_acc``.
"""
import argparse
import json
import os
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as pth_transforms

import datasets
import utils
from transforms import IMAGENET_MEAN, IMAGENET_STD

CHECKPOINT_NAME = "checkpoint.pth.tar"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Linear evaluation on frozen features", add_help=False)
    parser.add_argument("--n_last_blocks", default=4, type=int, help="Concatenate the [CLS] outputs of the last "
                        "n blocks; DINO uses n=4 for ViT-Small and n=1 for ViT-Base.")
    parser.add_argument("--avgpool_patchtokens", default=False, type=utils.bool_flag,
                        help="Also concatenate the average-pooled patch tokens of the last block; DINO uses "
                        "false for ViT-Small and true for ViT-Base.")
    parser.add_argument("--epochs", default=100, type=int, help="Number of epochs of training.")
    parser.add_argument("--lr", default=0.001, type=float, help="Learning rate at the start of training for a "
                        "total batch of 256 (scaled linearly with batch_size_per_gpu x processes).")
    parser.add_argument("--weight_decay", default=0.0, type=float, help="SGD weight decay of the linear layer.")
    parser.add_argument("--batch_size_per_gpu", default=128, type=int, help="Per-process batch size.")
    parser.add_argument("--image_size", default=224, type=int, help="Side of the crops fed to the network "
                        "(a multiple of --patch_size); e.g. 32 to evaluate CIFAR-10 at its own resolution.")
    parser.add_argument("--resize_size", default=None, type=int, help="Val transform: the shorter side is "
                        "resized to this before the center crop (default: image_size x 256 / 224).")
    parser.add_argument("--data_path", default="/path/to/imagenet/", type=str,
                        help="Folder with train/ and val/ (one sub-folder per class), CIFAR-10's python "
                        "version (cifar-10-batches-py), or MNIST-format files (train-* and t10k-*, gzipped or not).")
    parser.add_argument("--val_freq", default=1, type=int, help="Validate (and save) every val_freq epochs.")
    parser.add_argument("--output_dir", default=".", type=str, help="Where the classifier checkpoint "
                        f"({CHECKPOINT_NAME}) and log.txt are written; a run restarts from the checkpoint.")
    parser.add_argument("--num_labels", default=None, type=int, help="Number of labels of the linear "
                        "classifier (default: the number of classes found in the data).")
    parser.add_argument("--evaluate", default=False, type=utils.bool_flag, nargs="?", const=True,
                        help="Only validate the classifier saved in --output_dir.")
    parser.add_argument("--seed", default=0, type=int, help="Random seed.")
    utils.eval_model_args(parser, use_cuda_flag=False)
    return parser


class LinearClassifier(nn.Module):
    """One linear layer on frozen features (weights N(0, 0.01), zero bias, as in DINO)."""

    def __init__(self, dim: int, num_labels: int) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))  # (B, num_labels)


def frozen_features(model: nn.Module, images: torch.Tensor, n_last_blocks: int, avgpool: bool) -> torch.Tensor:
    """[CLS] outputs of the last ``n_last_blocks`` blocks (+ mean patch token of the last): (B, D * (n + avgpool)).

    With one block and ``avgpool`` the two alternate channel by channel (cls_0, avg_0, cls_1, avg_1, ...), the
    reference's layout, so that its released ViT-B linear heads read the right columns; with more blocks the
    pooled tokens follow all [CLS] features."""
    with torch.no_grad():
        outputs = model.get_intermediate_layers(images, n_last_blocks)  # n x (B, 1+N, D)
        feats = torch.cat([x[:, 0] for x in outputs], dim=-1)  # (B, n*D)
        if avgpool:
            pooled = outputs[-1][:, 1:].mean(dim=1)  # (B, D)
            if n_last_blocks == 1:
                feats = torch.stack((feats, pooled), dim=-1).flatten(1)  # (B, 2*D) interleaved
            else:
                feats = torch.cat((feats, pooled), dim=-1)  # (B, (n+1)*D)
    return feats


def feature_setup(model: nn.Module, args: argparse.Namespace) -> Dict[str, object]:
    """What the classifier's input depends on, saved with it: a classifier is only resumed or evaluated on
    the same features. The backbone is identified by a SHA-256 of its weights, not by the file's path."""
    return {"backbone weights": utils.weights_digest(model), "--arch": args.arch, "--patch_size": args.patch_size,
            "--n_last_blocks": args.n_last_blocks, "--avgpool_patchtokens": args.avgpool_patchtokens,
            "--image_size": args.image_size}


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def build_transforms(image_size: int, resize_size: int) -> tuple:
    """Train: RandomResizedCrop + flip; val: resize (bicubic) + center crop; both ImageNet-normalised."""
    train = pth_transforms.Compose([
        pth_transforms.RandomResizedCrop(image_size),
        pth_transforms.RandomHorizontalFlip(),
        pth_transforms.ToTensor(),
        pth_transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    return train, datasets.eval_transform(resize_size, image_size)


def build_loaders(args: argparse.Namespace) -> tuple:
    """(train loader or None with --evaluate, val loader, number of classes found)."""
    train_transform, val_transform = build_transforms(args.image_size, args.resize_size)
    dataset_val = datasets.build_eval_dataset(args.data_path, "val", val_transform)
    rank, world_size = utils.get_rank(), utils.get_world_size()
    pin = args.device.type == "cuda"
    val_loader = torch.utils.data.DataLoader(  # every process takes its own share, no padding
        dataset_val, sampler=list(range(rank, len(dataset_val), world_size)), batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers, pin_memory=pin)
    train_loader = None
    if not args.evaluate:
        dataset_train = datasets.build_eval_dataset(args.data_path, "train", train_transform)
        datasets.check_same_classes(dataset_train, dataset_val)
        sampler = torch.utils.data.DistributedSampler(dataset_train, num_replicas=world_size, rank=rank,
                                                      shuffle=True, seed=args.seed)
        train_loader = torch.utils.data.DataLoader(dataset_train, sampler=sampler,
                                                   batch_size=args.batch_size_per_gpu,
                                                   num_workers=args.num_workers, pin_memory=pin)
        print(f"Data loaded with {len(dataset_train)} train and {len(dataset_val)} val imgs.")
    return train_loader, val_loader, len(dataset_val.classes)


# ----------------------------------------------------------------------------------------------------
# Training and validation
# ----------------------------------------------------------------------------------------------------
def train_one_epoch(model: nn.Module, classifier: nn.Module, optimizer: torch.optim.Optimizer,
                    loader: torch.utils.data.DataLoader, epoch: int, args: argparse.Namespace) -> Dict[str, float]:
    def loss_of(images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        images = images.to(args.device, non_blocking=True)  # (B, 3, H, W)
        target = target.to(args.device, non_blocking=True)  # (B,)
        feats = frozen_features(model, images, args.n_last_blocks, args.avgpool_patchtokens)  # (B, F)
        return F.cross_entropy(classifier(feats), target)

    return utils.train_head_one_epoch(classifier, optimizer, loader, epoch, loss_of)


@torch.no_grad()
def validate(model: nn.Module, classifier: nn.Module, loader: torch.utils.data.DataLoader,
             args: argparse.Namespace) -> Dict[str, float]:
    """Loss, top-1 and top-5 accuracy (percent; top-5 over min(5, num_labels)) on the whole val set."""
    classifier.eval()
    num_labels = args.num_labels
    totals = torch.zeros(4, dtype=torch.float64, device=args.device)  # loss sum, top-1 hits, top-5 hits, count
    metric_logger = utils.MetricLogger(delimiter="  ")
    for images, target in metric_logger.log_every(loader, 20, "Test:"):
        images = images.to(args.device, non_blocking=True)  # (B, 3, H, W)
        target = target.to(args.device, non_blocking=True)  # (B,)
        output = classifier(frozen_features(model, images, args.n_last_blocks, args.avgpool_patchtokens))  # (B, C)
        hits = output.topk(min(5, num_labels), dim=1).indices == target[:, None]  # (B, min(5, C))
        totals += torch.stack([F.cross_entropy(output, target, reduction="sum").double(),
                               hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                               torch.tensor(float(len(target)), dtype=torch.float64, device=args.device)])
    if utils.get_world_size() > 1:
        dist.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    stats = {"loss": loss / count, "acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count}
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f}")
    return stats


def load_classifier_checkpoint(path: str, classifier: nn.Module, setup: Dict[str, object],
                               optimizer: Optional[torch.optim.Optimizer] = None,
                               scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None) -> dict:
    """Restore the classifier (and optimizer, scheduler) from ``path`` after checking that it was trained on
    the features ``setup`` describes (see ``feature_setup``); returns the checkpoint."""
    checkpoint = utils.load_checkpoint(path)
    return utils.restore_linear_head(path, checkpoint, classifier, setup,
                                     "--arch/--n_last_blocks/--avgpool_patchtokens/--num_labels", optimizer, scheduler)


def train_linear(model: nn.Module, classifier: nn.Module, train_loader: torch.utils.data.DataLoader,
                 val_loader: torch.utils.data.DataLoader, setup: Dict[str, object],
                 args: argparse.Namespace) -> Dict[str, float]:
    """The training loop with resume, validation, checkpoint and log every ``val_freq`` epochs."""
    lr = args.lr * args.batch_size_per_gpu * utils.get_world_size() / 256.0
    epochs = args.epochs
    optimizer, scheduler = utils.linear_probe_optimizer(classifier.parameters(), lr, epochs, args.weight_decay)
    checkpoint_path = os.path.join(args.output_dir, CHECKPOINT_NAME)
    start_epoch, best_acc, test_stats = 0, 0.0, None
    if os.path.isfile(checkpoint_path):
        checkpoint = load_classifier_checkpoint(checkpoint_path, classifier, setup, optimizer, scheduler)
        start_epoch, best_acc = int(checkpoint.get("epoch", 0)), float(checkpoint.get("best_acc", 0.0))
        utils.restart_schedule(optimizer, scheduler, lr, start_epoch)  # the current --lr, batch and --epochs

    for epoch in range(start_epoch, epochs):
        train_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, classifier, optimizer, train_loader, epoch, args)
        scheduler.step()
        if epoch % args.val_freq == 0 or epoch == epochs - 1:
            test_stats = validate(model, classifier, val_loader, args)
            print(f"Accuracy at epoch {epoch} of the network on the {len(val_loader.dataset)} test images: "
                  f"{test_stats['acc1']:.1f}%")
            best_acc = max(best_acc, test_stats["acc1"])
            print(f"Max accuracy so far: {best_acc:.2f}%")
            utils.save_on_master({"epoch": epoch + 1, "state_dict": classifier.state_dict(),
                                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                  "best_acc": best_acc, "num_labels": args.num_labels, "setup": setup},
                                 checkpoint_path)
            utils.append_json_log(args.output_dir, {**{f"train_{k}": v for k, v in train_stats.items()},
                                                    **{f"test_{k}": v for k, v in test_stats.items()},
                                                    "epoch": epoch})
    if test_stats is None:  # nothing left to train: report the saved classifier
        test_stats = validate(model, classifier, val_loader, args)
        best_acc = max(best_acc, test_stats["acc1"])
    print("Training of the supervised linear classifier on frozen features completed.\n"
          f"Top-1 test accuracy: {test_stats['acc1']:.1f}")
    return {"top1": test_stats["acc1"], "top5": test_stats["acc5"], "best_acc": best_acc}


def check_args(args: argparse.Namespace) -> None:
    if args.image_size % args.patch_size:
        raise utils.UserError(f"--image_size {args.image_size} is not a multiple of --patch_size {args.patch_size}")
    if args.resize_size is None:
        args.resize_size = datasets.eval_resize_size(args.image_size)
    if args.resize_size < args.image_size:
        raise utils.UserError(f"--resize_size {args.resize_size} is smaller than --image_size {args.image_size}")
    for name in ("epochs", "batch_size_per_gpu", "val_freq", "n_last_blocks"):
        if getattr(args, name) < 1:
            raise utils.UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.num_labels is not None and args.num_labels < 1:
        raise utils.UserError(f"--num_labels must be at least 1, got {args.num_labels}")


def main(args: argparse.Namespace) -> Dict[str, float]:
    utils.init_distributed_mode(args)
    utils.resolve_model_args(args)
    check_args(args)
    utils.fix_random_seeds(args.seed + utils.get_rank())
    torch.backends.cudnn.benchmark = True
    print("\n".join(f"{key}: {value}" for key, value in sorted(vars(args).items())))
    if args.evaluate and not os.path.isfile(os.path.join(args.output_dir, CHECKPOINT_NAME)):
        raise utils.UserError(f"--evaluate needs a trained classifier but {args.output_dir}/{CHECKPOINT_NAME} "
                              f"does not exist: train first (without --evaluate) or pass its --output_dir")
    os.makedirs(args.output_dir, exist_ok=True)
    train_loader, val_loader, num_classes = build_loaders(args)
    if args.num_labels is None:
        args.num_labels = num_classes
    elif args.num_labels < num_classes:
        raise utils.UserError(f"--num_labels {args.num_labels} is smaller than the {num_classes} classes found")

    model = utils.frozen_backbone(args, args.n_last_blocks)

    dim = model.embed_dim * (args.n_last_blocks + int(args.avgpool_patchtokens))
    classifier = LinearClassifier(dim, args.num_labels).to(args.device)
    classifier = nn.parallel.DistributedDataParallel(
        classifier, device_ids=[args.gpu] if args.device.type == "cuda" else None)

    setup = feature_setup(model, args)
    if args.evaluate:
        checkpoint = load_classifier_checkpoint(os.path.join(args.output_dir, CHECKPOINT_NAME), classifier, setup)
        test_stats = validate(model, classifier, val_loader, args)
        print(f"Accuracy of the network on the {len(val_loader.dataset)} test images: {test_stats['acc1']:.1f}%")
        result = {"top1": test_stats["acc1"], "top5": test_stats["acc5"],
                  "best_acc": float(checkpoint.get("best_acc", test_stats["acc1"]))}
    else:
        result = train_linear(model, classifier, train_loader, val_loader, setup, args)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    parser = utils.ArgumentParser("Linear evaluation on frozen features", parents=[get_args_parser()])
    utils.run_cli(main, parser.parse_args())
