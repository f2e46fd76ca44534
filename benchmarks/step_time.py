"""Time of one ``UAPAttack`` optimisation step against its floor, per face model.

What is timed
-------------
* **step**: one update of the fit loop, timed directly: the clean batch's
  embeddings (no grad) and the solver's ``step`` built by ``UAPAttack`` with its
  defaults and the SSIM stealth loss (``_make_solver``, the object ``fit`` builds:
  perturbation, adversarial forward + backward, stealth loss, Adam step +
  projection, one extra SSIM of the batch for ``history_`` and the ``.item()``
  reads of its record).
* **floor**: the work no implementation of the algorithm can skip: one forward of
  the clean batch without grad, plus one forward + backward of the perturbed batch
  through the face model and the stealth loss (here ``1 - SSIM``), with the
  perturbation as a plain leaf tensor.
* **fit(1 batch)** (unless ``--no-fit``): the public ``fit`` on a single batch with
  ``max_epochs=1``: one step plus fit's fixed set-up (checks, module building).
* breakdown of what the step adds to the floor: the extra no-grad SSIM for
  ``history_``, the perturbation module forward + backward (a flow warp only
  with key regions) and the Adam step + projection, each timed alone.

Every number is the median of ``--repeats`` timed calls after ``--warmup`` calls;
step, floor and the breakdown are called in turn within each repeat (so load from
other processes hits them alike) and step/floor is the median of the per-repeat
ratios.
Memory is ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak resident
set size of the process sampled every 2 ms while the steps run (``/proc``), or
``ru_maxrss`` (peak of the whole process so far) where ``/proc`` is missing.

Examples
--------
python benchmarks/step_time.py --batch-sizes 32 --repeats 3 --warmup 1
python benchmarks/step_time.py --device cuda --batch-sizes 32 128 --repeats 20
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from krtfuap._batches import FitData
from krtfuap.attack import UAPAttack
from krtfuap.losses import DirectionLoss
from krtfuap.metrics import ssim
from krtfuap.models import FaceEmbedder, iresnet50, load_foamliu_mobilefacenet, load_insightface_mbf
from krtfuap.stealth import resolve_stealth_loss

MODELS_DIR = Path(__file__).resolve().parents[2] / "shared" / "assets" / "models"
SIZE = 112
EPSILON = 0.08
THRESHOLD = 0.3


# ------------------------------------------------------------------- models
def available_models(names: list[str]) -> list[tuple[str, nn.Module]]:
    """The requested face models that can be loaded here, with a note for the others."""
    models = []
    for name in names:
        try:
            if name == "foamliu_mobilefacenet":
                path = MODELS_DIR / "foamliu_mobilefacenet_128d.pt"
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is absent")
                models.append((name, load_foamliu_mobilefacenet(path)))
            elif name == "insightface_mbf":
                models.append(("insightface_mbf (w600k_mbf)", load_insightface_mbf()))
            elif name == "iresnet50":
                torch.manual_seed(0)
                backbone = iresnet50()
                model = FaceEmbedder(backbone, input_size=(SIZE, SIZE), mean=(0.5,) * 3, std=(0.5,) * 3).eval()
                for parameter in model.parameters():
                    parameter.requires_grad_(False)
                models.append(("iresnet50 (random weights)", model))
            else:
                raise ValueError(f"unknown model {name!r}")
        except (FileNotFoundError, ModuleNotFoundError, ImportError, ValueError) as error:
            print(f"skipping {name}: {error}", file=sys.stderr)
    return models


# ------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class PeakMemory:
    """Peak memory while the ``with`` block runs, in MiB (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = float("nan")
        self.kind = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak_pages = 0

    def _rss_pages(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1])

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak_pages = max(self._peak_pages, self._rss_pages())
            time.sleep(0.002)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
        elif os.path.exists("/proc/self/statm"):
            self._peak_pages = self._rss_pages()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
            self.kind = "peak RSS (sampled)"
        else:
            self.kind = "ru_maxrss (process peak so far)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self._peak_pages, self._rss_pages()) * os.sysconf("SC_PAGE_SIZE") / 2**20
        else:
            scale = 1 if platform.system() == "Darwin" else 1024  # bytes on macOS, KiB on Linux
            self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


