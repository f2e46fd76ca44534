"""The benchmark scripts call the library's internals directly; these smoke runs keep them working."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

from fakes import TinyEmbedder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import step_time  # noqa: E402


def test_step_time_measures_the_fit_loop_update_and_its_floor():
    args = argparse.Namespace(stealth="ssim", repeats=1, warmup=0, no_fit=False)
    row = step_time.measure(TinyEmbedder(), 2, torch.device("cpu"), args)
    for name in ("step", "floor", "extra_ssim", "perturbation", "adam", "fit"):
        assert row[name] > 0.0, name
    assert row["step_mem"] > 0.0 and row["floor_mem"] > 0.0


def test_engine_speed_scores_and_gives_the_lowest_face_ssim_both_ways():
    import engine_speed
    from fakes import random_faces

    from krtfuap.metrics import ssim

    faces, model = random_faces(12, seed=1, size=32), TinyEmbedder()
    attack = engine_speed.make_attack("target:0.9,max_steps=3", model, 0.9, {"random_state": 0})
    attack.fit(faces)
    uniform = engine_speed.score_with_lowest(model, faces, attack.perturbation_, 0.9, None)
    assert uniform["lowest_ssim"] == ssim(attack.transform(faces), faces).min().item()
    scaled = engine_speed.score_with_lowest(model, faces, attack.perturbation_, 0.9, 0.97)
    assert scaled["lowest_ssim"] >= 0.97
    for scores, per_face_ssim in ((uniform, None), (scaled, 0.97)):
        expected = attack.evaluate(faces, per_face_ssim=per_face_ssim)
        assert {key: scores[key] for key in expected} == expected


def test_universal_transfer_curve_scores_every_judge_on_the_chosen_epochs(capsys):
    import universal_transfer
    from fakes import random_faces

    from krtfuap import UAPAttack
    from krtfuap.scoring import score_perturbation

    fit_faces, held_out = random_faces(16, seed=1, size=32), random_faces(8, seed=2, size=32)
    models = {"fitted": TinyEmbedder(), "left_out": TinyEmbedder(seed=3)}
    thresholds = {"fitted": 0.9, "left_out": 0.95}
    curve = universal_transfer.held_out_curve(models, thresholds, ["fitted"], held_out, every=2)
    events = []

    def on_epoch(event):
        events.append(event)
        curve(event)

    UAPAttack(models["fitted"], threshold=0.9, max_epochs=5, batch_size=8, target_fooling_rate=1.0,
              random_state=0).fit(fit_faces, on_epoch=on_epoch)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("curve:")]
    scored = [event for event in events if event["epoch"] % 2 == 0]
    assert len(events) == 5 and [event["epoch"] for event in scored] == [0, 2, 4]
    assert len(lines) == len(scored)
    for line, event in zip(lines, scored):
        fitted = score_perturbation(models["fitted"], held_out, event["perturbation"], 0.9)
        left_out = score_perturbation(models["left_out"], held_out, event["perturbation"], 0.95)
        assert line.strip().startswith(
            f"curve: step {event['step']}, fitted* {fitted['fooling_rate']:.3f}, "
            f"left_out {left_out['fooling_rate']:.3f}, SSIM {left_out['ssim']:.4f}, load "
        )


def test_scoring_share_splits_each_epoch_after_the_first_into_steps_and_scoring():
    import scoring_share
    from fakes import random_faces, tiny_attack

    attack = tiny_attack(max_epochs=3, target_fooling_rate=1.0, batch_size=4).fit(random_faces(16))
    times = scoring_share.epoch_times(attack)
    assert len(times) == 2 and all(steps > 0 and scoring > 0 for steps, scoring in times)
    scored = [score["time"] for score in attack.epoch_scores_]
    assert [steps + scoring for steps, scoring in times] == pytest.approx([b - a for a, b in zip(scored, scored[1:])])
