"""Image retrieval on the revisited Oxford and Paris benchmarks (Radenović et al., CVPR 2018).

Reproduces the DINO reference protocol: every image is shrunk to fit ``--imsize`` keeping its aspect ratio
and passed alone (batch of one) through the frozen ViT; its [CLS] output, optionally averaged over the
scales 1, 1/sqrt(2) and 1/2, is L2-normalised, and the database is ranked by cosine similarity to each
query. mAP and mP@{1,5,10} are reported for the Easy, Medium and Hard setups of the revisited protocol.

Differences from the reference: queries are cropped to their bounding box by default, as the revisited
protocol prescribes (``--crop_queries false`` reproduces the reference, which did not crop); the Easy
setup is reported too; image sides that are not multiples of the patch size lose their last pixels
explicitly (the reference's strided patch embedding dropped them silently).
"""
import argparse
import json
import math
import os
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import functional as TF

import datasets
import eval_knn
import utils

DATASETS = ("roxford5k", "rparis6k")
GLDV2_URL = ("https://dl.fbaipublicfiles.com/dino/dino_vitsmall16_googlelandmark_pretrain/"
             "dino_vitsmall16_googlelandmark_pretrain.pth")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)
KAPPAS = (1, 5, 10)
# setup -> (lists of gnd[i] that are positives, lists that are ignored)
SETUPS = {
    "E": (("easy",), ("junk", "hard")),
    "M": (("easy", "hard"), ("junk",)),
    "H": (("hard",), ("junk", "easy")),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Image retrieval on revisited Oxford and Paris", add_help=False)
    parser.add_argument("--data_path", default="/path/to/revisited_paris_oxford/", type=str,
                        help="Folder holding roxford5k/ and rparis6k/, each with jpg/*.jpg and gnd_<name>.pkl "
                             "as prepared by https://github.com/filipradenovic/revisitop")
    parser.add_argument("--dataset", default="roxford5k", type=str, choices=DATASETS,
                        help="Which benchmark to evaluate.")
    parser.add_argument("--imsize", default=224, type=int,
                        help="Images are shrunk to fit an imsize x imsize square, keeping their aspect ratio.")
    parser.add_argument("--multiscale", default=False, type=utils.bool_flag,
                        help="Average the features at scales 1, 1/sqrt(2) and 1/2.")
    parser.add_argument("--crop_queries", default=True, type=utils.bool_flag,
                        help="Crop queries to their bounding box as the revisited protocol prescribes; false "
                             "reproduces the DINO reference, which used the whole query image.")
    utils.eval_model_args(parser, default_weights="the official DINO weights pretrained on "
                          "Google Landmarks v2 for vit_small/16, the official ImageNet ones for other models")
    return parser


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def load_ground_truth(data_path: str, dataset: str) -> dict:
    """Read ``data_path/<dataset>/gnd_<dataset>.pkl`` (untrusted, so with the restricted unpickler) and
    check it holds ``imlist``, ``qimlist`` and one ``gnd`` entry per query."""
    gnd_path = os.path.join(data_path, dataset, f"gnd_{dataset}.pkl")
    if not os.path.isfile(gnd_path):
        raise utils.UserError(f"ground truth {gnd_path} not found: --data_path must hold "
                              f"{dataset}/gnd_{dataset}.pkl and {dataset}/jpg/ as prepared by the revisitop tools")
    cfg = datasets.safe_pickle_load(gnd_path)
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise utils.UserError(f"{gnd_path} is not a revisitop ground truth: expected a dict with imlist, "
                              f"qimlist and gnd")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise utils.UserError(f"{gnd_path} has {len(cfg['gnd'])} gnd entries for {len(cfg['qimlist'])} queries")
    for i, g in enumerate(cfg["gnd"]):
        missing = [k for k in ("easy", "hard", "junk") if k not in g]
        if missing:
            raise utils.UserError(f"{gnd_path}: gnd[{i}] lacks {', '.join(missing)}")
    return cfg


def query_boxes(cfg: dict, dataset: str) -> list:
    """The ``bbx`` (x0, y0, x1, y1) of every query as floats, checked: queries are cropped to them."""
    boxes = []
    for i, g in enumerate(cfg["gnd"]):
        try:
            x0, y0, x1, y1 = (float(v) for v in g["bbx"])
            valid = x0 < x1 and y0 < y1
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise utils.UserError(f"gnd_{dataset}.pkl: gnd[{i}] has no bounding box (x0, y0, x1, y1) with x0 < x1 "
                                  f"and y0 < y1 (bbx: {g.get('bbx')!r}): fix it or pass --crop_queries false")
        boxes.append((x0, y0, x1, y1))
    return boxes


class OxfordParisDataset(torch.utils.data.Dataset):
    """Database (``split="database"``) or query (``split="query"``) images of a revisited benchmark.

    Items are normalised tensors (3, h, w) with max(h, w) <= imsize; queries are first cropped to their
    ``bbx`` when ``crop_queries``.
    """

    def __init__(self, data_path: str, dataset: str, split: str, imsize: int, crop_queries: bool = True,
                 cfg: Optional[dict] = None):
        if split not in ("database", "query"):
            raise ValueError(f"split must be 'database' or 'query', got {split!r}")
        self.cfg = cfg if cfg is not None else load_ground_truth(data_path, dataset)
        self.image_dir = os.path.join(data_path, dataset, "jpg")
        names = self.cfg["qimlist"] if split == "query" else self.cfg["imlist"]
        self.paths = [os.path.join(self.image_dir, name + ".jpg") for name in names]
        self.boxes = query_boxes(self.cfg, dataset) if split == "query" and crop_queries else None
        self.imsize = imsize
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise utils.UserError(f"{len(missing)} {split} image(s) of {dataset} missing, e.g. {missing[0]}: "
                                  f"every name in the {'qimlist' if split == 'query' else 'imlist'} of "
                                  f"gnd_{dataset}.pkl must be a .jpg in {self.image_dir}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        img = datasets.open_image(self.paths[index])
        if self.boxes is not None:
            img = img.crop(self.boxes[index])
        img.thumbnail((self.imsize, self.imsize), Image.Resampling.LANCZOS)
        return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)  # (3, h, w)


# ----------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------
def fit_to_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Drop the last rows/columns so both sides are multiples of ``patch_size``: (B, 3, H', W'). A side
    shorter than one patch (a tiny or very thin image, or one at scale 1/2) is first stretched to one patch."""
    H, W = images.shape[-2:]
    if H < patch_size or W < patch_size:
        images = nn.functional.interpolate(images, size=(max(H, patch_size), max(W, patch_size)),
                                           mode="bilinear", align_corners=False)  # (B, 3, >=p, >=p)
    h, w = images.shape[-2] // patch_size * patch_size, images.shape[-1] // patch_size * patch_size
    return images[..., :h, :w]


def retrieval_features(model: nn.Module, images: torch.Tensor, patch_size: int,
                       scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """[CLS] features averaged over ``scales`` (bilinear resizing), L2-normalised: (B, D)."""
    total = None
    for scale in scales:
        x = images if scale == 1 else nn.functional.interpolate(
            images, scale_factor=scale, mode="bilinear", align_corners=False)  # (B, 3, h, w)
        feats = model(fit_to_patches(x, patch_size))  # (B, D)
        total = feats if total is None else total + feats
    return nn.functional.normalize(total / len(scales), dim=-1)  # (B, D)


# ----------------------------------------------------------------------------------------------------
# Revisited protocol
# ----------------------------------------------------------------------------------------------------
def setup_ground_truth(gnd: Sequence[dict], setup: str) -> List[Dict[str, np.ndarray]]:
    """Per-query ``ok`` (positives) and ``junk`` (ignored) database indices for setup E, M or H."""
    ok_keys, junk_keys = SETUPS[setup]
    return [{"ok": np.concatenate([np.asarray(g[k], dtype=np.int64).ravel() for k in ok_keys]),
             "junk": np.concatenate([np.asarray(g[k], dtype=np.int64).ravel() for k in junk_keys])}
            for g in gnd]


def compute_map(ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = KAPPAS
                ) -> Tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP and mean precision@k of a ranking with the revisitop semantics.

    ``ranks`` (n_db, n_q): column i lists database indices, best first, for query i. ``gnd[i]`` has
    ``ok`` (positives) and optionally ``junk`` (removed from the ranking; an index in both counts as a
    positive). Queries without positives are skipped (NaN in ``aps``/``prs``) and left out of the means.
    Precision@k follows revisitop: with the last positive at 1-based position p < k it is measured at p.
    Returns ``(mAP, aps (n_q,), pr (len(kappas),), prs (n_q, len(kappas)))``, fractions in [0, 1].
    """
    ranks = np.asarray(ranks)
    num_queries = len(gnd)
    if ranks.ndim != 2 or ranks.shape[1] != num_queries:
        raise ValueError(f"ranks must be (n_db, {num_queries}), got {ranks.shape}")
    aps = np.full(num_queries, np.nan)
    prs = np.full((num_queries, len(kappas)), np.nan)
    for i, g in enumerate(gnd):
        ok = np.asarray(g["ok"], dtype=np.int64).ravel()
        if ok.size == 0:
            continue
        junk = np.asarray(g.get("junk", []), dtype=np.int64).ravel()
        is_pos = np.isin(ranks[:, i], ok)  # (n_db,)
        keep = is_pos | ~np.isin(ranks[:, i], junk)  # (n_db,)
        pos = np.flatnonzero(is_pos[keep])  # 0-based positions of the positives once junk is gone
        aps[i] = utils.average_precision(pos, ok.size)
        for j, k in enumerate(kappas):
            cutoff = min(pos[-1] + 1, k) if pos.size else k
            prs[i, j] = np.count_nonzero(pos < cutoff) / cutoff
    answered = ~np.isnan(aps)
    if not answered.any():
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return float(aps[answered].mean()), aps, prs[answered].mean(axis=0), prs


def evaluate(ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = KAPPAS) -> dict:
    """mAP and mP@k in percent for the three setups: ``{"E": (mAP, [mP@k...]), "M": ..., "H": ...}``."""
    results = {}
    for setup in SETUPS:
        mean_ap, _, pr, _ = compute_map(ranks, setup_ground_truth(gnd, setup), kappas)
        results[setup] = (100.0 * mean_ap, [100.0 * p for p in pr])
    return results


def _json_number(value: float) -> Optional[float]:
    return None if math.isnan(value) else round(value, 4)


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> dict:
    args.force_cpu = not args.use_cuda
    utils.init_distributed_mode(args)
    utils.resolve_model_args(args)
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    if args.imsize < args.patch_size:
        raise utils.UserError(f"--imsize {args.imsize} is smaller than one patch ({args.patch_size})")

    cfg = load_ground_truth(args.data_path, args.dataset)
    database = OxfordParisDataset(args.data_path, args.dataset, "database", args.imsize, cfg=cfg)
    queries = OxfordParisDataset(args.data_path, args.dataset, "query", args.imsize, args.crop_queries, cfg=cfg)
    print(f"{args.dataset}: {len(database)} database images / {len(queries)} queries "
          f"({'cropped to their box' if args.crop_queries else 'whole images'})")

    model = utils.build_backbone(args.arch, args.patch_size)
    default_url = GLDV2_URL if (args.arch, args.patch_size) == ("vit_small", 16) else None
    utils.load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch,
                                  args.patch_size, default_url=default_url)
    model.to(args.device).eval()

    feature_fn = partial(retrieval_features, patch_size=args.patch_size,
                         scales=SCALES if args.multiscale else (1.0,))
    features = []
    for name, dataset in (("database", database), ("queries", queries)):
        print(f"Extracting features of the {name}")
        loader = eval_knn.feature_loader(dataset, batch_size=1, num_workers=args.num_workers)
        features.append(eval_knn.extract_features(model, loader, args.device, feature_fn))
    db_feats, q_feats = features  # (n_db, D), (n_q, D)

    similarity = db_feats @ q_feats.T  # (n_db, n_q) cosine: both are L2-normalised
    ranks = torch.argsort(-similarity, dim=0, stable=True).numpy()  # (n_db, n_q)
    results = evaluate(ranks, cfg["gnd"])

    summary = {"dataset": args.dataset}
    summary.update({f"mAP_{s}": _json_number(results[s][0]) for s in SETUPS})
    summary["mP@k"] = {s: [_json_number(p) for p in results[s][1]] for s in SETUPS}
    print(f">> {args.dataset}: mAP " + ", ".join(f"{s}: {results[s][0]:.2f}" for s in SETUPS))
    print(f">> {args.dataset}: mP@k{list(KAPPAS)} " + ", ".join(
        f"{s}: {np.round(results[s][1], 2).tolist()}" for s in SETUPS))
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    parser = utils.ArgumentParser("Image retrieval on revisited Oxford and Paris", parents=[get_args_parser()])
    utils.run_cli(main, parser.parse_args())
