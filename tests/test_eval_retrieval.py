"""Tests of eval_image_retrieval.py: the revisited-protocol mAP/mP@k against hand-worked rankings and an
independent implementation, the dataset (query crops, errors) and an end-to-end run on
a mini roxford5k written in the revisitop layout, checked against features computed here (CPU)."""
import argparse
import os
import pickle
import re
import shutil
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

import eval_image_retrieval as retrieval
import utils
from eval_testdata import (REPO, assert_one_line_error, clean_env, last_json, random_image, run_script,
                           write_teacher_student_checkpoint)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PATCH = 8
pytestmark = pytest.mark.usefixtures("one_thread")
IMSIZE = 64


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
def reference_ap_and_precisions(ranking, ok, junk, kappas):
    """The revisited protocol written out step by step, as a check of compute_map."""
    ok, junk = set(int(i) for i in ok), set(int(i) for i in junk) - set(int(i) for i in ok)
    kept = [int(i) for i in ranking if int(i) not in junk]
    hits, ap, positions = 0, 0.0, []
    for position, item in enumerate(kept):
        if item in ok:
            left = 1.0 if position == 0 else hits / position
            hits += 1
            right = hits / (position + 1)
            ap += (left + right) / 2 / len(ok)
            positions.append(position + 1)
    precisions = []
    for k in kappas:
        cutoff = min(max(positions), k) if positions else k
        precisions.append(sum(p <= cutoff for p in positions) / cutoff)
    return ap, precisions


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------
def test_compute_map_hand_worked():
    # database of 6, three queries (columns)
    ranks = np.array([[3, 0, 5], [1, 1, 4], [0, 2, 3], [4, 3, 2], [2, 4, 1], [5, 5, 0]])
    gnd = [
        {"ok": [0, 2], "junk": [3, 4]},  # junk before (3) and between (4) the positives
        {"ok": [], "junk": [1]},  # no positives: skipped
        {"ok": [5], "junk": []},
    ]
    mean_ap, aps, pr, prs = retrieval.compute_map(ranks, gnd, (1, 5, 10))
    # query 0 without junk: 1, 0, 2, 5 -> positives at 0-based 1 and 2
    ap0 = 0.5 * (0 / 1 + 1 / 2) / 2 + 0.5 * (1 / 2 + 2 / 3) / 2
    assert aps[0] == pytest.approx(ap0)
    assert np.isnan(aps[1]) and np.isnan(prs[1]).all()
    assert aps[2] == pytest.approx(1.0)
    assert mean_ap == pytest.approx((ap0 + 1.0) / 2)
    # P@1: nothing at rank 1; P@5 and P@10: both positives within the first 3 -> measured at 3
    np.testing.assert_allclose(prs[0], [0.0, 2 / 3, 2 / 3])
    np.testing.assert_allclose(prs[2], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(pr, [0.5, (2 / 3 + 1) / 2, (2 / 3 + 1) / 2])


def test_compute_map_matches_an_independent_implementation_on_random_rankings():
    rng = np.random.default_rng(0)
    n_db, n_q, kappas = 40, 12, (1, 5, 10)
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)  # (n_db, n_q)
    gnd = []
    for _ in range(n_q):
        labels = rng.choice(4, size=n_db, p=[0.6, 0.15, 0.15, 0.1])  # 0 none, 1 easy, 2 hard, 3 junk
        gnd.append({"easy": np.flatnonzero(labels == 1).tolist(), "hard": np.flatnonzero(labels == 2).tolist(),
                    "junk": np.flatnonzero(labels == 3).tolist(), "bbx": [0, 0, 1, 1]})
    gnd[3]["hard"] = []  # a query without positives in H
    definitions = {"E": (["easy"], ["junk", "hard"]), "M": (["easy", "hard"], ["junk"]),
                   "H": (["hard"], ["junk", "easy"])}
    for setup, (ok_keys, junk_keys) in definitions.items():
        mean_ap, aps, pr, prs = retrieval.compute_map(ranks, retrieval.setup_ground_truth(gnd, setup), kappas)
        expected_aps, expected_prs = [], []
        for i, g in enumerate(gnd):
            ok = sum((g[k] for k in ok_keys), [])
            if not ok:
                assert np.isnan(aps[i])
                continue
            ap, prec = reference_ap_and_precisions(ranks[:, i], ok, sum((g[k] for k in junk_keys), []), kappas)
            assert aps[i] == pytest.approx(ap)
            expected_aps.append(ap)
            expected_prs.append(prec)
        assert mean_ap == pytest.approx(np.mean(expected_aps))
        np.testing.assert_allclose(pr, np.mean(expected_prs, axis=0))


