"""Steps and seconds to a held-out fooling rate at an SSIM floor: the paper's recipe against the defaults.

Fits on the faces of one half of the identities in ``../shared/assets/faces``
and, after every epoch, scores the perturbation on faces of the other half
(identities never used for fitting; the held-out scoring time is not counted).
Each configuration runs side by side in one process, on one machine, under the
same ``--max-time`` (and ``--max-epochs``). For each ``--goal-fr`` level the
table gives the first step and second at which the held-out fooling rate
reached it with held-out mean SSIM >= ``--goal-ssim`` ("-" when never), then
the held-out numbers of the perturbation ``fit`` returned (with ``--per-face-ssim S`` also as
``transform(X, per_face_ssim=S)`` applies it, scaled for each face to SSIM ``S``, and the lowest
face's SSIM both ways). With ``n_init=N`` in a configuration the fit steps read ``a + b + ...``,
one term per restart, and the held-out curve holds every restart's epochs (``init`` in ``--json``,
beside each restart's ``init_scores``). ``--figure`` draws
the held-out fooling rate / SSIM point of every configuration (the stealth
frontier).

Configurations (``--configs``):

* ``paper``: ``UAPAttack.paper(model, stealth_loss="ssim", stealth_weight=3)``, the
  paper's recipe with the SSIM stealth loss at the weight the library used
  before (no VGG16 weights exist offline);
* ``target:S``: ``UAPAttack(model, target_ssim=S)``, the defaults with a stealth target
  (``target:S:R`` also sets ``stealth_adapt_rate=R``);
* ``weight:W``: ``UAPAttack(model, stealth_weight=W)``, the defaults with a fixed weight;
* ``paper+target:S``: the paper's recipe as in ``paper`` with ``target_ssim=S``;
* any of these followed by ``,keyword=value`` pairs sets more keywords of
  ``UAPAttack``, e.g. ``target:0.93,key_regions=True,lr_decay_steps=600`` (``key_regions=True``:
  ``KeyRegions()``).

Example (2-core CPU, about 10 minutes per configuration at --max-time 600)::

    python benchmarks/engine_speed.py --models foamliu_mobilefacenet insightface_mbf \
        --configs paper target:0.93 --max-time 600
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from _common import calibrated_threshold, held_out_split, load_model

from krtfuap.attack import UAPAttack
from krtfuap.key_regions import KeyRegions
from krtfuap.metrics import ssim
from krtfuap.scoring import PerturbationScore, score_batch, score_perturbation


def parse_value(text: str) -> object:
    """A keyword value written in a configuration: a number, True/False/None or a word."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def parse_keywords(items: Iterable[str]) -> dict[str, object]:
    """Keyword arguments written as ``KEY=VALUE`` items, each value read by :func:`parse_value`."""
    return {key: parse_value(value) for key, value in (item.split("=", 1) for item in items)}


