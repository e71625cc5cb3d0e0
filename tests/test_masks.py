"""Foreground / background masks against FGD_SPEC.md section 2."""
import pytest
import torch

from fgd_d2.masks import focal_masks


def masks(boxes, image_sizes, input_size, feature_size, mode="padded", dtype=torch.float64):
    return focal_masks([torch.tensor(b, dtype=torch.float64).reshape(-1, 4) for b in boxes], image_sizes,
                       input_size, feature_size, box_scaling=mode, dtype=dtype)


def reference_fg(boxes, image_size, input_size, feature_size, mode):
    """Per-box loop as in the spec (and the reference code, with fgd_d2's clamping and degenerate-box rule)."""
    import math
    H, W = feature_size
    h_ref, w_ref = input_size if mode == "padded" else image_size
    fg = torch.zeros(H, W, dtype=torch.float64)
    for x1, y1, x2, y2 in boxes:
        x1, y1, x2, y2 = (max(0.0, v) for v in (x1, y1, x2, y2))
        if x2 <= x1 or y2 <= y1:
            continue
        xl, xh = math.floor(x1 / w_ref * W), math.ceil(x2 / w_ref * W)
        yl, yh = math.floor(y1 / h_ref * H), math.ceil(y2 / h_ref * H)
        weight = 1.0 / ((yh + 1 - yl) * (xh + 1 - xl))
        region = fg[yl:yh + 1, xl:xh + 1]
        region.copy_(torch.clamp(region, min=weight))
    return fg


def test_known_box_covers_inclusive_cells_with_plus_one_weight():
    fg, bg = masks([[[0, 0, 64, 16]]], [(256, 256)], (256, 256), (32, 32))
    covered = fg[0] > 0
    assert covered[:3, :9].all()
    assert covered.sum() == 3 * 9  # rows 0..2, columns 0..8
    assert torch.allclose(fg[0][:3, :9], torch.full((3, 9), 1.0 / 27, dtype=torch.float64))
    assert torch.all(bg[0][covered] == 0)


def test_smallest_box_wins_on_overlap():
    big, small = [0, 0, 128, 128], [8, 8, 24, 24]
    fg, _ = masks([[big, small]], [(256, 256)], (256, 256), (32, 32))
    fg_rev, _ = masks([[small, big]], [(256, 256)], (256, 256), (32, 32))
    # small box: x' in [1, 3] -> cells 1..3, count 3 each way, weight 1/9; big box: cells 0..16, 17 each way.
    small_weight = 1.0 / 9
    assert fg[0, 2, 2].item() == pytest.approx(small_weight)
    assert fg[0, 10, 10].item() == pytest.approx(1.0 / (17 * 17))
    assert torch.equal(fg, fg_rev)


def test_background_is_normalised_per_image():
    fg, bg = masks([[[10, 10, 100, 60]], [], [[0, 0, 5, 5], [50, 50, 200, 90]]],
                   [(256, 256)] * 3, (256, 256), (16, 16))
    assert torch.allclose(bg.sum(dim=(1, 2)), torch.ones(3, dtype=torch.float64))
    assert torch.all(bg[1] == 1.0 / 256)  # no boxes: uniform background
    assert torch.all(fg[1] == 0)
    assert torch.all((fg > 0) == (bg == 0))


def test_matches_a_per_box_loop_on_random_boxes():
    g = torch.Generator().manual_seed(0)
    image_sizes = [(200, 300), (240, 180)]
    input_size = (256, 320)
    feature_size = (32, 40)
    boxes = []
    for h, w in image_sizes:
        xy = torch.rand(30, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h])
        wh = torch.rand(30, 2, generator=g, dtype=torch.float64) * 90
        boxes.append(torch.cat([xy - 10, xy + wh], dim=1).tolist())  # some negative corners
    for mode in ("padded", "image"):
        fg, _ = masks(boxes, image_sizes, input_size, feature_size, mode)
        for i in range(2):
            expected = reference_fg(boxes[i], image_sizes[i], input_size, feature_size, mode)
            assert torch.allclose(fg[i], expected), mode


def test_padded_and_image_modes_differ_exactly_when_padded():
    box = [[[30, 20, 90, 70]]]
    same_a, _ = masks(box, [(128, 128)], (128, 128), (16, 16), "padded")
    same_b, _ = masks(box, [(128, 128)], (128, 128), (16, 16), "image")
    assert torch.equal(same_a, same_b)
    padded, _ = masks(box, [(96, 100)], (128, 128), (16, 16), "padded")
    image, _ = masks(box, [(96, 100)], (128, 128), (16, 16), "image")
    assert not torch.equal(padded, image)
    # image mode stretches the box right and down
    assert (image > 0).sum() > (padded > 0).sum()


def test_edge_cases_are_finite_and_follow_the_spec():
    # box covering the whole map: bg all zero, no NaN
    fg, bg = masks([[[0, 0, 256, 256]]], [(256, 256)], (256, 256), (8, 8))
    assert torch.all(bg == 0) and torch.all(fg > 0) and torch.isfinite(fg).all()
    # degenerate and all-zero boxes are ignored
    fg, bg = masks([[[0, 0, 0, 0], [50, 50, 50, 80], [60, 60, 40, 90]]], [(256, 256)], (256, 256), (8, 8))
    assert torch.all(fg == 0) and torch.allclose(bg.sum(), torch.tensor(1.0, dtype=torch.float64))
    # boxes partly outside the image: negative corner clamped (the reference would drop the box)
    fg, _ = masks([[[-40, -40, 20, 20]]], [(256, 256)], (256, 256), (8, 8))
    assert fg[0, 0, 0] > 0
    # beyond the bottom-right: clipped to the map, weight counted before clipping
    fg, _ = masks([[[200, 200, 400, 400]]], [(256, 256)], (256, 256), (8, 8))
    assert fg[0, 7, 7].item() == pytest.approx(1.0 / ((13 + 1 - 6) ** 2))
    # a tiny box below one cell still covers its (inclusive) cells
    fg, _ = masks([[[33, 33, 34, 34]]], [(256, 256)], (256, 256), (8, 8))
    assert (fg > 0).sum() == 4 and fg.max().item() == pytest.approx(0.25)
    # no images at all
    fg, bg = focal_masks([], [], (64, 64), (4, 4))
    assert fg.shape == (0, 4, 4)


def test_many_boxes_are_chunked_and_match_unchunked(monkeypatch):
    import fgd_d2.masks as m
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(2, 500, 2, generator=g) * 300
    boxes = [torch.cat([xy[i], xy[i] + 5 + torch.rand(500, 2, generator=g) * 60], 1) for i in range(2)]
    full, _ = focal_masks(boxes, [(320, 320)] * 2, (320, 320), (40, 40))
    monkeypatch.setattr(m, "_MAX_CHUNK_ELEMENTS", 2 * 40 * 40 * 7)  # 7 boxes per chunk
    chunked, _ = focal_masks(boxes, [(320, 320)] * 2, (320, 320), (40, 40))
    assert torch.equal(full, chunked)


def test_rejects_unknown_scaling():
    with pytest.raises(ValueError, match="box_scaling"):
        masks([[[0, 0, 1, 1]]], [(8, 8)], (8, 8), (2, 2), "pixels")
