"""Weighted k-NN classification of frozen ViT features (the DINO k-NN protocol).

Reproduces the evaluation of Caron et al., "Emerging Properties in Self-Supervised Vision Transformers"
(ICCV 2021), as in the reference ``eval_knn.py``: [CLS] features of the train and val splits extracted with
the val transform (resize 256, center crop 224), L2-normalised; each test image takes its k most similar
(cosine) train images, every neighbour votes for its label with weight ``exp(similarity / T)``, T = 0.07;
top-1 and top-5 accuracy for k in {10, 20, 100, 200}.

Deliberate differences from the reference:
- the neighbour search runs once for the largest k (the smaller k use its sorted prefix) in blocks of bounded
  size (the reference holds test chunk x whole train set): faiss's exact inner-product search on CPU, or a
  tiled torch matmul + top-k on the features' device (the default on CUDA); ``--knn_backend`` picks one;
- any test-set size works (the reference's 100 fixed chunks fail below 100 test images), k is clamped to
  the training-set size, top-5 counts the first ``min(5, k, num_classes)`` predictions, and classes with
  equal votes are ranked by class index (the reference leaves that order undefined);
- votes are computed as ``exp((s - s_max) / T)``, which ranks classes exactly as ``exp(s / T)`` but cannot
  overflow on features that are not normalised;
- the last line of stdout is a JSON object with every accuracy.

Feature extraction (``feature_loader``, ``extract_features``) and the search and vote (``knn_search``,
``knn_vote``, ``knn_classifier``) live here, as in the reference: the retrieval and copy-detection scripts and the
k-NN monitor of ``patch_wise_dino.py`` import them from this file.
"""
import argparse
import json
import os
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import datasets
import utils

FEATURE_FILES = ("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth")
KNN_CHUNK_ELEMENTS = {"cpu": 2 ** 24, "cuda": 2 ** 28}  # largest similarity block held at once (64 MiB, 1 GiB)
KNN_MIN_TEST_ROWS = 256  # below this many test rows per block the train set is split too, to keep matmuls large


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Evaluation with weighted k-NN on ImageNet-style folders or CIFAR-10",
                                     add_help=False)
    parser.add_argument("--batch_size_per_gpu", default=128, type=int, help="Per-process batch size for "
                        "feature extraction.")
    parser.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int,
                        help="Number of nearest neighbours used for classification (one result per value).")
    parser.add_argument("--temperature", default=0.07, type=float,
                        help="Temperature T of the vote weights exp(similarity / T).")
    parser.add_argument("--use_cuda", default=torch.cuda.is_available(), type=utils.bool_flag,
                        help="Keep the features on the GPU for the k-NN search (default: true when a GPU is "
                        "visible). Set false to run the search on the CPU (slower, lighter on GPU memory).")
    parser.add_argument("--knn_backend", default="auto", choices=["auto", "torch", "faiss"],
                        help="Neighbour search: faiss (exact inner product, CPU) or torch (matmul + top-k, on "
                        "the features' device); auto: torch with --use_cuda, faiss otherwise.")
    parser.add_argument("--resize_size", default=256, type=int,
                        help="Val transform: the shorter image side is resized to this (bicubic).")
    parser.add_argument("--crop_size", default=224, type=int, help="Val transform: side of the center crop "
                        "fed to the network (a multiple of --patch_size).")
    parser.add_argument("--dump_features", default=None, type=str,
                        help="Folder where the extracted features and labels are saved (trainfeat.pth, "
                        "testfeat.pth, trainlabels.pth, testlabels.pth).")
    parser.add_argument("--load_features", default=None, type=str, help="Folder of features saved by "
                        "--dump_features: skips the model and the data.")
    parser.add_argument("--data_path", default="/path/to/imagenet/", type=str,
                        help="Folder with train/ and val/ (one sub-folder per class), CIFAR-10's python "
                        "version (cifar-10-batches-py), or MNIST-format files (train-* and t10k-*, gzipped or not).")
    utils.eval_model_args(parser, use_cuda_flag=False)
    return parser


