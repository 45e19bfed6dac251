"""Tests of eval_copy_detection.py: the Holidays AP per block, the positives of each block, whitening, the
search, and end-to-end runs on a mini Copydays tree (all 20 blocks, sizes unlike the real ones) checked
against an independent computation from the teacher's features, also with whitening and distractors, under
torchrun with two processes, with blocks missing and with broken inputs (CPU)."""
import argparse
import json
import os
import shutil
import subprocess
from typing import Optional

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import functional as TF

import eval_copy_detection as copydays
from eval_testdata import assert_one_line_error, last_json, random_image, run_script, write_teacher_student_checkpoint

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PATCH = 8
pytestmark = pytest.mark.usefixtures("one_thread")
IMSIZE = 48
ORIGINALS = ["200000.jpg", "200100.jpg", "200200.jpg", "200300.jpg", "200400.jpg"]


def make_copydays(root, blocks=copydays.QUERY_BLOCKS[1:]) -> str:
    """A Copydays tree: 5 originals; ``strong`` has 7 images (exact copies under new names, a mirror, a
    blur); ``jpegqual/<q>`` re-encodes the originals at quality q; ``crops/<c>`` cuts c% of their area."""
    originals = [random_image(i) for i in range(len(ORIGINALS))]
    folder = os.path.join(root, "original")
    os.makedirs(folder)
    for name, img in zip(ORIGINALS, originals):
        img.save(os.path.join(folder, name), quality=95)
    for block in blocks:
        folder = os.path.join(root, block)
        os.makedirs(folder)
        if block == "strong":
            for source, name in ((0, "200000.jpg"), (0, "200001.jpg"), (1, "200100.jpg"), (3, "200300.jpg")):
                shutil.copyfile(os.path.join(root, "original", ORIGINALS[source]), os.path.join(folder, name))
            ImageOps.mirror(originals[2]).save(os.path.join(folder, "200200.jpg"), quality=90)
            originals[4].filter(ImageFilter.GaussianBlur(3)).save(os.path.join(folder, "200400.jpg"), quality=90)
            random_image(99).save(os.path.join(folder, "200401.jpg"), quality=90)  # unrelated: a hard query
        elif block.startswith("jpegqual/"):
            for name, img in zip(ORIGINALS, originals):
                img.save(os.path.join(folder, name), quality=int(block.split("/")[1]))
        elif block.startswith("crops/"):
            keep = (1 - int(block.split("/")[1]) / 100) ** 0.5
            for name, img in zip(ORIGINALS, originals):
                w, h = round(img.width * keep), round(img.height * keep)
                img.crop((0, 0, w, h)).save(os.path.join(folder, name), quality=90)
    return str(root)


def run(*flags: str, nproc: Optional[int] = None) -> subprocess.CompletedProcess:
    return run_script("eval_copy_detection.py", flags, nproc=nproc, timeout=300, threads=1)


def holidays_ap(ranks, nres):
    """The Holidays scoring written out: trapezoids between the precisions before and after each hit."""
    ap = 0.0
    for ntp, rank in enumerate(ranks):
        before = 1.0 if rank == 0 else ntp / rank
        after = (ntp + 1) / (rank + 1)
        ap += (before + after) / 2 / nres
    return ap


def expected_map(root, teacher, whitening=None, distractors=None) -> dict:
    """What eval_copy_detection should print, computed here independently from the teacher."""
    def features(paths):
        x = torch.stack([TF.normalize(TF.to_tensor(Image.open(p).convert("RGB").resize(
            (IMSIZE, IMSIZE), Image.Resampling.BICUBIC)), MEAN, STD) for p in paths])  # (n, 3, S, S)
        with torch.no_grad():
            tokens = teacher.get_intermediate_layers(x, 1)[0]  # (n, 1+N, D)
        g = IMSIZE // PATCH
        grid = tokens[:, 1:].reshape(len(paths), g, g, -1).permute(0, 3, 1, 2).clamp(min=1e-6)  # (n, D, g, g)
        gem = torch.nn.functional.avg_pool2d(grid ** 4, (g, g)).flatten(1) ** 0.25  # (n, D)
        return torch.cat((tokens[:, 0], gem), 1).double().numpy()  # (n, 2D)

    def listing(folder):
        return [os.path.join(folder, f) for f in sorted(os.listdir(folder))]

    blocks = {b: listing(os.path.join(root, b)) for b in ["original"] + list(copydays.QUERY_BLOCKS)[1:]
              if os.path.isdir(os.path.join(root, b))}
    queries = {b: features(paths) for b, paths in blocks.items()}
    database = queries["original"]
    if distractors:
        database = np.concatenate([database, features(listing(distractors))])
    if whitening:
        w = features(listing(whitening))
        mean = w.mean(0)
        eigvals, eigvecs = np.linalg.eigh(np.cov((w - mean).T, bias=True))
        eigvals = np.maximum(eigvals, eigvals.max() * 1e-5)
        project = lambda f: ((f - mean) @ eigvecs) / eigvals ** 0.5  # noqa: E731 (column order is irrelevant)
        database = project(database)
        queries = {b: project(f) for b, f in queries.items()}
    normalize = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)  # noqa: E731
    database = normalize(database)
    out = {}
    for block, feats in queries.items():
        order = np.argsort(-(normalize(feats) @ database.T), axis=1, kind="stable")[:, :20]  # (Q, 20)
        aps = []
        for q, row in enumerate(order):
            qname = os.path.basename(blocks[block][q])
            positives = [j for j, o in enumerate(ORIGINALS) if o[:4] == qname[:4]] if block == "strong" else [q]
            aps.append(holidays_ap([r for r, j in enumerate(row) if j in positives], len(positives)))
        out[block] = 100 * np.mean(aps)
    return out


