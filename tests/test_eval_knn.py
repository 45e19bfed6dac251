"""eval_knn.py and the k-NN search and vote it shares through utils.py: the weighted vote against an
independent computation, backend agreement, end to end runs (one process, feature dump/load, two torchrun
processes) and one-line errors."""
import argparse
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval_knn
import utils
from eval_testdata import assert_one_line_error, last_json, make_image_folder, run_script, write_dino_checkpoint

SMALL_ARGS = ["--arch", "vit_tiny", "--patch_size", "16", "--resize_size", "32", "--crop_size", "32",
              "--num_workers", "0", "--batch_size_per_gpu", "4", "--nb_knn", "1", "5", "20", "--use_cuda", "false"]


def independent_vote(train, train_labels, test, test_labels, k, T, num_classes):
    """The weighted k-NN vote written out with plain Python loops in float64."""
    train, test = train.double().numpy(), test.double().numpy()
    k = min(k, len(train))
    top1 = top5 = 0
    for x, y in zip(test, test_labels.tolist()):
        ranked = sorted(range(len(train)), key=lambda i: -float(np.dot(x, train[i])))
        score = [0.0] * num_classes
        for i in ranked[:k]:
            score[int(train_labels[i])] += math.exp(float(np.dot(x, train[i])) / T)
        classes = sorted(range(num_classes), key=lambda c: (-score[c], c))
        top1 += classes[0] == y
        top5 += y in classes[:min(5, k, num_classes)]
    n = len(test_labels)
    return 100.0 * top1 / n, 100.0 * top5 / n


def random_features(num, dim, num_classes, generator, spread=1.0):
    """Clustered L2-normalised features: a random centre per class plus Gaussian noise."""
    centres = torch.randn(num_classes, dim, generator=generator)
    labels = torch.randint(0, num_classes, (num,), generator=generator)
    feats = centres[labels] + spread * torch.randn(num, dim, generator=generator)
    return F.normalize(feats, dim=1), labels


@pytest.mark.parametrize("num_classes", [2, 3, 12])
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_knn_classifier_matches_independent_vote(num_classes, backend):
    g = torch.Generator().manual_seed(num_classes)
    train, train_labels = random_features(40, 16, num_classes, g, spread=2.0)
    test, test_labels = random_features(7, 16, num_classes, g, spread=2.0)
    test_labels[0] = num_classes - 1  # the default num_classes must come from the largest label
    seen = set()
    for k in (1, 3, 5, 20, 100):
        for T in (0.07, 0.5):
            expected = independent_vote(train, train_labels, test, test_labels, k, T, num_classes)
            got = eval_knn.knn_classifier(train, train_labels, test, test_labels, k, T, backend=backend)
            assert got == pytest.approx(expected), (k, T)
            seen.add(expected)
            explicit = eval_knn.knn_classifier(train, train_labels, test, test_labels, k, T,
                                            num_classes=num_classes + 3, backend=backend)
            assert explicit == pytest.approx(
                independent_vote(train, train_labels, test, test_labels, k, T, num_classes + 3))
    assert len(seen) > 1  # the data is hard enough for k and T to matter


def test_chunking_and_k_clamp_do_not_change_results():
    g = torch.Generator().manual_seed(0)
    train, train_labels = random_features(50, 8, 4, g, spread=1.5)
    test, test_labels = random_features(23, 8, 4, g, spread=1.5)
    for backend in ("torch", "faiss"):
        whole = eval_knn.knn_classifier(train, train_labels, test, test_labels, 10, 0.07, backend=backend)
        tiny_chunks = eval_knn.knn_classifier(train, train_labels, test, test_labels, 10, 0.07, backend=backend,
                                           chunk_elements=7)
        assert whole == tiny_chunks
    clamped = eval_knn.knn_classifier(train, train_labels, test, test_labels, 500, 0.07)
    assert clamped == eval_knn.knn_classifier(train, train_labels, test, test_labels, 50, 0.07)


