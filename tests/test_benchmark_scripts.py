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
