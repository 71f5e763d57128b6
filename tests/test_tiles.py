"""Tile planning, the seamless blend, and crop selection (pure tensor code, fast)."""

import pytest
import torch

from fastem_ext.crops import choose_crops, crop_scores
from fastem_ext.tiles import TileBlend, TilePlan


def _blend(plan: TilePlan, image: torch.Tensor) -> torch.Tensor:
    blend = TileBlend(plan, 1, image.shape[0])
    for index, tile in enumerate(plan.windows(image, range(len(plan)))):
        blend.add(index, tile[None])
    return blend.result()[0]


@pytest.mark.parametrize("shape", [(97, 131), (224, 224), (225, 600), (512, 768), (40, 300)])
def test_plan_covers_every_pixel_with_weights_summing_to_one(shape):
    plan = TilePlan.plan(*shape, window=96, context=8, ramp=12)
    assert plan.window_h <= 96 and plan.window_w <= 96
    total = torch.zeros(shape, dtype=torch.float64)
    for index, (top, left, h, w) in enumerate(plan.boxes()):
        assert top >= 0 and left >= 0 and top + h <= shape[0] and left + w <= shape[1]
        total[top : top + h, left : left + w] += plan.weight(index)
    torch.testing.assert_close(total, torch.ones(shape, dtype=torch.float64), rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("shape", [(70, 100), (45, 210)])
def test_canvas_blend_covers_the_grids_borders_with_weights_summing_to_one(shape):
    """With a border (the tiles' whole grids), the weights still sum to 1 on every canvas pixel
    and identical content comes back exactly."""
    plan = TilePlan.plan(*shape, window=40, context=3, ramp=8)
    border = (5, 7, plan.window_h + 11, plan.window_w + 13)  # top, left, grid_h, grid_w
    blend = TileBlend(plan, 1, 1, border=border)
    height, width = blend.shape()
    assert (height, width) == (shape[0] + 11, shape[1] + 13)
    canvas = torch.linspace(0, 1, height * width).reshape(1, 1, height, width)
    for index in range(len(plan)):
        top, left, h, w = blend.boxes[index]
        assert (h, w) == border[2:]
        blend.add(index, canvas[..., top : top + h, left : left + w])
    total = torch.zeros(height, width, dtype=torch.float64)
    for index, (top, left, h, w) in enumerate(blend.boxes):
        total[top : top + h, left : left + w] += blend.weight(index)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)
    torch.testing.assert_close(blend.result(), canvas, rtol=0, atol=1e-6)


def test_weights_vanish_in_the_inner_context_and_reach_the_frame():
    plan = TilePlan.plan(100, 300, window=96, context=8, ramp=12)
    assert len(plan.tops) == 2 and len(plan.lefts) == 4
    first, second = plan.weight(0), plan.weight(1)
    assert bool((first[:, -8:] == 0).all()) and bool((second[:, :8] == 0).all())
    assert float(first[0, 0]) == 1.0  # the photo's corner: the valid model is the truth there
    assert 0 < float(first[0, -9]) < 1  # on the ramp


@pytest.mark.parametrize("kind", ["constant", "gradient"])
def test_blend_has_no_seam(kind):
    """Tiles cut from one image blend back to it exactly: no seam on flat or sloped content."""
    height, width = 150, 260
    if kind == "constant":
        image = torch.full((3, height, width), 0.37)
    else:
        rows = torch.linspace(0, 1, height)[:, None]
        image = torch.stack([rows * 0.5 + torch.linspace(0, 0.5, width)[None, :],
                             1 - rows.expand(height, width), rows.expand(height, width)])
    out = _blend(TilePlan.plan(height, width, window=80, context=6, ramp=10), image)
    torch.testing.assert_close(out, image, rtol=0, atol=1e-6)
    # the differences along each axis are the image's own: no step at a tile boundary
    torch.testing.assert_close(out.diff(dim=-1), image.diff(dim=-1), rtol=0, atol=2e-6)


def test_blend_of_different_tiles_is_smooth_across_the_overlap():
    """Two tiles restored to different constants cross over smoothly, never in one step."""
    plan = TilePlan.plan(40, 150, window=96, context=8, ramp=20)
    blend = TileBlend(plan, 1, 1)
    for index, value in enumerate((0.2, 0.8)):
        blend.add(index, torch.full((1, 1, plan.window_h, plan.window_w), value))
    row = blend.result()[0, 0, 0]
    assert float(row[0]) == pytest.approx(0.2) and float(row[-1]) == pytest.approx(0.8)
    assert float(row.diff().abs().max()) < 0.6 / 20 * 2  # a ramp of ≥ 20 px, not a jump
    assert bool((row.diff() >= -1e-7).all())


def test_a_window_too_small_for_its_overlap_is_refused():
    with pytest.raises(ValueError, match="too small"):
        TilePlan.plan(500, 500, window=40, context=8, ramp=8)


def test_blend_refuses_to_finish_without_every_tile():
    plan = TilePlan.plan(50, 200, window=96, context=8, ramp=12)
    blend = TileBlend(plan, 1, 1)
    blend.add(0, torch.ones(1, 1, plan.window_h, plan.window_w))
    with pytest.raises(ValueError, match="1 of 3 added"):
        blend.result()


def _scene(seed=0):
    """A flat grey photo with one textured (random checks) block and one striped block."""
    g = torch.Generator().manual_seed(seed)
    image = torch.full((3, 160, 240), 0.5)
    image += 0.01 * torch.randn(image.shape, generator=g)
    image[:, 90:150, 150:230] = torch.rand(1, 6, 8, generator=g).repeat_interleave(
        10, 1).repeat_interleave(10, 2) * 0.8 + 0.1
    image[:, 10:70, 20:100] = (torch.arange(80) // 5 % 2).float() * 0.6 + 0.2  # vertical stripes
    return image


def test_crop_selection_prefers_texture_with_varied_edges():
    image = _scene()
    top, left, h, w = choose_crops(image, (60, 80), 1, margin=4)[0]
    assert (top, left) == (90, 150) and (h, w) == (60, 80)
    scores = crop_scores(image, (60, 80), 10, margin=4)
    stripes, flat = float(scores[1, 2]), float(scores[9, 0])  # (10, 20) and (90, 0)
    best = float(scores.max())
    assert best > 10 * stripes  # one orientation says little about the kernel
    assert best > 10 * flat  # noise alone, neither


def test_crop_selection_avoids_clipped_highlights_and_overlaps():
    """Two copies of one texture: the one with more contrast but clipped highlights loses."""
    g = torch.Generator().manual_seed(1)
    image = torch.full((3, 160, 240), 0.5)
    checks = torch.rand(1, 6, 8, generator=g).repeat_interleave(10, 1).repeat_interleave(10, 2)
    image[:, 90:150, 150:230] = checks * 0.6 + 0.2
    image[:, 10:70, 20:100] = (checks * 1.5 - 0.1).clamp(0, 1)
    boxes = choose_crops(image, (60, 80), 3, margin=4)
    assert (boxes[0][0], boxes[0][1]) == (90, 150)
    assert float(crop_scores(image, (60, 80), 10, margin=0)[1, 2]) > float(
        crop_scores(image, (60, 80), 10, margin=0)[9, 15])  # without the margin it would win
    for i, (t1, l1, h, w) in enumerate(boxes):
        for t2, l2, _, _ in boxes[:i]:
            shared = max(0, min(t1, t2) + h - max(t1, t2)) * max(0, min(l1, l2) + w - max(l1, l2))
            assert shared <= 0.25 * h * w
