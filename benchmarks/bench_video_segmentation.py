"""Benchmark of eval_video_segmentation.py on a generated 480p video (854 x 480 JPEG frames, two moving objects).

1. Throughput: frames/s of ``eval_video_segmentation.segment_video`` (decoding, features of a randomly initialised
   ViT, propagation with DINO's settings, PNG writing) for each configuration, timed from the first frame on.
2. The propagation of one frame from a full context (the first frame and 7 previous ones, 8 x N patches), ours
   (``propagate_labels``: tiles, +-12 patches, top-5) against the transcription of DINO's code in
   ``tests/dino_video_reference.py`` (a dense (N x N) affinity per context frame, the mask built by four Python
   loops), on the same features: seconds (DINO's mask, built once per video, timed apart), peak resident memory over
   the memory before (each in its own process, ``VmHWM``), and the labels, which must be the same.
   PASS when the arg-max labels are identical, the soft labels agree within 1e-5 and ours is the faster.

The context frames beyond the recorded ones are the recorded features with a little noise, so that no two are equal.
One thread by default (``--threads``), as the other benchmarks: on a shared machine, small multi-threaded operations
wait at their barriers for the threads that other processes hold off the cores.

    python benchmarks/bench_video_segmentation.py            # ViT-S/16 and ViT-S/8, 4 frames (about 7 minutes)
    python benchmarks/bench_video_segmentation.py --quick    # ViT-S/16 only, 3 frames
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import datasets  # noqa: E402
import eval_video_segmentation as vos  # noqa: E402
import utils  # noqa: E402
from dino_video_reference import dino_propagation, loop_neighbourhood_mask  # noqa: E402

FRAME_SIZE = (480, 854)  # DAVIS 480p
CONTEXT = 8  # the first frame and DINO's 7 previous ones


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Video segmentation benchmark", add_help=False)
    parser.add_argument("--configs", default=["vit_small/16", "vit_small/8"], nargs="+",
                        help="Models as arch/patch_size (random weights).")
    parser.add_argument("--frames", default=4, type=utils.bounded(int, low=2), help="Frames of the video.")
    parser.add_argument("--threads", default=1, type=utils.bounded(int, low=0),
                        help="CPU threads of torch (0: its default).")
    parser.add_argument("--quick", action="store_true", help="vit_small/16 only, 3 frames.")
    parser.add_argument("--worker", default=None, choices=["ours", "dino"], help="Internal: time one propagation.")
    parser.add_argument("--inputs", default="", type=str, help="Internal: the worker's inputs and outputs (.pt).")
    return parser


def make_video(folder: str, frames: int) -> tuple:
    """JPEG frames of a smooth random background with an ellipse and a square sliding over it, and the first frame's
    annotation (ids 1 and 2) as a palette PNG. Returns (frame paths, annotation path)."""
    height, width = FRAME_SIZE
    rng = np.random.default_rng(0)
    background = Image.fromarray((rng.random((12, 20, 3)) * 255).astype(np.uint8)).resize(
        (width + 20 * frames, height), Image.Resampling.BICUBIC)
    paths = []
    for i in range(frames):
        image = background.crop((20 * i, 0, 20 * i + width, height))
        draw = ImageDraw.Draw(image)
        draw.ellipse((150 + 12 * i, 120, 350 + 12 * i, 330), fill=(230, 40, 40))
        draw.rectangle((500 - 8 * i, 200 + 5 * i, 640 - 8 * i, 340 + 5 * i), fill=(30, 60, 220))
        paths.append(os.path.join(folder, f"{i:05d}.jpg"))
        image.save(paths[-1], quality=90)
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    draw.ellipse((150, 120, 350, 330), fill=1)
    draw.rectangle((500, 200, 640, 340), fill=2)
    annotation = os.path.join(folder, "00000.png")
    datasets.write_palette_png(annotation, np.array(mask), datasets.davis_palette())
    return paths, annotation


def segment(config: str, frames: list, annotation: str, folder: str) -> tuple:
    """Run ``segment_video`` with a random ViT; returns (seconds, the features of every frame (F, N, D), grid)."""
    arch, patch_size = config.split("/")
    torch.manual_seed(0)
    model = utils.build_backbone(arch, int(patch_size)).eval()
    args = argparse.Namespace(short_side=480, num_workers=0, device=torch.device("cpu"), patch_size=int(patch_size),
                              n_last_frames=CONTEXT - 1, size_mask_neighborhood=12, topk=5)
    recorded, extract = [], vos.patch_features
    os.makedirs(folder)

    def recording(model: torch.nn.Module, frame: torch.Tensor) -> torch.Tensor:  # keeps each frame's features
        recorded.append(extract(model, frame))
        return recorded[-1]

    vos.patch_features = recording
    start = time.perf_counter()
    vos.segment_video(model, frames, annotation, folder, args)
    seconds = time.perf_counter() - start
    vos.patch_features = extract
    height, width = datasets.davis_frame_size(*FRAME_SIZE, 480)
    return seconds, torch.stack(recorded), (height // int(patch_size), width // int(patch_size))


def full_context(features: torch.Tensor, annotation: str, grid: tuple) -> dict:
    """A target frame and 8 context frames: the first frame with its one-hot labels, then recorded frames (cycled,
    with noise) with soft labels."""
    g = torch.Generator().manual_seed(0)
    first = vos.first_frame_labels(datasets.read_palette_png(annotation), grid)  # (C, N)
    later = [F.normalize(features[1 + j % (len(features) - 1)] + 0.02 * torch.randn(features.shape[1:], generator=g),
                         dim=1) for j in range(CONTEXT - 1)]
    labels = [first] + [torch.softmax(4 * first + torch.randn(first.shape, generator=g), dim=0)
                        for _ in range(CONTEXT - 1)]
    return {"target": features[-1], "sources": torch.stack([features[0], *later]), "labels": torch.stack(labels),
            "grid": grid}


def memory_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process from /proc/self/status, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def reset_peak_memory() -> None:
    """Start ``VmHWM`` again from the resident size (Linux >= 4.0). ``getrusage``'s peak cannot be reset, and a
    process started from a larger one inherits that one's peak across exec."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(args: argparse.Namespace) -> None:
    """Time one propagation (ours: best of 3; DINO's: its mask, then one call) and print a JSON line."""
    data = torch.load(args.inputs)
    inputs = (data["target"], data["sources"], data["labels"], data["grid"])
    reset_peak_memory()
    before, mask_seconds = memory_mib("VmRSS"), 0.0
    if args.worker == "ours":
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            soft = vos.propagate_labels(*inputs, 12, 5)  # (C, N)
            seconds.append(time.perf_counter() - start)
        seconds = min(seconds)
    else:
        start = time.perf_counter()
        mask = loop_neighbourhood_mask(*data["grid"], 12).unsqueeze(0)  # (1, N, N)
        mask_seconds = time.perf_counter() - start
        start = time.perf_counter()
        soft, _ = dino_propagation(*inputs, 12, 5, mask)  # (C, N)
        seconds = time.perf_counter() - start
    peak = memory_mib("VmHWM")
    torch.save(soft, args.inputs + f".{args.worker}")
    print(json.dumps({"seconds": seconds, "mask_seconds": mask_seconds, "peak_over_mib": peak - before}))


