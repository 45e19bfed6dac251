"""hubconf.py through torch.hub, offline: the entries torch.hub lists, DINO's backbones and parameter names, the
official weights (the download replaced by a stand-in), checkpoints of this project loaded as the evaluation
scripts load them, one-line errors, and no interference with a caller's own modules."""
import os
import shutil
import sys
import types
import urllib.error

import pytest
import torch

import utils
import vision_transformer as vits
from eval_testdata import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

ENTRIES = {"dino_vits16": ("vit_small", 16), "dino_vits8": ("vit_small", 8), "dino_vitb16": ("vit_base", 16),
           "dino_vitb8": ("vit_base", 8)}


def official_parameter_names(depth: int = 12) -> set:
    """The 150 tensor names of DINO's released ViT backbones."""
    names = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(depth):
        for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            names |= {f"blocks.{i}.{layer}.weight", f"blocks.{i}.{layer}.bias"}
    return names


def hub_load(name: str, **kwargs) -> torch.nn.Module:
    return torch.hub.load(REPO, name, source="local", **kwargs)


@pytest.fixture
def published(tmp_path, monkeypatch) -> str:
    """The checkout as torch.hub finds a published repository it downloaded before: ``<hub dir>/owner_repo_main``
    (here a link to the checkout, so nothing is downloaded)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    os.makedirs(torch.hub.get_dir())
    os.symlink(REPO, os.path.join(torch.hub.get_dir(), "owner_patch-wise-dino_main"))
    return "owner/patch-wise-dino:main"


def test_list_and_load_a_published_repository(published, checkpoint8):
    assert sorted(torch.hub.list(published, trust_repo=True)) == sorted([*ENTRIES, "patch_wise_dino"])
    assert "k-NN" in torch.hub.help(published, "dino_vits8", trust_repo=True)
    model = torch.hub.load(published, "patch_wise_dino", checkpoint=checkpoint8, trust_repo=True)
    assert (model.embed_dim, model.patch_size) == (192, 8)


def test_dino_entries_build_dino_backbones(monkeypatch):
    built = []

    def record(arch, patch_size, **kwargs):
        built.append((arch, patch_size, kwargs))
        return vits.vit_tiny(patch_size=patch_size)

    monkeypatch.setattr(utils, "build_backbone", record)
    for name in ENTRIES:
        hub_load(name, pretrained=False, drop_path_rate=0.1)
    assert built == [(*arch_patch, {"drop_path_rate": 0.1}) for arch_patch in ENTRIES.values()]
    monkeypatch.undo()
    model = hub_load("dino_vits16", pretrained=False)
    assert isinstance(model, vits.VisionTransformer) and (model.embed_dim, model.patch_size) == (384, 16)
    assert set(model.state_dict()) == official_parameter_names()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 384)  # the [CLS] output


def test_pretrained_takes_the_official_weights_or_a_local_copy(tmp_path, monkeypatch):
    torch.manual_seed(0)
    released = vits.vit_small(patch_size=16).state_dict()
    requested = []

    def download(url, **kwargs):
        requested.append(url)
        return released

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", download)
    model = hub_load("dino_vits16")
    assert requested == [utils.DINO_URL + "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, released[key]), key
    monkeypatch.setattr(utils, "build_backbone", lambda arch, patch_size: vits.vit_tiny(patch_size=patch_size))
    copy = vits.vit_tiny(patch_size=16).state_dict()  # a small stand-in for the local copy
    local = str(tmp_path / "dino_deitsmall16_pretrain.pth")
    torch.save(copy, local)
    model = hub_load("dino_vits16", pretrained=local)
    assert len(requested) == 1 and torch.equal(model.pos_embed, copy["pos_embed"])


def test_offline_pretrained_is_a_one_line_error(monkeypatch):
    def offline(url, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(utils.UserError) as error:
        hub_load("dino_vits8")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("could not download the official DINO weights for vit_small/8 from "
                              f"{utils.DINO_URL}dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth")
    assert "Temporary failure in name resolution" in message
    assert message.endswith("pass pretrained='/path/to/dino_deitsmall8_pretrain.pth' (a local copy) or "
                            "pretrained=False")


def test_patch_wise_dino_equals_the_evaluation_scripts_loader(checkpoint8, capsys):
    model = hub_load("patch_wise_dino", checkpoint=checkpoint8)
    assert "--arch vit_tiny and --patch_size 8 from the checkpoint's args" in capsys.readouterr().out
    reference = utils.build_backbone("vit_tiny", 8)
    utils.load_pretrained_weights(reference, checkpoint8, "teacher", "vit_tiny", 8)
    assert set(model.state_dict()) == official_parameter_names()
    images = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))
        assert torch.equal(model.get_last_selfattention(images), reference.get_last_selfattention(images))


def test_a_checkpoint_url_is_downloaded_once(tmp_path, monkeypatch, checkpoint8):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    downloads = []

    def download(url, path, **kwargs):
        downloads.append(url)
        shutil.copy(checkpoint8, path)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    url = "https://example.org/runs/vit_tiny8/checkpoint0100.pth"
    first = hub_load("patch_wise_dino", checkpoint=url)
    second = hub_load("patch_wise_dino", checkpoint=url)
    assert downloads == [url]
    assert os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", "checkpoint0100.pth"))
    assert torch.equal(first.pos_embed, second.pos_embed) and first.patch_size == 8

    def offline(url, path, **kwargs):
        raise urllib.error.URLError("[Errno 111] Connection refused")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(utils.UserError) as error:
        hub_load("patch_wise_dino", checkpoint="https://example.org/runs/other.pth")
    assert str(error.value) == ("could not download https://example.org/runs/other.pth (URLError: <urlopen error "
                                "[Errno 111] Connection refused>); download it yourself and pass "
                                "checkpoint='/path/to/other.pth'")


@pytest.mark.parametrize("kwargs, message", [
    ({"checkpoint": "absent.pth"}, "checkpoint absent.pth does not exist"),
    ({"checkpoint": ""}, "patch_wise_dino needs checkpoint="),
    ({"checkpoint_key": "student"}, "holds NaN or inf values in"),
    ({"checkpoint_key": "ema"}, "has no entry 'ema': pass --checkpoint_key with one of student, teacher"),
    ({"patch_size": 16}, "--patch_size 16 contradicts"),
])
def test_patch_wise_dino_errors_are_the_scripts_one_line_errors(checkpoint8, kwargs, message):
    with pytest.raises(utils.UserError, match=message) as error:
        hub_load("patch_wise_dino", **{"checkpoint": checkpoint8, **kwargs})
    assert "\n" not in str(error.value)


def test_a_callers_own_utils_module_neither_shadows_nor_is_replaced(monkeypatch, checkpoint8):
    theirs = {name: types.ModuleType(name) for name in ("utils", "transforms")}
    for name, module in theirs.items():
        monkeypatch.setitem(sys.modules, name, module)
    path_before = list(sys.path)
    model = hub_load("patch_wise_dino", checkpoint=checkpoint8)
    assert model.patch_size == 8
    assert all(sys.modules[name] is module for name, module in theirs.items())
    assert sys.path == path_before
