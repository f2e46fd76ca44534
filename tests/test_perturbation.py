import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from krtfuap.metrics import psnr as psnr_metric

from krtfuap.perturbation import (
    MaskedPerturbation,
    limit_rms,
    lowpass,
    masked_perturbation,
    psnr_to_rms,
    rescale_mask,
)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-3, 3, allow_nan=False), min_size=1, max_size=64))
def test_rescaled_mask_stays_in_half_to_one(values):
    rescaled = rescale_mask(torch.tensor(values))
    assert rescaled.min() >= 0.5 and rescaled.max() <= 1.0


def test_rescale_maps_zero_to_half_and_one_to_one():
    torch.testing.assert_close(rescale_mask(torch.tensor([0.0, 1.0])), torch.tensor([0.5, 1.0]))


@settings(max_examples=40, deadline=None)
@given(
    epsilon=st.floats(1e-3, 0.5),
    scale=st.floats(0.0, 50.0),
    seed=st.integers(0, 2**16),
)
def test_perturbation_never_exceeds_budget(epsilon, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(3, 6, 6, generator=generator) * scale
    mask = torch.rand(6, 6, generator=generator)
    assert masked_perturbation(noise, mask, epsilon).abs().max() <= epsilon


@settings(max_examples=20, deadline=None)
@given(epsilon=st.floats(1e-3, 0.3), seed=st.integers(0, 2**16), learn_flow=st.booleans())
def test_module_stays_in_budget_after_arbitrary_updates(epsilon, seed, learn_flow):
    generator = torch.Generator().manual_seed(seed)
    mask = (torch.rand(8, 8, generator=generator) > 0.5).float()
    module = MaskedPerturbation(mask, epsilon=epsilon, learn_flow=learn_flow, generator=generator)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 10)
    assert module().abs().max() <= epsilon + 1e-7
    module.project_()
    assert module.noise.abs().max() <= epsilon + 1e-7
    if learn_flow:
        assert module.flow_warp.flow.abs().max() <= 1.0


@settings(max_examples=20, deadline=None)
@given(epsilon=st.floats(1e-3, 0.3), init_scale=st.floats(0, 2), seed=st.integers(0, 2**16))
def test_a_start_along_a_direction_has_the_uniform_starts_size_within_the_budget(epsilon, init_scale, seed):
    module = MaskedPerturbation(None, epsilon=epsilon, height=8, width=8,
                                generator=torch.Generator().manual_seed(seed))
    target_rms = init_scale * epsilon / math.sqrt(3)  # that of noise uniform in [-init_scale * eps, ...]
    smooth = torch.linspace(-1, 1, 8).expand(3, 8, 8)
    module.start_along_(smooth, init_scale)
    assert module.noise.abs().max() <= epsilon + 1e-7
    expected = smooth * (target_rms / smooth.pow(2).mean().sqrt())
    if expected.abs().max() <= epsilon:  # nothing clipped: the direction at the uniform start's size
        torch.testing.assert_close(module.noise, expected, atol=1e-7, rtol=1e-5)
    spiky = torch.zeros(3, 8, 8)
    spiky[0, 0, 0] = -1.0  # one value far out: clipped to the budget, sign kept
    module.start_along_(spiky, init_scale)
    assert module.noise[0, 0, 0].item() == pytest.approx(-min(epsilon, target_rms * math.sqrt(3 * 8 * 8)))
    assert module.noise.abs().max() <= epsilon + 1e-7


def test_non_key_regions_get_half_the_noise():
    mask = torch.zeros(4, 4)
    mask[:2] = 1.0
    module = MaskedPerturbation(mask, epsilon=0.1, learn_flow=False)
    with torch.no_grad():
        module.noise.fill_(0.1)
    v = module()
    torch.testing.assert_close(v[:, :2], torch.full((3, 2, 4), 0.1))
    torch.testing.assert_close(v[:, 2:], torch.full((3, 2, 4), 0.05))


def test_zero_flow_keeps_the_mask():
    mask = (torch.rand(10, 10) > 0.5).float()
    module = MaskedPerturbation(mask, learn_flow=True)
    assert torch.equal(module.warped_mask(), mask)


def test_flow_and_noise_both_get_gradients():
    mask = torch.zeros(10, 10)
    mask[3:7, 3:7] = 1
    module = MaskedPerturbation(mask, epsilon=0.5, learn_flow=True, generator=torch.Generator().manual_seed(0))
    module().pow(2).sum().backward()
    assert module.noise.grad.abs().sum() > 0
    assert module.flow_warp.flow.grad.abs().sum() > 0


