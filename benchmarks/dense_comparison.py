"""The README's small dense comparison: does the patch loss help local features?

Trains each arm on single garments (a fixed subset of Fashion-MNIST's train split, the README's recipe; 2 epochs
of 2,500 images unless ``--epochs``/``--max_images`` say otherwise) with the same settings and seeds, then scores
the teacher three ways: the k-NN monitor on single garments (Fashion-MNIST train/t10k, [CLS]), the linear
segmentation probe on the scenes of ``make_dense_data.py`` (``eval_segmentation.py``, mIoU) and label propagation
on its videos (``eval_video_segmentation.py``, J&F).
Arms: ``random`` (the untrained teacher: one step at lr 0), ``dino`` (``--patch_loss false``), ``patch``
(Patch-Wise DINO), ``patchaug`` (Patch-Wise DINO with ``--patch_augmentation true``). Prints a table (mean +- std
over the seeds, wall times, final teacher entropies against ln K) and draws it (``--figure``). A finished stage of a
run (training, probe, videos) is not redone, so an interrupted comparison continues where it stopped; ``--redo vos``
scores the kept checkpoints on new videos. Not part of ``run_all.py``: about 2 hours on 2 CPU cores.

    python make_dense_data.py --data_path $D --output_dir out/dense --num_scenes 600 --num_val_scenes 200 \\
        --num_videos 12
    python benchmarks/dense_comparison.py --data_path $D --dense_path out/dense --output_dir out/dense_runs \\
        --figure docs/dense_comparison.png
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

from matplotlib.figure import Figure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import plot_logs  # noqa: E402

OUT_DIM = 1024
TRAIN = ["--arch", "vit_tiny", "--patch_size", "4", "--resize", "0", "--global_size", "28", "--local_size", "16",
         "--local_crops_number", "2", "--out_dim", str(OUT_DIM), "--batch_size_per_gpu", "32", "--warmup_epochs", "1",
         "--lr", "0.008", "--momentum_teacher", "0.99", "--teacher_temp", "0.02", "--warmup_teacher_temp", "0.02",
         "--weight_decay_end", "0.04", "--knn_max_images", "2000", "--saveckp_freq", "0", "--print_freq", "20"]
ARMS = {"random": ["--patch_loss", "false", "--epochs", "1", "--lr", "0", "--min_lr", "0", "--max_images", "32"],
        "dino": ["--patch_loss", "false"],
        "patch": [],
        "patchaug": ["--patch_augmentation", "true"]}
LABELS = {"random": "random init", "dino": "DINO (--patch_loss false)", "patch": "Patch-Wise DINO",
          "patchaug": "Patch-Wise DINO + --patch_augmentation"}
SHORT = {"random": "random init", "dino": "DINO", "patch": "Patch-Wise\nDINO",
         "patchaug": "Patch-Wise\nDINO + patch aug."}  # the figure's tick labels
SEGMENTATION = ["--image_size", "96", "--resize_mode", "stretch", "--epochs", "20", "--val_freq", "20", "--lr", "2.0",
                "--batch_size_per_gpu", "64"]
VIDEO = ["--short_side", "128"]  # the 96-px canvas: DINO's resize floors the long side to a multiple of 64
METRICS = [("knn_top1", "k-NN top-1, single garments"), ("mIoU", "linear probe mIoU, scenes"),
           ("J&F", "J&F, videos")]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Patch-Wise DINO: the small dense comparison", add_help=True)
    parser.add_argument("--data_path", required=True, type=str,
                        help="Fashion-MNIST's MNIST-format folder (k-NN on single garments)")
    parser.add_argument("--dense_path", required=True, type=str,
                        help="the --output_dir of make_dense_data.py (scenes/ and davis/)")
    parser.add_argument("--output_dir", default="dense_runs", type=str, help="one folder per arm and seed")
    parser.add_argument("--arms", default=list(ARMS), nargs="+", choices=list(ARMS), help="arms to run")
    parser.add_argument("--seeds", default=[0, 1, 2], nargs="+", type=int, help="seeds of every arm")
    parser.add_argument("--epochs", default=2, type=int, help="training epochs of every trained arm")
    parser.add_argument("--max_images", default=2500, type=int,
                        help="the fixed subset of Fashion-MNIST's train split every trained arm sees")
    parser.add_argument("--redo", default=[], nargs="+", choices=["seg", "vos"],
                        help="run these evaluations again even where finished (e.g. vos after new videos)")
    parser.add_argument("--num_workers", default=2, type=int, help="data workers of every script")
    parser.add_argument("--figure", default=None, type=str, help="where to draw the table (a PNG)")
    return parser


def run_script(script: str, argv: List[str], log_path: str) -> float:
    """Run a top-level script, its output in ``log_path``; returns its wall time (s). Stops on failure."""
    start = time.time()
    with open(log_path, "w") as log:
        status = subprocess.call([sys.executable, os.path.join(REPO, script), *argv], stdout=log,
                                 stderr=subprocess.STDOUT, cwd=REPO)
    if status:
        sys.exit(f"{script} failed (exit status {status}); its output: {log_path}")
    return time.time() - start


def last_json(path: str) -> dict:
    """The last line of a script's output: its JSON result."""
    with open(path) as f:
        return json.loads(f.read().strip().splitlines()[-1])


def stage_done(path: str, key: str) -> bool:
    """Whether a stage's output ends with its JSON result (a stage interrupted midway has none)."""
    try:
        return key in last_json(path)
    except (OSError, ValueError, IndexError):
        return False


