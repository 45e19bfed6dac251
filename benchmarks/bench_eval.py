"""Benchmarks of the evaluation code.

1. k-NN (``eval_knn.evaluate_knn``, k = 10, 20, 100, 200) on clustered random features (50,000 train x
   10,000 test, width 384, 10 classes by default) with each backend in its own subprocess: seconds of the
   search + votes, resident memory before the search and its peak (``resource.getrusage`` max RSS; the
   features are generated in place so the peak belongs to the search), and the accuracies, which must
   agree. PASS when the backend ``eval_knn`` picks by default on CPU is the faster one.
2. Feature extraction (``eval_knn.extract_features`` through the k-NN val transform) of generated images
   with a randomly initialised ViT: images/s after one warm-up batch.

    python benchmarks/bench_eval.py                    # both, on CPU
    python benchmarks/bench_eval.py --cuda true        # also torch k-NN and extraction on the GPU
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import datasets  # noqa: E402
import eval_knn  # noqa: E402
import utils  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Evaluation benchmarks", add_help=False)
    parser.add_argument("--part", default="all", choices=["all", "knn", "extract"], help="What to measure.")
    parser.add_argument("--num_train", default=50000, type=int, help="k-NN: train features.")
    parser.add_argument("--num_test", default=10000, type=int, help="k-NN: test features.")
    parser.add_argument("--dim", default=384, type=int, help="k-NN: feature width.")
    parser.add_argument("--num_classes", default=10, type=int, help="k-NN: classes (one cluster each).")
    parser.add_argument("--spread", default=7.0, type=float, help="k-NN: noise norm relative to the cluster "
                        "centre norm (larger = harder).")
    parser.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int, help="k-NN: values of k.")
    parser.add_argument("--arch", default="vit_small", type=str, help="Extraction: architecture.")
    parser.add_argument("--patch_size", default=16, type=int, help="Extraction: patch size.")
    parser.add_argument("--crop_size", default=224, type=int, help="Extraction: network input side.")
    parser.add_argument("--batch_size", default=32, type=int, help="Extraction: batch size.")
    parser.add_argument("--batches", default=4, type=int, help="Extraction: timed batches (after one warm-up).")
    parser.add_argument("--num_workers", default=2, type=int, help="Extraction: data loading workers.")
    parser.add_argument("--threads", default=0, type=int, help="k-NN: CPU threads for torch and faiss "
                        "(0: their defaults).")
    parser.add_argument("--cuda", default=False, type=utils.bool_flag, help="Also measure on the GPU.")
    parser.add_argument("--worker", default=None, choices=["knn"], help="Internal: run one measurement.")
    parser.add_argument("--backend", default="faiss", type=str, help="Internal: k-NN backend of the worker.")
    parser.add_argument("--device", default="cpu", type=str, help="Internal: device of the worker.")
    return parser


def clustered_features(num: int, dim: int, num_classes: int, spread: float, seed: int) -> tuple:
    """L2-normalised centre + isotropic noise of norm about ``spread``, generated in chunks (no big temporaries)."""
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)  # (C, D), shared by train and test
    g.manual_seed(seed)
    labels = torch.randint(0, num_classes, (num,), generator=g)  # (N,)
    feats = torch.empty(num, dim)  # (N, D)
    for start in range(0, num, 4096):
        lab = labels[start:start + 4096]
        noise = torch.randn(len(lab), dim, generator=g) * (spread / dim ** 0.5)  # (b, D)
        feats[start:start + 4096] = F.normalize(centres[lab] + noise, dim=1)
    return feats, labels


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def knn_worker(args: argparse.Namespace) -> None:
    """One backend, one process: print a JSON line with time, memory and accuracies."""
    device = torch.device(args.device)
    if args.threads > 0:
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    train, train_labels = clustered_features(args.num_train, args.dim, args.num_classes, args.spread, seed=1)
    test, test_labels = clustered_features(args.num_test, args.dim, args.num_classes, args.spread, seed=2)
    train, train_labels, test, test_labels = (t.to(device) for t in (train, train_labels, test, test_labels))
    if device.type == "cuda":
        torch.cuda.synchronize()
    before = rss_mib()
    start = time.perf_counter()
    results = eval_knn.evaluate_knn(train, train_labels, test, test_labels, args.nb_knn, 0.07, args.backend)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    extra = {"gpu_peak_mib": torch.cuda.max_memory_allocated() / 2 ** 20} if device.type == "cuda" else {}
    print(json.dumps({"backend": args.backend, "device": args.device, "threads": torch.get_num_threads(),
                      "seconds": seconds, "rss_before_mib": before,
                      "peak_rss_mib": peak, "knn": results, **extra}))


def bench_knn(args: argparse.Namespace) -> bool:
    runs = [("faiss", "cpu"), ("torch", "cpu")] + ([("torch", "cuda")] if args.cuda else [])
    print(f"k-NN: {args.num_train} train x {args.num_test} test features of width {args.dim}, {args.num_classes} "
          f"clustered classes (spread {args.spread}), k = {args.nb_knn}, "
          f"{args.threads or torch.get_num_threads()} CPU threads")
    measured = {}
    for backend, device in runs:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "knn", "--backend", backend, "--device", device,
               "--num_train", str(args.num_train), "--num_test", str(args.num_test), "--dim", str(args.dim),
               "--num_classes", str(args.num_classes), "--spread", str(args.spread), "--threads", str(args.threads),
               "--nb_knn", *map(str, args.nb_knn)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        m = json.loads(out.strip().splitlines()[-1])
        measured[(backend, device)] = m
        accs = ", ".join(f"k={k}: {v['top1']:.2f}/{v['top5']:.2f}" for k, v in m["knn"].items())
        gpu = f", GPU peak {m['gpu_peak_mib']:.0f} MiB" if "gpu_peak_mib" in m else ""
        print(f"  {backend:5s} on {device:4s}: {m['seconds']:7.2f} s, RSS before search {m['rss_before_mib']:6.0f} MiB,"
              f" peak RSS {m['peak_rss_mib']:6.0f} MiB (+{m['peak_rss_mib'] - m['rss_before_mib']:.0f}){gpu};"
              f" top-1/top-5 {accs}")
    same = all(m["knn"] == measured[("faiss", "cpu")]["knn"] for m in measured.values())
    print(f"  same accuracy for every backend: {'yes' if same else 'NO'}")
    default = eval_knn.resolve_backend("auto", torch.device("cpu"))
    other = "torch" if default == "faiss" else "faiss"
    passed = measured[(default, "cpu")]["seconds"] <= measured[(other, "cpu")]["seconds"]
    print(f"{'PASS' if passed else 'FAIL'}: the CPU default backend ({default}) is "
          f"{'the faster' if passed else 'slower than ' + other}")
    return passed and same


class GeneratedImages(torch.utils.data.Dataset):
    """Random RGB images of a typical photo size, with the transform applied like an ImageFolder."""

    def __init__(self, num: int, transform, size: tuple = (375, 500)) -> None:
        self.num, self.transform, self.size = num, transform, size

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int):
        rng = np.random.default_rng(index)
        img = Image.fromarray(rng.integers(0, 256, size=(*self.size, 3), dtype=np.uint8))
        return self.transform(img), 0


def bench_extraction(args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)
    model = utils.build_backbone(args.arch, args.patch_size).to(device).eval()
    transform = datasets.eval_transform(round(args.crop_size * 256 / 224), args.crop_size)
    warmup = eval_knn.feature_loader(GeneratedImages(args.batch_size, transform), args.batch_size, 0)
    eval_knn.extract_features(model, warmup, device, print_freq=10 ** 6)
    num = args.batch_size * args.batches
    loader = eval_knn.feature_loader(GeneratedImages(num, transform), args.batch_size, args.num_workers)
    start = time.perf_counter()
    feats = eval_knn.extract_features(model, loader, device, print_freq=10 ** 6)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"Feature extraction {args.arch}/{args.patch_size} at {args.crop_size} on {device.type} "
          f"({torch.get_num_threads()} threads, {args.num_workers} loader workers, batch {args.batch_size}): "
          f"{num} images in {seconds:.2f} s = {num / seconds:.1f} images/s, features {tuple(feats.shape)}")


def main(args: argparse.Namespace) -> None:
    if args.worker == "knn":
        knn_worker(args)
        return
    ok = True
    if args.part in ("all", "knn"):
        ok = bench_knn(args)
    if args.part in ("all", "extract"):
        bench_extraction(args, torch.device("cpu"))
        if args.cuda:
            bench_extraction(args, torch.device("cuda"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Evaluation benchmarks", parents=[get_args_parser()])
    main(parser.parse_args())
