"""video_generation.py: on a short video written with OpenCV and on a folder of frames, one attention frame per
frame, each the colour of visualize_attention.py's maps for that frame (computed here frame by frame); the video
it encodes; --video_only; and one-line errors for bad inputs."""
import argparse
import os

import cv2
import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

import datasets
import utils
import video_generation as vg
import visualize_attention as va
from eval_testdata import random_image

pytestmark = pytest.mark.usefixtures("one_thread")

INFERNO = colormaps["inferno"](np.arange(256), bytes=True)[:, :3]  # (256, 3) the colour of each level
LEVEL_OF_COLOUR = {tuple(colour): level for level, colour in enumerate(INFERNO)}


def _args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(parents=[vg.get_args_parser()])
    return parser.parse_args(["--use_cuda", "false", *flags])


def write_clip(path: str, count: int, size=(60, 44), fps: float = 5.0) -> list:
    """An MJPG .avi of ``count`` smooth random frames (w x h = size); returns the frames as OpenCV decodes them,
    RGB (h, w, 3)."""
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    for seed in range(count):
        writer.write(np.asarray(random_image(seed, size))[..., ::-1].copy())
    writer.release()
    capture, frames = cv2.VideoCapture(path), []
    while (frame := capture.read()[1]) is not None:
        frames.append(frame[..., ::-1])
    assert len(frames) == count
    return frames


def attention_levels(path: str) -> np.ndarray:
    """The inferno level (0..255) of every pixel of an attention frame: (H, W)."""
    pixels = np.asarray(Image.open(path).convert("RGB"))  # (H, W, 3)
    return np.vectorize(lambda r, g, b: LEVEL_OF_COLOUR[(r, g, b)])(*pixels.transpose(2, 0, 1))


def expected_levels(maps: torch.Tensor, patch_size: int, threshold=None) -> np.ndarray:
    """Levels written out: the heads' mean on its own min..max, or the share of heads keeping each patch on 0..1,
    one value per patch_size x patch_size block: (H, W)."""
    if threshold is None:
        mean = maps.double().mean(dim=0).numpy()  # (h, w)
        share = (mean - mean.min()) / (mean.max() - mean.min())
    else:
        share = va.mass_mask(maps, threshold).double().mean(dim=0).numpy()  # (h, w)
    levels = np.clip(np.floor(share * 256), 0, 255).astype(int)
    return np.kron(levels, np.ones((patch_size, patch_size), dtype=int))  # (H, W)


def frame_by_frame_maps(checkpoint: str, paths: list, size) -> list:
    """visualize_attention's maps of each image file, one forward pass per image: (heads, h, w) each."""
    model = utils.build_backbone("vit_tiny", 8)
    utils.load_pretrained_weights(model, checkpoint, "teacher", "vit_tiny", 8)
    return [va.cls_attention(model.eval(), datasets.image_for_vit(p, size, 8)[1]) for p in paths]


def read_video(path: str) -> list:
    capture, frames = cv2.VideoCapture(path), []
    while (frame := capture.read()[1]) is not None:
        frames.append(frame)
    return frames


def test_a_video_gives_one_attention_frame_per_frame(tmp_path, checkpoint8):
    decoded = write_clip(str(tmp_path / "clip.avi"), count=4)
    out = tmp_path / "out"
    result = vg.main(_args("--pretrained_weights", checkpoint8, "--input_path", str(tmp_path / "clip.avi"),
                           "--output_path", str(out), "--video_format", "avi", "--batch_size", "3"))
    assert result == {"frames": 4, "video": str(out / "video.avi")}
    names = [f"frame-{i:04d}.png" for i in range(4)]
    assert sorted(os.listdir(out)) == ["attention", "frames", "video.avi"]
    assert sorted(os.listdir(out / "frames")) == names
    assert sorted(os.listdir(out / "attention")) == [f"attn-{name}" for name in names]
    for frame, name in zip(decoded, names):
        assert np.array_equal(np.asarray(Image.open(out / "frames" / name)), frame)  # lossless
    references = [str(tmp_path / f"decoded{i}.png") for i in range(4)]  # the frames as decoded here
    for frame, path in zip(decoded, references):
        Image.fromarray(frame).save(path)
    all_maps = frame_by_frame_maps(checkpoint8, references, (44, 60))
    script_maps = va.main(argparse.ArgumentParser(parents=[va.get_args_parser()]).parse_args(
        ["--pretrained_weights", checkpoint8, "--image_path", references[0], "--image_size", "44", "60",
         "--output_dir", str(tmp_path / "va"), "--use_cuda", "false"]))
    assert torch.equal(script_maps, all_maps[0])
    for maps, name in zip(all_maps, names):
        assert maps.shape == (3, 5, 7)  # 44 x 60 cut to 40 x 56
        got, want = attention_levels(out / "attention" / f"attn-{name}"), expected_levels(maps, 8)
        assert got.shape == (40, 56)
        assert np.abs(got - want).max() <= 1 and (got == want).mean() > 0.95  # batched vs one by one: rounding
    video = cv2.VideoCapture(str(out / "video.avi"))
    assert video.get(cv2.CAP_PROP_FPS) == 5.0  # the input's frame rate
    frames = read_video(str(out / "video.avi"))
    assert len(frames) == 4 and frames[0].shape == (40, 56, 3)


