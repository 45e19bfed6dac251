"""Benchmark of one Patch-Wise DINO training step: ``--patch_loss true`` against ``false`` (vanilla DINO).

Inputs: one batch of 8 images (``--batch_size``) from the sample photos (``data/sample``) through the real data pipeline
(2 global crops of 224, 8 local crops of 96, their matches), fixed seed; float32 on the CPU by default.
Each (configuration, mode) runs ``pwd.train_step`` (student + teacher forward, loss, backward,
clipping, optimiser, teacher EMA) in its own subprocess, so that its peak resident memory
(``resource.getrusage`` max RSS) belongs to it alone; seconds per step are the fastest of ``--steps``
steps after one warm-up step (other load on the machine only ever adds time), on one CPU thread by
default (``--threads``: with several threads, load from other processes stalls every parallel region,
and timings on a shared machine vary several-fold).
Vanilla and patch-wise subprocesses alternate over ``--rounds`` rounds and each keeps its fastest round,
so load from other processes hits both alike.

On the CPU the subprocesses run with ``GLIBC_TUNABLES`` set to ``KEEP_FREED_MEMORY`` (``--keep_freed_memory``, both
modes): glibc then keeps freed blocks for reuse instead of returning them to the kernel, which otherwise maps and
zeroes the step's GB-sized (tokens, K) tensors afresh, page by page, at every step. That cost grows with memory, not
with FLOPs (ViT-S/16, K=65536: 15.0 s instead of 13.6 s per patch-wise step, vanilla unchanged), and users remove it
with the same variable; ``--keep_freed_memory false`` measures glibc's defaults.

Memory: peak resident set of the process on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one whole step (matrix
products and attention of the backbones and of the heads on the tokens actually used, forward and
backward) plus the loss, counted separately in the same mode with one FLOP per element per element-wise
op (4 for softmax, log-softmax and logsumexp).

Targets (vit_tiny/16, out_dim 4096): patch-wise step time <= 1.8 x vanilla and peak memory <= 1.3 x
vanilla; and for every configuration: (time ratio) <= 1.15 x (FLOP ratio).

    python benchmarks/bench_train_step.py                          # all rows (about 17 min on 2 cores)
    python benchmarks/bench_train_step.py --configs vit_tiny:4096  # the time / memory targets only
    python benchmarks/bench_train_step.py --configs vit_small/8:10000 --batch_size 6  # the authors' recipe
    python benchmarks/bench_train_step.py --compile true                  # both modes with torch.compile
    python benchmarks/bench_train_step.py --device cuda --use_fp16 true --amp_dtype bfloat16
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import datasets  # noqa: E402
import patch_matching  # noqa: E402
import patch_wise_dino as pwd  # noqa: E402
import utils  # noqa: E402

aten = torch.ops.aten
DEFAULT_CONFIGS = "vit_tiny:4096,vit_tiny:65536,vit_small:4096,vit_small:65536"
# blocks up to 2 GB come from the heap instead of their own mapping, and the heap is not trimmed below 4 GB free
KEEP_FREED_MEMORY = "glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=4294967295"


def elementwise_flops(*shapes, out_shape=None, **kwargs) -> int:
    """One FLOP per element of the largest tensor an op reads or writes."""
    sizes = [math.prod(s) for s in (*shapes, out_shape) if isinstance(s, (tuple, list, torch.Size))
             and all(isinstance(d, int) for d in s)]
    return max(sizes, default=0)


def softmax_flops(*shapes, out_shape=None, **kwargs) -> int:
    return 4 * elementwise_flops(*shapes, out_shape=out_shape)


LOSS_OPS = {op: elementwise_flops for op in (aten.mul, aten.sub, aten.div, aten.add, aten.exp, aten.log, aten.sum,
                                             aten.amax, aten.index_add, aten.neg, aten.rsub)}
LOSS_OPS.update({op: softmax_flops for op in (aten._softmax, aten._log_softmax, aten.logsumexp)})


def make_batch(args: argparse.Namespace) -> pwd.MultiCropBatch:
    """Eight sample photos through the training transform and matching; [CLS]-only matches when vanilla."""
    transform = pwd.DataAugmentationPatchWiseDINO(args.global_crops_scale, args.local_crops_scale,
                                                  args.local_crops_number, args.patch_size, args.global_size,
                                                  args.local_size, args.resize)
    images = datasets.build_image_source(datasets.default_data_path())
    dataset = pwd.MultiCropDataset(images, transform, args.patch_size, patch_loss=True)
    torch.manual_seed(0)
    items = [dataset[i % len(dataset)] for i in range(args.batch_size_per_gpu)]
    if not args.patch_loss:
        items = [(crops, patch_matching.cls_only_matches(len(crops))) for crops, _ in items]
    return pwd.collate_multicrop(items)


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(config: dict) -> dict:
    """Time one mode of one configuration in this process; returns seconds, memory and FLOPs."""
    argv = ["--arch", config["arch"], "--patch_size", str(config["patch_size"]), "--out_dim", str(config["out_dim"]),
            "--batch_size_per_gpu", str(config["batch_size"]), "--local_crops_number", "8",
            "--patch_loss", str(config["patch_loss"]),
            "--use_fp16", str(config["use_fp16"]), "--amp_dtype", config["amp_dtype"], "--epochs", "1",
            "--compile", str(config["compile"])]
    args = argparse.ArgumentParser(parents=[pwd.get_args_parser()]).parse_args(argv)
    args.force_cpu = config["device"] == "cpu"
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    utils.init_distributed_mode(args)
    utils.fix_random_seeds(0)
    batch = make_batch(args)
    student, teacher = pwd.build_models(args)
    positions = 1 + (args.global_size // args.patch_size) ** 2 if args.patch_loss else 1
    dino_loss = pwd.PatchWiseDINOLoss(args.out_dim, positions, 0.04, 0.04, 0, 1).to(args.device)
    state = pwd.TrainState(student, teacher, dino_loss, pwd.build_optimizer(args, student),
                           pwd.setup_precision(args))
    cuda = args.device.type == "cuda"
    before = torch.cuda.memory_allocated() / 2 ** 20 if cuda else max_rss_mb()
    times = []
    for _ in range(1 + config["steps"]):  # the first step warms up (and compiles with --compile true)
        start = time.perf_counter()
        pwd.train_step(state, batch, 1, 1e-4, 0.04, 0.996, args)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else max_rss_mb()
    captured = {}
    hook = dino_loss.register_forward_pre_hook(lambda module, inputs: captured.update(inputs=inputs))
    with FlopCounterMode(display=False) as counter:
        pwd.train_step(state, batch, 1, 1e-4, 0.04, 0.996, args)
    hook.remove()
    student_out, teacher_out, plan, epoch = captured["inputs"]
    student_out = student_out.detach().requires_grad_()
    with FlopCounterMode(display=False, custom_mapping=LOSS_OPS) as loss_counter:
        loss, _ = dino_loss(student_out, teacher_out, plan, epoch)
        loss.backward()
    return {"seconds": min(times[1:]), "peak_mb": peak, "before_mb": before,
            "model_flops": counter.get_total_flops(), "loss_flops": loss_counter.get_total_flops(),
            "student_tokens": len(plan.student_rows), "entries": len(plan.entry_teacher),
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def run_worker(config: dict, keep_freed_memory: bool) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if keep_freed_memory:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, (os.environ.get("GLIBC_TUNABLES"), KEEP_FREED_MEMORY)))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(config)],
                          capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {config} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def verdict(value: float, limit: float) -> str:
    return f"{value:6.2f} <= {limit:<5.2f} {'PASS' if value <= limit else 'FAIL'}"


def main(args: argparse.Namespace) -> bool:
    rows, ok = [], True
    for spec in args.configs.split(","):
        model, out_dim = spec.split(":")
        arch, _, patch_size = model.partition("/")
        patch_size = int(patch_size or 16)
        results = {}
        for _ in range(args.rounds):
            for patch_loss in (False, True):
                config = dict(arch=arch, patch_size=patch_size, out_dim=int(out_dim), batch_size=args.batch_size,
                              patch_loss=patch_loss, steps=args.steps,
                              device=args.device, use_fp16=args.use_fp16, amp_dtype=args.amp_dtype,
                              threads=args.threads, compile=args.compile)
                result = run_worker(config, args.keep_freed_memory and args.device == "cpu")
                best = results.get(patch_loss)
                if best is None or result["seconds"] < best["seconds"]:
                    results[patch_loss] = {**result, "peak_mb": min(result["peak_mb"],
                                                                    best["peak_mb"] if best else math.inf)}
        vanilla, patch = results[False], results[True]
        time_ratio = patch["seconds"] / vanilla["seconds"]
        flop_ratio = (patch["model_flops"] + patch["loss_flops"]) / (vanilla["model_flops"] + vanilla["loss_flops"])
        name = f"{arch}/{patch_size} K={out_dim} B={args.batch_size}"
        compiled = " (compiled)" if args.compile else ""
        print(f"\n{name} on {vanilla['device']}{compiled}: student head on {patch['student_tokens']} tokens "
              f"({vanilla['student_tokens']} vanilla), {patch['entries']} loss entries")
        for label, r in (("vanilla", vanilla), ("patch", patch)):
            print(f"  {label:8s} {r['seconds']:8.3f} s/step  peak {r['peak_mb']:8.0f} MB (before the first step "
                  f"{r['before_mb']:6.0f} MB)  model {r['model_flops'] / 1e9:8.1f} GFLOP  "
                  f"loss {r['loss_flops'] / 1e9:6.2f} GFLOP")
        checks = [("time x FLOPs", time_ratio / flop_ratio, 1.15)]
        if (arch, patch_size, out_dim, args.batch_size) == ("vit_tiny", 16, "4096", 8):
            checks = [("step time", time_ratio, 1.8), ("peak memory", patch["peak_mb"] / vanilla["peak_mb"], 1.3)] \
                + checks
        for label, value, limit in checks:
            line = f"{name:22s} {label:13s} " + verdict(value, limit)
            if label == "time x FLOPs":
                line += f"   (time ratio {time_ratio:.2f}, FLOP ratio {flop_ratio:.2f})"
            rows.append(line)
            ok &= value <= limit
    print("\nratio (patch-wise / vanilla)")
    print("\n".join(rows))
    return ok


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Training-step benchmark", add_help=False)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="comma-separated arch[/patch_size]:out_dim, e.g. vit_small/8:10000 (patch size 16 if "
                             "not given); the time and memory targets apply to vit_tiny:4096 at batch 8")
    parser.add_argument("--batch_size", default=8, type=int, help="images per step")
    parser.add_argument("--steps", default=3, type=int, help="timed steps per subprocess (after one warm-up)")
    parser.add_argument("--rounds", default=2, type=int, help="alternating vanilla/patch rounds; best kept")
    parser.add_argument("--threads", default=1, type=int,
                        help="CPU threads per subprocess (0: torch's default); one thread keeps timings "
                             "comparable on a machine that other jobs share")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the step runs")
    parser.add_argument("--use_fp16", default=False, type=utils.bool_flag, help="mixed precision (CUDA only)")
    parser.add_argument("--amp_dtype", default="float16", choices=["float16", "bfloat16"], help="half type")
    parser.add_argument("--compile", default=False, type=utils.bool_flag,
                        help="train with --compile true in both modes (the warm-up step compiles)")
    parser.add_argument("--keep_freed_memory", default=True, type=utils.bool_flag,
                        help=f"on the CPU, run the steps with GLIBC_TUNABLES={KEEP_FREED_MEMORY} (glibc keeps freed "
                             f"memory instead of unmapping it); false: glibc's defaults")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    cli = argparse.ArgumentParser("Training-step benchmark", parents=[get_args_parser()]).parse_args()
    if cli.worker:
        print("RESULT " + json.dumps(worker(json.loads(cli.worker))), flush=True)
    else:
        sys.exit(0 if main(cli) else 1)