def compare(path: str, threads: int) -> dict:
    """Run both workers on the inputs saved at ``path``; their timings and how far their labels are apart."""
    runs = {}
    for name in ("ours", "dino"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name, "--inputs", path,
                              "--threads", str(threads)], capture_output=True, text=True, check=True).stdout
        runs[name] = json.loads(out.strip().splitlines()[-1])
    ours, dino = torch.load(path + ".ours"), torch.load(path + ".dino")
    runs["max_diff"] = (ours - dino).abs().max().item()
    runs["same_argmax"] = bool(torch.equal(ours.argmax(0), dino.argmax(0)))
    return runs


def bench(config: str, frames: int, folder: str, threads: int) -> bool:
    paths, annotation = make_video(folder, frames)
    seconds, features, grid = segment(config, paths, annotation, os.path.join(folder, config.replace("/", "_")))
    print(f"Video segmentation {config} at 480p on the CPU ({torch.get_num_threads()} threads): {frames} frames in "
          f"{seconds:.1f} s = {frames / seconds:.3f} frames/s (grid {grid[0]}x{grid[1]} = {grid[0] * grid[1]} "
          f"patches)", flush=True)
    path = os.path.join(folder, "inputs.pt")
    torch.save(full_context(features, annotation, grid), path)
    runs = compare(path, threads)
    ours, dino = runs["ours"], runs["dino"]
    print(f"  propagation of one frame from {CONTEXT} context frames: ours {ours['seconds']:.2f} s, peak "
          f"+{ours['peak_over_mib']:.0f} MiB; DINO's {dino['seconds']:.2f} s (+ {dino['mask_seconds']:.1f} s for its "
          f"mask, once per video), peak +{dino['peak_over_mib']:.0f} MiB: {dino['seconds'] / ours['seconds']:.1f}x "
          f"the time, {dino['peak_over_mib'] / max(ours['peak_over_mib'], 1):.1f}x the memory")
    passed = runs["same_argmax"] and runs["max_diff"] < 1e-5 and ours["seconds"] < dino["seconds"]
    print(f"{'PASS' if passed else 'FAIL'}: {config} propagation: same labels as DINO's "
          f"({'identical arg-max' if runs['same_argmax'] else 'DIFFERENT arg-max'}, max |difference| "
          f"{runs['max_diff']:.1e}), {dino['seconds'] / ours['seconds']:.1f}x faster", flush=True)
    return passed


def main(args: argparse.Namespace) -> bool:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return True
    configs, frames = (["vit_small/16"], 3) if args.quick else (args.configs, args.frames)
    ok = True
    for config in configs:
        with tempfile.TemporaryDirectory() as folder:
            ok &= bench(config, frames, folder, args.threads)
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Video segmentation benchmark", parents=[get_args_parser()])
    sys.exit(0 if main(parser.parse_args()) else 1)
