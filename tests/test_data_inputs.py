"""How image files are decoded: 16-bit grayscale scaled by bit depth."""
import numpy as np
import pytest
from PIL import Image

import utils


@pytest.mark.parametrize("name, dtype, stored, expected", [
    ("dark16.pgm", np.uint16, 200 * 257, 200),  # Pillow mode "I" from a 16-bit PGM
    ("dark16b.pgm", np.uint16, 200, 1),  # dark 16-bit: not left 257 times too bright
    ("dark16.png", np.uint16, 200, 1),  # mode "I;16"
    ("int32.tif", np.int32, 1000, 255),  # 32-bit: 8-bit levels, clipped as torchvision's loader does
])
def test_16_bit_grayscale_is_scaled_by_bit_depth_not_by_values(tmp_path, name, dtype, stored, expected):
    Image.fromarray(np.full((4, 4), stored, dtype)).save(tmp_path / name)
    image = utils.open_image(str(tmp_path / name))
    assert image.mode == "RGB" and np.asarray(image).min() == np.asarray(image).max() == expected
