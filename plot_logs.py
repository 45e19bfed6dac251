"""Training curves of Patch-Wise DINO runs, drawn into one PNG.

``python plot_logs.py RUN_DIR [RUN_DIR ...] --output curves.png`` reads the ``log.txt`` that ``patch_wise_dino.py``
writes in each run folder (one JSON line per epoch) and the run's ``args.json``, and draws one line per run,
labelled by its folder name (or ``--labels``), in panels for: the loss (total, [CLS] part, patch part), the two
collapse diagnostics of the DINO paper (teacher entropy and student-teacher KL, each for [CLS] and patch
tokens), the learning rate, and the k-NN monitor's top-1 when a run has it. ln K (K = ``--out_dim`` from
``args.json``) is marked on the loss and entropy panels: a loss stuck there with KL near 0 is collapse.

A run that is still going may end its log with a half-written line: that line is skipped with a note, as are
lines that are not JSON and folders without ``log.txt``. matplotlib is needed by this script only.
"""
import argparse
import json
import math
import os
from typing import List, NamedTuple, Optional, Sequence, Tuple

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import utils

# (title, [(log key, part name, line style)]): a panel is drawn when a run has one of its keys
PANELS = (
    ("loss", [("train_loss", "total", "-"), ("train_loss_cls", "[CLS]", "--"), ("train_loss_patch", "patch", ":")]),
    ("teacher entropy", [("train_teacher_entropy_cls", "[CLS]", "-"),
                         ("train_teacher_entropy_patch", "patch", "--")]),
    ("student-teacher KL", [("train_kl_cls", "[CLS]", "-"), ("train_kl_patch", "patch", "--")]),
    ("learning rate", [("train_lr", "", "-")]),
    ("k-NN top-1 (%)", [("knn_top1", "", "-")]),
)
LN_K_PANELS = ("loss", "teacher entropy")


class Run(NamedTuple):
    label: str
    epochs: List[dict]  # the log line of each epoch, in epoch order
    out_dim: Optional[int]  # K of the DINO head (args.json), None when unknown


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Plot the training curves of Patch-Wise DINO runs", add_help=False)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="output folders of patch_wise_dino.py runs (each holding log.txt, and args.json for ln K)")
    parser.add_argument("--output", default="curves.png", type=str, help="PNG file to write")
    parser.add_argument("--labels", default=None, nargs="+", type=str,
                        help="one legend label per RUN_DIR, in the same order (default: the folder names)")
    return parser


def read_log(path: str) -> Tuple[List[dict], List[str]]:
    """The JSON lines of a ``log.txt`` that have an ``epoch`` (the last one of each epoch wins, in epoch order),
    and a note for every line that was skipped (half-written, not JSON, no epoch)."""
    with open(path) as f:
        lines = f.read().split("\n")
    by_epoch, notes = {}, []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            epoch = int(entry["epoch"])
        except (ValueError, TypeError, KeyError):
            last = number == len(lines) or (number == len(lines) - 1 and not lines[-1])
            why = "half-written (the run may still be going)" if last else "not a JSON line with an epoch"
            notes.append(f"{path}: skipped line {number}, {why}")
            continue
        by_epoch[epoch] = entry
    return [by_epoch[epoch] for epoch in sorted(by_epoch)], notes


def read_out_dim(folder: str) -> Optional[int]:
    """``out_dim`` from the run's ``args.json``, or None when it cannot be read."""
    try:
        with open(os.path.join(folder, "args.json")) as f:
            out_dim = int(json.load(f)["out_dim"])
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return out_dim if out_dim > 1 else None