# ----------------------------------------------------------------------------------------------------
# Mini roxford5k
# ----------------------------------------------------------------------------------------------------
QUERIES = ["q0", "q1", "q2", "q3"]
# database name -> source of its pixels: a query (byte copy of its file) or a fresh random image seed
DATABASE = [("junk0", "q1"), ("q0_easy", "q0"), ("q0_hard", "q0"), ("q1_easy", "q1"), ("q1_hard", "q1"),
            ("q2_easy", "q2"), ("d0", 10), ("d1", 11), ("d2", 12), ("d3", 13), ("d4", 14)]
GND = [
    {"bbx": [0.0, 0.0, 80.0, 60.0], "easy": [1], "hard": [2], "junk": []},
    {"bbx": [0.0, 0.0, 80.0, 60.0], "easy": [3], "hard": [4], "junk": [0]},
    {"bbx": [0.0, 0.0, 80.0, 60.0], "easy": [5], "hard": [], "junk": [6]},  # no positive in H
    {"bbx": [10.4, 5.0, 70.0, 45.6], "easy": [7, 9], "hard": [8], "junk": [10]},  # cropped, no copies
]


@pytest.fixture(scope="module")
def mini_revisited(tmp_path_factory):
    root = tmp_path_factory.mktemp("revisited")
    jpg = root / "roxford5k" / "jpg"
    jpg.mkdir(parents=True)
    for i, name in enumerate(QUERIES):
        random_image(i).save(jpg / f"{name}.jpg", quality=95)
    for name, source in DATABASE:
        if isinstance(source, str):
            shutil.copyfile(jpg / f"{source}.jpg", jpg / f"{name}.jpg")
        else:
            random_image(source).save(jpg / f"{name}.jpg", quality=95)
    with open(root / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": [n for n, _ in DATABASE], "qimlist": QUERIES, "gnd": GND}, f)
    ckpt = str(root / "checkpoint.pth")
    teacher = write_teacher_student_checkpoint(ckpt, PATCH, seed=0)
    return root, ckpt, teacher


def expected_results(root, teacher, multiscale: bool, crop: bool) -> dict:
    """The numbers eval_image_retrieval should print, computed here from the teacher's [CLS] features."""
    jpg = os.path.join(root, "roxford5k", "jpg")

    def feature(name, box=None):
        img = Image.open(os.path.join(jpg, name + ".jpg")).convert("RGB")
        if box is not None:
            img = img.crop(tuple(box))
        img.thumbnail((IMSIZE, IMSIZE), Image.Resampling.LANCZOS)
        x = TF.normalize(TF.to_tensor(img), MEAN, STD)[None]  # (1, 3, h, w)
        total = 0
        for s in ((1, 2 ** -0.5, 0.5) if multiscale else (1,)):
            xs = x if s == 1 else torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear")
            h, w = xs.shape[-2] // PATCH * PATCH, xs.shape[-1] // PATCH * PATCH
            with torch.no_grad():
                total = total + teacher(xs[..., :h, :w])[0]
        return total / torch.linalg.vector_norm(total)

    db = torch.stack([feature(n) for n, _ in DATABASE])  # (n_db, D)
    q = torch.stack([feature(n, g["bbx"] if crop else None) for n, g in zip(QUERIES, GND)])  # (n_q, D)
    sims = (db @ q.T).numpy()  # (n_db, n_q)
    out = {"dataset": "roxford5k"}
    definitions = {"E": (["easy"], ["junk", "hard"]), "M": (["easy", "hard"], ["junk"]),
                   "H": (["hard"], ["junk", "easy"])}
    mp = {}
    for setup, (ok_keys, junk_keys) in definitions.items():
        aps, precs = [], []
        for i, g in enumerate(GND):
            ok = sum((g[k] for k in ok_keys), [])
            if ok:
                ranking = sorted(range(len(DATABASE)), key=lambda j: (-sims[j, i], j))
                ap, prec = reference_ap_and_precisions(ranking, ok, sum((g[k] for k in junk_keys), []), (1, 5, 10))
                aps.append(ap)
                precs.append(prec)
        out[f"mAP_{setup}"] = 100 * np.mean(aps)
        mp[setup] = (100 * np.mean(precs, axis=0)).tolist()
    out["mP@k"] = mp
    return out


def assert_results_match(got: dict, expected: dict):
    assert got["dataset"] == expected["dataset"]
    for setup in "EMH":
        assert got[f"mAP_{setup}"] == pytest.approx(expected[f"mAP_{setup}"], abs=1e-3)
        assert got["mP@k"][setup] == pytest.approx(expected["mP@k"][setup], abs=1e-3)


# The seed README's commands say "torchrun --use_env", which torchrun refuses; the README's two ways out:
LAUNCHERS = {"python": [], "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node=1"],
             "launch --use_env": ["-m", "torch.distributed.launch", "--use_env", "--nproc_per_node=1"]}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_end_to_end_prints_the_expected_json(mini_revisited, launcher):
    root, ckpt, teacher = mini_revisited
    flags = ["--data_path", str(root), "--dataset", "roxford5k", "--imsize", str(IMSIZE), "--arch", "vit_tiny",
             "--patch_size", str(PATCH), "--pretrained_weights", ckpt, "--num_workers", "0", "--use_cuda", "false"]
    command = [sys.executable, *LAUNCHERS[launcher], os.path.join(REPO, "eval_image_retrieval.py"), *flags]
    proc = subprocess.run(command, cwd=REPO, env=clean_env(threads=1), capture_output=True, text=True, timeout=300)
    got = last_json(proc)
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith(">> roxford5k: mAP E:") for line in lines)
    assert set(got) == {"dataset", "mAP_E", "mAP_M", "mAP_H", "mP@k"}
    assert_results_match(got, expected_results(root, teacher, multiscale=False, crop=True))
    # queries 0-2 find their exact copies first; junk removal puts the hard copy of q0/q1 first in H
    # (without it the H AP of q1 would be 0.25); q2 has no hard positive and is left out of H
    assert got["mP@k"]["E"][0] >= 75.0 and got["mP@k"]["H"][0] >= 100 * 2 / 3


