"""benchmarks/dense_comparison.py: the table's means, sample standard deviations and medians against hand-computed
ones, finished runs read back from their result.json (nothing retrained), the figure written. The scripts it runs
are tested in their own files."""
import importlib.util
import json
import os
import subprocess

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


def test_finished_runs_are_read_back_and_drawn(tmp_path, monkeypatch, capsys):
    for arm, runs in RESULTS.items():
        for run in runs:
            folder = tmp_path / "runs" / f"{arm}-s{run['seed']}"
            folder.mkdir(parents=True)
            (folder / "result.json").write_text(json.dumps(run))

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a finished run was started again: {args}")

    monkeypatch.setattr(subprocess, "call", no_subprocess)
    figure = str(tmp_path / "comparison.png")
    args = dense_comparison.get_args_parser().parse_args(
        ["--data_path", "unused", "--dense_path", "unused", "--output_dir", str(tmp_path / "runs"),
         "--arms", "patch", "random", "--figure", figure])
    results = dense_comparison.main(args)
    assert list(results) == ["random", "patch"]  # the table's order, whatever the order they ran in
    assert results == RESULTS
    assert dense_comparison.table(RESULTS) in capsys.readouterr().out
    with Image.open(figure) as image:
        assert image.width > 400 and image.height > 200