def test_a_frame_folder_with_threshold_and_resize(tmp_path, checkpoint8):
    folder = tmp_path / "frames"
    folder.mkdir()
    names = ["f1.png", "f2.jpg", "f10.png"]  # natural order; sizes differ, --resize brings them to one
    for seed, (name, size) in enumerate(zip(names, [(60, 44), (64, 48), (50, 40)])):
        random_image(seed, size).save(folder / name)
    out = tmp_path / "out"
    result = vg.main(_args("--pretrained_weights", checkpoint8, "--input_path", str(folder), "--output_path",
                           str(out), "--resize", "40", "48", "--threshold", "0.6", "--fps", "12"))
    assert result["frames"] == 3 and sorted(os.listdir(out)) == ["attention", "video.mp4"]
    all_maps = frame_by_frame_maps(checkpoint8, [str(folder / n) for n in names], (40, 48))
    for maps, name in zip(all_maps, names):
        path = out / "attention" / f"attn-{os.path.splitext(name)[0]}.png"
        assert np.array_equal(attention_levels(path), expected_levels(maps, 8, threshold=0.6))
    assert vg.list_frames(str(folder)) == [str(folder / n) for n in names]
    frames = read_video(result["video"])
    assert len(frames) == 3 and frames[0].shape == (40, 48, 3)
    assert cv2.VideoCapture(result["video"]).get(cv2.CAP_PROP_FPS) == 12.0


def test_video_only_encodes_attention_frames_without_a_model(tmp_path):
    folder = tmp_path / "attention"
    folder.mkdir()
    for i in range(3):
        random_image(i, (32, 24)).save(folder / f"attn-frame-{i}.png")
    random_image(9, (16, 16)).save(folder / "notes.png")  # not an attention frame: left out
    args = _args("--input_path", str(folder), "--output_path", str(tmp_path / "out"), "--video_only",
                 "--video_format", "avi", "--pretrained_weights", str(tmp_path / "absent.pth"))
    assert vg.main(args) == {"frames": 3, "video": str(tmp_path / "out" / "video.avi")}
    frames = read_video(str(tmp_path / "out" / "video.avi"))
    assert len(frames) == 3 and frames[0].shape == (24, 32, 3)


def test_an_unreadable_video_is_a_one_line_error(tmp_path, capfd):
    junk = tmp_path / "clip.avi"
    junk.write_text("not a video")
    with pytest.raises(SystemExit) as exit_status:
        utils.run_cli(vg.main, _args("--input_path", str(junk), "--output_path", str(tmp_path)))
    assert exit_status.value.code == 2
    stderr = capfd.readouterr().err  # also what OpenCV's C++ code writes
    assert stderr == f"error: OpenCV cannot read {junk} as a video (not a video, or a codec its FFmpeg lacks): " \
                     "pass another file, or a folder of its frames\n"


def test_bad_inputs_are_one_line_errors(tmp_path, checkpoint8):
    empty, mixed = tmp_path / "empty", tmp_path / "mixed"
    empty.mkdir()
    mixed.mkdir()
    random_image(0, (60, 44)).save(mixed / "a.png")
    random_image(1, (64, 48)).save(mixed / "b.png")
    cases = [
        (["--input_path", str(tmp_path / "absent.mp4")], "--input_path .*absent.mp4 does not exist"),
        (["--input_path", str(empty)], "no images in .*empty"),
        (["--input_path", str(mixed)], "frames of different sizes: .*a.png is 60x44 but .*b.png is 64x48"),
        (["--input_path", str(mixed), "--resize", "40"], "frames of different sizes"),
        (["--input_path", str(mixed), "--video_only"], r"no images named attn-\* in .*mixed"),
        (["--input_path", str(mixed), "--threshold", "1.5"], "--threshold 1.5 must be"),
        (["--input_path", str(mixed), "--resize", "4", "5", "6"], "--resize takes one size"),
    ]
    for flags, message in cases:
        with pytest.raises(utils.UserError, match=message) as error:
            vg.main(_args("--pretrained_weights", checkpoint8, "--output_path", str(tmp_path / "out"), *flags))
        assert "\n" not in str(error.value)


def test_without_a_codec_the_attention_frames_are_still_written(tmp_path, checkpoint8, monkeypatch):
    class NoCodec:
        def __init__(self, *args):
            pass

        def isOpened(self):
            return False

        def release(self):
            pass

    monkeypatch.setattr(cv2, "VideoWriter", NoCodec)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(2):
        random_image(i, (32, 32)).save(folder / f"{i}.png")
    with pytest.raises(utils.UserError, match="OpenCV cannot write .*video.mp4 with the mp4v codec here; the 2 "
                                              "attention frames are in .*attention: try --video_format avi"):
        vg.main(_args("--pretrained_weights", checkpoint8, "--input_path", str(folder), "--output_path",
                      str(tmp_path / "out")))
    assert sorted(os.listdir(tmp_path / "out" / "attention")) == ["attn-0.png", "attn-1.png"]