def run_one(args: argparse.Namespace, arm: str, seed: int) -> dict:
    """Train one arm with one seed and evaluate its teacher. Each stage (training, the probe, the videos) is
    skipped when its output is complete, unless ``--redo`` names it; its wall time is kept in ``times.json``."""
    folder = os.path.join(args.output_dir, f"{arm}-s{seed}")
    os.makedirs(folder, exist_ok=True)
    times_path = os.path.join(folder, "times.json")
    times = {}
    if os.path.isfile(times_path):
        with open(times_path) as f:
            times = json.load(f)
    workers = ["--num_workers", str(args.num_workers)]
    weights = ["--pretrained_weights", os.path.join(folder, "checkpoint.pth"), "--checkpoint_key", "teacher"]
    recipe = ["--epochs", str(args.epochs), "--max_images", str(args.max_images)]
    stages = {  # name: (script, its arguments, the key of its last JSON line or None); output in <name>.out
        "train": ("patch_wise_dino.py", TRAIN + recipe + ARMS[arm] + workers + [
            "--seed", str(seed), "--data_path", args.data_path, "--knn_data_path", args.data_path,
            "--output_dir", folder], None),
        "seg": ("eval_segmentation.py", SEGMENTATION + weights + workers + [
            "--data_path", os.path.join(args.dense_path, "scenes"), "--output_dir", os.path.join(folder, "seg")],
            "mIoU"),
        "vos": ("eval_video_segmentation.py", VIDEO + weights + [  # --overwrite: the videos may have changed
            "--data_path", os.path.join(args.dense_path, "davis"), "--output_dir", os.path.join(folder, "vos"),
            "--overwrite", "true"], "J&F-Mean")}
    for name, (script, argv, key) in stages.items():
        output = os.path.join(folder, f"{name}.out")
        done = name in times and (key is None or stage_done(output, key))
        if done and name not in args.redo:
            continue
        times[name] = run_script(script, argv, output)
        with open(times_path, "w") as f:
            json.dump(times, f)
    log = plot_logs.read_log(os.path.join(folder, "log.txt"))[0][-1]  # the last epoch's line
    result = {"arm": arm, "seed": seed, "knn_top1": log["knn_top1"],
              "mIoU": last_json(os.path.join(folder, "seg.out"))["mIoU"],
              "J&F": 100 * last_json(os.path.join(folder, "vos.out"))["J&F-Mean"],
              "entropy_cls": log["train_teacher_entropy_cls"],
              "entropy_patch": log.get("train_teacher_entropy_patch"),
              "train_s": times["train"], "eval_s": times["seg"] + times["vos"]}
    with open(os.path.join(folder, "result.json"), "w") as f:  # a summary to read; not a cache
        json.dump(result, f)
    print(json.dumps(result), flush=True)
    return result


def mean_std(values: List[float]) -> tuple:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(results: Dict[str, List[dict]]) -> str:
    """The README's markdown table: mean +- std over the seeds of each metric, the final teacher entropies
    (mean), the median wall time of a seed (training and both evaluations)."""
    lines = ["| arm | " + " | ".join(name for _, name in METRICS)
             + f" | teacher entropy [CLS] / patch (ln K = {math.log(OUT_DIM):.2f}) | wall time per seed (median) |",
             "| --- " * (len(METRICS) + 3) + "|"]
    for arm, runs in results.items():
        cells = ["{:.1f} ± {:.1f}".format(*mean_std([r[key] for r in runs])) for key, _ in METRICS]
        patch = [r["entropy_patch"] for r in runs if r["entropy_patch"] is not None]
        entropy = f"{statistics.mean(r['entropy_cls'] for r in runs):.2f}"
        entropy += f" / {statistics.mean(patch):.2f}" if patch else " / –"
        minutes = statistics.median(r["train_s"] + r["eval_s"] for r in runs) / 60
        lines.append(f"| {LABELS[arm]} | " + " | ".join(cells) + f" | {entropy} | {minutes:.0f} min |")
    return "\n".join(lines)


def draw(results: Dict[str, List[dict]], path: str) -> None:
    """One panel per metric: each arm's mean with its std as an error bar, its seeds as dots."""
    figure = Figure(figsize=(4 * len(METRICS), 3.6), layout="constrained")
    axes = figure.subplots(1, len(METRICS))
    for ax, (key, name) in zip(axes, METRICS):
        for x, (arm, runs) in enumerate(results.items()):
            values = [r[key] for r in runs]
            mean, std = mean_std(values)
            ax.bar(x, mean, yerr=std, capsize=4, color=f"C{x}", alpha=0.8)
            ax.plot([x] * len(values), values, "k.", markersize=4)
        ax.set_xticks(range(len(results)), [SHORT[arm] for arm in results], fontsize=7)
        ax.set_title(name, fontsize=9)
    figure.savefig(path, dpi=120)


def main(args: argparse.Namespace) -> Dict[str, List[dict]]:
    os.makedirs(args.output_dir, exist_ok=True)
    results = {arm: [] for arm in ARMS if arm in args.arms}  # the table's order
    for seed in args.seeds:  # seed by seed: every arm has results early
        for arm in args.arms:  # the order asked for
            results[arm].append(run_one(args, arm, seed))
    print(table(results))
    if args.figure:
        draw(results, args.figure)
        print(f"figure: {args.figure}")
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
