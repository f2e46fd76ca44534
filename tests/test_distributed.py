"""Distributed fitting: two gloo CPU processes reproduce a one-process fit.

Two ranks with ``batch_size=4`` each read interleaved shards, so their global
batches are the one-process ``batch_size=8`` batches; the averaged gradients then
give the same Adam steps. The fits agree up to float rounding of the summation
order: perturbation and flow to ``atol=1e-5`` (epsilon is 0.08; measured: 1.7e-7), history values to
``atol=1e-5``, and exactly in the number of steps, epochs and stop reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from fakes import random_faces, tiny_attack
from processes import spawn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from krtfuap import distributed
from krtfuap.attack import UAPAttack
from krtfuap.key_regions import KeyRegions

WORLD_SIZE = 2
GLOBAL_BATCH = 8
N_FACES = 24
ATOL = 1e-5


def make_attack(batch_size: int, **params) -> UAPAttack:
    # threshold 0.995 and small initial noise make a part of each batch fooled mid-fit, so skip_fooled matters.
    settings = dict(
        threshold=0.995, stealth_loss="ssim", key_regions=KeyRegions(), skip_fooled=True, init_scale=0.1,
        target_fooling_rate=0.75, max_epochs=8, shuffle=False,  # shuffled shards cannot match one process's order
        batch_size=batch_size,
    )
    return tiny_attack(UAPAttack, **{**settings, **params})


def summary(attack: UAPAttack) -> dict:
    return {
        "perturbation": attack.perturbation_,
        "flow": attack.flow_,
        "history": attack.history_,
        "n_iter": attack.n_iter_,
        "n_epochs": attack.n_epochs_,
        "stop_reason": attack.stop_reason_,
        "fooling_rate": attack.fooling_rate_,
    }


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    root = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{root / 'rendezvous'}", rank=rank, world_size=WORLD_SIZE)
    try:
        batch, faces = GLOBAL_BATCH // WORLD_SIZE, random_faces(N_FACES)
        # Rank 1 draws other initial noise on purpose: the broadcast from rank 0 must align the ranks.
        by_tensor = make_attack(batch, random_state=rank, checkpoint_path=root / f"checkpoint-{rank}.pt").fit(faces)
        loader = DataLoader(TensorDataset(faces), batch_size=batch)
        by_loader = make_attack(batch).fit(loader)
        # Each rank shuffles its own shard, here from another seed on each rank.
        shuffled = make_attack(batch, shuffle=True, random_state=rank, max_epochs=3, target_fooling_rate=1.0).fit(faces)
        by_tensor.save(root / f"attack-{rank}.safetensors")
        torch.save({"tensor": summary(by_tensor), "loader": summary(by_loader), "shuffled": summary(shuffled)},
                   root / f"result-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("distributed")
    spawn(_worker, args=(str(folder),), nprocs=WORLD_SIZE)
    return folder, [torch.load(folder / f"result-{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def single_process() -> dict:
    return summary(make_attack(GLOBAL_BATCH).fit(random_faces(N_FACES)))


def assert_same_fit(result: dict, expected: dict) -> None:
    assert (result["n_iter"], result["n_epochs"], result["stop_reason"]) == (
        expected["n_iter"], expected["n_epochs"], expected["stop_reason"]
    )
    assert result["fooling_rate"] == pytest.approx(expected["fooling_rate"], abs=ATOL)
    torch.testing.assert_close(result["perturbation"], expected["perturbation"], atol=ATOL, rtol=0)
    torch.testing.assert_close(result["flow"], expected["flow"], atol=ATOL, rtol=0)
    for got, want in zip(result["history"], expected["history"], strict=True):
        assert got.keys() == want.keys()
        for key in want.keys() - {"time"}:  # wall-clock seconds differ between runs
            assert got[key] == pytest.approx(want[key], abs=ATOL), (key, got["step"])


@pytest.mark.parametrize("data", ["tensor", "loader"])
def test_two_ranks_match_one_process_with_the_same_global_batch(distributed_results, single_process, data):
    _, results = distributed_results
    assert single_process["stop_reason"] == "target_fooling_rate"  # the stop is decided by the fooling rate
    assert any(0 < record["fooling_rate"] < 1 for record in single_process["history"])  # skip_fooled acts
    for rank_result in results:
        assert_same_fit(rank_result[data], single_process)
    torch.testing.assert_close(results[0][data]["perturbation"], results[1][data]["perturbation"], atol=0, rtol=0)


def test_ranks_that_shuffle_their_shards_still_hold_one_perturbation(distributed_results):
    _, results = distributed_results
    first, second = (result["shuffled"] for result in results)
    assert first["n_iter"] == second["n_iter"] == 3 * (N_FACES // GLOBAL_BATCH)
    torch.testing.assert_close(first["perturbation"], second["perturbation"], atol=0, rtol=0)
    assert first["history"][0]["loss"] == second["history"][0]["loss"]  # records are averaged over the ranks


def test_only_rank_zero_writes_files(distributed_results):
    folder, _ = distributed_results
    assert (folder / "attack-0.safetensors").is_file()
    assert not (folder / "attack-1.safetensors").exists()
    assert not (folder / "checkpoint-1.pt").exists()
    assert (folder / "checkpoint-0.pt").is_file()


def test_helpers_are_identities_without_a_process_group():
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    x = random_faces(5)
    assert distributed.shard(x) is x
    assert distributed.mean_over_ranks({"loss": 0.5}, 3) == ({"loss": 0.5}, 3)
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    parameter = nn.Parameter(torch.ones(2))
    parameter.grad = torch.full((2,), 3.0)
    distributed.average_gradients([parameter])
    assert parameter.grad.tolist() == [3.0, 3.0]


def test_shard_indices_interleave_into_the_global_batches():
    shards = [distributed.shard_indices(24, rank, WORLD_SIZE) for rank in range(WORLD_SIZE)]
    assert shards[0][:4] == [0, 2, 4, 6] and shards[1][:4] == [1, 3, 5, 7]
    assert sorted(shards[0] + shards[1]) == list(range(24))
    # Uneven: padded by wrapping around, like DistributedSampler(shuffle=False).
    assert [distributed.shard_indices(5, rank, 3) for rank in range(3)] == [[0, 3], [1, 4], [2, 0]]
    assert [distributed.shard_indices(1, rank, 3) for rank in range(3)] == [[0], [0], [0]]
    with pytest.raises(ValueError, match="rank"):
        distributed.shard_indices(4, 2, 2)
