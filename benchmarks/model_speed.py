"""Forward and backward time per face of each face model, by batch size and weight memory format or precision.

The per-face cloak spends most of its time in forward and backward passes of its surrogates
(gradients to the input only). This script times one such pass per face model that is
installed, for each ``--batch-sizes`` value, with two variants of the model in turns within each
repeat, so that load from other processes hits both alike:

* ``--compare memory-format``: copies whose 4-D weights are stored channels-first
  (``torch.contiguous_format``) and channels-last. The loaders store the MobileFaceNets' weights
  channels-last (:func:`krtfuap.models._loading.channels_last`);
* ``--compare precision``: the model as loaded (float32) and under bfloat16 autocast
  (:class:`krtfuap.models.precision.BFloat16Autocast`, what ``krtfuap cloak`` runs its further
  surrogates in where the CPU has AMX).

The last column says what the second variant buys each model. Prints the median of ``--repeats`` in
milliseconds per face.

Example (2-core CPU)::

    python benchmarks/model_speed.py --threads 2 --batch-sizes 1 16
    python benchmarks/model_speed.py --threads 1 --batch-sizes 16 --compare precision
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from surrogate_ensembles import FOAMLIU_WEIGHTS

from krtfuap.models import load_face_model
from krtfuap.models.precision import BFloat16Autocast, fast_bfloat16

MODELS = {
    "insightface_mbf": None,
    "facenet_casia": None,
    "foamliu_mobilefacenet": FOAMLIU_WEIGHTS,
    "sface": None,
    "keras_facenet": None,
}


def pass_time(model: torch.nn.Module, faces: torch.Tensor, calls: int) -> float:
    """Seconds of one forward and backward pass (to the input) of ``model`` on ``faces``, over ``calls`` calls."""
    started = time.perf_counter()
    for _ in range(calls):
        leaf = faces.detach().requires_grad_(True)
        model(leaf).sum().backward()
    return (time.perf_counter() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--compare", choices=("memory-format", "precision"), default="memory-format")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {len(os.sched_getaffinity(0))} cores; "
          f"load average at start {os.getloadavg()[0]:.2f}; median of {args.repeats}; AMX bfloat16 "
          f"{'yes' if fast_bfloat16() else 'no'}\n")
    first, second = ("channels first", "channels last") if args.compare == "memory-format" else ("float32", "bfloat16")
    print(f"| model | batch | {first}, ms / face | {second}, ms / face | {second} / {first} |")
    print("|---|---|---|---|---|")
    for name in args.models:
        try:
            loaded = load_face_model(name, MODELS[name])
        except (ModuleNotFoundError, FileNotFoundError) as error:
            print(f"| {name} | - | not available: {error} | | |")
            continue
        if args.compare == "memory-format":
            variants = {"first": copy.deepcopy(loaded).to(memory_format=torch.contiguous_format),
                        "second": copy.deepcopy(loaded).to(memory_format=torch.channels_last)}
        else:
            variants = {"first": loaded, "second": BFloat16Autocast(loaded)}
        for batch in args.batch_sizes:
            faces = torch.rand(batch, 3, 112, 112, generator=torch.Generator().manual_seed(0))
            calls = max(1, 16 // batch)
            for model in variants.values():
                pass_time(model, faces, 2)  # warm-up
            times: dict[str, list[float]] = {key: [] for key in variants}
            for _ in range(args.repeats):
                for key, model in variants.items():
                    times[key].append(pass_time(model, faces, calls))
            ratio = statistics.median(later / former for later, former in zip(times["second"], times["first"]))
            print(f"| {name} | {batch} | {statistics.median(times['first']) * 1000 / batch:.1f} | "
                  f"{statistics.median(times['second']) * 1000 / batch:.1f} | {ratio:.2f} |", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
