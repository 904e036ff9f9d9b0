"""Crop geometry and image decoding: padding, clamping at borders, tiny boxes, EXIF orientation."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from backend.labeling.crops import VIEWS, CropSettings, crop_regions, cut_crops, view_boxes
from backend.labeling.decode import ImageDecodeError, decode_image

ZERO, ONE = torch.zeros(3), torch.ones(3)


def test_default_region_is_clips_centre_square_of_the_short_side():
    region = crop_regions(torch.tensor([[10.0, 20.0, 50.0, 40.0]]), CropSettings())
    assert region.tolist() == [[20.0, 20.0, 40.0, 40.0]]


def test_square_keeps_the_whole_box_and_context_grows_around_the_centre():
    box = torch.tensor([[10.0, 20.0, 50.0, 40.0]])
    assert crop_regions(box, CropSettings(square=True)).tolist() == [[10.0, 10.0, 50.0, 50.0]]
    assert crop_regions(box, CropSettings(square=True, context=1.5)).tolist() == [[0.0, 0.0, 60.0, 60.0]]


def test_tiny_boxes_grow_to_the_minimum_size_before_context():
    region = crop_regions(torch.tensor([[100.0, 100.0, 104.0, 106.0]]), CropSettings(square=True, min_size=16,
                                                                                       context=1.25))
    side = region[0, 2] - region[0, 0]
    assert side == pytest.approx(20.0)
    assert ((region[0, :2] + region[0, 2:]) / 2).tolist() == [102.0, 103.0]


def test_views_of_a_box_scale_and_shift_it_around_its_centre():
    box = torch.tensor([[10.0, 20.0, 50.0, 40.0]])      # 40 x 20, centre (30, 30)
    views = view_boxes(torch.cat([box, box + 100]))
    assert views.shape == (2 * len(VIEWS), 4)
    assert views[0].tolist() == box[0].tolist() and views[1].tolist() == (box[0] + 100).tolist()   # view-major
    by_view = {v: b.tolist() for v, b in zip(VIEWS, views[0::2])}
    assert by_view[(0.85, 0.0, 0.0)] == pytest.approx([13.0, 21.5, 47.0, 38.5])
    assert by_view[(1.0, -0.1, 0.0)] == pytest.approx([6.0, 20.0, 46.0, 40.0])     # a tenth of the width left
    assert by_view[(1.0, 0.0, 0.1)] == pytest.approx([10.0, 22.0, 50.0, 42.0])     # a tenth of the height down


def test_crop_resamples_exact_pixels_when_sizes_match():
    image = torch.arange(3 * 20 * 30, dtype=torch.uint8).reshape(3, 20, 30)
    crop = cut_crops(image, torch.tensor([[4.0, 6.0, 12.0, 14.0]]), 8, ZERO, ONE)
    assert torch.allclose(crop[0] * 255, image[:, 6:14, 4:12].float(), atol=1e-3)


def test_parts_outside_the_image_are_black_and_normalisation_applies():
    image = torch.full((3, 10, 10), 255, dtype=torch.uint8)
    crop = cut_crops(image, torch.tensor([[-10.0, 0.0, 10.0, 10.0]]), 20, torch.full((3,), 0.5),
                     torch.full((3,), 0.25))
    left, right = crop[0, :, :, :8], crop[0, :, :, 12:]
    assert torch.allclose(left, torch.tensor(-2.0))   # black: (0 - 0.5) / 0.25
    assert torch.allclose(right, torch.tensor(2.0))   # white: (1 - 0.5) / 0.25


def test_no_regions_gives_an_empty_batch():
    crops = cut_crops(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(0, 4), 16, ZERO, ONE)
    assert crops.shape == (0, 3, 16, 16)


def _jpeg_with_orientation(array: np.ndarray, orientation: int) -> bytes:
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def test_decode_applies_exif_orientation_as_label_studio_displays_it():
    stored = np.zeros((40, 60, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)  # red band on the left of the stored pixels
    upright = decode_image(_jpeg_with_orientation(stored, 6))  # 6 = rotate 90° clockwise to display
    assert upright.shape == (3, 60, 40)
    assert upright[0, :15].float().mean() > 200 and upright[0, -15:].float().mean() < 60  # red now on top
    crop = cut_crops(upright, torch.tensor([[0.0, 0.0, 40.0, 15.0]]), 8, ZERO, ONE)
    assert crop[0, 0].mean() > 0.8


@pytest.mark.parametrize("data, reason", [(b"", "empty"), (b"not an image", "cannot decode"),
                                          (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "cannot decode")])
def test_unreadable_images_raise_one_clear_error(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_truncated_image_is_refused():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buffer, "JPEG")
    with pytest.raises(ImageDecodeError):
        decode_image(buffer.getvalue()[:300])


def test_pixel_limit_is_checked_before_decoding():
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buffer, "PNG")
    with pytest.raises(ImageDecodeError, match="above the limit"):
        decode_image(buffer.getvalue(), max_pixels=50_000)
    assert decode_image(buffer.getvalue(), max_pixels=60_000).shape == (3, 200, 300)
