"""Copy detection on Copydays (Douze et al., 2009) as in the DINO reference.

Every image is resized to ``imsize x imsize``; its feature is the [CLS] output of the last (normed) layer
concatenated with the GeM (p=4) pooling of its patch tokens. Optionally a PCA whitening (eigenvalue power
0.5) is learned on a separate image set after centering, and distractor images join the originals in the
database. Each query block (``original``, ``strong``, ``jpegqual/<q>``, ``crops/<c>``) searches the
database for its 20 nearest neighbours by cosine similarity and is scored with the Holidays trapezoid AP.
Positives: the original at the same position (sorted file names) for every block but ``strong``, whose
positives are the originals sharing the first four characters of the file name.

Differences from the reference: block sizes come from the folders on disk (the reference hard-coded 157
and 229) and blocks missing on disk are skipped; the whitening covariance is computed on centered
features (the reference centered only the features it whitened); mAP is printed in percent.
"""
import argparse
import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torchvision import transforms

import datasets
import eval_knn
import utils

QUERY_BLOCKS = (["original", "strong"] + [f"jpegqual/{q}" for q in (3, 5, 8, 10, 15, 20, 30, 50, 75)]
                + [f"crops/{c}" for c in (10, 15, 20, 30, 40, 50, 60, 70, 80)])
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TOP_K = 20
GEM_P = 4.0
DEFAULT_MODEL = ("vit_base", 8)  # arch and patch size of DINO's copy-detection model, without saved args


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Copy detection on Copydays", add_help=False)
    parser.add_argument("--data_path", default="/path/to/copydays/", type=str,
                        help="Copydays folder with original/, strong/, jpegqual/<q>/ and crops/<c>/ "
                             "(see https://lear.inrialpes.fr/~jegou/data.php#copydays).")
    parser.add_argument("--whitening_path", default="", type=str,
                        help="Folder of images to learn the PCA whitening on (the DINO paper: 20k random "
                             "YFCC100M images). Empty: no whitening.")
    parser.add_argument("--distractors_path", default="", type=str,
                        help="Folder of distractor images added to the database (the DINO paper: 10k random "
                             "YFCC100M images). Empty: no distractors.")
    parser.add_argument("--imsize", default=320, type=int, help="Images are resized to imsize x imsize.")
    parser.add_argument("--batch_size_per_gpu", default=16, type=int, help="Batch size per process.")
    utils.eval_model_args(parser, *DEFAULT_MODEL)
    return parser


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
class ImageListDataset(torch.utils.data.Dataset):
    """Images from a list of paths, decoded with ``datasets.open_image`` and transformed."""

    def __init__(self, paths: Sequence[str], transform: transforms.Compose):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(datasets.open_image(self.paths[index]))  # (3, imsize, imsize)


def find_blocks(data_path: str) -> Dict[str, List[str]]:
    """Sorted image paths of every Copydays block present under ``data_path``; ``original`` is required,
    missing query blocks are skipped with a note."""
    datasets.require_folder(data_path)
    original = os.path.join(data_path, "original")
    if not os.path.isdir(original) or not datasets.list_images(original):
        raise utils.UserError(f"no images in {original}: --data_path must hold Copydays' original/ (the database) "
                              f"and its query blocks strong/, jpegqual/<q>/, crops/<c>/")
    blocks, skipped = {}, []
    for name in QUERY_BLOCKS:
        folder = os.path.join(data_path, name)
        paths = datasets.list_images(folder) if os.path.isdir(folder) else []
        if paths:
            blocks[name] = paths
        else:
            skipped.append(name)
    if skipped:
        print(f"Note: skipping the Copydays blocks missing (or empty) under {data_path}: {', '.join(skipped)}")
    return blocks


def block_positives(block: str, query_paths: Sequence[str], original_paths: Sequence[str]) -> List[List[int]]:
    """Indices of the originals that are positives of each query of ``block``.

    ``strong``: the originals whose file name shares the query's first four characters. Every other block:
    the original at the same position in sorted order (the block must have as many images as original/).
    """
    originals = [os.path.basename(p) for p in original_paths]
    if block == "strong":
        return [[j for j, name in enumerate(originals) if name[:4] == os.path.basename(q)[:4]]
                for q in query_paths]
    if len(query_paths) != len(originals):
        raise utils.UserError(f"Copydays block {block} has {len(query_paths)} images but original/ has "
                              f"{len(originals)}: its images must correspond one to one, in sorted order")
    return [[i] for i in range(len(query_paths))]


def evaluate_block(neighbours: np.ndarray, positives: Sequence[Sequence[int]]) -> float:
    """Mean Holidays AP of the queries of one block; ``neighbours`` (Q, k) are database indices, best first."""
    aps = []
    for row, pos in zip(neighbours, positives):
        if not pos:
            aps.append(0.0)
            continue
        ranks = np.flatnonzero(np.isin(row, pos))  # (P,) 0-based ranks of the positives found
        aps.append(utils.average_precision(ranks, len(pos)))
    return float(np.mean(aps))


