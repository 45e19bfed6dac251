"""visualize_patches.py: PCA against numpy's eigen-decomposition, colours that ignore the scale of the features,
background removal, mutual nearest neighbours against a brute-force search, the identity correspondence of an
image with itself, the files written and one-line errors."""
import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

import utils
import visualize_patches as vp
from eval_testdata import REPO, assert_one_line_error, random_image, run_script

pytestmark = pytest.mark.usefixtures("one_thread")


def test_projections_are_those_of_the_covariance_eigenvectors():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 12)) * np.linspace(5, 0.5, 12)  # distinct variances: unique axes
    projections = vp.pca_projections(torch.from_numpy(features), 3).numpy()  # (200, 3)
    centred = features - features.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(centred, rowvar=False))
    expected = centred @ eigenvectors[:, ::-1][:, :3]  # largest variance first
    for column in range(3):
        sign = np.sign(expected[np.abs(expected[:, column]).argmax(), column])  # largest projection positive
        np.testing.assert_allclose(projections[:, column], sign * expected[:, column], atol=1e-9)
    assert vp.pca_projections(torch.from_numpy(features[:2]), 3)[:, 1:].abs().max() == 0  # 2 rows: 1 axis


def grids(seed: int):
    """Patch features of two 'images' (5 x 7 and 4 x 6 patches, width 16) with structure across patches."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(4, 16, generator=g)
    return [torch.randn(h, w, 4, generator=g) @ basis + 0.1 * torch.randn(h, w, 16, generator=g)
            for h, w in ((5, 7), (4, 6))]


@pytest.mark.parametrize("threshold", [None, 0.4])
def test_pca_colours_do_not_depend_on_the_scale_of_the_features(threshold):
    features = grids(1)
    colours = vp.pca_colours(features, threshold)
    assert [c.shape for c in colours] == [(5, 7, 3), (4, 6, 3)]
    assert all(0 <= c.min() and c.max() <= 1 for c in colours)
    assert colours[0].std() > 0.1  # not a constant picture
    for scale in (3.7, 1e-3, -2.0):
        scaled = vp.pca_colours([f * scale for f in features], threshold)
        for a, b in zip(colours, scaled):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_background_on_the_borders_is_removed():
    """Border patches share one feature, the inner patches another (plus noise): with a threshold the border is
    black and the inside coloured, whichever sign the features have. The inside is the majority, so the border's
    projections are the largest: only the border rule can tell which side is background."""
    g = torch.Generator().manual_seed(2)
    features = []
    for h, w in ((9, 10), (8, 8)):
        inside = torch.zeros(h, w, dtype=torch.bool)
        inside[1:-1, 1:-1] = True
        grid = torch.where(inside[..., None], torch.full((16,), 3.0), torch.full((16,), -1.0))  # (h, w, 16)
        features.append(grid + 0.3 * torch.randn(h, w, 16, generator=g))
    for sign in (1.0, -1.0):
        colours = vp.pca_colours([sign * f for f in features], threshold=0.5)
        for c in colours:
            assert c[0].abs().sum() == 0 and c[-1].abs().sum() == 0 and c[:, 0].abs().sum() == 0
            assert (c[1:-1, 1:-1].sum(dim=-1) > 0).float().mean() > 0.9
    with pytest.raises(utils.UserError, match="no patch lies above --pca_threshold"):
        vp.pca_colours([torch.ones(3, 3, 4)], threshold=0.5)  # identical patches: nothing stands out


def brute_force_mutual_neighbours(a: torch.Tensor, b: torch.Tensor):
    a, b = a.double().numpy(), b.double().numpy()
    cosine = [[float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) for y in b] for x in a]
    pairs = []
    for i, row in enumerate(cosine):
        j = max(range(len(b)), key=lambda col: row[col])
        if max(range(len(a)), key=lambda r: cosine[r][j]) == i:
            pairs.append((i, j, row[j]))
    return sorted(pairs, key=lambda p: -p[2])


def test_mutual_nearest_neighbours_match_a_brute_force_search():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(40, 8, generator=g), torch.randn(55, 8, generator=g)
    b[:20] = a[:20] * 2.5 + 0.3 * torch.randn(20, 8, generator=g)  # some true correspondences
    expected = brute_force_mutual_neighbours(a, b)
    assert len(expected) > 20
    for k in (1, 5, 1000):
        index_a, index_b, sims = vp.mutual_nearest_neighbours(a, b, k)
        got = list(zip(index_a.tolist(), index_b.tolist(), sims.tolist()))
        assert [(i, j) for i, j, _ in got] == [(i, j) for i, j, _ in expected[:k]]
        np.testing.assert_allclose([s for *_, s in got], [s for *_, s in expected[:k]], atol=1e-6)


def _args(tmp_path, *flags):
    parser = argparse.ArgumentParser(parents=[vp.get_args_parser()])
    return parser.parse_args(["--output_dir", str(tmp_path / "out"), "--use_cuda", "false", *flags])


def test_an_image_and_itself_correspond_patch_to_patch(tmp_path, checkpoint8, capsys):
    image_path = str(tmp_path / "photo.png")
    random_image(6, size=(90, 70)).save(image_path)
    result = vp.main(_args(tmp_path, "--pretrained_weights", checkpoint8, "--image_paths", image_path, image_path,
                           "--image_size", "50", "--topk", "10"))  # 64 x 50 -> cut to 64 x 48: 6 x 8 patches
    out = capsys.readouterr().out
    assert "--arch vit_tiny and --patch_size 8 from the checkpoint's args" in out
    assert len(result["matches"]) == 10
    for a, b, sim in result["matches"]:
        assert a == b and sim == pytest.approx(1.0, abs=1e-5)
        assert f"{str(divmod(a, 8)):>10} -> {str(divmod(b, 8)):<10} cosine 1.0000" in out
    assert [c.shape for c in result["pca"]] == [(6, 8, 3), (6, 8, 3)]
    torch.testing.assert_close(result["pca"][0], result["pca"][1])
    files = set(os.listdir(tmp_path / "out"))
    assert files == {"pca-0-photo.png", "pca-1-photo.png", "pca.png", "matches.png"}
    picture = np.asarray(Image.open(tmp_path / "out" / "pca-0-photo.png").convert("RGB"))  # (48, 64, 3)
    assert picture.shape == (48, 64, 3)
    expected = np.round(result["pca"][0].numpy() * 255).repeat(8, 0).repeat(8, 1)  # (48, 64, 3)
    assert np.abs(picture.astype(float) - expected).max() <= 1


def test_one_image_gives_pca_only_with_background_removed(tmp_path, checkpoint8):
    result = vp.main(_args(tmp_path, "--pretrained_weights", checkpoint8, "--image_size", "40",
                           "--image_paths", os.path.join(REPO, "test.png"), "--pca_threshold", "0.5"))
    assert result["matches"] == [] and len(result["pca"]) == 1
    colours = result["pca"][0]  # (5, 7, 3): test.png is 451 x 300
    assert colours.shape == (5, 7, 3)
    black = colours.sum(dim=-1) == 0
    assert black.any() and not black.all()
    assert set(os.listdir(tmp_path / "out")) == {"pca-test.png", "pca.png"}


def test_bad_input_is_a_one_line_error(tmp_path, checkpoint8):
    result = run_script("visualize_patches.py", ["--pretrained_weights", checkpoint8, "--use_cuda", "false",
                                                 "--image_paths", os.path.join(REPO, "test.png"),
                                                 str(tmp_path / "absent.jpg")])
    assert_one_line_error(result, "absent.jpg", "not found")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(utils.UserError, match="cannot decode image .*notes.jpg") as error:
        vp.main(_args(tmp_path, "--pretrained_weights", checkpoint8, "--image_paths", str(text)))
    assert "\n" not in str(error.value)
    with pytest.raises(utils.UserError, match="--patch_size 16 contradicts .*--patch_size 8"):
        vp.main(_args(tmp_path, "--pretrained_weights", checkpoint8, "--patch_size", "16"))
    for flags, message in ((["--pca_threshold", "1"], "--pca_threshold 1.0 must be"),
                           (["--topk", "-1"], "--topk must be 0 or more")):
        with pytest.raises(utils.UserError, match=message):
            vp.main(_args(tmp_path, "--pretrained_weights", checkpoint8, *flags))


def test_an_unwritable_output_dir_is_a_one_line_error(tmp_path, checkpoint8):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(utils.UserError, match="cannot write the PNGs to --output_dir .*a_file"):
        vp.main(_args(tmp_path, "--pretrained_weights", checkpoint8, "--image_size", "32",
                      "--output_dir", str(blocker)))
    result = run_script("visualize_patches.py", ["--patch_size", "0"])
    assert_one_line_error(result, "--patch_size", "at least 1")