def test_faiss_and_torch_backends_agree():
    g = torch.Generator().manual_seed(1)
    train, train_labels = random_features(3000, 64, 10, g, spread=0.25)
    test, test_labels = random_features(700, 64, 10, g, spread=0.25)
    sims_t, idx_t = eval_knn.knn_search(train, test, 50, backend="torch")
    sims_f, idx_f = eval_knn.knn_search(train, test, 50, backend="faiss")
    torch.testing.assert_close(sims_t, sims_f, atol=1e-5, rtol=0)
    assert (idx_t == idx_f).float().mean() > 0.999  # only near-ties may swap
    res_t = eval_knn.evaluate_knn(train, train_labels, test, test_labels, [10, 20, 50], 0.07, "torch")
    res_f = eval_knn.evaluate_knn(train, train_labels, test, test_labels, [10, 20, 50], 0.07, "faiss")
    assert res_t == res_f
    assert 20.0 < res_t["10"]["top1"] < 100.0  # neither trivial nor chance


def test_evaluate_knn_reuses_one_search_for_every_k():
    g = torch.Generator().manual_seed(2)
    train, train_labels = random_features(200, 16, 5, g, spread=1.0)
    test, test_labels = random_features(31, 16, 5, g, spread=1.0)
    results = eval_knn.evaluate_knn(train, train_labels, test, test_labels, [1, 10, 20, 300], 0.07, "torch")
    for k in (1, 10, 20, 300):
        expected = eval_knn.knn_classifier(train, train_labels, test, test_labels, k, 0.07, backend="torch")
        assert (results[str(k)]["top1"], results[str(k)]["top5"]) == pytest.approx(expected)


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn")
    data = make_image_folder(str(root / "data"), {"train": (7, 6), "val": (3, 2)})
    checkpoint = write_dino_checkpoint(str(root / "checkpoint.pth"))
    return root, data, checkpoint


@pytest.fixture(scope="module")
def single_process_run(image_data):
    """One plain-python run on the image folder with the teacher, dumping its features."""
    root, data, checkpoint = image_data
    dump = str(root / "features_1proc")
    result = last_json(run_script("eval_knn.py", ["--data_path", data, "--pretrained_weights", checkpoint,
                                                  "--checkpoint_key", "teacher", "--dump_features", dump,
                                                  *SMALL_ARGS]))
    return result, dump


def test_end_to_end_teacher_separates_classes_and_dump_load_round_trip(image_data, single_process_run):
    root, _, _ = image_data
    first, dump = single_process_run
    assert set(first["knn"]) == {"1", "5", "20"}
    assert first["knn"]["1"]["top1"] == 100.0 and first["knn"]["5"]["top1"] == 100.0
    assert sorted(os.listdir(dump)) == sorted(eval_knn.FEATURE_FILES)
    train_features = torch.load(os.path.join(dump, "trainfeat.pth"))
    assert train_features.shape == (13, 192)
    torch.testing.assert_close(train_features.norm(dim=1), torch.ones(13))
    assert torch.load(os.path.join(dump, "testlabels.pth")).tolist() == [0, 0, 0, 1, 1]
    loaded = last_json(run_script("eval_knn.py", ["--load_features", dump, "--data_path", str(root / "absent"),
                                                  *SMALL_ARGS]))
    assert loaded == first


def test_torchrun_two_processes_match_one_process(image_data, single_process_run):
    root, data, checkpoint = image_data
    single, one = single_process_run
    two = str(root / "features_2proc")
    double = run_script("eval_knn.py", ["--data_path", data, "--pretrained_weights", checkpoint,
                                        "--dump_features", two, *SMALL_ARGS], nproc=2)
    assert last_json(double) == single
    for name in eval_knn.FEATURE_FILES:  # 13 and 5 images: the sampler pads, gathering by index must not
        a, b = torch.load(os.path.join(one, name)), torch.load(os.path.join(two, name))
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_missing_val_folder_is_a_one_line_error(tmp_path, image_data):
    _, _, checkpoint = image_data
    data = make_image_folder(str(tmp_path / "data"), {"train": (2, 2)})
    result = run_script("eval_knn.py", ["--data_path", data, "--pretrained_weights", checkpoint, *SMALL_ARGS])
    assert_one_line_error(result, os.path.join(data, "val"), "not found")