# ----------------------------------------------------------------------------------------------------
# Features, whitening, search
# ----------------------------------------------------------------------------------------------------
def cls_gem_features(model: nn.Module, images: torch.Tensor, p: float = GEM_P) -> torch.Tensor:
    """[CLS] of the last normed layer concatenated with GeM(p) of its patch tokens: (B, 2D)."""
    tokens = model.forward_tokens(images)  # (B, 1+N, D)
    cls = tokens[:, 0]  # (B, D)
    gem = tokens[:, 1:].clamp(min=1e-6).pow(p).mean(dim=1).pow(1.0 / p)  # (B, D)
    return torch.cat((cls, gem), dim=-1)  # (B, 2D)


def learn_whitening(features: torch.Tensor, power: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor]:
    """PCA whitening learned on ``features`` (n, D): returns the mean (D,) and the projection (D, D) whose
    rows are the principal directions divided by eigenvalue**power; eigenvalues below 1e-5 of the largest
    are raised to that floor."""
    feats = features.double()  # (n, D)
    mean = feats.mean(dim=0)  # (D,)
    centered = feats - mean  # (n, D)
    cov = centered.T @ centered / feats.shape[0]  # (D, D)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # (D,), (D, D), ascending
    eigvals = eigvals.clamp(min=eigvals.max().item() * 1e-5)  # (D,)
    order = torch.argsort(eigvals, descending=True)  # (D,)
    projection = eigvecs[:, order].T / eigvals[order, None].pow(power)  # (D, D)
    return mean.float(), projection.float()


def apply_whitening(features: torch.Tensor, mean: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    return (features - mean) @ projection.T  # (n, D)


def search(queries: torch.Tensor, database: torch.Tensor, k: int, device: torch.device) -> np.ndarray:
    """Database indices of the ``k`` nearest neighbours by cosine similarity, best first: (Q, k).
    faiss on CPU, a torch matrix product and top-k on CUDA."""
    queries = nn.functional.normalize(queries, dim=-1)  # (Q, D)
    database = nn.functional.normalize(database, dim=-1)  # (M, D)
    k = min(k, database.shape[0])
    if device.type == "cuda":
        similarity = queries.to(device) @ database.to(device).T  # (Q, M)
        return similarity.topk(k, dim=-1).indices.cpu().numpy()  # (Q, k)
    import faiss

    index = faiss.IndexFlatIP(database.shape[1])
    index.add(np.ascontiguousarray(database.numpy(), dtype=np.float32))
    _, neighbours = index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), k)  # (Q, k)
    return neighbours


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> dict:
    args.force_cpu = not args.use_cuda
    utils.init_distributed_mode(args)
    utils.resolve_model_args(args, *DEFAULT_MODEL)
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    if args.imsize % args.patch_size:
        raise utils.UserError(f"--imsize {args.imsize} must be a multiple of --patch_size {args.patch_size}")

    blocks = find_blocks(args.data_path)
    positives = {name: block_positives(name, paths, blocks["original"]) for name, paths in blocks.items()}
    distractors = datasets.list_images(args.distractors_path, recursive=True) if args.distractors_path else []
    whitening = datasets.list_images(args.whitening_path, recursive=True) if args.whitening_path else []
    for flag, folder, paths in (("--distractors_path", args.distractors_path, distractors),
                                ("--whitening_path", args.whitening_path, whitening)):
        if folder and not paths:
            raise utils.UserError(f"{flag} {folder} holds no images")
    print(f"Copydays: {', '.join(f'{name} ({len(paths)})' for name, paths in blocks.items())}; "
          f"{len(distractors)} distractors, {len(whitening)} whitening images")

    model = utils.build_backbone(args.arch, args.patch_size)
    utils.load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
    model.to(args.device).eval()

    transform = transforms.Compose([
        transforms.Resize((args.imsize, args.imsize), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])

    def features_of(paths: Sequence[str], what: str) -> torch.Tensor:
        print(f"Extracting features of {what} ({len(paths)} images)")
        loader = eval_knn.feature_loader(ImageListDataset(paths, transform), args.batch_size_per_gpu,
                                      args.num_workers)
        return eval_knn.extract_features(model, loader, args.device, cls_gem_features)  # (n, 2D)

    all_queries = [p for paths in blocks.values() for p in paths]
    query_feats = features_of(all_queries, "the query blocks")  # (Q, 2D)
    db_feats = query_feats[:len(blocks["original"])]  # (n_orig, 2D): original/ is the first block
    if distractors:
        db_feats = torch.cat((db_feats, features_of(distractors, "the distractors")))  # (M, 2D)
    if whitening:
        mean, projection = learn_whitening(features_of(whitening, "the whitening images"))
        query_feats = apply_whitening(query_feats, mean, projection)  # (Q, 2D)
        db_feats = apply_whitening(db_feats, mean, projection)  # (M, 2D)

    neighbours = search(query_feats, db_feats, TOP_K, args.device)  # (Q, k)
    results, start = {}, 0
    for name, paths in blocks.items():
        results[name] = 100.0 * evaluate_block(neighbours[start:start + len(paths)], positives[name])
        start += len(paths)
        print(f"eval on {name}: mAP={results[name]:.2f}")
    print(json.dumps({"mAP": {name: round(value, 4) for name, value in results.items()}}), flush=True)
    return results


if __name__ == "__main__":
    parser = utils.ArgumentParser("Copy detection on Copydays", parents=[get_args_parser()])
    utils.run_cli(main, parser.parse_args())
