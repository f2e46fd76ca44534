"""Fit one KRT-FUAP perturbation with several processes (``torchrun``), one shard of faces each.

Usage
-----
torchrun --standalone --nproc_per_node=2 examples/fit_distributed.py ../shared/assets/faces --max-faces 256
torchrun --standalone --nproc_per_node=8 examples/fit_distributed.py FACES --amp --channels-last   # 8 GPUs

``UAPAttack.fit`` runs data-parallel by itself once ``torch.distributed`` is
initialised: each process reads its shard of the ``DataLoader`` (a
``DistributedSampler`` is put in), the gradients of the shared noise and flow are
averaged across processes, and all of them stop together. ``--batch-size`` is per
process. Rank 0 writes the attack and judges it on the held-out identities. Run
with plain ``python`` it fits in one process.

The folder holds aligned 112x112 faces as ``<identity>/<image>.jpg``. The model is
InsightFace ``w600k_mbf`` (``threshold`` 0.202: its best-accuracy threshold on LFW).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from krtfuap import UAPAttack
from krtfuap.datasets import FaceFolder, split_identities
from krtfuap.distributed import is_main_process, world_size
from krtfuap.models import load_insightface_mbf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("faces", type=Path)
    parser.add_argument("--max-faces", type=int, default=256, help="faces per half (fit / held-out)")
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--max-time", type=float, default=None, help="seconds of fitting at most")
    parser.add_argument("--threshold", type=float, default=0.202)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--output", type=Path, default=Path("cloak.safetensors"))
    args = parser.parse_args()
    for name in ('max_faces', 'batch_size', 'max_epochs', 'max_time'):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")

    launched = "RANK" in os.environ  # set by torchrun
    if launched:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    try:
        fit_ids, held_out_ids = split_identities(FaceFolder(args.faces).identities, 0.5, random_state=0)
        fit_set = FaceFolder(args.faces, identities=fit_ids)
        held_out = FaceFolder(args.faces, identities=held_out_ids)
        fit_loader = DataLoader(Subset(fit_set, range(min(args.max_faces, len(fit_set)))), batch_size=args.batch_size)

        attack = UAPAttack(
            load_insightface_mbf().to(device), threshold=args.threshold, stealth_loss="ssim",
            target_fooling_rate=0.8, max_epochs=args.max_epochs, max_time=args.max_time, batch_size=args.batch_size,
            random_state=0, amp=args.amp, channels_last=args.channels_last, verbose=True,
        )
        attack.fit(fit_loader)
        attack.save(args.output)  # writes on rank 0 only
        if is_main_process():
            print(
                f"{world_size()} process(es), global batch {args.batch_size * world_size()}: {attack.n_iter_} steps, "
                f"{attack.n_epochs_} epochs, stopped by {attack.stop_reason_}, fit fooling rate "
                f"{attack.fooling_rate_:.3f}"
            )
            test_loader = DataLoader(Subset(held_out, range(min(args.max_faces, len(held_out)))), batch_size=64)
            print("held-out identities:", attack.evaluate(test_loader))
            print(f"saved {args.output}")
    finally:
        if launched:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
