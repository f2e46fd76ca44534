"""Where a CPU fit's time goes: update steps against the scoring after every epoch.

For each model, every configuration fits ``UAPAttack(model, threshold=t, target_ssim=0.95,
target_fooling_rate=1.0, max_steps=(E + 1) * steps_per_epoch, random_state=0, **config)`` on the
shared fitting faces, the configurations in turns (``--rounds`` times, so load hits them alike).
``history_`` and ``epoch_scores_`` time every step and every scoring; the first epoch is left out
(it also computes the clean embeddings). The table gives, per model and configuration, the median
over the timed epochs of the seconds of steps and of scoring per epoch, the scoring's share of the
loop, and the steps a 600-s fit would make at that pace, with its ratio to the first configuration.

Configurations (``--configs``): ``plain`` (the defaults, ``channels_last=True, score_size="auto"``:
300 faces) or ``,``-separated ``keyword=value`` pairs of ``UAPAttack``, e.g.
``channels_last=False,score_size=None`` (the defaults before ``benchmarks/RESULTS.md`` 9m).

Example (2-core CPU, about 10 minutes)::

    python benchmarks/scoring_share.py --models insightface_mbf foamliu_mobilefacenet \
        --configs channels_last=False,score_size=None score_size=None channels_last=False plain
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from _common import calibrated_threshold, held_out_split, load_model
from engine_speed import parse_keywords

from krtfuap.attack import UAPAttack


def epoch_times(attack: UAPAttack) -> list[tuple[float, float]]:
    """``(seconds of steps, seconds of scoring)`` of every epoch of a fitted ``attack`` after the first."""
    times, scored_at = [], None
    for score in attack.epoch_scores_:
        last_step = max(record["time"] for record in attack.history_ if record["epoch"] == score["epoch"])
        if scored_at is not None:
            times.append((last_step - scored_at, score["time"] - last_step))
        scored_at = score["time"]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["insightface_mbf", "foamliu_mobilefacenet"])
    parser.add_argument("--configs", nargs="+", default=["channels_last=False,score_size=None", "score_size=None",
                                                         "channels_last=False", "plain"])
    parser.add_argument("--fit-faces", type=int, default=1232)
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per fit, after an untimed one")
    parser.add_argument("--rounds", type=int, default=1, help="times every configuration is fitted, in turns")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    split = held_out_split(args.fit_faces, 300, 600, 0)
    faces = split.fit_faces
    print(f"{len(faces)} fitting faces, {args.epochs} timed epoch(s) per fit, "
          f"{args.rounds} round(s); torch threads {torch.get_num_threads()}; "
          f"load average at start {os.getloadavg()[0]:.2f}\n")
    print("| model | config | s of steps per epoch | s of scoring per epoch | scoring's share | "
          "steps in 600 s | ratio | load |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = load_model(name)
        threshold = calibrated_threshold(model, split.calibration)
        times: dict[str, list[tuple[float, float]]] = {config: [] for config in args.configs}
        steps_per_epoch: dict[str, int] = {}
        for _ in range(args.rounds):
            for config in args.configs:
                keywords = {} if config == "plain" else parse_keywords(config.split(","))
                attack = UAPAttack(model, threshold=threshold, target_ssim=0.95, target_fooling_rate=1.0,
                                   random_state=0, **keywords)
                steps_per_epoch[config] = -(-len(faces) // attack.batch_size)
                attack.set_params(max_steps=(args.epochs + 1) * steps_per_epoch[config])
                times[config] += epoch_times(attack.fit(faces))
        first = None
        for config in args.configs:
            steps = statistics.median(step for step, _ in times[config])
            scoring = statistics.median(score for _, score in times[config])
            per_600 = 600 / (steps + scoring) * steps_per_epoch[config]
            first = first or per_600
            print(f"| {name} | {config} | {steps:.1f} | {scoring:.1f} | {scoring / (steps + scoring):.2f} | "
                  f"{per_600:.0f} | {per_600 / first:.2f} | {os.getloadavg()[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
