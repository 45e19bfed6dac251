"""Every reader of user data: how images, labels and folders become datasets.

- Images: ``open_image`` (any file Pillow reads to 8-bit RGB, with one-line errors), ``image_for_vit`` (one image
  resized and cut to the patch grid, for the visualizations), ``list_images`` (hidden files skipped, linked
  folders followed once).
- Safe unpickling (``safe_pickle_load``): ground-truth files and CIFAR batches are data, never code.
- Packed datasets found inside a folder: CIFAR-10's python batches and MNIST-format files (MNIST,
  Fashion-MNIST), read directly without torchvision's download checks.
- Labelled evaluation splits (``build_eval_dataset``): one sub-folder per class, or a packed dataset; DINO's
  evaluation transform (``eval_transform``).
- Training images (``build_image_source``): every image under ``--data_path`` (labels unused), or a packed
  dataset's training split.
- Segmentation folders (``build_segmentation_dataset``): Pascal VOC or plain ``images/`` + ``masks/`` splits, masks
  read as class ids (``read_class_mask``; 255 = not scored).
- DAVIS-2017 videos (``eval_video_segmentation.py``): the val list, frames resized and normalised as DINO's script
  does, palette-PNG annotations read as object ids and written with the DAVIS palette.
"""
import gzip
import math
import os
import pickle
import struct
import zlib
from typing import Any, Callable, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision import transforms as pth_transforms

from transforms import IMAGENET_MEAN, IMAGENET_STD
from utils import REPO_DIR, UserError, name_list

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")  # formats whose Pillow mode "I" holds at most 16 bits
MNIST_PREFIXES = {"train": "train", "val": "t10k"}  # file-name prefix of each split of an MNIST-format folder
HELD_OUT_SPLITS = {"val", "valid", "validation", "test"}  # never trained on