# ----------------------------------------------------------------------------------------------------
# Units
# ----------------------------------------------------------------------------------------------------
def test_holidays_ap_per_block_hand_worked():
    neighbours = np.array([[0, 1, 2], [2, 0, 1], [1, 2, 0], [1, 2, 3]])
    positives = [[0], [0], [0, 1], [0]]
    per_query = [1.0, (0 / 1 + 1 / 2) / 2, 0.5 * (1 + 1) / 2 + 0.5 * (1 / 2 + 2 / 3) / 2, 0.0]
    assert copydays.evaluate_block(neighbours, positives) == pytest.approx(np.mean(per_query))
    assert copydays.evaluate_block(neighbours[:1], [[0, 5]]) == pytest.approx(0.5)  # one of two positives found
    assert copydays.evaluate_block(neighbours[:1], [[]]) == 0.0


def test_block_positives():
    originals = [f"/c/original/{n}" for n in ("200000.jpg", "200001.jpg", "200100.jpg")]
    strong = [f"/c/strong/{n}" for n in ("200000.jpg", "200003.jpg", "200100.jpg", "209900.jpg")]
    assert copydays.block_positives("strong", strong, originals) == [[0, 1], [0, 1], [2], []]
    crops = [f"/c/crops/50/{n}" for n in ("200000.jpg", "200001.jpg", "200100.jpg")]
    assert copydays.block_positives("crops/50", crops, originals) == [[0], [1], [2]]
    with pytest.raises(copydays.utils.UserError, match="crops/50 has 2 images but original/ has 3"):
        copydays.block_positives("crops/50", crops[:2], originals)


def test_whitening_decorrelates_and_scales_to_unit_variance():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(6, 6))
    feats = torch.from_numpy(rng.normal(size=(2000, 6)) @ mixing + 3.0).float()  # (n, 6), correlated
    mean, projection = copydays.learn_whitening(feats)
    white = copydays.apply_whitening(feats, mean, projection).double()  # (n, 6)
    assert white.mean(0).abs().max() < 1e-4
    np.testing.assert_allclose((white.T @ white / len(white)).numpy(), np.eye(6), atol=1e-3)
    variances = (white.T @ white / len(white)).diagonal()
    assert torch.all(variances > 0.99)
    rank_deficient = torch.randn(4, 10).double()  # fewer images than dimensions: eigenvalues ~0 are floored
    mean, projection = copydays.learn_whitening(rank_deficient)
    centered = rank_deficient - rank_deficient.mean(0)
    largest = torch.linalg.eigvalsh(centered.T @ centered / 4).max()
    row_scales = projection.double().norm(dim=1)  # eigenvalue ** -0.5, from the largest to the floored ones
    assert row_scales[0].item() == pytest.approx(largest.item() ** -0.5, rel=1e-4)
    assert row_scales.max().item() == pytest.approx((1e-5 * largest.item()) ** -0.5, rel=1e-4)


def test_search_faiss_and_torch_agree_with_brute_force():
    g = torch.Generator().manual_seed(0)
    queries, database = torch.randn(7, 16, generator=g), torch.randn(30, 16, generator=g)
    expected = np.argsort(-(torch.nn.functional.normalize(queries, dim=1)
                            @ torch.nn.functional.normalize(database, dim=1).T).numpy(), axis=1)[:, :5]
    np.testing.assert_array_equal(copydays.search(queries, database, 5, torch.device("cpu")), expected)
    assert copydays.search(queries, database[:3], 20, torch.device("cpu")).shape == (7, 3)
    if torch.cuda.is_available():
        np.testing.assert_array_equal(copydays.search(queries, database, 5, torch.device("cuda")), expected)


