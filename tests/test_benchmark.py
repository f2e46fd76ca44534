"""``krtfuap.apps.benchmark``: the method registry, time to fooling rate, occlusion and a small real run."""

import csv

import pytest
import torch
from torch import nn

from krtfuap.attack import UAPAttack
from krtfuap.key_regions import KeyRegions
from krtfuap.baselines import FGUAP, DeepFoolUAP, FrequencyUAP, RandomNoiseUAP
from krtfuap.apps.benchmark import (
    METHODS,
    load_benchmark_data,
    load_models,
    occlusion_accuracy,
    run_benchmark,
    time_to_fooling_rate,
)
from krtfuap.apps.report import write_report


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 8 * 8, 4)

    def forward(self, images):
        return self.linear(images.flatten(1))


COMMON = dict(threshold=0.5, epsilon=0.08, target_fooling_rate=0.8, max_epochs=1, max_time=None, batch_size=4,
              random_state=0, device="cpu", stealth_weight=None)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("krt-fuap", {"key_regions": KeyRegions(), "adversarial_loss": "direction", "input_diversity": 0.0}),
        ("no-key-regions", {"key_regions": None}),
        ("fixed-key-regions", {"key_regions": KeyRegions(learn_flow=False)}),
        ("cosine-loss", {"adversarial_loss": "cosine"}),
        ("euclidean-loss", {"adversarial_loss": "euclidean"}),
        ("krt-fuap-di", {"input_diversity": 0.5}),
    ],
)
def test_krt_fuap_variants_switch_what_they_name(name, expected):
    estimator = METHODS[name].build(Linear(), **COMMON)
    assert type(estimator) is UAPAttack and estimator.stealth_loss == "ssim"
    params = estimator.get_params()
    for key, value in expected.items():
        assert params[key] == value, key


@pytest.mark.parametrize(
    "name, cls", [("random-noise", RandomNoiseUAP), ("uap", DeepFoolUAP), ("fg-uap", FGUAP), ("frequency-uap", FrequencyUAP)]
)
def test_baselines_get_the_shared_budget_and_stopping_rules(name, cls):
    estimator = METHODS[name].build(Linear(), **COMMON)
    assert type(estimator) is cls and not METHODS[name].stealth
    params = estimator.get_params()
    assert (params["epsilon"], params["threshold"]) == (0.08, 0.5)
    # Random noise learns nothing: it takes no stopping rules, the others take the shared ones.
    assert params.get("max_epochs") == (None if cls is RandomNoiseUAP else 1)


def test_time_to_fooling_rate_reads_the_scored_epochs():
    scores = [{"fooling_rate": f, "time": t, "step": k} for f, t, k in [(0.2, 1.0, 2), (0.6, 2.0, 4), (0.5, 3.0, 6)]]
    reached = time_to_fooling_rate(scores, levels=(0.5, 0.6, 0.9))
    assert reached == {0.5: (2.0, 4), 0.6: (2.0, 4), 0.9: None}


class Sum(nn.Module):
    """Embeds a face as (sum of the top half, sum of the bottom half): noise in one half moves one axis."""

    def forward(self, images):
        half = images.shape[-2] // 2
        return torch.stack([images[..., :half, :].sum((1, 2, 3)), images[..., half:, :].sum((1, 2, 3))], 1)


def test_occlusion_noise_goes_only_where_the_region_says():
    # Faces at 0.9: noise clipped into [0, 1] lowers the sum of every half it touches.
    a = torch.full((4, 3, 8, 8), 0.9)
    pairs = [(a, a.clone(), torch.ones(4))]
    nowhere, top, everywhere = torch.zeros(8, 8), torch.zeros(8, 8), torch.ones(8, 8)
    top[:4] = 1
    assert occlusion_accuracy(Sum(), pairs, 0.9999, nowhere, strength=0.5) == 1.0
    # Only the top half moves: the embedding turns away from the diagonal, the genuine pair fails.
    assert occlusion_accuracy(Sum(), pairs, 0.9999, top, strength=0.5) == 0.0
    # Both halves move alike (the same noise field per half, statistically): the direction barely changes.
    assert occlusion_accuracy(Sum(), pairs, 0.99, everywhere, strength=0.5) == 1.0


@pytest.mark.real
def test_small_real_benchmark_writes_report_csv_and_figures(shared_assets, tmp_path):
    data = load_benchmark_data(shared_assets / "faces", fit_faces=16, test_faces=16, pairs=32)
    assert "16 faces" in data.description
    models = load_models(["foamliu_mobilefacenet"], shared_assets / "models")
    result = run_benchmark(
        data, models, methods=["krt-fuap", "random-noise", "no-key-regions"], max_epochs=2, batch_size=8,
        sweep_stealth_weights=[0.0], sweep_epsilons=[], occlusion_strengths=[0.0, 0.3], verbose=False,
    )
    report = write_report(result, tmp_path, command="pytest")
    text = report.read_text()
    for heading in ("## Models", "Table 1-style", "Table 3-style", "Figure 6-style", "Figure 4-style", "trade-off"):
        assert heading in text, heading
    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    attack = [r for r in rows if r["experiment"] == "attack"]
    assert {r["method"] for r in attack} == {"krt-fuap", "random-noise", "no-key-regions"}
    for r in attack:
        assert r["threshold"] and r["seed"] == "0" and r["n_test"] == "16"
        assert (float(r["fooling_rate"]) * 16).is_integer()  # a share of the 16 test faces
    # Even two epochs of KRT-FUAP move faces further from themselves than noise of the same budget.
    similarity = {r["method"]: float(r["mean_similarity"]) for r in attack}
    assert similarity["krt-fuap"] < similarity["random-noise"]
    occlusion = [r for r in rows if r["experiment"] == "occlusion"]
    assert {r["region"] for r in occlusion} == {"inside", "outside", "outside, equal area"}
    clean = {float(r["accuracy"]) for r in occlusion if float(r["strength"]) == 0.0}
    assert len(clean) == 1  # no noise: every region gives the clean accuracy
    for name in ("examples.png", "tradeoff.png", "time_to_fr.png", "occlusion.png"):
        assert (tmp_path / name).stat().st_size > 1000, name


def test_unknown_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown benchmark model 'vgg'"):
        load_models(["vgg"])
    with pytest.raises(FileNotFoundError, match="pairs.csv"):
        load_benchmark_data(tmp_path)
