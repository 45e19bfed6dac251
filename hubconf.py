"""torch.hub entries: DINO's ViT backbones with the official weights, and the backbone of a Patch-Wise DINO checkpoint.

``dino_vits16``, ``dino_vits8``, ``dino_vitb16`` and ``dino_vitb8`` have the names, arguments and results of the
entries of the DINO reference's ``hubconf.py`` (Caron et al., ICCV 2021): the ViT backbone (the official checkpoints'
parameter names; ``forward`` gives the [CLS] output), with DINO's official weights when ``pretrained`` (downloaded
once into torch.hub's cache). Beyond the reference, ``pretrained`` may also be the path of a local copy of those
weights. DINO's ResNet-50 and XCiT entries are not provided.

``patch_wise_dino(checkpoint=...)`` returns the backbone of a training checkpoint (a file, or a URL downloaded once
into torch.hub's cache) exactly as the evaluation scripts load it: the ``teacher`` by default, the architecture and
patch size from the checkpoint's saved args, read with ``weights_only``. A missing file, an offline download or a
checkpoint that does not fit is a one-line ``utils.UserError``, as in the scripts.

Besides the standard library, only torch and the project's modules are imported (torch.hub checks ``dependencies``,
the packages those modules need). Modules are imported whole: torch.hub lists every public callable of this file
as an entry.
"""
import argparse
import importlib
import os
import sys
import types
import typing
import urllib.parse

import torch

HERE = os.path.dirname(os.path.realpath(__file__))
dependencies = ["torch", "torchvision", "numpy", "PIL", "cv2"]


def _import_project_module(name: str) -> types.ModuleType:
    """The project's module ``name``, imported from this folder.

    torch.hub puts this folder first on ``sys.path`` while it imports this file, but a module of the same name
    imported earlier from elsewhere (a caller's own ``utils.py`` or ``transforms.py``) would be taken from
    ``sys.modules`` instead. Such modules are set aside during the import and put back after it; the folder is on
    ``sys.path`` only during the import (also when this file is imported without torch.hub)."""
    project = {f[:-3] for f in os.listdir(HERE) if f.endswith(".py")}
    set_aside = {}
    for module_name in project & set(sys.modules):
        path = getattr(sys.modules[module_name], "__file__", None)
        if path is None or os.path.dirname(os.path.realpath(path)) != HERE:
            set_aside[module_name] = sys.modules.pop(module_name)
    sys.path.insert(0, HERE)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(HERE)
        sys.modules.update(set_aside)


utils = _import_project_module("utils")


def _dino_backbone(arch: str, patch_size: int, pretrained: typing.Union[bool, str],
                   **kwargs: typing.Any) -> torch.nn.Module:
    """A DINO ViT; with ``pretrained`` the official weights (``True``) or a local copy of them (a path)."""
    model = utils.build_backbone(arch, patch_size, **kwargs)
    if pretrained:
        local = pretrained if isinstance(pretrained, str) else None
        file_name = os.path.basename(utils.OFFICIAL_WEIGHTS[(arch, patch_size)])
        utils.load_pretrained_weights(model, local, "teacher", arch, patch_size,
                                      hint=f"pass pretrained='/path/to/{file_name}' (a local copy) or "
                                           f"pretrained=False")
    return model


def dino_vits16(pretrained: typing.Union[bool, str] = True, **kwargs: typing.Any) -> torch.nn.Module:
    """ViT-Small/16x16 pre-trained with DINO (74.5% top-1 on ImageNet with k-NN classification).

    ``pretrained``: True downloads the official weights, False leaves the ViT random, a path loads that file.
    Other keyword arguments go to the ViT (e.g. ``drop_path_rate``)."""
    return _dino_backbone("vit_small", 16, pretrained, **kwargs)


def dino_vits8(pretrained: typing.Union[bool, str] = True, **kwargs: typing.Any) -> torch.nn.Module:
    """ViT-Small/8x8 pre-trained with DINO (78.3% top-1 on ImageNet with k-NN classification).

    ``pretrained``: True downloads the official weights, False leaves the ViT random, a path loads that file.
    Other keyword arguments go to the ViT (e.g. ``drop_path_rate``)."""
    return _dino_backbone("vit_small", 8, pretrained, **kwargs)


def dino_vitb16(pretrained: typing.Union[bool, str] = True, **kwargs: typing.Any) -> torch.nn.Module:
    """ViT-Base/16x16 pre-trained with DINO (76.1% top-1 on ImageNet with k-NN classification).

    ``pretrained``: True downloads the official weights, False leaves the ViT random, a path loads that file.
    Other keyword arguments go to the ViT (e.g. ``drop_path_rate``)."""
    return _dino_backbone("vit_base", 16, pretrained, **kwargs)


def dino_vitb8(pretrained: typing.Union[bool, str] = True, **kwargs: typing.Any) -> torch.nn.Module:
    """ViT-Base/8x8 pre-trained with DINO (77.4% top-1 on ImageNet with k-NN classification).

    ``pretrained``: True downloads the official weights, False leaves the ViT random, a path loads that file.
    Other keyword arguments go to the ViT (e.g. ``drop_path_rate``)."""
    return _dino_backbone("vit_base", 8, pretrained, **kwargs)


def _download(url: str) -> str:
    """The local path of ``url``: downloaded once into ``<torch.hub.get_dir()>/checkpoints`` (as torch.hub caches
    weights), then reused."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise utils.UserError(f"checkpoint URL {url} does not end with a file name")
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"Downloading {url} to {path}")
        try:
            torch.hub.download_url_to_file(url, path)
        except Exception as exc:  # urllib raises many types offline (URLError, socket errors, HTTPError)
            reason = " ".join(str(exc).split())
            raise utils.UserError(f"could not download {url} ({type(exc).__name__}: {reason}); download it "
                                  f"yourself and pass checkpoint='/path/to/{name}'") from None
    return path


def patch_wise_dino(checkpoint: str, checkpoint_key: typing.Optional[str] = "teacher",
                    arch: typing.Optional[str] = None, patch_size: typing.Optional[int] = None,
                    **kwargs: typing.Any) -> torch.nn.Module:
    """The ViT backbone of a Patch-Wise DINO (or DINO) training checkpoint, as the evaluation scripts load it.

    ``checkpoint``: a file, or a URL (downloaded once into torch.hub's cache). ``checkpoint_key``: which network
    of a training checkpoint (``teacher`` or ``student``; ignored for a plain backbone state dict). ``arch`` and
    ``patch_size`` come from the checkpoint's saved args; pass them only for a state dict that has none (default
    vit_small and 16). Other keyword arguments go to the ViT (e.g. ``drop_path_rate``)."""
    if not checkpoint:
        raise utils.UserError("patch_wise_dino needs checkpoint='/path/to/checkpoint.pth' (or a URL)")
    path = _download(checkpoint) if "://" in checkpoint else checkpoint
    args = argparse.Namespace(pretrained_weights=path, arch=arch, patch_size=patch_size)
    utils.resolve_model_args(args)
    model = utils.build_backbone(args.arch, args.patch_size, **kwargs)
    utils.load_pretrained_weights(model, path, checkpoint_key, args.arch, args.patch_size)
    return model