def test_torchrun_refuses_the_seed_commands_use_env_flag():
    command = [sys.executable, "-m", "torch.distributed.run", "--use_env", "--nproc_per_node=1",
               os.path.join(REPO, "eval_image_retrieval.py")]
    proc = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments: --use_env" in proc.stderr, proc.stderr[-2000:]


def test_multiscale_without_crops_in_process(mini_revisited):
    root, ckpt, teacher = mini_revisited
    parser = argparse.ArgumentParser(parents=[retrieval.get_args_parser()])
    args = parser.parse_args(["--data_path", str(root), "--imsize", str(IMSIZE), "--arch", "vit_tiny",
                              "--patch_size", str(PATCH), "--pretrained_weights", ckpt, "--num_workers", "0",
                              "--use_cuda", "false", "--multiscale", "true", "--crop_queries", "false"])
    got = retrieval.main(args)
    assert_results_match(got, expected_results(root, teacher, multiscale=True, crop=False))


def test_queries_are_cropped_to_their_box_then_shrunk(mini_revisited):
    root = mini_revisited[0]
    cropped = retrieval.OxfordParisDataset(str(root), "roxford5k", "query", imsize=32, crop_queries=True)
    whole = retrieval.OxfordParisDataset(str(root), "roxford5k", "query", imsize=32, crop_queries=False)
    database = retrieval.OxfordParisDataset(str(root), "roxford5k", "database", imsize=32)
    assert len(cropped) == 4 and len(database) == len(DATABASE)
    assert whole[3].shape == (3, 24, 32)  # 80x60 shrunk to fit 32: aspect kept
    assert cropped[3].shape == (3, 22, 32)  # box 10..70 x 5..46 (60x41 px) shrunk to fit 32
    assert torch.equal(cropped[0], whole[0])  # a box covering the whole image changes nothing


def test_default_weights_are_the_gldv2_ones_and_offline_is_a_clear_error(mini_revisited, monkeypatch):
    root = mini_revisited[0]
    asked = []

    def offline(url, **kwargs):
        asked.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    parser = argparse.ArgumentParser(parents=[retrieval.get_args_parser()])
    args = parser.parse_args(["--data_path", str(root), "--num_workers", "0", "--use_cuda", "false"])
    with pytest.raises(utils.UserError, match=f"^could not download the official DINO weights for vit_small/16 from "
                                              f"{re.escape(retrieval.GLDV2_URL)} \\(URLError: .*no network.*\\); .*"
                                              f"--pretrained_weights"):
        retrieval.main(args)
    assert asked == [retrieval.GLDV2_URL]