# ----------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mini_copydays(tmp_path_factory):
    root = tmp_path_factory.mktemp("copydays")
    data = make_copydays(root / "copydays")
    for folder, seeds in (("whitening", range(100, 112)), ("distractors", range(200, 204))):
        os.makedirs(root / folder)
        for s in seeds:
            random_image(s).save(root / folder / f"{s}.jpg", quality=90)
    ckpt = str(root / "checkpoint.pth")
    teacher = write_teacher_student_checkpoint(ckpt, PATCH, seed=1)
    flags = ["--data_path", data, "--imsize", str(IMSIZE), "--arch", "vit_tiny", "--patch_size", str(PATCH),
             "--pretrained_weights", ckpt, "--num_workers", "0", "--batch_size_per_gpu", "8",
             "--use_cuda", "false"]
    single = run(*flags)
    last_json(single)  # the run succeeded
    return root, data, teacher, flags, single


def test_end_to_end_all_blocks_match_an_independent_computation(mini_copydays):
    root, data, teacher, _, single = mini_copydays
    got = last_json(single)["mAP"]
    assert list(got) == list(copydays.QUERY_BLOCKS)
    assert "eval on strong: mAP=" in single.stdout
    expected = expected_map(data, teacher)
    for block in copydays.QUERY_BLOCKS:
        assert got[block] == pytest.approx(expected[block], abs=1e-3), block
    assert got["original"] == 100.0
    # strong's four exact copies (two of original 0 under names with its prefix 2000) find it first
    assert got["strong"] >= 100 * 4 / 7


def parse(flags) -> argparse.Namespace:
    return argparse.ArgumentParser(parents=[copydays.get_args_parser()]).parse_args(flags)


def test_whitening_and_distractors(mini_copydays, capsys):
    root, data, teacher, flags, single = mini_copydays
    copydays.main(parse([*flags, "--whitening_path", str(root / "whitening"),
                         "--distractors_path", str(root / "distractors")]))
    out = capsys.readouterr().out
    assert "4 distractors, 12 whitening images" in out
    got = json.loads(out.strip().splitlines()[-1])["mAP"]
    expected = expected_map(data, teacher, whitening=str(root / "whitening"), distractors=str(root / "distractors"))
    for block in copydays.QUERY_BLOCKS:
        assert got[block] == pytest.approx(expected[block], abs=1e-3), block
    assert got != last_json(single)["mAP"]


def test_two_processes_print_the_same_json(mini_copydays):
    _, _, _, flags, single = mini_copydays
    proc = run(*flags, nproc=2)
    assert last_json(proc) == last_json(single)
    assert proc.stdout.count('{"mAP"') == 1  # only rank 0 prints


def test_missing_blocks_are_skipped_with_a_note(tmp_path, mini_copydays, capsys):
    _, _, teacher, flags, _ = mini_copydays
    data = make_copydays(tmp_path / "partial", blocks=["strong", "crops/50"])
    got = copydays.main(parse([data if f == flags[1] else f for f in flags]))
    out = capsys.readouterr().out
    assert "skipping the Copydays blocks missing" in out and "jpegqual/3" in out
    assert list(got) == ["original", "strong", "crops/50"]
    expected = expected_map(data, teacher)
    assert got["crops/50"] == pytest.approx(expected["crops/50"], abs=1e-3)


def test_broken_inputs_are_clear_errors(tmp_path, mini_copydays):
    _, data, _, flags, _ = mini_copydays

    def main_with(data_path):
        copydays.main(parse([data_path if f == flags[1] else f for f in flags]))

    (tmp_path / "empty").mkdir()
    with pytest.raises(copydays.utils.UserError, match="no images in .*empty/original"):
        main_with(str(tmp_path / "empty"))
    broken = str(tmp_path / "broken")
    shutil.copytree(data, broken)
    os.remove(os.path.join(broken, "jpegqual", "5", "200000.jpg"))
    with pytest.raises(copydays.utils.UserError, match="jpegqual/5 has 4 images but original/ has 5"):
        main_with(broken)
    shutil.rmtree(os.path.join(broken, "jpegqual", "5"))
    with open(os.path.join(broken, "strong", "200100.jpg"), "wb") as f:
        f.write(b"truncated")
    proc = run(*[broken if f == flags[1] else f for f in flags])  # from the command line: one line, status 2
    assert_one_line_error(proc, "cannot decode image", os.path.join("strong", "200100.jpg"))


def test_model_flags_default_to_the_checkpoint_args_else_vit_base8(mini_copydays, monkeypatch):
    _, _, _, flags, single = mini_copydays
    drop = {i + j for i, flag in enumerate(flags) if flag in ("--arch", "--patch_size") for j in (0, 1)}
    without_model_flags = [flag for i, flag in enumerate(flags) if i not in drop]
    assert copydays.main(parse(without_model_flags)) == pytest.approx(last_json(single)["mAP"], abs=1e-4)
    asked = []

    def offline(url, **kwargs):
        asked.append(url)
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    weights = without_model_flags.index("--pretrained_weights")
    with pytest.raises(copydays.utils.UserError, match="official DINO weights for vit_base/8"):
        copydays.main(parse(without_model_flags[:weights] + without_model_flags[weights + 2:]))
    assert asked == [copydays.utils.DINO_URL + copydays.utils.OFFICIAL_WEIGHTS[("vit_base", 8)]]
