"""Optimisers of the perturbation (``krtfuap.optim``)."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from krtfuap.optim import OPTIMIZERS, TensorwiseAdam, make_optimizer


def _one_step(optimizer_class, gradient: torch.Tensor, lr: float = 0.01) -> torch.Tensor:
    param = torch.zeros_like(gradient, requires_grad=True)
    optimizer = optimizer_class([param], lr=lr)
    param.grad = gradient.clone()
    optimizer.step()
    return param.detach()


def test_first_step_keeps_the_gradients_shape_where_adam_takes_its_sign():
    gradient = torch.tensor([4.0, -1.0, 0.5, 0.0])
    tensorwise = _one_step(TensorwiseAdam, gradient)
    adam = _one_step(torch.optim.Adam, gradient)
    root_mean_square = gradient.pow(2).mean().sqrt()
    assert torch.allclose(tensorwise, -0.01 * gradient / root_mean_square)
    assert torch.allclose(adam, -0.01 * gradient.sign(), atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(1e-6, 1e6), seed=st.integers(0, 2**16))
def test_steps_do_not_depend_on_the_losses_scale(scale, seed):
    gradient = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    step = _one_step(TensorwiseAdam, gradient)
    scaled = _one_step(TensorwiseAdam, gradient * scale)
    assert torch.allclose(step, scaled, rtol=1e-5, atol=1e-12)  # eps 1e-12 against a 1e-6 RMS
    assert step.pow(2).mean().sqrt().item() == pytest.approx(0.01, rel=1e-6)


def test_minimises_a_quadratic():
    target = torch.linspace(-1, 1, 12).reshape(3, 4)
    param = torch.zeros(3, 4, requires_grad=True)
    optimizer = TensorwiseAdam([param], lr=0.05)
    for step in range(400):
        for group in optimizer.param_groups:
            group["lr"] = 0.05 * (1 - step / 400) + 1e-3
        optimizer.zero_grad()
        ((param - target) ** 2).sum().backward()
        optimizer.step()
    assert torch.allclose(param.detach(), target, atol=0.02)


def test_state_round_trips_through_state_dict():
    def run(optimizer, param, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            (param.sin() * torch.arange(6.0)).sum().backward()
            optimizer.step()

    param = torch.ones(6, requires_grad=True)
    optimizer = TensorwiseAdam([param], lr=0.1)
    run(optimizer, param, 3)
    saved_param, saved_state = param.detach().clone(), copy.deepcopy(optimizer.state_dict())
    run(optimizer, param, 2)

    resumed = saved_param.clone().requires_grad_(True)
    again = TensorwiseAdam([resumed], lr=0.1)
    again.load_state_dict(saved_state)
    run(again, resumed, 2)
    assert torch.equal(resumed.detach(), param.detach())


def test_a_zero_gradient_takes_no_step():
    assert torch.equal(_one_step(TensorwiseAdam, torch.zeros(5)), torch.zeros(5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=0.0), "lr must be > 0"),
        (dict(betas=(0.9, 1.0)), r"betas must each be in \[0, 1\)"),
        (dict(eps=-1.0), "eps must be >= 0"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TensorwiseAdam([torch.zeros(2, requires_grad=True)], **kwargs)


def test_make_optimizer_names():
    param = torch.zeros(2, requires_grad=True)
    groups = [{"params": [param], "lr": 0.3}]
    assert isinstance(make_optimizer("adam", groups), torch.optim.Adam)
    made = make_optimizer("tensorwise_adam", groups)
    assert isinstance(made, TensorwiseAdam) and made.param_groups[0]["lr"] == 0.3
    assert set(OPTIMIZERS) == {"adam", "tensorwise_adam"}
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer("sgd", groups)