# ------------------------------------------------------------- one model
def measure(
    model: nn.Module, batch_size: int, device: torch.device, args: argparse.Namespace
) -> dict[str, float]:
    model = model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    images = torch.rand(batch_size, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).to(device)

    # The objects fit() builds for one run.
    attack = UAPAttack(model, threshold=THRESHOLD, stealth_loss=args.stealth, epsilon=EPSILON, batch_size=batch_size)
    embed = attack._embed_function(model)
    solver, _ = attack._make_solver(FitData(images.cpu(), batch_size), device, torch.Generator().manual_seed(0),
                                    embed, THRESHOLD)
    perturbation, optimizer = solver.module, solver.optimizer
    adversarial_loss = DirectionLoss("direction", reduction="none")
    stealth_loss, stealth_weight = resolve_stealth_loss(args.stealth, None)

    def step() -> None:
        with torch.no_grad():
            clean = embed(images)
        solver.step(images, clean)

    # Floor: what the algorithm cannot avoid.
    delta = perturbation().detach().clone().requires_grad_(True)

    def floor() -> None:
        with torch.no_grad():
            clean = model(images)
        adversarial = (images + delta).clamp(0.0, 1.0)
        loss = adversarial_loss(model(adversarial), clean).mean() + stealth_weight * stealth_loss(adversarial, images)
        delta.grad = None
        loss.backward()

    # The pieces the step adds to the floor, each alone.
    adversarial_fixed = (images + delta.detach()).clamp(0.0, 1.0)

    def extra_ssim() -> None:
        with torch.no_grad():
            ssim(adversarial_fixed, images).mean().item()

    def perturbation_module() -> None:
        optimizer.zero_grad(set_to_none=True)
        perturbation().sum().backward()

    def adam_and_project() -> None:
        for parameter in perturbation.parameters():
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
        perturbation.project_()

    # Step, floor and the pieces run interleaved, so that load from other processes
    # (shared CPUs) hits all of them alike; each number is the median of its own calls.
    timed = {"step": step, "floor": floor, "extra_ssim": extra_ssim, "perturbation": perturbation_module,
             "adam": adam_and_project}
    for _ in range(args.warmup):
        for fn in timed.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(args.repeats):
        for name, fn in timed.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    row: dict[str, float] = {name: statistics.median(values) for name, values in samples.items()}
    row["step_over_floor"] = statistics.median(s / f for s, f in zip(samples["step"], samples["floor"]))
    with PeakMemory(device) as memory:
        step()
    row["step_mem"] = memory.peak_mib
    with PeakMemory(device) as memory:
        floor()
    row["floor_mem"] = memory.peak_mib
    if not args.no_fit:
        def fit_one_batch() -> None:
            UAPAttack(
                model, threshold=THRESHOLD, stealth_loss=args.stealth, epsilon=EPSILON, max_epochs=1,
                batch_size=batch_size, random_state=0, device=device,
            ).fit(images)

        row["fit"] = median_time(fit_one_batch, device, min(args.warmup, 1), args.repeats)
    row["memory_kind"] = memory.kind  # type: ignore[assignment]
    return row


def transform_throughput(device: torch.device, batch_size: int, args: argparse.Namespace) -> tuple[float, float]:
    """Images per second of ``UAPAttack.transform`` on one batch, and its peak memory (MiB)."""
    attack = UAPAttack(nn.Identity())
    attack.perturbation_ = (torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1) * EPSILON
    attack.threshold_ = THRESHOLD
    images = torch.rand(batch_size, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).to(device)
    with PeakMemory(device) as memory:
        seconds = median_time(lambda: attack.transform(images), device, args.warmup, max(args.repeats, 3))
    return batch_size / seconds, memory.peak_mib


# ------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--models", nargs="+", default=["foamliu_mobilefacenet", "insightface_mbf", "iresnet50"],
        choices=["foamliu_mobilefacenet", "insightface_mbf", "iresnet50"],
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per number (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument("--stealth", default="ssim", choices=["ssim"], help="stealth loss (needs no weights)")
    parser.add_argument("--transform-batch", type=int, default=None, help="default: 1024 on CPU, 8192 on CUDA")
    parser.add_argument("--no-fit", action="store_true", help="skip the public fit(1 batch) column")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({torch.get_num_threads()} threads)"

    models = available_models(args.models)
    print(
        f"torch {torch.__version__}; device {device_name}; {SIZE}x{SIZE} faces; stealth loss {args.stealth}; "
        f"median of {args.repeats} after {args.warmup} warm-up; "
        "step = one fit-loop update (clean embeddings + the solver's step) timed directly\n"
    )
    header = "| model | device | batch | step ms | floor ms | step/floor | extra SSIM ms | perturbation ms | Adam+project ms |"
    align = "|---|---|---|---|---|---|---|---|---|"
    if not args.no_fit:
        header += " fit(1 batch) ms |"
        align += "---|"
    header += " step peak MiB | floor peak MiB |"
    align += "---|---|"
    print(header)
    print(align)
    memory_kind = ""
    for label, model in models:
        for batch_size in args.batch_sizes:
            row = measure(model, batch_size, device, args)
            memory_kind = row.pop("memory_kind")
            cells = [
                label, device_name, str(batch_size), f"{row['step'] * 1e3:.1f}", f"{row['floor'] * 1e3:.1f}",
                f"{row['step_over_floor']:.2f}", f"{row['extra_ssim'] * 1e3:.1f}",
                f"{row['perturbation'] * 1e3:.1f}", f"{row['adam'] * 1e3:.2f}",
            ]
            if not args.no_fit:
                cells.append(f"{row['fit'] * 1e3:.1f}")
            cells += [f"{row['step_mem']:.0f}", f"{row['floor_mem']:.0f}"]
            print("| " + " | ".join(cells) + " |", flush=True)
        model.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\nmemory: {memory_kind}")

    transform_batch = args.transform_batch or (8192 if device.type == "cuda" else 1024)
    rate, peak = transform_throughput(device, transform_batch, args)
    print("\n| transform | device | batch | images/s | peak MiB |")
    print("|---|---|---|---|---|")
    print(f"| UAPAttack.transform | {device_name} | {transform_batch} | {rate:,.0f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