# ----------------------------------------------------------------------------------------------------
# Feature extraction (also used by the other evaluations and the training's k-NN monitor)
# ----------------------------------------------------------------------------------------------------
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
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=utils.get_world_size(), rank=utils.get_rank(),
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
    world_size = utils.get_world_size()
    gather_device = device if device.type == "cuda" else torch.device("cpu")
    features = None
    logger = utils.MetricLogger()
    for images, index in logger.log_every(data_loader, print_freq, header="Features:"):
        images = images.to(device, non_blocking=True)
        index = index.to(gather_device)  # (B,)
        feats = feature_fn(model, images).float().to(gather_device)  # (B, D)
        if features is None:
            features = torch.zeros(len(data_loader.dataset), feats.shape[-1])  # (N, D)
        if world_size > 1:
            index_all = [torch.empty_like(index) for _ in range(world_size)]
            feats_all = [torch.empty_like(feats) for _ in range(world_size)]
            torch.distributed.all_gather(index_all, index)
            torch.distributed.all_gather(feats_all, feats)
            index, feats = torch.cat(index_all), torch.cat(feats_all)
        features[index.cpu()] = feats.cpu()
    if features is None:
        raise utils.UserError("no images to extract features from")
    return features


# ----------------------------------------------------------------------------------------------------
# Weighted k-NN search and vote (also used by the training's k-NN monitor)
# ----------------------------------------------------------------------------------------------------
def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """``torch`` or ``faiss``: ``auto``/None means torch for CUDA features and faiss for CPU features."""
    if backend in (None, "auto"):
        return "torch" if device.type == "cuda" else "faiss"
    if backend not in ("torch", "faiss"):
        raise utils.UserError(f"unknown k-NN backend {backend!r}: choose auto, torch or faiss")
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
        raise utils.UserError(f"train and test features must be (N, D) with the same D, got "
                        f"{tuple(train_features.shape)} and {tuple(test_features.shape)}")
    if not 1 <= k <= train_features.shape[0]:
        raise utils.UserError(f"k must be in [1, {train_features.shape[0]}] (the training-set size), got {k}")
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
        raise utils.UserError("there are no test features to classify")
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
        raise utils.UserError(f"labels do not match the features: {num_train} train and {num_test} test "
                        f"features, labels of shape {tuple(train_labels.shape)} and {tuple(test_labels.shape)}")
    labels = torch.cat((train_labels.cpu(), test_labels.cpu()))  # (N_train + N_test,)
    if labels.numel() and labels.min().item() < 0:
        raise utils.UserError(f"labels must be non-negative, found {labels.min().item()}")
    largest = int(labels.max().item()) if labels.numel() else 0
    if num_classes is None:
        return largest + 1
    if largest >= num_classes:
        raise utils.UserError(f"labels must be in [0, {num_classes}), found label {largest}")
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
# k-NN evaluation
# ----------------------------------------------------------------------------------------------------
def evaluate_knn(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, nb_knn: list, T: float, backend: Optional[str] = None) -> Dict[str, dict]:
    """Accuracies for every k of ``nb_knn`` from one search for the largest k: ``{"k": {"top1", "top5"}}``."""
    num_train = train_features.shape[0]
    if num_train == 0:
        raise utils.UserError("there are no train features to search")
    num_classes = check_knn_labels(train_labels, test_labels, num_train, test_features.shape[0], None)
    max_k = min(max(nb_knn), num_train)
    backend = resolve_backend(backend, train_features.device)
    where = "cpu" if backend == "faiss" else train_features.device.type
    print(f"Searching the {max_k} nearest neighbours of {test_features.shape[0]} test images among {num_train} "
          f"train images ({backend} on {where}, {num_classes} classes)")
    similarities, indices = knn_search(train_features, test_features, max_k, backend)
    neighbor_labels = train_labels.to(indices.device)[indices]  # (N_test, max_k)
    results = {}
    for k in nb_knn:
        if k > num_train:
            print(f"k={k} is larger than the {num_train} training images: using k={num_train}")
        top1, top5 = knn_vote(similarities, neighbor_labels, test_labels, min(k, num_train), T, num_classes)
        print(f"{k}-NN classifier result: Top1: {top1}, Top5: {top5}")
        results[str(k)] = {"top1": top1, "top5": top5}
    return results


# ----------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------
def build_datasets(args: argparse.Namespace) -> tuple:
    """Train and val datasets with the val transform; their class lists must agree."""
    transform = datasets.eval_transform(args.resize_size, args.crop_size)
    dataset_train = datasets.build_eval_dataset(args.data_path, "train", transform)
    dataset_val = datasets.build_eval_dataset(args.data_path, "val", transform)
    datasets.check_same_classes(dataset_train, dataset_val)
    print(f"Data loaded with {len(dataset_train)} train and {len(dataset_val)} val imgs.")
    return dataset_train, dataset_val


