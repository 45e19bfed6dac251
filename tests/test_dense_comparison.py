"""benchmarks/dense_comparison.py: the table's means, sample standard deviations and medians against hand-computed
ones, finished runs read back from their outputs (nothing retrained), the figure written; an unfinished stage, or
one named by --redo, runs again alone. The scripts it runs are tested in their own files."""
import importlib.util
import json
import os
import subprocess

import pytest
from PIL import Image

from eval_testdata import REPO

SPEC = importlib.util.spec_from_file_location("dense_comparison",
                                              os.path.join(REPO, "benchmarks", "dense_comparison.py"))
dense_comparison = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(dense_comparison)


def result(arm, seed, knn, miou, jf, entropy_patch, minutes):
    return {"arm": arm, "seed": seed, "knn_top1": knn, "mIoU": miou, "J&F": jf, "entropy_cls": 4.0 + seed,
            "entropy_patch": entropy_patch, "train_s": 60.0 * minutes - 30, "eval_s": 30.0}


RESULTS = {"random": [result("random", 0, 40.0, 10.0, 50.0, None, 3), result("random", 1, 42.0, 12.0, 56.0, None, 5),
                      result("random", 2, 44.0, 14.0, 53.0, None, 40)],
           "patch": [result("patch", 0, 50.0, 20.0, 60.0, 1.0, 10), result("patch", 1, 50.0, 20.0, 60.0, 2.0, 11),
                     result("patch", 2, 50.0, 20.0, 60.0, 3.0, 12)]}


def test_table_rows_are_hand_computed():
    rows = dense_comparison.table(RESULTS).splitlines()
    assert "ln K = 6.93" in rows[0] and len(rows) == 4
    # random: k-NN 40/42/44 -> 42 +- 2 (sample std), mIoU 10/12/14 -> 12 +- 2, J&F 50/56/53 -> 53 +- 3;
    # entropy 4/5/6 -> 5.00, no patch entropy; the median of 3, 5 and 40 minutes is 5
    assert rows[2] == "| random init | 42.0 ± 2.0 | 12.0 ± 2.0 | 53.0 ± 3.0 | 5.00 / – | 5 min |"
    assert rows[3] == "| Patch-Wise DINO | 50.0 ± 0.0 | 20.0 ± 0.0 | 60.0 ± 0.0 | 5.00 / 2.00 | 11 min |"


def write_finished_run(folder, run, vos_done=True):
    """The files a finished run leaves: log.txt, the probe's and the videos' outputs, times.json."""
    folder.mkdir(parents=True)
    entry = {"epoch": 1, "knn_top1": run["knn_top1"], "train_teacher_entropy_cls": run["entropy_cls"]}
    if run["entropy_patch"] is not None:
        entry["train_teacher_entropy_patch"] = run["entropy_patch"]
    (folder / "log.txt").write_text(json.dumps({"epoch": 0, "knn_top1": 0.0}) + "\n" + json.dumps(entry) + "\n")
    (folder / "seg.out").write_text("Epoch ...\n" + json.dumps({"mIoU": run["mIoU"], "pixel_acc": 90.0}) + "\n")
    vos = json.dumps({"J&F-Mean": run["J&F"] / 100}) if vos_done else "garments0003  0.5  0.6"  # interrupted
    (folder / "vos.out").write_text("video J F\n" + vos + "\n")
    (folder / "times.json").write_text(json.dumps({"train": run["train_s"], "seg": 20.0, "vos": 10.0}))


def run_main(tmp_path, *flags):
    args = dense_comparison.get_args_parser().parse_args(
        ["--data_path", "unused", "--dense_path", str(tmp_path / "dense"), "--output_dir", str(tmp_path / "runs"),
         *flags])
    return dense_comparison.main(args)


def assert_same_results(results, expected):
    assert list(results) == list(expected)
    for runs, expected_runs in zip(results.values(), expected.values()):
        assert [r == pytest.approx(e) for r, e in zip(runs, expected_runs)] == [True] * len(expected_runs)


def test_finished_runs_are_read_back_and_drawn(tmp_path, monkeypatch, capsys):
    for arm, runs in RESULTS.items():
        for run in runs:
            write_finished_run(tmp_path / "runs" / f"{arm}-s{run['seed']}", run)

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a finished run was started again: {args}")

    monkeypatch.setattr(subprocess, "call", no_subprocess)
    figure = str(tmp_path / "comparison.png")
    results = run_main(tmp_path, "--arms", "patch", "random", "--figure", figure)
    assert list(results) == ["random", "patch"]  # the table's order, whatever the order they ran in
    assert_same_results(results, RESULTS)
    assert dense_comparison.table(results) in capsys.readouterr().out
    with Image.open(figure) as image:
        assert image.width > 400 and image.height > 200


def test_only_unfinished_or_redone_stages_run(tmp_path, monkeypatch):
    """An interrupted video stage runs again, alone; --redo vos reruns every run's videos (with --overwrite, on
    the videos now in --dense_path); training and the probe are never redone."""
    patch = RESULTS["patch"]
    write_finished_run(tmp_path / "runs" / "patch-s0", patch[0], vos_done=False)
    write_finished_run(tmp_path / "runs" / "patch-s1", patch[1])
    calls = []

    def fake_video_evaluation(argv, stdout, **kwargs):
        calls.append(argv)
        assert os.path.basename(argv[1]) == "eval_video_segmentation.py", argv
        assert argv[argv.index("--overwrite") + 1] == "true"
        assert argv[argv.index("--data_path") + 1] == str(tmp_path / "dense" / "davis")
        stdout.write(json.dumps({"J&F-Mean": 0.625}) + "\n")
        return 0

    monkeypatch.setattr(subprocess, "call", fake_video_evaluation)
    results = run_main(tmp_path, "--arms", "patch", "--seeds", "0", "1")
    assert len(calls) == 1 and "patch-s0" in calls[0][calls[0].index("--output_dir") + 1]
    assert [r["J&F"] for r in results["patch"]] == [62.5, pytest.approx(patch[1]["J&F"])]
    assert results["patch"][0]["eval_s"] < 30  # the stage's new wall time replaced the interrupted one
    calls.clear()
    results = run_main(tmp_path, "--arms", "patch", "--seeds", "0", "1", "--redo", "vos")
    assert len(calls) == 2 and [r["J&F"] for r in results["patch"]] == [62.5, 62.5]
    assert results["patch"][1]["mIoU"] == patch[1]["mIoU"] and results["patch"][1]["train_s"] == patch[1]["train_s"]
