"""Write a :class:`~krtfuap.apps.benchmark.BenchmarkResult` as a tidy CSV, a Markdown report and figures.

``results.csv`` holds one row per measurement (an ``experiment`` column tells
``attack``, ``time_to_fr``, ``occlusion`` and ``sweep`` rows apart; every row
names its model, data sizes, threshold, budget and seed). ``report.md`` lays the
numbers out as the paper's tables; the figures are drawn with matplotlib.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from krtfuap.apps.benchmark import FOOLING_LEVELS, METHODS, BenchmarkResult

__all__ = ["CSV_COLUMNS", "write_report"]

CSV_COLUMNS = (
    "experiment", "table", "method", "label", "source_model", "target_model", "white_box", "varied",
    "fooling_rate", "ssim", "psnr", "mean_similarity", "threshold", "clean_accuracy", "epsilon",
    "stealth_weight", "seed", "n_fit", "n_test", "n_pairs", "fit_time_s", "steps", "stop_reason",
    "fit_fooling_rate", "level", "time_s", "steps_to_level", "region", "strength", "area", "accuracy",
)
"""Columns of ``results.csv``; a row leaves empty the ones its experiment does not measure."""


def _format(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_format(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(result: BenchmarkResult, output: str | Path, *, command: str = "") -> Path:
    """Write ``results.csv``, ``report.md`` and the figures into ``output``.

    Parameters
    ----------
    result : BenchmarkResult
        From :func:`run_benchmark`.
    output : path-like
        Folder (created).
    command : str
        The command that produced ``result``, quoted in the report.

    Returns
    -------
    pathlib.Path
        Path of ``report.md``.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "results.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result.rows)
    figures = _figures(result, output)
    setup = result.setup
    attack = [r for r in result.rows if r["experiment"] == "attack"]
    parts = [
        "# krtfuap benchmark report",
        "",
        f"Made on {setup.get('date')} with `{command or 'krtfuap benchmark'}`.",
        "",
        f"* Data: {setup.get('data')}.",
        f"* Budget: l_inf epsilon = {setup.get('epsilon')} on [0, 1] images; seed {setup.get('seed')} for every fit.",
        f"* Stopping: target fooling rate {setup.get('target_fooling_rate')} on the fitting faces, at most "
        f"{setup.get('max_epochs')} epochs"
        + (f" and {setup['max_time']} s of optimisation" if setup.get("max_time") else "")
        + f" per fit; batch {setup.get('batch_size')}.",
        f"* KRT-FUAP stealth: 1 - SSIM loss, weight {setup.get('stealth_weight') or 'default (3)'} (the paper's "
        "VGG16 loss needs ImageNet VGG16 weights, not available offline here).",
        f"* Machine: {setup.get('device')} ({setup.get('machine')}), torch {setup.get('torch')}.",
        "* FR: share of held-out faces with cos(F(x + v), F(x)) below the target model's threshold. "
        "SSIM and PSNR (dB) are means over the held-out faces. LPIPS is not reported: its AlexNet "
        "backbone weights cannot be had offline here (`krtfuap.metrics.LPIPSMetric` computes it where they are).",
        "",
        "## Models",
        "",
        "Threshold: best-accuracy threshold on the fitting identities' pairs; accuracy and TAR at FAR 1e-3 on the same pairs.",
        "",
        _table(["model", "threshold", "clean accuracy", "TAR @ FAR 1e-3"],
               [(m["model"], m["threshold"], m["clean_accuracy"], m["tar_at_far_1e-3"]) for m in result.models]),
    ]
    for table, title in (("Table 1", "KRT-FUAP and baselines (white-box)"), ("Table 3", "Ablation: no key-region mask"),
                         ("Table 4", "Ablation: no flow field"), ("Table 5", "Ablation: adversarial loss")):
        rows = [r for r in attack if r["white_box"] and not r["source_model"].startswith("ensemble")
                and (r["table"] == table or (table != "Table 1" and r["method"] == "krt-fuap"))]
        if not rows:
            continue
        parts += ["", f"## {table}-style: {title}", "",
                  _table(["method", "model", "FR", "SSIM", "PSNR", "fit FR", "steps", "fit s", "stop"],
                         [(r["label"], r["target_model"], r["fooling_rate"], r["ssim"], r["psnr"],
                           r["fit_fooling_rate"], r["steps"], r["fit_time_s"], r["stop_reason"]) for r in rows])]
    targets = list(dict.fromkeys(r["target_model"] for r in attack))
    keys = list(dict.fromkeys((r["method"], r["source_model"]) for r in attack))
    if len(targets) > 1:
        lookup = {(r["method"], r["source_model"], r["target_model"]): r for r in attack}
        matrix = []
        for method, source in keys:
            cells = []
            for target in targets:
                r = lookup[(method, source, target)]
                cells.append(f"{r['fooling_rate']:.3f}{'*' if r['white_box'] else ''} (SSIM {r['ssim']:.3f})")
            matrix.append((METHODS[method].label, source, *cells))
        parts += ["", "## Table 2-style: transfer (FR on each target; * = white-box)", "",
                  _table(["method", "fitted on", *targets], matrix)]
    timing = [r for r in result.rows if r["experiment"] == "time_to_fr" and not r["source_model"].startswith("ensemble")]
    if timing:
        grouped: dict[tuple, dict] = {}
        for r in timing:
            grouped.setdefault((r["label"], r["source_model"]), {})[r["level"]] = r
        rows = [(label, source, *(f"{v['time_s']:.1f} s / {v['steps_to_level']}" if v["time_s"] is not None else "not reached"
                                  for v in levels.values())) for (label, source), levels in grouped.items()]
        parts += ["", "## Figure 6-style: time to fooling rate (optimisation seconds / steps, fitting faces, one run)", "",
                  _table(["method", "model", *(f"{int(l * 100)} %" for l in FOOLING_LEVELS)], rows)]
    occlusion = [r for r in result.rows if r["experiment"] == "occlusion"]
    if occlusion:
        strengths = list(dict.fromkeys(r["strength"] for r in occlusion))
        grouped = {}
        for r in occlusion:
            grouped.setdefault((r["target_model"], r["region"], r["area"]), {})[r["strength"]] = r["accuracy"]
        parts += ["", "## Figure 4-style: verification accuracy with noise inside / outside the key regions", "",
                  f"Uniform noise of the given strength on the second face of each held-out pair ({occlusion[0]['n_pairs']} pairs), "
                  "only inside the key regions (the built-in template mask), only outside them, or on as many random "
                  "pixels outside them as the key regions hold (equal area); area = share of pixels.", "",
                  _table(["model", "region", "area", *(f"s={s}" for s in strengths)],
                         [(m, reg, area, *(acc[s] for s in strengths)) for (m, reg, area), acc in grouped.items()])]
    sweep = [r for r in result.rows if r["experiment"] == "sweep"]
    if sweep:
        parts += ["", "## FR / SSIM trade-off of KRT-FUAP (white-box)", "",
                  _table(["model", "varied", "epsilon", "stealth weight", "FR", "SSIM", "PSNR", "steps", "stop"],
                         [(r["source_model"], r["varied"], r["epsilon"], r["stealth_weight"], r["fooling_rate"],
                           r["ssim"], r["psnr"], r["steps"], r["stop_reason"]) for r in sweep])]
    if figures:
        parts += ["", "## Figures", ""]
        parts += [f"![{caption}]({path.name})\n\n*{caption}*\n" for path, caption in figures]
    if any(r.get("stop_reason") == "max_time" for r in attack):
        parts += ["", "Rows stopped by `max_time` ended before reaching the target fooling rate: their fooling rates are "
                  "what that much optimisation buys, not what the method converges to."]
    parts += ["", "All numbers: `results.csv` in this folder (one row per measurement, with model, data sizes, "
              "threshold, budget and seed)."]
    report = output / "report.md"
    report.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return report


