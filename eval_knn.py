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

The search and the vote live in ``utils.py`` (``knn_search``, ``knn_vote``, ``knn_classifier``), shared with the
k-NN monitor of ``patch_wise_dino.py``.
"""
import argparse
import json
import os
from typing import Dict, Optional

import torch
import torch.nn.functional as F

import utils

FEATURE_FILES = ("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth")


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
# k-NN evaluation
# ----------------------------------------------------------------------------------------------------
def evaluate_knn(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, nb_knn: list, T: float, backend: Optional[str] = None) -> Dict[str, dict]:
    """Accuracies for every k of ``nb_knn`` from one search for the largest k: ``{"k": {"top1", "top5"}}``."""
    num_train = train_features.shape[0]
    if num_train == 0:
        raise utils.UserError("there are no train features to search")
    num_classes = utils.check_knn_labels(train_labels, test_labels, num_train, test_features.shape[0], None)
    max_k = min(max(nb_knn), num_train)
    backend = utils.resolve_backend(backend, train_features.device)
    where = "cpu" if backend == "faiss" else train_features.device.type
    print(f"Searching the {max_k} nearest neighbours of {test_features.shape[0]} test images among {num_train} "
          f"train images ({backend} on {where}, {num_classes} classes)")
    similarities, indices = utils.knn_search(train_features, test_features, max_k, backend)
    neighbor_labels = train_labels.to(indices.device)[indices]  # (N_test, max_k)
    results = {}
    for k in nb_knn:
        if k > num_train:
            print(f"k={k} is larger than the {num_train} training images: using k={num_train}")
        top1, top5 = utils.knn_vote(similarities, neighbor_labels, test_labels, min(k, num_train), T, num_classes)
        print(f"{k}-NN classifier result: Top1: {top1}, Top5: {top5}")
        results[str(k)] = {"top1": top1, "top5": top5}
    return results


# ----------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------
def build_datasets(args: argparse.Namespace) -> tuple:
    """Train and val datasets with the val transform; their class lists must agree."""
    transform = utils.eval_transform(args.resize_size, args.crop_size)
    dataset_train = utils.build_eval_dataset(args.data_path, "train", transform)
    dataset_val = utils.build_eval_dataset(args.data_path, "val", transform)
    utils.check_same_classes(dataset_train, dataset_val)
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
        loader = utils.feature_loader(dataset, args.batch_size_per_gpu, args.num_workers)
        feats = utils.extract_features(model, loader, args.device)  # (N, D)
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
