import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from krtfuap.flow import FlowWarp, warp_with_flow

sizes = st.integers(min_value=2, max_value=24)


@settings(max_examples=30, deadline=None)
@given(height=sizes, width=sizes, channels=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_zero_flow_is_identity(height, width, channels, seed):
    image = torch.rand(2, channels, height, width, generator=torch.Generator().manual_seed(seed))
    for unit in ("pixels", "normalized"):
        warped = warp_with_flow(image, torch.zeros(2, height, width), unit)
        assert torch.equal(warped, image)


def test_integer_pixel_flow_shifts_by_that_many_pixels():
    image = torch.arange(36.0).view(1, 1, 6, 6)
    flow = torch.zeros(2, 6, 6)
    flow[0] = 1.0  # sample one column to the right
    warped = warp_with_flow(image, flow, "pixels")
    torch.testing.assert_close(warped[..., :, :-1], image[..., :, 1:])
    torch.testing.assert_close(warped[..., :, -1], image[..., :, -1])  # border repeats


def test_half_pixel_flow_interpolates_bilinearly():
    image = torch.tensor([[[[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]]])
    flow = torch.zeros(2, 2, 3)
    flow[0] = 0.5
    warped = warp_with_flow(image, flow, "pixels")
    torch.testing.assert_close(warped[0, 0, 0, :2], torch.tensor([0.5, 1.5]))


def test_normalized_unit_moves_by_half_the_image():
    image = torch.arange(25.0).view(1, 1, 5, 5)
    flow = torch.zeros(2, 5, 5)
    flow[1] = 0.5  # half of (H - 1) / 2 = 1 pixel down
    torch.testing.assert_close(
        warp_with_flow(image, flow, "normalized")[..., :-1, :], image[..., 1:, :]
    )


def test_flow_warp_is_differentiable_and_bounded():
    warp = FlowWarp(8, 8, bound=1.0)
    image = torch.zeros(1, 1, 8, 8)
    image[..., 3:5, 3:5] = 1.0
    warp(image).sum().backward()
    assert warp.flow.grad is not None and warp.flow.grad.abs().sum() > 0
    with torch.no_grad():
        warp.flow.fill_(5.0)
    warp.project_()
    assert warp.flow.abs().max() == 1.0


def test_bad_flow_shape_and_unit_are_rejected():
    with pytest.raises(ValueError, match="flow must have shape"):
        warp_with_flow(torch.zeros(1, 1, 4, 4), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="unit"):
        FlowWarp(4, 4, unit="meters")