@pytest.mark.parametrize("flags, fragments", [(["--arch", "vit_small"], ("--arch vit_small", "--arch vit_tiny")),
                                              (["--patch_size", "8"], ("--patch_size 8", "--patch_size 16"))])
def test_flags_that_contradict_the_checkpoint_args_are_a_one_line_error(image_data, flags, fragments):
    _, data, checkpoint = image_data
    result = run_script("eval_knn.py", ["--data_path", data, "--pretrained_weights", checkpoint, *SMALL_ARGS,
                                        *flags])
    assert_one_line_error(result, "contradicts", *fragments)


def test_state_dict_of_another_architecture_is_a_one_line_error(image_data, tmp_path):
    """A plain state dict saves no args: the flags (or their defaults) are checked against the weights."""
    _, data, checkpoint = image_data
    plain = str(tmp_path / "backbone.pth")
    torch.save(utils.load_checkpoint(checkpoint)["teacher"], plain)
    result = run_script("eval_knn.py", ["--data_path", data, "--pretrained_weights", plain, *SMALL_ARGS,
                                        "--patch_size", "8"])
    assert_one_line_error(result, "patch size 16", "--arch")


def _small_args_without_model_flags():
    drop = {i + j for i, arg in enumerate(SMALL_ARGS) if arg in ("--arch", "--patch_size") for j in (0, 1)}
    return [arg for i, arg in enumerate(SMALL_ARGS) if i not in drop]


def test_model_comes_from_the_checkpoint_args_without_flags(image_data, tmp_path):
    """A vit_tiny/8 checkpoint evaluated without --arch/--patch_size gives the features of that model; a plain
    state dict gets vit_small/16."""
    import vision_transformer as vits

    _, data, _ = image_data
    checkpoint = write_dino_checkpoint(str(tmp_path / "patch8.pth"), patch_size=8, seed=3)
    dump = str(tmp_path / "features")
    result = run_script("eval_knn.py", ["--data_path", data, "--pretrained_weights", checkpoint,
                                        "--dump_features", dump, *_small_args_without_model_flags()])
    last_json(result)
    assert "--arch vit_tiny and --patch_size 8 from the checkpoint's args" in result.stdout
    teacher = vits.vit_tiny(patch_size=8).eval()
    state = utils.load_checkpoint(checkpoint)["teacher"]
    teacher.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    train = eval_knn.build_datasets(argparse.Namespace(data_path=data, resize_size=32, crop_size=32))[0]
    with torch.no_grad():
        expected = F.normalize(teacher(torch.stack([train[i][0] for i in range(len(train))])), dim=1)  # (N, 192)
    torch.testing.assert_close(torch.load(os.path.join(dump, "trainfeat.pth")), expected, atol=1e-5, rtol=1e-4)

    plain = str(tmp_path / "vit_small16.pth")
    torch.save(vits.vit_small(patch_size=16).state_dict(), plain)
    result = run_script("eval_knn.py", ["--data_path", data, "--pretrained_weights", plain,
                                        *_small_args_without_model_flags()])
    last_json(result)
    assert "--arch vit_small and --patch_size 16 by default" in result.stdout


def test_resize_smaller_than_the_crop_is_refused(image_data):
    _, data, checkpoint = image_data
    parser = argparse.ArgumentParser(parents=[eval_knn.get_args_parser()])
    args = parser.parse_args(["--data_path", data, "--pretrained_weights", checkpoint, *SMALL_ARGS,
                              "--resize_size", "16"])
    with pytest.raises(utils.UserError, match="--resize_size 16 is smaller than --crop_size 32"):
        eval_knn.extract_feature_pipeline(args)
