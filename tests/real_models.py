"""Checks shared by the tests of real face models (imported as ``from real_models import ...``)."""

from __future__ import annotations

import torch


def check_real_face_model(model: torch.nn.Module, pairs: tuple, threshold: float, dim: int) -> None:
    """Assert a loaded face model is frozen, differentiable, ``dim``-d and verifies held-out ``pairs``.

    Accuracy at ``threshold`` at least 0.9 on ``pairs`` (the ``held_out_pairs`` fixture of
    ``conftest.py``), and genuine pairs at least 0.3 more similar than impostors on average.
    """
    a, b, same = pairs
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = a[:2].clone().requires_grad_(True)
    embeddings = model(x)
    assert embeddings.shape == (2, dim)
    embeddings.norm(dim=1).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(model(a), model(b), dim=1)
    accuracy = ((cosine >= threshold) == same).float().mean().item()
    assert accuracy >= 0.9, (accuracy, cosine[same].tolist(), cosine[~same].tolist())
    assert cosine[same].mean() > cosine[~same].mean() + 0.3