def _figures(result: BenchmarkResult, output: Path) -> list[tuple[Path, str]]:
    """Save the figures with matplotlib; returns ``(path, caption)`` pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[tuple[Path, str]] = []
    single = {k: v for k, v in result.perturbations.items() if not k.split("@")[1].startswith("ensemble")}
    first_source = next(iter(single), "@").split("@")[1]
    shown = {k: v for k, v in single.items() if k.endswith("@" + first_source)}
    if shown and result.example is not None:
        figure, axes = plt.subplots(2, len(shown) + 1, figsize=(1.1 * (len(shown) + 1), 2.6), squeeze=False)
        axes[0, 0].imshow(result.example.permute(1, 2, 0).numpy())
        axes[0, 0].set_title("clean", fontsize=7)
        axes[1, 0].axis("off")
        for column, (key, perturbation) in enumerate(shown.items(), start=1):
            adversarial = (result.example + perturbation).clamp(0, 1)
            axes[0, column].imshow(adversarial.permute(1, 2, 0).numpy())
            axes[0, column].set_title(METHODS[key.split("@")[0]].label, fontsize=6)
            scale = perturbation.abs().max().clamp_min(1e-8)
            axes[1, column].imshow((perturbation / (2 * scale) + 0.5).permute(1, 2, 0).numpy())
        for axis in axes.flat:
            axis.set_xticks([])
            axis.set_yticks([])
        figure.suptitle(f"held-out face + perturbation fitted on {first_source} (bottom: perturbation, rescaled)", fontsize=7)
        made.append(_save(figure, output / "examples.png", "Adversarial faces and perturbations per method"))
    sweep = [r for r in result.rows if r["experiment"] == "sweep"]
    attack = [r for r in result.rows if r["experiment"] == "attack" and r["white_box"]
              and r["source_model"] == first_source and r["target_model"] == first_source]
    if sweep or attack:
        figure, axis = plt.subplots(figsize=(4.5, 3.5))
        for varied, marker in (("stealth_weight", "o-"), ("epsilon", "s--")):
            points = sorted((r["ssim"], r["fooling_rate"]) for r in sweep if r["varied"] == varied)
            if points:
                axis.plot(*zip(*points), marker, label=f"KRT-FUAP over {varied.replace('_', ' ')}")
        for r in attack:
            axis.scatter(r["ssim"], r["fooling_rate"], s=14)
            axis.annotate(r["label"], (r["ssim"], r["fooling_rate"]), fontsize=5)
        axis.set_xlabel("SSIM (held-out faces)")
        axis.set_ylabel("fooling rate (held-out faces)")
        axis.set_title(f"white-box on {first_source}", fontsize=8)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=6)
        made.append(_save(figure, output / "tradeoff.png", "Fooling rate against SSIM"))
    curves = {k: v for k, v in result.curves.items() if k in shown}
    if curves:
        figure, axis = plt.subplots(figsize=(4.5, 3.5))
        for key, curve in curves.items():
            axis.plot([t for t, _ in curve], [f for _, f in curve], label=METHODS[key.split("@")[0]].label)
        axis.set_xlabel("optimisation time (s)")
        axis.set_ylabel("scored fooling rate (fitting faces)")
        axis.legend(fontsize=5)
        made.append(_save(figure, output / "time_to_fr.png", "Running fooling rate over optimisation time"))
    rows = [r for r in result.rows if r["experiment"] == "attack"]
    targets = list(dict.fromkeys(r["target_model"] for r in rows))
    keys = list(dict.fromkeys(f"{r['method']}@{r['source_model']}" for r in rows))
    if len(targets) > 1:
        lookup = {f"{r['method']}@{r['source_model']}": {} for r in rows}
        for r in rows:
            lookup[f"{r['method']}@{r['source_model']}"][r["target_model"]] = r["fooling_rate"]
        values = torch.tensor([[lookup[k][t] for t in targets] for k in keys])
        figure, axis = plt.subplots(figsize=(1.5 + 1.3 * len(targets), 0.8 + 0.28 * len(keys)))
        image = axis.imshow(values.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        axis.set_xticks(range(len(targets)), targets, fontsize=6, rotation=20)
        axis.set_yticks(range(len(keys)), keys, fontsize=5)
        for i in range(len(keys)):
            for j in range(len(targets)):
                axis.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=5, color="w")
        figure.colorbar(image, ax=axis, label="fooling rate")
        made.append(_save(figure, output / "transfer.png", "Fooling rate of each perturbation (rows) on each model (columns)"))
    occlusion = [r for r in result.rows if r["experiment"] == "occlusion"]
    if occlusion:
        figure, axis = plt.subplots(figsize=(4.5, 3.5))
        for model in dict.fromkeys(r["target_model"] for r in occlusion):
            for region, style in (("inside", "-"), ("outside", "--"), ("outside, equal area", ":")):
                points = [(r["strength"], r["accuracy"]) for r in occlusion
                          if r["target_model"] == model and r["region"] == region]
                axis.plot(*zip(*points), style, marker="o", ms=3, label=f"{model}, {region}")
        axis.set_xlabel("noise strength (l_inf)")
        axis.set_ylabel("verification accuracy")
        axis.legend(fontsize=5)
        made.append(_save(figure, output / "occlusion.png", "Accuracy with noise inside vs outside the key regions"))
    return made


def _save(figure, path: Path, caption: str) -> tuple[Path, str]:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path, caption
