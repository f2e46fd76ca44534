"""The benchmark scripts call the library's internals directly; these smoke runs keep them working."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
