"""Does a universal perturbation fitted on some face models fool a model left out of the fit? (issue 20)

Fits :class:`krtfuap.UAPAttack` on faces of one half of the identities of ``../shared/assets/faces``
against the models named by ``--fit``, under a ``--max-time`` budget, and scores the perturbation
(:func:`krtfuap.scoring.score_perturbation`) on faces of the other half (people never seen while
fitting) for every model of ``--judge``: fooling rate against that model's own threshold (calibrated,
best accuracy, on pairs of the fitting identities), and SSIM / PSNR of the perturbed faces (standard
definitions). A model of ``--fit`` is white box (``*``); the others are left out of the fit. One
Markdown row per setting of ``--lowpass`` (the perturbation band-limited to a grid of that side;
0: full resolution).

Example (2-core CPU, one run per direction)::

    python benchmarks/universal_transfer.py --fit insightface_mbf --judge foamliu_mobilefacenet \\
        --max-time 600 --lowpass 0 28

``--options input_diversity=0.7`` passes further keywords to every fit (``random_state=R`` there
replaces ``--seed`` for the fit only; the split stays ``--seed``'s); ``--max-time 0`` fits without a
time limit, for a fit limited by steps (``--options max_steps=3000``), which the machine's load does
not move; ``--bfloat16 facenet_casia``
runs the named models of ``--fit`` under bfloat16 autocast while fitting (they judge in float32);
``--save FILE`` keeps the fitted attack (``transfer_techniques.py --cloak FILE`` pastes it into photos
for dlib's ResNet); ``--curve-every N`` also prints the held-out curve: every judge's fooling rate and
the SSIM after every N-th epoch of the fit (the scoring's time is not counted in ``--max-time``).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

import torch
from torch import nn
from _common import calibrated_threshold, held_out_split, load_model
from engine_speed import parse_keywords

from krtfuap import UAPAttack
from krtfuap.models.precision import BFloat16Autocast
from krtfuap.scoring import score_perturbation


def held_out_curve(
    models: dict[str, nn.Module], thresholds: dict[str, float], fitted: list[str], faces: torch.Tensor, every: int
) -> Callable[[dict[str, Any]], None]:
    """An ``on_epoch`` callback for :meth:`UAPAttack.fit` that scores the perturbation after every
    ``every``-th epoch (the first, then each ``every`` later) for every model of ``models`` on the
    held-out ``faces`` and prints one line: step, fooling rates (``*``: fitted on), SSIM."""
    def on_epoch(event: dict[str, Any]) -> None:
        if event["epoch"] % every:
            return
        scores = {name: score_perturbation(model, faces, event["perturbation"], thresholds[name])
                  for name, model in models.items()}
        rates = ", ".join(f"{name}{'*' if name in fitted else ''} {score['fooling_rate']:.3f}"
                          for name, score in scores.items())
        similarity = next(iter(scores.values()))["ssim"]  # the same faces and change for every model
        print(f"  curve: step {event['step']}, {rates}, SSIM {similarity:.4f}, "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
    return on_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", nargs="+", default=["insightface_mbf"], help="models the perturbation is fitted on")
    parser.add_argument("--judge", nargs="+", default=["insightface_mbf", "foamliu_mobilefacenet"])
    parser.add_argument("--lowpass", nargs="+", type=int, default=[0], help="lowpass_size (0: none)")
    parser.add_argument("--target-ssim", type=float, default=0.93)
    parser.add_argument("--max-time", type=float, default=600.0, help="seconds per fit (0: no time limit)")
    parser.add_argument("--fit-faces", type=int, default=600)
    parser.add_argument("--test-faces", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE",
                        help="further UAPAttack keywords for every fit, e.g. input_diversity=0.7")
    parser.add_argument("--bfloat16", nargs="*", default=[], metavar="MODEL",
                        help="models of --fit that run in bfloat16 while fitting (judges stay float32)")
    parser.add_argument("--save", default=None, help="save the (last) fitted attack here (UAPAttack.save)")
    parser.add_argument("--curve-every", type=int, default=0, metavar="N",
                        help="also score every judge on the held-out faces after every N-th epoch (0: off)")
    args = parser.parse_args()
    options = parse_keywords(args.options)
    if args.curve_every < 0:
        parser.error(f"--curve-every must be >= 0 (0: no curve), got {args.curve_every}")
    not_fitted = sorted(set(args.bfloat16) - set(args.fit))
    if not_fitted:
        parser.error(f"--bfloat16 names models that are not fitted on: {not_fitted}")
    torch.set_num_threads(args.threads)

    split = held_out_split(args.fit_faces, args.test_faces, 2000, args.seed)
    models = {name: load_model(name) for name in dict.fromkeys(args.fit + args.judge)}
    thresholds = {name: calibrated_threshold(model, split.calibration) for name, model in models.items()}
    print(f"fit on {' + '.join(args.fit)} ({len(split.fit_faces)} faces), judged on {len(split.test_faces)} faces "
          f"of held-out people; thresholds {', '.join(f'{n} {t:.3f}' for n, t in thresholds.items())}; "
          f"target_ssim {args.target_ssim}, max_time {f'{args.max_time:.0f} s' if args.max_time else 'none'}, "
          f"options {options or 'none'}, "
          f"bfloat16 while fitting: {', '.join(args.bfloat16) or 'none'}; torch threads {args.threads}; "
          f"load average at start {os.getloadavg()[0]:.2f}\n")
    judges = [f"{name}{'*' if name in args.fit else ''}" for name in args.judge]
    rates = " | ".join(f"fooling rate {name}" for name in judges)
    print(f"| lowpass | {rates} | SSIM | PSNR dB | fit s | steps | stop | load |")
    print("|---|" + "---|" * len(judges) + "---|---|---|---|---|---|")
    judged = {name: models[name] for name in args.judge}
    curve = None if not args.curve_every else held_out_curve(judged, thresholds, args.fit, split.test_faces,
                                                             args.curve_every)
    for lowpass in args.lowpass:
        fitted = [BFloat16Autocast(models[name]) if name in args.bfloat16 else models[name] for name in args.fit]
        threshold = [thresholds[name] for name in args.fit]
        attack = UAPAttack(fitted[0] if len(fitted) == 1 else fitted,
                           threshold=threshold[0] if len(fitted) == 1 else threshold,
                           target_ssim=args.target_ssim, max_time=args.max_time or None,
                           lowpass_size=lowpass or None, num_threads=args.threads,
                           **{"random_state": args.seed, **options})
        started = time.perf_counter()
        attack.fit(split.fit_faces, on_epoch=curve)
        seconds = time.perf_counter() - started
        scores = [score_perturbation(models[name], split.test_faces, attack.perturbation_, thresholds[name])
                  for name in args.judge]
        cells = " | ".join(f"{score['fooling_rate']:.3f}" for score in scores)
        print(f"| {lowpass or '-'} | {cells} | {scores[0]['ssim']:.4f} | {scores[0]['psnr']:.1f} | {seconds:.0f} | "
              f"{attack.n_iter_} | {attack.stop_reason_} | {os.getloadavg()[0]:.2f} |", flush=True)
        if args.save:
            attack.save(args.save)


if __name__ == "__main__":
    main()
