"""eval_linear.py: the frozen features fed to the classifier, training end to end with resume and
--evaluate on a generated two-class folder, and one-line errors."""
import json
import math
import os
import re

import pytest
import torch

import eval_linear
import vision_transformer as vits
from eval_testdata import assert_one_line_error, last_json, make_image_folder, run_script, write_dino_checkpoint


def test_frozen_features_concatenate_last_blocks_then_pooled_patches():
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=16).eval()
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        cls_last = model(images)  # (2, 192)
        tokens = model.forward_tokens(images)  # (2, 1+6, 192)
        second_last = model.get_intermediate_layers(images, 2)[0][:, 0]  # (2, 192)
    feats = eval_linear.frozen_features(model, images, 4, False)
    assert feats.shape == (2, 4 * 192)
    torch.testing.assert_close(feats[:, -192:], cls_last)  # blocks in order, the last block last
    torch.testing.assert_close(feats[:, 2 * 192:3 * 192], second_last)
    pooled = eval_linear.frozen_features(model, images, 1, True)
    assert pooled.shape == (2, 2 * 192)
    # one block: the reference's layout cls_0, avg_0, cls_1, avg_1, ... (its released ViT-B heads expect it)
    torch.testing.assert_close(pooled[:, 0::2], cls_last)
    torch.testing.assert_close(pooled[:, 1::2], tokens[:, 1:].mean(dim=1))
    pooled = eval_linear.frozen_features(model, images, 2, True)  # more blocks: the pooled tokens last
    assert pooled.shape == (2, 3 * 192)
    torch.testing.assert_close(pooled[:, 192:2 * 192], cls_last)
    torch.testing.assert_close(pooled[:, 2 * 192:], tokens[:, 1:].mean(dim=1))
    assert not feats.requires_grad


def test_classifier_initialisation():
    torch.manual_seed(0)
    classifier = eval_linear.LinearClassifier(768, 1000)
    assert classifier.linear.bias.abs().max() == 0
    assert classifier.linear.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert classifier(torch.randn(3, 4, 192)).shape == (3, 1000)


@pytest.fixture(scope="module")
def linear_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("linear")
    data = make_image_folder(str(root / "data"), {"train": (7, 6), "val": (3, 2)})
    checkpoint = write_dino_checkpoint(str(root / "checkpoint.pth"))
    common = ["--data_path", data, "--pretrained_weights", checkpoint, "--arch", "vit_tiny", "--patch_size", "16",
              "--image_size", "32", "--num_workers", "0", "--batch_size_per_gpu", "4", "--lr", "0.05"]
    return root, common


def _log(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as f:
        return [json.loads(line) for line in f]


def _printed_val_loss(stdout):
    return float(re.findall(r"\* Acc@1 \S+ Acc@5 \S+ loss (\S+)", stdout)[-1])


def test_train_resume_and_evaluate(linear_setup):
    root, common = linear_setup
    out = str(root / "run")
    first = run_script("eval_linear.py", [*common, "--epochs", "2", "--output_dir", out])
    result = last_json(first)
    assert set(result) == {"top1", "top5", "best_acc"}
    assert result["top1"] == 100.0 and result["best_acc"] == 100.0  # the colours are linearly separable
    log = _log(out)
    assert [entry["epoch"] for entry in log] == [0, 1]
    base_lr = 0.05 * 4 / 256
    assert log[0]["train_lr"] == pytest.approx(base_lr)
    assert log[1]["train_lr"] == pytest.approx(base_lr * 0.5 * (1 + math.cos(math.pi / 2)))
    assert log[1]["train_loss"] < log[0]["train_loss"]
    saved = torch.load(os.path.join(out, "checkpoint.pth.tar"))
    assert saved["epoch"] == 2 and saved["best_acc"] == 100.0
    assert {"state_dict", "optimizer", "scheduler"} <= set(saved)
    assert sorted(os.listdir(out)) == ["checkpoint.pth.tar", "log.txt"]  # no temporary file left behind

    assert saved["setup"]["--image_size"] == 32 and len(saved["setup"]["backbone weights"]) == 64

    # resumed with more epochs and another --lr: the rest of the schedule follows the current command
    resumed = run_script("eval_linear.py", [*common, "--epochs", "3", "--output_dir", out, "--lr", "0.1"])
    last_json(resumed)
    assert "Epoch: [2]" in resumed.stdout and "Epoch: [0]" not in resumed.stdout
    log = _log(out)
    assert [entry["epoch"] for entry in log] == [0, 1, 2]
    assert log[2]["train_lr"] == pytest.approx(0.1 * 4 / 256 * 0.5 * (1 + math.cos(2 * math.pi / 3)))

    evaluated = run_script("eval_linear.py", [*common, "--evaluate", "--output_dir", out])
    result = last_json(evaluated)
    assert "Epoch:" not in evaluated.stdout
    assert result["top1"] == log[-1]["test_acc1"] and result["best_acc"] == 100.0
    assert _printed_val_loss(evaluated.stdout) == pytest.approx(log[-1]["test_loss"], abs=1.5e-3)
    assert len(_log(out)) == 3

    # another backbone (same architecture, so the shapes fit) or other features: refused, nothing reused
    other = write_dino_checkpoint(str(root / "other_backbone.pth"), seed=1)
    weights = common.index("--pretrained_weights") + 1
    refused = run_script("eval_linear.py", [*common[:weights], other, *common[weights + 1:], "--evaluate",
                                            "--output_dir", out])
    assert_one_line_error(refused, "backbone weights", "another --output_dir")
    refused = run_script("eval_linear.py", [*common, "--epochs", "4", "--output_dir", out, "--image_size", "48"])
    assert_one_line_error(refused, "--image_size 48 (saved: 32)")
    assert len(_log(out)) == 3


def test_resume_with_another_feature_size_is_a_one_line_error(linear_setup):
    root, common = linear_setup
    out = str(root / "other")
    os.makedirs(out)
    torch.save({"epoch": 1, "state_dict": {"module.linear.weight": torch.zeros(2, 192),
                                           "module.linear.bias": torch.zeros(2)}, "best_acc": 50.0},
               os.path.join(out, "checkpoint.pth.tar"))
    result = run_script("eval_linear.py", [*common, "--epochs", "2", "--n_last_blocks", "4", "--output_dir", out])
    assert_one_line_error(result, "--n_last_blocks", "another shape")


def test_evaluate_without_a_trained_classifier_is_a_one_line_error(linear_setup):
    root, common = linear_setup
    result = run_script("eval_linear.py", [*common, "--evaluate", "--output_dir", str(root / "empty")])
    assert_one_line_error(result, "--evaluate", "train first")


def test_a_classifier_without_a_recorded_backbone_loads_unchecked(tmp_path):
    """The reference's released heads record no backbone: they load, with a note instead of the check."""
    setup = {"backbone weights": "0" * 64, "--arch": "vit_tiny", "--patch_size": 16, "--n_last_blocks": 1,
             "--avgpool_patchtokens": True, "--image_size": 32}
    head = {"epoch": 3, "state_dict": {"linear.weight": torch.ones(2, 384), "linear.bias": torch.zeros(2)}}
    torch.save(head, tmp_path / "released.pth.tar")
    classifier = eval_linear.LinearClassifier(384, 2)
    eval_linear.load_classifier_checkpoint(str(tmp_path / "released.pth.tar"), classifier, setup)
    assert classifier.linear.weight.sum() == 2 * 384