def test_global_perturbation_needs_a_size():
    with pytest.raises(ValueError, match="height and width"):
        MaskedPerturbation(None)
    assert MaskedPerturbation(None, height=5, width=7).base_mask.shape == (5, 7)


def test_bad_epsilon_is_rejected():
    with pytest.raises(ValueError, match="epsilon"):
        MaskedPerturbation(torch.ones(3, 3), epsilon=0.0)


@settings(max_examples=30, deadline=None)
@given(epsilon=st.floats(1e-3, 0.5), size=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_lowpassed_module_stays_in_budget(epsilon, size, seed):
    generator = torch.Generator().manual_seed(seed)
    module = MaskedPerturbation(None, epsilon=epsilon, height=24, width=32, lowpass_size=size, generator=generator)
    with torch.no_grad():
        module.noise.mul_(1 + 30 * torch.rand(module.noise.shape, generator=generator))
    perturbation = module()
    assert perturbation.shape == (3, 24, 32)
    assert perturbation.abs().max() <= epsilon * (1 + 1e-6)


def test_lowpass_removes_detail_finer_than_its_grid_and_keeps_coarse_shapes():
    checkerboard = 0.08 * (torch.arange(112)[:, None] + torch.arange(112)[None, :]).remainder(2).mul(2).sub(1).float()
    assert lowpass(checkerboard.expand(3, 112, 112), 56).abs().max() < 1e-6  # 2x2 cells average out
    ramp = torch.linspace(-0.08, 0.08, 112).expand(3, 112, 112)
    assert (lowpass(ramp, 56) - ramp).abs().max() < 0.003
    assert torch.equal(lowpass(ramp, 112), ramp)


def test_lowpassed_noise_gets_a_gradient_and_bad_sizes_are_refused():
    module = MaskedPerturbation(None, height=16, width=16, lowpass_size=4, learn_flow=False)
    module().sum().backward()
    assert module.noise.grad is not None and module.noise.grad.abs().sum() > 0
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="lowpass_size"):
            MaskedPerturbation(None, height=16, width=16, lowpass_size=bad)


@settings(max_examples=40, deadline=None)
@given(rms=st.floats(1e-4, 0.2), scale=st.floats(1e-3, 3.0), seed=st.integers(0, 2**16))
def test_limit_rms_caps_the_root_mean_square_and_only_ever_scales_down(rms, scale, seed):
    values = scale * torch.randn(3, 9, 7, generator=torch.Generator().manual_seed(seed))
    limited = limit_rms(values, rms)
    assert limited.pow(2).mean().sqrt() <= rms * (1 + 1e-5)
    assert (limited.abs() <= values.abs()).all()  # never leaves the l_inf ball, never flips a sign
    assert (limited * values >= 0).all()
    if values.pow(2).mean().sqrt() <= rms:
        assert torch.equal(limited, values)
    else:  # on the budget's edge, not further inside
        assert limited.pow(2).mean().sqrt() == pytest.approx(rms, rel=1e-5)


def test_limit_rms_of_zeros_is_zeros_with_a_finite_gradient():
    zeros = torch.zeros(3, 4, 4, requires_grad=True)
    limited = limit_rms(zeros, 0.01)
    limited.sum().backward()
    assert torch.equal(limited, torch.zeros(3, 4, 4)) and torch.isfinite(zeros.grad).all()


def test_psnr_to_rms_is_the_psnr_of_that_difference():
    clean = torch.full((1, 3, 8, 8), 0.5)
    for psnr in (20.0, 32.0, 40.0):
        changed = clean + psnr_to_rms(psnr) * torch.tensor([1.0, -1.0]).repeat(96).reshape(1, 3, 8, 8)
        assert psnr_metric(changed, clean).item() == pytest.approx(psnr, abs=1e-3)


@settings(max_examples=20, deadline=None)
@given(psnr=st.floats(25.0, 45.0), seed=st.integers(0, 2**16), key_regions=st.booleans())
def test_rms_budget_keeps_the_module_within_both_budgets(psnr, seed, key_regions):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(16, 16, generator=generator) if key_regions else None
    module = MaskedPerturbation(mask, epsilon=0.08, height=16, width=16, rms_budget=psnr_to_rms(psnr),
                                generator=generator)
    perturbation = module()
    assert perturbation.abs().max() <= 0.08 * (1 + 1e-6)
    assert perturbation.pow(2).mean().sqrt() <= psnr_to_rms(psnr) * (1 + 1e-5)
    perturbation.sum().backward()
    assert module.noise.grad.abs().sum() > 0


def test_bad_rms_budget_is_refused():
    for bad in (0.0, -0.01):
        with pytest.raises(ValueError, match="rms_budget must be > 0"):
            MaskedPerturbation(None, height=8, width=8, rms_budget=bad)