def test_missing_ground_truth_and_bad_images_are_one_line_errors(mini_revisited, tmp_path):
    root, ckpt, _ = mini_revisited
    flags = ["--imsize", str(IMSIZE), "--arch", "vit_tiny", "--patch_size", str(PATCH),
             "--pretrained_weights", ckpt, "--num_workers", "0", "--use_cuda", "false"]
    parser = argparse.ArgumentParser(parents=[retrieval.get_args_parser()])
    args = parser.parse_args(["--data_path", str(tmp_path), "--dataset", "rparis6k", *flags])
    with pytest.raises(utils.UserError, match=os.path.join(str(tmp_path), "rparis6k", "gnd_rparis6k.pkl")):
        retrieval.main(args)

    broken = tmp_path / "broken"
    shutil.copytree(root / "roxford5k", broken / "roxford5k")
    (broken / "roxford5k" / "jpg" / "d3.jpg").write_bytes(b"not a jpeg")
    proc = run_script("eval_image_retrieval.py", ["--data_path", str(broken), *flags], timeout=300, threads=1)
    line = assert_one_line_error(proc, "d3.jpg")
    assert line.startswith("error: cannot decode image")


def test_ground_truth_is_read_without_running_code(tmp_path, runs_code):
    (tmp_path / "roxford5k").mkdir()
    with open(tmp_path / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": [runs_code(tmp_path / "ran")]}, f)
    with pytest.raises(utils.UserError, match=f"^refused to load {tmp_path}/roxford5k/gnd_roxford5k.pkl: global "
                                              r"'\w+.system' is forbidden \(only plain data"):
        retrieval.load_ground_truth(str(tmp_path), "roxford5k")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("box", [[40, 0, 10, 5], None, 7])
def test_a_box_that_is_not_x0_y0_x1_y1_is_a_clear_error_when_queries_are_cropped(box):
    cfg = {"gnd": [{"bbx": [0, 0, 5, 5]}, {"bbx": box}]}
    with pytest.raises(utils.UserError, match=r"gnd\[1\] has no bounding box .* --crop_queries false"):
        retrieval.query_boxes(cfg, "roxford5k")
    assert retrieval.query_boxes({"gnd": [{"bbx": [0, 1, 5.5, 5]}]}, "roxford5k") == [(0.0, 1.0, 5.5, 5.0)]


def test_bad_boxes_do_not_matter_with_whole_queries(mini_revisited, tmp_path):
    root = mini_revisited[0]
    shutil.copytree(root / "roxford5k", tmp_path / "roxford5k")
    cfg = retrieval.load_ground_truth(str(root), "roxford5k")
    cfg["gnd"][1]["bbx"] = [40, 0, 10, 5]
    whole = retrieval.OxfordParisDataset(str(tmp_path), "roxford5k", "query", imsize=32, crop_queries=False, cfg=cfg)
    assert whole[1].shape[0] == 3
    with pytest.raises(utils.UserError, match=r"gnd\[1\]"):
        retrieval.OxfordParisDataset(str(tmp_path), "roxford5k", "query", imsize=32, crop_queries=True, cfg=cfg)


def test_images_smaller_than_a_patch_are_stretched_to_one_patch_not_refused():
    """A tiny or thin image (or one halved by --multiscale) keeps its content instead of failing: sides shorter
    than a patch become one patch, the others are cut to multiples of the patch size as usual."""
    tiny = torch.full((1, 3, 10, 10), 0.5)
    assert torch.allclose(retrieval.fit_to_patches(tiny, 16), torch.full((1, 3, 16, 16), 0.5))
    thin = torch.linspace(0, 1, 500)[None, None, :, None].expand(1, 3, 500, 4)  # a vertical ramp, 4 px wide
    out = retrieval.fit_to_patches(thin, 16)
    assert out.shape == (1, 3, 496, 16)
    assert (out[0, 0, 1:, 0] > out[0, 0, :-1, 0]).all()  # the ramp survives the stretch
    assert retrieval.fit_to_patches(torch.zeros(2, 3, 40, 50), 16).shape == (2, 3, 32, 48)
