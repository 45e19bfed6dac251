"""plot_logs.py: one PNG for several runs with a panel per group of curves, ln K from args.json, and notes (not
tracebacks) for a half-written last line, a line that is not JSON and a folder without log.txt. The curves of a
real training log are drawn in test_knn_monitor.py."""
import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import plot_logs
import utils
from eval_testdata import REPO, assert_one_line_error, run_script

KEYS = ("train_loss", "train_loss_cls", "train_loss_patch", "train_teacher_entropy_cls",
        "train_teacher_entropy_patch", "train_kl_cls", "train_kl_patch", "train_lr")


def write_run(folder, epochs, out_dim=64, knn=False, tail=""):
    """A run folder as patch_wise_dino.py leaves it: log.txt (one JSON line per epoch, then ``tail``) and args.json."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "log.txt"), "w") as f:
        for epoch in range(epochs):
            line = {key: 4.0 - 0.1 * epoch + i for i, key in enumerate(KEYS)}
            line.update(epoch=epoch, bad_images=0, **({"knn_top1": 20.0 + epoch} if knn else {}))
            f.write(json.dumps(line) + "\n")
        f.write(tail)
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump({"out_dim": out_dim, "arch": "vit_tiny"}, f)
    return str(folder)


def plot(run_dirs, output, labels=None):
    parser = argparse.ArgumentParser(parents=[plot_logs.get_args_parser()])
    return plot_logs.main(parser.parse_args([*run_dirs, "--output", str(output)]
                                            + (["--labels", *labels] if labels else [])))


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_two_runs_make_one_png_and_a_half_written_line_is_skipped(tmp_path, capsys):
    going = write_run(tmp_path / "patchwise", 3, out_dim=4096, knn=True, tail='{"train_loss": 3.1, "ep')
    done = write_run(tmp_path / "vanilla", 4, out_dim=64)
    os.makedirs(tmp_path / "empty_folder")
    output = tmp_path / "curves.png"
    figure = plot([going, done, str(tmp_path / "empty_folder")], output)

    image = Image.open(output)
    assert image.format == "PNG" and image.width > 1000 and image.height > 900
    assert np.asarray(image.convert("L")).std() > 10  # not a blank canvas
    out = capsys.readouterr().out
    assert f"{going}/log.txt: skipped line 4, half-written (the run may still be going)" in out
    assert f"skipped {tmp_path / 'empty_folder'}: no log.txt there" in out
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["loss", "teacher entropy", "student-teacher KL", "learning rate", "k-NN top-1 (%)"]
    loss, entropy, kl, lr, knn = figure.axes
    curves = lines_by_label(loss)
    assert list(curves["patchwise: total"].get_xdata()) == [0, 1, 2]  # the half-written epoch is not drawn
    assert list(curves["vanilla: patch"].get_ydata()) == pytest.approx([6.0, 5.9, 5.8, 5.7])
    assert curves["patchwise: [CLS]"].get_linestyle() == "--" and curves["patchwise: patch"].get_linestyle() == ":"
    assert curves["patchwise: total"].get_color() != curves["vanilla: total"].get_color()
    ln_k = {name: line.get_ydata()[0] for name, line in lines_by_label(entropy).items() if name.startswith("ln K")}
    assert sorted(ln_k.values()) == pytest.approx([math.log(64), math.log(4096)])
    assert set(lines_by_label(kl)) == {"patchwise: [CLS]", "patchwise: patch", "vanilla: [CLS]", "vanilla: patch"}
    assert set(lines_by_label(lr)) == {"patchwise", "vanilla"}
    assert set(lines_by_label(knn)) == {"patchwise"}  # only the run with a k-NN monitor


def test_labels_and_no_knn_panel_without_knn(tmp_path, capsys):
    a = write_run(tmp_path / "a", 2, tail="\n\n")  # blank lines are not notes
    b = write_run(tmp_path / "b", 2, tail="not json\n" + json.dumps({"train_loss": 1.0, "epoch": 2}) + "\n")
    os.remove(tmp_path / "b" / "args.json")
    figure = plot([a, b], tmp_path / "out.png", labels=["DINO", "Patch-Wise"])
    assert [ax.get_title() for ax in figure.axes] == ["loss", "teacher entropy", "student-teacher KL",
                                                      "learning rate"]
    assert {"DINO", "Patch-Wise"} == set(lines_by_label(figure.axes[3]))
    assert list(lines_by_label(figure.axes[0])["Patch-Wise: total"].get_xdata()) == [0, 1, 2]
    out = capsys.readouterr().out
    assert "skipped line 3, not a JSON line with an epoch" in out
    assert "no out_dim in args.json, so ln K is not marked" in out and "half-written" not in out
    assert [name for name in lines_by_label(figure.axes[1]) if name.startswith("ln K")] == ["ln K = 4.16 (K = 64)"]


def test_nothing_to_plot_and_wrong_label_count_are_user_errors(tmp_path):
    write_run(tmp_path / "only_half", 0, tail='{"epoch": 0, "train_lo')
    with pytest.raises(utils.UserError, match="nothing to plot"):
        plot([str(tmp_path / "only_half"), str(tmp_path / "missing")], tmp_path / "x.png")
    with pytest.raises(utils.UserError, match="--labels got 1 labels for 2 run folders"):
        plot([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "x.png", labels=["one"])
    with pytest.raises(utils.UserError, match="the folder .*nowhere does not exist"):
        plot([write_run(tmp_path / "ok", 1)], tmp_path / "nowhere" / "x.png")
    assert not os.path.exists(tmp_path / "x.png")


def test_command_line_error_is_one_line(tmp_path):
    result = run_script("plot_logs.py", [str(tmp_path / "no_run_here"), "--output", str(tmp_path / "c.png")])
    assert_one_line_error(result, "nothing to plot", "no_run_here")


def test_training_and_evaluation_scripts_do_not_import_matplotlib():
    code = ("import sys, patch_wise_dino, eval_knn, eval_linear, eval_image_retrieval, eval_copy_detection, "
            "patch_matching, run_with_submitit, utils; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_log_that_cannot_be_decoded_is_skipped_with_a_note(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "log.txt").write_bytes(b'{"epoch": 0, "train_loss": \xff\xfe}\n')
    plot([str(bad), write_run(tmp_path / "good", 2)], tmp_path / "c.png")
    assert "skipped " + str(bad) + ": cannot read its log.txt" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "c.png")
