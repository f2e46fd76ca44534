"""Optimisers of the perturbation: Adam, and Adam with one second moment per tensor.

Adam (Kingma and Ba 2015) divides every element's gradient by that element's own
running root-mean-square, so every pixel of a perturbation moves by about the
learning rate per step, whether the loss cares about it much or little: the
change spreads evenly over the image, as a sign-like texture. :class:`TensorwiseAdam`
divides the whole tensor's gradient by one running root-mean-square, that of
all its elements together: the step keeps the gradient's own shape, large
where the adversarial and stealth losses pull hard and small where they
nearly cancel, while its overall size (about ``lr`` per element, root-mean-square)
stays independent of the loss's scale, as Adam's does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch

__all__ = ["OPTIMIZERS", "TensorwiseAdam", "make_optimizer"]


class TensorwiseAdam(torch.optim.Optimizer):
    """Adam whose second-moment estimate is one number per parameter tensor.

    For each tensor ``p`` with gradient ``g``: ``m = beta1 * m + (1 - beta1) * g``,
    ``s = beta2 * s + (1 - beta2) * mean(g ** 2)`` (a scalar), and
    ``p -= lr * m_hat / (sqrt(s_hat) + eps)`` with Adam's bias corrections
    ``m_hat = m / (1 - beta1 ** t)``, ``s_hat = s / (1 - beta2 ** t)``.

    Parameters
    ----------
    params : iterable of torch.Tensor or of dict
        Parameters or parameter groups, as for :class:`torch.optim.Adam`.
    lr : float
        Root-mean-square size of a step per element, ``> 0``.
    betas : tuple of float
        Decay of the first and second moments, each in ``[0, 1)``.
    eps : float
        Added to the root-mean-square, ``>= 0``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-12,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}.")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must each be in [0, 1), got {betas}.")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter that has a gradient; ``closure`` re-evaluates the loss, as in torch."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros((), dtype=param.dtype, device=param.device)
                state["step"] += 1
                step = state["step"]
                state["exp_avg"].mul_(beta1).add_(param.grad, alpha=1.0 - beta1)
                state["exp_avg_sq"].mul_(beta2).add_(param.grad.pow(2).mean(), alpha=1.0 - beta2)
                root_mean_square = (state["exp_avg_sq"] / (1.0 - beta2**step)).sqrt()
                param.sub_(state["exp_avg"] / ((1.0 - beta1**step) * (root_mean_square + group["eps"])) * group["lr"])
        return loss


#: Optimiser classes by the name ``UAPAttack(optimizer=...)`` takes.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "tensorwise_adam": TensorwiseAdam,
}


def make_optimizer(
    kind: Literal["adam", "tensorwise_adam"], params: Iterable[torch.Tensor] | Iterable[dict[str, Any]]
) -> torch.optim.Optimizer:
    """The optimiser named ``kind`` (a key of :data:`OPTIMIZERS`) over ``params``, learning rates from the groups."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {kind!r}.")
    return OPTIMIZERS[kind](params)