def make_attack(config: str, model: torch.nn.Module, threshold: float, common: dict) -> UAPAttack:
    config, *extras = config.split(",")
    common = {**common, **parse_keywords(extras)}
    if "key_regions" in common:  # key_regions=True: the paper's key regions, KeyRegions()
        common["key_regions"] = KeyRegions() if common["key_regions"] else None
    if config == "paper":
        return UAPAttack.paper(model, threshold=threshold, stealth_loss="ssim", stealth_weight=3.0, **common)
    if config.startswith("paper+target:"):
        target = float(config.split(":")[1])
        return UAPAttack.paper(model, threshold=threshold, stealth_loss="ssim", stealth_weight=3.0,
                               target_ssim=target, **common)
    kind, value, *rate = config.split(":")
    if kind == "target":
        adapt = {"stealth_adapt_rate": float(rate[0])} if rate else {}
        return UAPAttack(model, threshold=threshold, target_ssim=float(value), **adapt, **common)
    if kind == "weight":
        return UAPAttack(model, threshold=threshold, stealth_weight=float(value), **common)
    raise SystemExit(f"unknown config {config!r}: use paper, target:S or weight:W")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["foamliu_mobilefacenet", "insightface_mbf"])
    parser.add_argument("--configs", nargs="+", default=["paper", "target:0.93"])
    parser.add_argument("--max-time", type=float, default=600.0, help="seconds of fitting per configuration (0: none)")
    parser.add_argument("--max-epochs", type=int, default=10_000, help="epochs per configuration (a step budget "
                        "that, unlike --max-time, does not depend on the machine's load)")
    parser.add_argument("--fit-faces", type=int, default=600)
    parser.add_argument("--test-faces", type=int, default=300)
    parser.add_argument("--pairs", type=int, default=600, help="fitting-identity pairs that calibrate t")
    parser.add_argument("--goal-fr", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--goal-ssim", type=float, default=0.93)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="where the models run (e.g. cuda)")
    parser.add_argument("--per-face-ssim", type=float, default=None, metavar="S",
                        help="also judge the returned perturbation scaled for each face to SSIM S")
    parser.add_argument("--json", type=Path, default=None, help="write every curve here")
    parser.add_argument("--figure", type=Path, default=None, help="draw the held-out FR/SSIM points here")
    parser.add_argument("--plot-only", type=Path, nargs="+", default=None, metavar="JSON",
                        help="fit nothing: draw --figure from the --json files of earlier runs")
    args = parser.parse_args()
    if args.plot_only:
        draw_frontier([run for path in args.plot_only for run in json.loads(path.read_text())], args.figure)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    split = held_out_split(args.fit_faces, args.test_faces, args.pairs, args.seed)
    fit_faces, test_faces = split.fit_faces, split.test_faces
    print(f"fit: {len(fit_faces)} faces of {len(split.fit_identities)} identities; held-out: {len(test_faces)} "
          f"faces of {len(split.test_identities)} other identities; epsilon {UAPAttack(None).epsilon:g} "
          f"(the defaults; 0.08 in 'paper' configurations); max_time {args.max_time:.0f} s; "
          f"max_epochs {args.max_epochs}; "
          f"torch threads {torch.get_num_threads()}; device {args.device}; "
          f"load average at start {os.getloadavg()[0]:.2f}\n")
    goals = " | ".join(f"steps / s to FR {goal:g}" for goal in args.goal_fr)
    scaled = (f" lowest face SSIM | per face to {args.per_face_ssim:g}: held-out FR | SSIM | lowest |"
              if args.per_face_ssim else "")
    print(f"| model | t | config | {goals} | fit steps | fit s | returned: held-out FR | "
          f"SSIM | PSNR | fit FR | fit SSIM | final stealth weight |{scaled} load |")
    print("|---|---|---|" + "---|" * len(args.goal_fr) + "---|---|---|---|---|---|---|---|---|"
          + "---|" * (4 if args.per_face_ssim else 0))
    curves = []
    for name in args.models:
        model = load_model(name).to(args.device)
        threshold = calibrated_threshold(model, split.calibration)
        for config in args.configs:
            curve: list[dict] = []

            def held_out(event: dict) -> None:
                score = score_perturbation(model, test_faces, event["perturbation"], threshold, batch_size=100)
                curve.append({"init": event.get("init", 0), "step": event["step"], "time": event["time"], **score})

            limits = dict(max_time=args.max_time or None, max_epochs=args.max_epochs, target_fooling_rate=1.0,
                          random_state=args.seed)
            attack = make_attack(config, model, threshold, limits)
            started = time.perf_counter()
            attack.fit(fit_faces, on_epoch=held_out)
            wall = time.perf_counter() - started
            final = attack.evaluate(test_faces)
            reached = []
            for goal_fr in args.goal_fr:
                goal = next((p for p in curve if p["fooling_rate"] >= goal_fr and p["ssim"] >= args.goal_ssim), None)
                reached.append(f"{goal['step']} / {goal['time']:.0f}" if goal else "-")
            weight = getattr(attack, "stealth_weight_", float("nan"))
            scaled = ""
            if args.per_face_ssim:
                final["lowest_ssim"] = ssim(attack.transform(test_faces), test_faces).min().item()  # no model pass
                per_face = score_with_lowest(model, test_faces, attack.perturbation_, threshold,
                                             args.per_face_ssim)
                scaled = (f" {final['lowest_ssim']:.4f} | {per_face['fooling_rate']:.3f} | {per_face['ssim']:.4f} | "
                          f"{per_face['lowest_ssim']:.4f} |")
                final["per_face"] = per_face
            steps = " + ".join(str(entry["n_iter"]) for entry in attack.init_scores_)  # "a + b": each restart of n_init
            print(f"| {name} | {threshold:.3f} | {config} | {' | '.join(reached)} | {steps} | "
                  f"{wall:.0f} | {final['fooling_rate']:.3f} | {final['ssim']:.4f} | {final['psnr']:.2f} | "
                  f"{attack.fooling_rate_:.3f} | {attack.ssim_:.4f} | {weight:.3g} |{scaled} "
                  f"{os.getloadavg()[0]:.2f} |", flush=True)
            curves.append({"model": name, "threshold": threshold, "config": config, "curve": curve,
                           "returned": final, "steps": attack.n_iter_, "seconds": wall,
                           "init_scores": attack.init_scores_, "best_init": attack.best_init_})
    if args.json:
        args.json.write_text(json.dumps(curves, indent=1))
    if args.figure:
        draw_frontier(curves, args.figure)


def score_with_lowest(model: torch.nn.Module, faces: torch.Tensor, perturbation: torch.Tensor, threshold: float,
                      per_face_ssim: float | None) -> dict[str, float]:
    """:func:`score_perturbation`'s scores of ``perturbation`` on ``faces`` (scaled for each face to
    ``per_face_ssim`` when given, as ``transform`` applies it) and ``lowest_ssim``, the lowest face's SSIM,
    from one scaling of each face."""
    device = next(model.parameters()).device
    score, lowest = PerturbationScore(threshold), 1.0
    with torch.no_grad():
        for batch in faces.split(100):
            scores = score_batch(model, batch.to(device), perturbation.to(device), per_face_ssim=per_face_ssim)
            score.update(scores)
            lowest = min(lowest, scores["ssim"].min().item())
    return {**score.compute(), "lowest_ssim": lowest}


def draw_frontier(curves: list[dict], path: Path) -> None:
    """One panel per model: the held-out fooling rate and SSIM of each configuration's returned perturbation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(run["model"] for run in curves))
    figure, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for axis, name in zip(axes[0], models):
        runs = [run for run in curves if run["model"] == name]
        fixed = sorted((r for r in runs if r["config"].startswith("weight:")), key=lambda r: r["returned"]["ssim"])
        if fixed:
            axis.plot([r["returned"]["ssim"] for r in fixed], [r["returned"]["fooling_rate"] for r in fixed],
                      "o-", color="grey", label="fixed stealth weight")
            for run in fixed:
                axis.annotate(run["config"], (run["returned"]["ssim"], run["returned"]["fooling_rate"]), fontsize=7)
        for run in runs:
            if not run["config"].startswith("weight:"):
                axis.scatter(run["returned"]["ssim"], run["returned"]["fooling_rate"], label=run["config"], zorder=3)
        axis.set(title=name, xlabel="held-out SSIM", ylabel="held-out fooling rate")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)

if __name__ == "__main__":
    main()