# ----------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------
def open_image(path: str) -> Image.Image:
    """Decode an image file to 8-bit RGB; any failure is a ``UserError`` naming the file.

    Grayscale, palette, CMYK and alpha images are converted as torchvision's loader does (alpha is
    dropped). 16-bit grayscale (Pillow modes ``I;16*``, and ``I`` from PNG or PGM/PPM, which hold at
    most 16 bits) is scaled to 8 bits (65535 -> 255) whatever its pixel values, instead of clipped.
    Other ``I`` images (32-bit integer TIFF) have no standard white level: their values are taken as
    8-bit levels and clipped to 0..255, as torchvision's loader does. Images over twice PIL's
    ``Image.MAX_IMAGE_PIXELS`` (about 179 Mpixels) are refused as decompression bombs."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "I" or img.mode.startswith("I;16"):
                values = np.asarray(img, dtype=np.float64)  # (H, W) 16 or 32-bit integers
                if img.mode != "I" or img.format in SIXTEEN_BIT_I_FORMATS:
                    values = values / 257.0  # 16 bits to 8: 65535 -> 255
                return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
            if img.mode == "P" and "transparency" in img.info:
                return img.convert("RGBA").convert("RGB")  # the palette colours, without PIL's warning
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot decode image {path}: {exc}") from None


def image_for_vit(path: str, image_size: Sequence[int], patch_size: int) -> Tuple[Image.Image, torch.Tensor]:
    """Read one image for a ViT: decoded to RGB (``open_image``), resized (bicubic) to ``image_size`` = (H, W),
    or with one value its shorter side to that size keeping the aspect ratio, then cut at the bottom and right to
    multiples of ``patch_size``. Returns the cut image and its ImageNet-normalised tensor (3, H', W'). A missing
    file, a file that is not an image, or a size under one patch is a ``UserError``."""
    if len(image_size) not in (1, 2) or min(image_size) < 1:
        raise UserError(f"--image_size takes one positive size (the shorter side) or two (height width), got "
                        f"{' '.join(map(str, image_size))}")
    if not os.path.isfile(path):
        raise UserError(f"image {path} not found: pass an image file")
    image = open_image(path)
    if len(image_size) == 2:
        height, width = image_size
    else:
        scale = image_size[0] / min(image.size)
        width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    if height < patch_size or width < patch_size:
        raise UserError(f"{path} resized to {height}x{width} is smaller than one {patch_size}-pixel patch: raise "
                        f"--image_size")
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    image = image.crop((0, 0, width - width % patch_size, height - height % patch_size))
    tensor = pth_transforms.functional.to_tensor(image)  # (3, H', W') in [0, 1]
    return image, pth_transforms.functional.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)  # (3, H', W')


def is_hidden(name: str) -> bool:
    """File and folder names starting with '.' are never data: macOS ``._*`` AppleDouble files,
    ``.DS_Store``, ``.ipynb_checkpoints``, ``.git``."""
    return name.startswith(".")


def require_folder(path: str, what: str = "--data_path") -> None:
    """A ``UserError`` unless ``path`` is a folder; a file (an archive, say) is named as such."""
    if os.path.isfile(path):
        raise UserError(f"{what} {path} is a file, not a folder: extract the archive (if it is one) and pass "
                        f"the extracted folder")
    if not os.path.isdir(path):
        raise UserError(f"{what} {path} does not exist")


def list_images(folder: str, recursive: bool = False) -> list:
    """Sorted paths of the image files in ``folder`` (and its sub-folders when ``recursive``).

    Hidden files and folders (``is_hidden``) are skipped. Linked sub-folders are followed, as
    torchvision's ImageFolder does, but every real folder is listed once, so link cycles end."""
    require_folder(folder, "image folder")
    paths, seen = [], {os.path.realpath(folder)}
    for root, dirs, files in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(dirs):
            real = os.path.realpath(os.path.join(root, name))
            if not is_hidden(name) and real not in seen:
                seen.add(real)
                kept.append(name)
        dirs[:] = kept
        paths += [os.path.join(root, f) for f in sorted(files)
                  if not is_hidden(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
        if not recursive:
            break
    return paths


# ----------------------------------------------------------------------------------------------------
# Safe unpickling
# ----------------------------------------------------------------------------------------------------
class _RestrictedUnpickler(pickle.Unpickler):
    """Admits plain containers, numbers, strings and numpy arrays; anything else is refused."""

    ALLOWED = {
        ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"), ("builtins", "bytearray"),
        ("builtins", "slice"), ("builtins", "bytes"), ("collections", "OrderedDict"), ("_codecs", "encode"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol-2 names
        if (module, name) in self.ALLOWED or (module.startswith("numpy") and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is forbidden")


def safe_pickle_load(path: str, encoding: str = "ASCII") -> Any:
    """Unpickle a data file (ground truth, CIFAR batch) without letting it run code."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding=encoding).load()
    except pickle.UnpicklingError as exc:
        raise UserError(f"refused to load {path}: {exc} (only plain data and numpy arrays are allowed)") \
            from None
    except (EOFError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"{path} is not a readable pickle: {exc}") from None


# ----------------------------------------------------------------------------------------------------
# Packed datasets: CIFAR-10 python batches, MNIST-format files
# ----------------------------------------------------------------------------------------------------
def find_cifar10(data_path: str) -> Optional[str]:
    """The ``cifar-10-batches-py`` folder at or directly under ``data_path``, else None."""
    for folder in (data_path, os.path.join(data_path, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(folder, "data_batch_1")) and \
                os.path.isfile(os.path.join(folder, "test_batch")):
            return folder
    return None


class CIFAR10Python(torch.utils.data.Dataset):
    """CIFAR-10 read directly from its python batches (``data_batch_1..5``, ``test_batch``)."""

    def __init__(self, folder: str, train: bool = True, transform: Optional[Callable] = None):
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        data, labels = [], []
        for name in names:
            batch = safe_pickle_load(os.path.join(folder, name), encoding="bytes")
            data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels += list(batch[b"labels"])
        self.data = np.concatenate(data).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
        self.targets = labels
        self.classes = [str(i) for i in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index])
        return (self.transform(img) if self.transform else img), self.targets[index]


def _mnist_file(folder: str, name: str) -> Optional[str]:
    """``folder/name``, else ``folder/name.gz``, else None."""
    for path in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
        if os.path.isfile(path):
            return path
    return None


def find_mnist(data_path: str) -> Optional[str]:
    """``data_path`` when it holds MNIST-format images (``train-`` or ``t10k-images-idx3-ubyte``, gzipped or
    not: MNIST, Fashion-MNIST, KMNIST), else None."""
    if any(_mnist_file(data_path, f"{prefix}-images-idx3-ubyte") for prefix in MNIST_PREFIXES.values()):
        return data_path
    return None


def read_idx(path: str, ndim: int) -> np.ndarray:
    """The unsigned-byte array of an IDX file (the MNIST format), gunzipped when its name ends in ``.gz``.

    torchvision's ``read_image_file``/``read_label_file`` read no ``.gz`` and check the header with ``assert``,
    so this parses the format itself: a header of two zero bytes, type 0x08 (unsigned byte), ``ndim``, then
    ``ndim`` big-endian uint32 sizes, then the data. A wrong header, a truncated file or extra bytes is a
    ``UserError`` naming the file."""
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise UserError(f"cannot read {path} ({exc}): the file is truncated or damaged, download it again") \
            from None
    start = 4 + 4 * ndim
    if len(data) < start or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise UserError(f"{path} is not an MNIST-format file of unsigned bytes with {ndim} dimension"
                        f"{'s' if ndim > 1 else ''} (its header is {data[:4].hex() or 'missing'}, expected "
                        f"00000801 for labels or 00000803 for images): the file is damaged or of another kind")
    shape = struct.unpack(f">{ndim}I", data[4:start])
    expected = start + math.prod(shape)
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise UserError(f"{path} is {state}: its header gives {'x'.join(map(str, shape))} bytes of data "
                        f"({expected} bytes with the header), the file holds {len(data)}: download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(shape)


class MNISTFolder(torch.utils.data.Dataset):
    """A split of an MNIST-format folder: ``train-images-idx3-ubyte`` with ``train-labels-idx1-ubyte``
    for train, the ``t10k-`` pair for any other split, each gzipped or not. Items are ``(RGB image, label)``:
    grayscale repeated over three channels. ``classes`` are the labels 0 .. the largest label of either
    split (the same list for train and val, so a split that lacks a class keeps it)."""

    def __init__(self, folder: str, train: bool = True, transform: Optional[Callable] = None):
        prefix = MNIST_PREFIXES["train" if train else "val"]
        images_path = self._require(folder, f"{prefix}-images-idx3-ubyte")
        labels_path = self._require(folder, f"{prefix}-labels-idx1-ubyte")
        self.data = read_idx(images_path, 3)  # (N, H, W) uint8
        labels = read_idx(labels_path, 1)  # (N,)
        if len(labels) != len(self.data):
            raise UserError(f"{labels_path} holds {len(labels)} labels but {images_path} holds {len(self.data)} "
                            f"images: both must be the same split of the same dataset")
        if not len(labels):
            raise UserError(f"{images_path} holds no images")
        largest = int(labels.max())
        for other in MNIST_PREFIXES.values():
            other_path = _mnist_file(folder, f"{other}-labels-idx1-ubyte")
            if other != prefix and other_path:
                largest = max(largest, int(read_idx(other_path, 1).max(initial=0)))
        self.targets = labels.astype(np.int64).tolist()
        self.classes = [str(i) for i in range(largest + 1)]
        self.transform = transform

    @staticmethod
    def _require(folder: str, name: str) -> str:
        path = _mnist_file(folder, name)
        if path is None:
            raise UserError(f"{folder} holds MNIST-format files but not {name} (nor {name}.gz): the folder needs "
                            f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                            f"t10k-labels-idx1-ubyte, gzipped or not")
        return path

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index]).convert("RGB")
        return (self.transform(img) if self.transform else img), self.targets[index]


def build_packed_dataset(data_path: str, split: str,
                         transform: Optional[Callable]) -> Optional[torch.utils.data.Dataset]:
    """CIFAR-10's python batches or MNIST-format files found at ``data_path`` (their training set for
    ``split`` ``train``, their test set for any other), else None: a folder of image files."""
    cifar = find_cifar10(data_path)
    if cifar is not None:
        return CIFAR10Python(cifar, train=split == "train", transform=transform)
    mnist = find_mnist(data_path)
    if mnist is not None:
        return MNISTFolder(mnist, train=split == "train", transform=transform)
    return None


# ----------------------------------------------------------------------------------------------------
# Labelled evaluation splits and DINO's evaluation transform
# ----------------------------------------------------------------------------------------------------
class ClassFolders(torch.utils.data.Dataset):
    """Items ``(image, class index)`` from one sub-folder per class, as torchvision's ``ImageFolder``
    (same ``classes``, ``class_to_idx``, ``samples``, ``targets``), but with the file rules of training:
    images listed by ``list_images`` (hidden names skipped, linked folders followed once). A class
    folder may be empty (noted) as long as the split holds images; images beside the class folders
    are noted and ignored."""

    def __init__(self, root: str, transform: Optional[Callable] = None):
        self.root, self.transform = root, transform
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not is_hidden(e.name))
        loose = list_images(root)
        if not self.classes:
            if loose:
                raise UserError(f"{root} holds {len(loose)} images but no class sub-folders: it needs one "
                                f"sub-folder per class (sort ImageNet's val images into class folders first)")
            raise UserError(f"{root} holds no class sub-folders: it needs one sub-folder of images per class")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        per_class = [list_images(os.path.join(root, name), recursive=True) for name in self.classes]
        self.samples = [(path, i) for i, paths in enumerate(per_class) for path in paths]
        self.targets = [label for _, label in self.samples]
        if not self.samples:
            raise UserError(f"{root} holds {len(self.classes)} class folders but no images")
        empty = [name for name, paths in zip(self.classes, per_class) if not paths]
        if empty:
            print(f"Note: {root}: no images in the class folders {name_list(empty)} (kept as classes)")
        if loose:
            print(f"Note: {root}: ignored {len(loose)} images directly inside, outside the class folders")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = open_image(path)
        return (self.transform(image) if self.transform else image), label


def build_eval_dataset(data_path: str, split: str, transform: Optional[Callable]) -> torch.utils.data.Dataset:
    """``data_path/<split>`` as ``ClassFolders`` (one sub-folder per class), or CIFAR-10's python batches, or
    MNIST-format files (``build_packed_dataset``)."""
    require_folder(data_path)
    packed = build_packed_dataset(data_path, split, transform)
    if packed is not None:
        return packed
    root = os.path.join(data_path, split)
    if not os.path.isdir(root):
        raise UserError(f"{root} not found: --data_path must hold '{split}' with one sub-folder per class "
                        f"(ImageFolder layout), CIFAR-10's cifar-10-batches-py, or MNIST-format files")
    return ClassFolders(root, transform)


def eval_transform(resize_size: int, crop_size: int) -> pth_transforms.Compose:
    """The evaluation transform of DINO: resize the shorter side (bicubic), center crop, ImageNet normalisation."""
    return pth_transforms.Compose([
        pth_transforms.Resize(resize_size, interpolation=pth_transforms.InterpolationMode.BICUBIC),
        pth_transforms.CenterCrop(crop_size),
        pth_transforms.ToTensor(),
        pth_transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_resize_size(crop_size: int) -> int:
    """DINO's evaluation resize for a center crop of ``crop_size``: 256 for 224, the same ratio otherwise."""
    return round(crop_size * 256 / 224)


def check_same_classes(train: torch.utils.data.Dataset, val: torch.utils.data.Dataset) -> None:
    """A ``UserError`` naming the classes each split lacks when train and val class lists differ."""
    train_classes, val_classes = list(train.classes), list(val.classes)
    if train_classes == val_classes:
        return
    lacks = [f"{split} lacks: {name_list(missing)}" for split, missing in (
        ("val", [name for name in train_classes if name not in set(val_classes)]),
        ("train", [name for name in val_classes if name not in set(train_classes)])) if missing]
    raise UserError(f"train and val hold different class folders ({'; '.join(lacks)}): both need the same "
                    f"class folders")


# ----------------------------------------------------------------------------------------------------
# Training images
# ----------------------------------------------------------------------------------------------------
def default_data_path() -> str:
    """The sample photos shipped with the code."""
    return os.path.join(REPO_DIR, "data", "sample")


class ImageList(torch.utils.data.Dataset):
    """Image files without labels: items are ``(PIL image, 0)``."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return open_image(self.paths[index]), 0


def build_image_source(data_path: str) -> torch.utils.data.Dataset:
    """Items ``(PIL image, label)``: the training set of CIFAR-10's python batches or of MNIST-format files
    (``build_packed_dataset``), else every image under ``data_path`` recursively (labels are not used). When the
    sub-folders are splits (``train`` beside ``val``, ``test``, ...), ``train`` is used alone and what is left out
    is printed; a held-out split folder (``val``, ``test``, Kaggle's ``val.X``) beside anything else is refused,
    since it would be trained on. A class folder that happens to be called ``train`` among other classes is just
    a class. Hidden files and folders are skipped, as in evaluation."""
    require_folder(data_path)
    packed = build_packed_dataset(data_path, "train", None)
    if packed is not None:
        return packed
    subdirs = sorted(e.name for e in os.scandir(data_path) if e.is_dir() and not is_hidden(e.name))
    loose = len(list_images(data_path))
    split_of = {name: name.lower().split(".")[0] for name in subdirs}  # val.X -> val
    held_out = [name for name in subdirs if split_of[name] in HELD_OUT_SPLITS]
    if "train" in subdirs and all(split in HELD_OUT_SPLITS | {"train"} for split in split_of.values()):
        ignored = [f"{name}/" for name in subdirs if name != "train"] + ([f"{loose} images"] if loose else [])
        data_path = os.path.join(data_path, "train")
        print(f"Training on {data_path} only"
              + (f" (ignored beside it: {name_list(ignored)})" if ignored else ""))
    else:
        if held_out:
            raise UserError(f"{data_path} holds {name_list(held_out)} (held-out data) beside other folders: pass "
                            f"the folder of training images as --data_path (Kaggle's ImageNet-100: merge "
                            f"train.X1..X4 into train/ first)")
        if loose and subdirs:
            print(f"{data_path} holds {loose} images beside {len(subdirs)} sub-folders: training on all of them")
    paths = list_images(data_path, recursive=True)
    if not paths:
        raise UserError(f"no images found in --data_path {data_path}: expected class sub-folders of images, "
                        f"images directly inside, CIFAR-10's cifar-10-batches-py, or MNIST-format files")
    return ImageList(paths)


# ----------------------------------------------------------------------------------------------------
# Segmentation folders: Pascal VOC and plain images/masks
# ----------------------------------------------------------------------------------------------------
SEGMENTATION_IGNORE = 255  # mask value of the pixels that are not scored (VOC's object outlines)
VOC_FOLDERS = ("JPEGImages", "SegmentationClass")
MASK_MODES = ("P", "L", "1", "I", "I;16")  # Pillow modes that hold one number per pixel


def decode_index_image(path: str, what: str) -> Tuple[str, np.ndarray]:
    """The PIL mode and the values (H, W) of an image of indices (a mask, an annotation), undecoded pixel values as
    they are stored (palette indices for a palette image); an undecodable file is a ``UserError`` naming ``what``
    and the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.mode, np.asarray(img)  # (H, W)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot decode {what} {path}: {exc}") from None


def read_class_mask(path: str) -> np.ndarray:
    """The class ids of a mask image, (H, W) uint8: a palette PNG (VOC, DAVIS) gives its palette indices, not its
    colours; a grayscale PNG its values (16-bit ones must stay under 256). Colour images and undecodable files are
    a ``UserError`` naming the file."""
    mode, values = decode_index_image(path, "mask")  # (H, W)
    if mode not in MASK_MODES:
        raise UserError(f"mask {path} is a {mode} image: a mask holds one class id per pixel (a palette or "
                        f"grayscale PNG), not colours")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise UserError(f"mask {path} holds values up to {values.max()}: class ids must be 0..254 "
                        f"({SEGMENTATION_IGNORE} = not scored)")
    return values.astype(np.uint8)


class SegmentationFolder(torch.utils.data.Dataset):
    """(image path, mask path) pairs of a segmentation split. Items are ``transform(image, mask)``, by default the
    RGB PIL image and its (H, W) uint8 class ids (``SEGMENTATION_IGNORE`` = not scored). A mask of another size
    than its image is a ``UserError`` naming both."""

    def __init__(self, samples: Sequence[Tuple[str, str]], transform: Optional[Callable] = None):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image_path, mask_path = self.samples[index]
        image, mask = open_image(image_path), read_class_mask(mask_path)
        if mask.shape != (image.height, image.width):
            raise UserError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} pixels but its image {image_path} "
                            f"is {image.width}x{image.height}: a mask needs the size of its image")
        return self.transform(image, mask) if self.transform else (image, mask)

    def largest_class_id(self, indices: Sequence[int]) -> Tuple[int, str]:
        """The largest class id (``SEGMENTATION_IGNORE`` left out) in the masks of the items ``indices``, and the
        mask that holds it; ``(-1, "")`` when they hold no scored pixel. Reads the masks only."""
        largest, where = -1, ""
        for index in indices:
            path = self.samples[index][1]
            ids = read_class_mask(path)  # (H, W)
            ids = ids[ids != SEGMENTATION_IGNORE]  # (P,)
            if ids.size and int(ids.max()) > largest:
                largest, where = int(ids.max()), path
        return largest, where


def _voc_samples(root: str, split: str) -> list:
    """Pascal VOC: the ids listed in ``ImageSets/Segmentation/<split>.txt``, their ``JPEGImages/<id>.jpg`` and
    ``SegmentationClass/<id>.png``."""
    list_path = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    if not os.path.isfile(list_path):
        raise UserError(f"{list_path} not found: the Pascal VOC layout lists the images of split '{split}' in "
                        f"ImageSets/Segmentation/{split}.txt")
    for folder in VOC_FOLDERS:
        require_folder(os.path.join(root, folder), "Pascal VOC folder")
    with open(list_path) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if not ids:
        raise UserError(f"{list_path} lists no images")
    samples = []
    for name in ids:
        image = os.path.join(root, "JPEGImages", f"{name}.jpg")
        mask = os.path.join(root, "SegmentationClass", f"{name}.png")
        if not os.path.isfile(image):
            raise UserError(f"image {image}, listed in {list_path}, does not exist")
        if not os.path.isfile(mask):
            raise UserError(f"image {image} has no mask: {mask} does not exist")
        samples.append((image, mask))
    return samples


def _plain_samples(split_dir: str) -> list:
    """Plain layout: every image under ``<split>/images`` with the PNG of the same stem (its path below ``images/``
    without the extension) under ``<split>/masks``; masks without an image are noted and ignored."""
    images_dir, masks_dir = os.path.join(split_dir, "images"), os.path.join(split_dir, "masks")
    require_folder(images_dir, "image folder")
    require_folder(masks_dir, "mask folder")

    def stem(path: str, folder: str) -> str:
        return os.path.splitext(os.path.relpath(path, folder))[0]

    masks = {stem(p, masks_dir): p for p in list_images(masks_dir, recursive=True) if p.lower().endswith(".png")}
    images = list_images(images_dir, recursive=True)
    if not images:
        raise UserError(f"{images_dir} holds no images")
    samples, named = [], {}
    for image in images:
        name = stem(image, images_dir)
        if name in named:
            raise UserError(f"{named[name]} and {image} differ only by their extension: a mask is matched to its "
                            f"image by name, so two images cannot share one")
        named[name] = image
        if name not in masks:
            raise UserError(f"image {image} has no mask: {os.path.join(masks_dir, name + '.png')} does not exist")
        samples.append((image, masks[name]))
    if len(masks) > len(samples):
        print(f"Note: {masks_dir}: ignored {len(masks) - len(samples)} masks without an image")
    return samples


def build_segmentation_dataset(data_path: str, split: str,
                               transform: Optional[Callable] = None) -> SegmentationFolder:
    """Split ``split`` (``train``, ``val``) of a segmentation folder, in one of two layouts, told apart by their
    folders:

    - Pascal VOC (``JPEGImages/`` or ``SegmentationClass/`` in ``data_path``): ``JPEGImages/<id>.jpg`` with
      ``SegmentationClass/<id>.png`` (palette PNGs, read as their indices) for the ids listed in
      ``ImageSets/Segmentation/<split>.txt``;
    - plain: ``<split>/images/`` and ``<split>/masks/``, a mask being the PNG of class ids with its image's name.

    In both, ``SEGMENTATION_IGNORE`` (255) marks pixels that are not scored. A missing folder or list, a listed image
    that does not exist and an image without a mask are ``UserError``s."""
    require_folder(data_path)
    if any(os.path.isdir(os.path.join(data_path, name)) for name in VOC_FOLDERS):
        return SegmentationFolder(_voc_samples(data_path, split), transform)
    if not any(os.path.isdir(os.path.join(data_path, name)) for name in ("train", "val", split)):
        raise UserError(f"{data_path} holds neither the Pascal VOC layout (JPEGImages/, SegmentationClass/, "
                        f"ImageSets/Segmentation/) nor the plain one (train/images/, train/masks/, val/images/, "
                        f"val/masks/)")
    split_dir = os.path.join(data_path, split)
    if not os.path.isdir(split_dir):
        raise UserError(f"{split_dir} not found: the plain layout needs {split}/images/ and {split}/masks/")
    return SegmentationFolder(_plain_samples(split_dir), transform)


# ----------------------------------------------------------------------------------------------------
# DAVIS-2017 videos (semi-supervised video object segmentation; DINO's eval_video_segmentation.py reads them)
# ----------------------------------------------------------------------------------------------------
DAVIS_FOLDERS = ("ImageSets", "JPEGImages", "Annotations")
DAVIS_RESOLUTION = "480p"
DAVIS_MEAN, DAVIS_STD = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225)  # DINO's color_normalize (0.228, not 0.229)
DAVIS_SIZE_STEP = 64  # DINO floors the longer side of a resized frame to a multiple of this


def davis_videos(root: str, split: str = "val") -> list:
    """Names of the videos listed in ``root/ImageSets/2017/<split>.txt`` (blank lines skipped), after checking that
    ``root`` holds ``ImageSets``, ``JPEGImages`` and ``Annotations``."""
    require_folder(root)
    for name in DAVIS_FOLDERS:
        if not os.path.isdir(os.path.join(root, name)):
            raise UserError(f"{os.path.join(root, name)} not found: --data_path must be the DAVIS-2017 folder "
                            f"holding {', '.join(DAVIS_FOLDERS)} (DAVIS-2017-trainval-480p)")
    listing = os.path.join(root, "ImageSets", "2017", f"{split}.txt")
    try:
        with open(listing) as f:
            names = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the video list {listing}: {exc}") from None
    if not names:
        raise UserError(f"{listing} lists no videos")
    return names


def davis_frames(root: str, video: str) -> list:
    """Sorted paths of the ``.jpg`` frames of ``video`` (``JPEGImages/480p/<video>``); none is a ``UserError``."""
    folder = os.path.join(root, "JPEGImages", DAVIS_RESOLUTION, video)
    if not os.path.isdir(folder):
        raise UserError(f"video {video} has no frame folder {folder}")
    frames = [os.path.join(folder, name) for name in sorted(os.listdir(folder))
              if name.endswith(".jpg") and not is_hidden(name)]
    if not frames:
        raise UserError(f"video {video} has no frames: no .jpg files in {folder}")
    return frames


def davis_annotations(root: str, video: str) -> dict:
    """``{frame name: path}`` of the ``.png`` annotations of ``video`` (``Annotations/480p/<video>``), possibly
    empty; the frame name is the file name without its extension."""
    folder = os.path.join(root, "Annotations", DAVIS_RESOLUTION, video)
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return {name[:-4]: os.path.join(folder, name) for name in names if name.endswith(".png") and not is_hidden(name)}


def davis_frame_size(height: int, width: int, short_side: int) -> Tuple[int, int]:
    """DINO's ``read_frame`` size: the shorter side becomes ``short_side``, the other is scaled alike and floored to a
    multiple of 64 (a landscape or square frame keeps ``short_side`` rows). Returns (height, width)."""
    if height > width:
        return int(short_side * height / width // DAVIS_SIZE_STEP * DAVIS_SIZE_STEP), short_side
    return short_side, int(short_side * width / height // DAVIS_SIZE_STEP * DAVIS_SIZE_STEP)


def read_davis_frame(path: str, short_side: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """A frame as DINO reads it: decoded by OpenCV, resized bilinearly to ``davis_frame_size``, scaled to [0, 1],
    normalised with ``DAVIS_MEAN``/``DAVIS_STD``. Returns the (3, h, w) float tensor and the original (H, W)."""

    image = cv2.imread(path, cv2.IMREAD_COLOR)  # (H, W, 3) BGR uint8, or None
    if image is None:
        raise UserError(f"cannot decode frame {path} (missing, truncated or not an image)")
    height, width = image.shape[:2]
    size = davis_frame_size(height, width, short_side)
    if min(size) < 1:
        raise UserError(f"frame {path} ({height}x{width}) resized to a shorter side of {short_side} has a side "
                        f"of {min(size)}: raise --short_side")
    image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)  # (h, w, 3)
    rgb = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))).float() / 255.0  # (3, h, w)
    mean = torch.tensor(DAVIS_MEAN).view(3, 1, 1)  # (3, 1, 1)
    std = torch.tensor(DAVIS_STD).view(3, 1, 1)  # (3, 1, 1)
    return (rgb - mean) / std, (height, width)  # (3, h, w)


def read_palette_png(path: str) -> np.ndarray:
    """The palette indices of a palette PNG (DAVIS annotations: object ids, 0 the background): (H, W) uint8. A
    missing file, an unreadable one, or an image without a palette is a ``UserError`` naming the file."""
    if not os.path.isfile(path):
        raise UserError(f"annotation {path} not found")
    mode, values = decode_index_image(path, "annotation")  # (H, W)
    if mode != "P":
        raise UserError(f"{path} is not a palette image (its mode is {mode}): DAVIS annotations are "
                        f"palette PNGs whose indices are object ids")
    return values.astype(np.uint8)


def davis_palette() -> np.ndarray:
    """The DAVIS (PASCAL VOC) palette, (256, 3) uint8: bits 0, 1, 2 of an index go to the most significant bit of R,
    G, B, bits 3, 4, 5 to the next one, and so on (1 -> (128, 0, 0), 2 -> (0, 128, 0), 8 -> (64, 0, 0))."""
    index = np.arange(256)  # (256,)
    palette = np.zeros((256, 3), dtype=np.int64)  # (256, 3)
    for level in range(8):  # level-th group of 3 bits -> bit 7 - level of each channel
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * level + channel)) & 1) << (7 - level)
    return palette.astype(np.uint8)


def write_palette_png(path: str, indices: np.ndarray, palette: np.ndarray) -> None:
    """Write ``indices`` (H, W) uint8 as a palette PNG with ``palette`` (256, 3), through a temporary file renamed
    over ``path`` (an interrupted run leaves no partial PNG behind)."""
    image = Image.fromarray(np.ascontiguousarray(indices, dtype=np.uint8))  # mode L
    image.putpalette(palette.astype(np.uint8).ravel().tolist())  # now mode P, the indices unchanged
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"could not write {path} ({exc}): free some space or choose another --output_dir") \
            from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