def load_runs(folders: Sequence[str], labels: Optional[Sequence[str]]) -> List[Run]:
    """The runs with at least one complete log line; every folder left out is noted (printed)."""
    if labels is not None and len(labels) != len(folders):
        raise utils.UserError(f"--labels got {len(labels)} labels for {len(folders)} run folders: give one per "
                              f"folder, in the same order")
    runs = []
    for i, folder in enumerate(folders):
        log_path = os.path.join(folder, "log.txt")
        if not os.path.isfile(log_path):
            print(f"Note: skipped {folder}: no log.txt there (not a run folder, or the run has not finished an "
                  f"epoch yet)")
            continue
        try:
            epochs, notes = read_log(log_path)
        except (OSError, UnicodeDecodeError) as exc:
            print(f"Note: skipped {folder}: cannot read its log.txt ({getattr(exc, 'strerror', None) or exc})")
            continue
        for note in notes:
            print(f"Note: {note}")
        if not epochs:
            print(f"Note: skipped {folder}: its log.txt holds no complete epoch line yet")
            continue
        out_dim = read_out_dim(folder)
        if out_dim is None:
            print(f"Note: {folder}: no out_dim in args.json, so ln K is not marked for this run")
        label = labels[i] if labels is not None else os.path.basename(os.path.normpath(os.path.abspath(folder)))
        runs.append(Run(label, epochs, out_dim))
    if not runs:
        raise utils.UserError(f"nothing to plot: none of {utils.name_list(folders)} holds a log.txt with a complete "
                              f"epoch line")
    return runs


def series(run: Run, key: str) -> Tuple[List[int], List[float]]:
    """Epochs and values of ``key`` in the lines of ``run`` that have it as a number."""
    points = [(entry["epoch"], float(entry[key])) for entry in run.epochs
              if isinstance(entry.get(key), (int, float)) and not isinstance(entry.get(key), bool)]
    return [epoch for epoch, _ in points], [value for _, value in points]


def draw_panel(ax, title: str, parts: Sequence[tuple], runs: Sequence[Run]) -> None:
    """One panel: a line per (run, part), run by colour and part by line style, with ln K where it applies."""
    for colour, run in enumerate(runs):
        for key, part, style in parts:
            epochs, values = series(run, key)
            if epochs:
                label = f"{run.label}: {part}" if len(parts) > 1 else run.label
                ax.plot(epochs, values, linestyle=style, color=f"C{colour % 10}", marker=".", label=label)
    if title in LN_K_PANELS:
        for out_dim in sorted({run.out_dim for run in runs if run.out_dim}):
            ax.axhline(math.log(out_dim), color="grey", linestyle="-.", linewidth=1,
                       label=f"ln K = {math.log(out_dim):.2f} (K = {out_dim})")
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def build_figure(runs: Sequence[Run]) -> Figure:
    """The panels of ``PANELS`` for which some run has data, two per row."""
    panels = [(title, parts) for title, parts in PANELS
              if any(series(run, key)[0] for run in runs for key, _, _ in parts)]
    if not panels:
        raise utils.UserError("the log.txt files hold none of the logged curves (train_loss, train_lr, ...): "
                              "pass output folders of patch_wise_dino.py")
    columns = min(2, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(6.4 * columns, 4.0 * rows), layout="constrained")
    for i, (title, parts) in enumerate(panels):
        draw_panel(figure.add_subplot(rows, columns, i + 1), title, parts, runs)
    return figure


def main(args: argparse.Namespace) -> Figure:
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise utils.UserError(f"cannot write --output {args.output}: the folder {folder} does not exist")
    runs = load_runs(args.run_dirs, args.labels)
    figure = build_figure(runs)
    try:
        figure.savefig(args.output, format="png", dpi=100)
    except OSError as exc:
        raise utils.UserError(f"cannot write --output {args.output}: {exc.strerror or exc}") from None
    print(f"Wrote {args.output}: {len(runs)} run{'s' * (len(runs) != 1)} ({', '.join(run.label for run in runs)}), "
          f"{len(figure.axes)} panels")
    return figure


if __name__ == "__main__":
    utils.run_cli(main, utils.ArgumentParser("Plot training curves", parents=[get_args_parser()]).parse_args())