def extract_feature_pipeline(args: argparse.Namespace) -> tuple:
    """L2-normalised [CLS] features and labels of both splits (every process gets all of them); ``args.arch`` and
    ``args.patch_size`` are set (``utils.resolve_model_args``)."""
    if args.crop_size % args.patch_size:
        raise utils.UserError(f"--crop_size {args.crop_size} is not a multiple of --patch_size {args.patch_size}")
    if args.resize_size < args.crop_size:
        raise utils.UserError(f"--resize_size {args.resize_size} is smaller than --crop_size {args.crop_size}: the "
                              f"center crop would be padded with black; resize to at least the crop size")
    dataset_train, dataset_val = build_datasets(args)
    model = utils.build_backbone(args.arch, args.patch_size)
    utils.load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
    model.to(args.device).eval()
    print(f"Model {args.arch} {args.patch_size}x{args.patch_size} built.")
    features = []
    for name, dataset in (("train", dataset_train), ("val", dataset_val)):
        print(f"Extracting features for {name} set...")
        loader = feature_loader(dataset, args.batch_size_per_gpu, args.num_workers)
        feats = extract_features(model, loader, args.device)  # (N, D)
        features.append(F.normalize(feats, dim=1, p=2))  # (N, D)
    train_labels = torch.as_tensor(dataset_train.targets, dtype=torch.long)  # (N_train,)
    test_labels = torch.as_tensor(dataset_val.targets, dtype=torch.long)  # (N_test,)
    if args.dump_features and utils.is_main_process():
        os.makedirs(args.dump_features, exist_ok=True)
        for file_name, tensor in zip(FEATURE_FILES, (*features, train_labels, test_labels)):
            utils.atomic_save(tensor, os.path.join(args.dump_features, file_name))
        print(f"Features saved to {args.dump_features}")
    return features[0], features[1], train_labels, test_labels


def load_features(folder: str) -> tuple:
    """Features and labels written by ``--dump_features`` (checked, features re-normalised)."""
    if not os.path.isdir(folder):
        raise utils.UserError(f"--load_features {folder} is not a folder")
    tensors = [utils.load_checkpoint(os.path.join(folder, name)) for name in FEATURE_FILES]
    for name, tensor in zip(FEATURE_FILES, tensors):
        if not torch.is_tensor(tensor):
            raise utils.UserError(f"{os.path.join(folder, name)} does not hold a tensor")
    train_features, test_features, train_labels, test_labels = tensors
    if train_features.dim() != 2 or test_features.dim() != 2 or train_features.shape[1] != test_features.shape[1]:
        raise utils.UserError(f"features in {folder} must be (N, D) with the same D, got "
                              f"{tuple(train_features.shape)} and {tuple(test_features.shape)}")
    print(f"Loaded {train_features.shape[0]} train and {test_features.shape[0]} test features from {folder}")
    return (F.normalize(train_features.float(), dim=1), F.normalize(test_features.float(), dim=1),
            train_labels.long(), test_labels.long())


def main(args: argparse.Namespace) -> Dict[str, dict]:
    if min(args.nb_knn) < 1:
        raise utils.UserError(f"--nb_knn values must be positive, got {args.nb_knn}")
    if args.temperature <= 0:
        raise utils.UserError(f"--temperature must be positive, got {args.temperature}")
    if args.use_cuda and not torch.cuda.is_available():
        raise utils.UserError("--use_cuda true but no GPU is visible: pass --use_cuda false")
    utils.init_distributed_mode(args)
    if not args.load_features:
        utils.resolve_model_args(args)
    print("\n".join(f"{key}: {value}" for key, value in sorted(vars(args).items())))
    if args.load_features:
        train_features, test_features, train_labels, test_labels = load_features(args.load_features)
    else:
        train_features, test_features, train_labels, test_labels = extract_feature_pipeline(args)
    results: Dict[str, dict] = {}
    if utils.is_main_process():
        device = torch.device("cuda", torch.cuda.current_device()) if args.use_cuda else torch.device("cpu")
        results = evaluate_knn(train_features.to(device), train_labels.to(device), test_features.to(device),
                               test_labels.to(device), args.nb_knn, args.temperature, args.knn_backend)
        print(json.dumps({"knn": results}), flush=True)
    return results


if __name__ == "__main__":
    parser = utils.ArgumentParser("Evaluation with weighted k-NN", parents=[get_args_parser()])
    utils.run_cli(main, parser.parse_args())
