"""Run every benchmark of this folder in turn and end with one table: each target, its measured value, PASS/FAIL.

- ``bench_data_pipeline.py``: our augmentation + matches against a plain torchvision/PIL DINO multi-crop, and
  with the per-patch augmentation against without it;
- ``bench_train_step.py``: ``--patch_loss true`` against ``false`` (step time, peak memory, time per FLOP);
- ``bench_eval.py``: k-NN with faiss against torch (the CPU default must be the faster), and feature-extraction
  throughput (a figure, no target);
- ``bench_video_segmentation.py``: DAVIS label propagation against DINO's (same labels, faster), and frames/s at 480p
  (a figure, no target).

Each benchmark's own output streams as it runs; the summary collects its PASS/FAIL lines (and the throughput
lines). Exit status 1 when a target fails or a benchmark crashes.

    python benchmarks/run_all.py           # about 30 minutes on 2 CPU cores
    python benchmarks/run_all.py --quick   # training step of vit_tiny/16, out_dim 4096 only, video segmentation at
                                           # ViT-S/16 only (about 5 minutes)
"""
import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run(script: str, argv: list) -> tuple:
    """Run one benchmark, echoing its output; returns (exit status, its verdict and figure lines)."""
    print(f"\n=== {script} {' '.join(argv)}", flush=True)
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, script), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    kept = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        if "PASS" in line or "FAIL" in line or line.startswith(("Feature extraction", "Video segmentation")):
            kept.append(line.strip())
    return proc.wait(), kept


def main(args: argparse.Namespace) -> bool:
    train_argv = ["--configs", "vit_tiny:4096"] if args.quick else []
    jobs = [("bench_data_pipeline.py", []), ("bench_train_step.py", train_argv), ("bench_eval.py", []),
            ("bench_video_segmentation.py", ["--quick"] if args.quick else [])]
    summary, ok = [], True
    for script, argv in jobs:
        status, lines = run(script, argv)
        if status != 0 and not any("FAIL" in line for line in lines):
            lines.append(f"FAIL: exited with status {status}")
        ok &= status == 0 and not any("FAIL" in line for line in lines)
        summary += [f"{script:24s} {line}" for line in lines]
    print("\n=== Targets\n" + "\n".join(summary))
    print("all targets PASS" if ok else "some targets FAIL")
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Run all benchmarks")
    parser.add_argument("--quick", action="store_true", help="only the vit_tiny/16, out_dim 4096 training-step row "
                        "and the ViT-S/16 video segmentation")
    sys.exit(0 if main(parser.parse_args()) else 1)
