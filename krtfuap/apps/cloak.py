"""Cloak real photos: detect every face, paste the universal perturbation onto it, save, verify.

:class:`PhotoCloak` works on one photo (a ``(H, W, 3)`` uint8 RGB array) or on
files and folders (:meth:`PhotoCloak.cloak_files`, behind ``krtfuap cloak``):

1. SCRFD finds each face and its five keypoints (:mod:`krtfuap.alignment`); each
   becomes one :class:`~krtfuap.photo_face.PhotoFace` (its alignment and the photo
   region around it), which the next steps share;
2. the fitted perturbation, defined on the aligned 112x112 face, is warped back
   onto the photo's pixel grid over each face (:func:`krtfuap.paste.paste_perturbation`)
   or, by default, a perturbation is made for that face in a few gradient steps
   through a simulated JPEG save and re-alignment (:func:`krtfuap.refine.refine_on_photo`,
   from zero by default);
3. the photo is rounded to 8 bits and written (PNG or JPEG at a given quality);
4. verification re-reads the written file, detects and aligns the faces again as
   a recogniser would, and compares each cloaked face with the same face of the
   original photo: cosine similarity, ``protected`` (similarity below the
   model's threshold, or the face no longer found), SSIM and PSNR of the face's
   box and of the whole photo, and whether that SSIM meets the stealth target;
   every further judge (:mod:`krtfuap.apps.judges`) adds its similarity and verdict,
   marked white box (one of the surrogates the cloak was refined against) or black box.

A photo that fails at any of these steps gets an ``error`` row and the others go
on; the report (:class:`CloakReport`) grows photo by photo, so an interrupted run
keeps what it did, and ``cloak_files(..., resume=True)`` (``krtfuap cloak --resume``)
cloaks only the photos it does not list as done, with the options of the first run
(``cloak-settings.json`` records them). Originals are never written: outputs
inside an input folder are refused. EXIF metadata is not copied (its orientation is
applied to the pixels; GPS and camera data are dropped on purpose); an RGB photo's ICC
colour profile is kept.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from krtfuap._files import write_text_atomically
from krtfuap._validation import (
    Boolean, FaceModelLike, InstanceOf, Interval, Options, SequenceOf, check_param, check_params,
)
from krtfuap.alignment import SCRFDDetector, align_face, detect_faces, photo_to_tensor, tensor_to_photo
from krtfuap.cloak_defaults import CLOAK_DEFAULTS
from krtfuap.apps.judges import Judge, ModelJudge, best_overlapping
from krtfuap.datasets import is_image_file, load_image
from krtfuap.metrics import HAARPSI_MIN_SIZE, haarpsi, psnr, ssim
from krtfuap.models.precision import full_precision
from krtfuap.paste import paste_perturbation
from krtfuap.photo_face import PhotoFace, locate_face
from krtfuap.refine import ARGUMENT_CONSTRAINTS as REFINE_CONSTRAINTS
from krtfuap.refine import check_downscale, refine_on_photos
from krtfuap.threads import default_num_threads, torch_threads

__all__ = [
    "CloakReport",
    "FaceReport",
    "PhotoCloak",
    "aligned_ssim",
    "box_scores",
    "plan_outputs",
    "read_photo",
    "read_report",
    "summarise",
    "write_photo",
    "write_report",
]

_FORMATS = {"png": ("PNG", ".png"), "jpeg": ("JPEG", ".jpg")}
#: The files in the output folder: the report, one row per face (CSV and JSON), and the options of the
#: run, compared when it is resumed.
REPORT_CSV, REPORT_JSON, SETTINGS_FILE = "cloak-report.csv", "cloak-report.json", "cloak-settings.json"
_DEFAULTS = CLOAK_DEFAULTS


@dataclass
class FaceReport:
    """What happened to one face (or to a photo without faces or that failed, ``face = -1``), one row of the report.

    ``ssim_face`` is standard SSIM (:func:`krtfuap.metrics.ssim`) over the detector's face box at the
    photo's own resolution, ``haarpsi_face`` the perceptual HaarPSI (:func:`krtfuap.metrics.haarpsi`,
    1: no visible change) over the same box; ``ssim_aligned`` over the ``S x S`` crops both photos give on the
    original's keypoints (what a recogniser sees; lower, as the crop enlarges a small face).
    ``stealth_met`` says whether ``ssim_face`` after the real save is at least ``target_ssim`` less
    :attr:`~krtfuap.cloak_defaults.CloakDefaults.stealth_tolerance` (None when not verified).
    ``white_box`` says whether the verification model is the attack's own or one the cloak was refined
    against.
    ``judges`` holds one dict per further judge (``PhotoCloak(judges=...)``): ``name``,
    ``threshold``, ``white_box``, ``similarity`` and ``protected``; the CSV spreads them over the
    columns ``similarity_<name>``, ``protected_<name>`` and ``white_box_<name>``.
    """

    photo: str
    output: str
    face: int
    status: str
    detection_score: float = math.nan
    box: list[float] = field(default_factory=list)
    redetected: bool | None = None
    similarity: float = math.nan
    threshold: float = math.nan
    white_box: bool | None = None
    protected: bool | None = None
    ssim_face: float = math.nan
    psnr_face: float = math.nan
    haarpsi_face: float = math.nan
    ssim_aligned: float = math.nan
    ssim_photo: float = math.nan
    psnr_photo: float = math.nan
    target_ssim: float = math.nan
    stealth_met: bool | None = None
    message: str = ""
    judges: list[dict] = field(default_factory=list)

    def as_record(self) -> dict:
        """The row as ``cloak-report.json`` holds it: a dict with every NaN or infinite float as None."""
        return _finite_or_none(asdict(self))


def read_photo(path: str | os.PathLike[str]) -> tuple[np.ndarray, bytes | None]:
    """Decode a photo for cloaking.

    Returns
    -------
    image : numpy.ndarray
        ``(H, W, 3)`` uint8 RGB, EXIF orientation applied (16-bit images rounded to 8 bits).
    icc_profile : bytes or None
        The colour profile of an RGB photo, to write back unchanged.

    Raises
    ------
    ValueError, FileNotFoundError
        As :func:`krtfuap.datasets.load_image` (the message names the file).
    """
    tensor = load_image(path)
    with Image.open(path) as image:
        icc_profile = image.info.get("icc_profile") if image.mode in ("RGB", "RGBA") else None
    return tensor_to_photo(tensor), icc_profile


def write_photo(path: Path, image: np.ndarray, *, file_format: str, quality: int, icc_profile: bytes | None) -> None:
    """Write ``(H, W, 3)`` uint8 RGB as PNG or JPEG (``quality`` 1-100), creating parent folders.

    The file is written beside ``path`` first and then moved there, so an interrupted write
    never leaves half a photo under ``path``.
    """
    pil_format, _ = _FORMATS[file_format]
    options: dict[str, object] = {"quality": quality} if pil_format == "JPEG" else {}
    if icc_profile:
        options["icc_profile"] = icc_profile
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    Image.fromarray(image).save(partial, format=pil_format, **options)
    os.replace(partial, path)


def _image_files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if is_image_file(path))


def plan_outputs(
    inputs: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str], file_format: str | None = None
) -> list[tuple[Path, Path]]:
    """Pair every input photo with its output path, refusing plans that could overwrite anything.

    A photo given as a file goes to ``output/<name>``; a folder is walked
    recursively and its structure kept under ``output``. With ``file_format``
    the extension becomes ``.png`` or ``.jpg``.

    Raises
    ------
    FileNotFoundError
        If an input does not exist.
    ValueError
        If ``output`` is an existing file, lies inside an input folder (or is one),
        no image is found, or two inputs map to one output.
    """
    if not inputs:
        raise ValueError("no input given; pass photos or folders of photos.")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"the output {output} is an existing file; pass a folder (it is created if missing).")
    resolved_output = output.resolve()
    plan: list[tuple[Path, Path]] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise FileNotFoundError(f"input {item} does not exist; pass existing photos or folders.")
        if item.is_dir():
            if resolved_output == item.resolve() or item.resolve() in resolved_output.parents:
                raise ValueError(
                    f"the output {output} is inside the input folder {item}: cloaked photos would mix with the "
                    "originals. Pass an output folder outside every input."
                )
            plan += [(path, output / path.relative_to(item)) for path in _image_files_under(item)]
        else:
            plan.append((item, output / item.name))
    if not plan:
        raise ValueError(f"no image files found in {', '.join(map(str, inputs))}.")
    if file_format is not None:
        plan = [(source, target.with_suffix(_FORMATS[file_format][1])) for source, target in plan]
    seen: dict[Path, Path] = {}
    for source, target in plan:
        if target.resolve() == source.resolve():
            raise ValueError(f"{source} would be overwritten; pass an output folder that differs from its folder.")
        if target in seen:
            raise ValueError(f"{seen[target]} and {source} would both be written to {target}; cloak them separately.")
        seen[target] = source
    return plan


class CloakReport:
    """``cloak-report.csv`` and ``cloak-report.json`` in a folder, one row per face, written as rows arrive.

    Creating it starts both files empty (the CSV with its header). Each :meth:`add` appends its
    rows to the CSV and rewrites the JSON file whole by a rename, so at any moment, even after an
    interrupted run, both list every photo added so far. In the JSON file a value that is not
    measured (NaN, or an infinite PSNR of an unchanged crop) is ``null``.

    Parameters
    ----------
    folder : path-like
        An existing folder.
    judges : sequence of str
        Names of the further judges, whose columns the CSV holds (see :class:`FaceReport`).
    rows : sequence of FaceReport
        Rows both files start with (a resumed run's earlier photos, :func:`read_report`).
    """

    def __init__(self, folder: str | os.PathLike[str], judges: Sequence[str] = (),
                 rows: Sequence[FaceReport] = ()) -> None:
        folder = Path(folder)
        self.csv_path, self.json_path = folder / REPORT_CSV, folder / REPORT_JSON
        self.rows: list[FaceReport] = list(rows)
        self.columns = [name for name in FaceReport.__dataclass_fields__ if name != "judges"]
        self.columns += [f"{kind}_{judge}" for judge in judges for kind in ("similarity", "protected", "white_box")]
        self.csv_path.write_text(self._csv_lines(self.rows, header=True), encoding="utf-8", newline="")
        self._write_json()

    def add(self, rows: Sequence[FaceReport]) -> None:
        """Append the rows of one photo to both files."""
        self.rows += rows
        with self.csv_path.open("a", encoding="utf-8", newline="") as handle:
            handle.write(self._csv_lines(rows, header=False))
        self._write_json()

    def _csv_lines(self, rows: Sequence[FaceReport], *, header: bool) -> str:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.columns, extrasaction="ignore")
        if header:
            writer.writeheader()
        for row in rows:
            record = asdict(row)
            for verdict in record.pop("judges"):
                record.update({f"{kind}_{verdict['name']}": verdict[kind]
                               for kind in ("similarity", "protected", "white_box")})
            writer.writerow(record)
        return text.getvalue()

    def _write_json(self) -> None:
        records = [row.as_record() for row in self.rows]
        text = json.dumps(records, indent=1, allow_nan=False) + "\n"  # NaN / inf -> null: strict JSON
        write_text_atomically(self.json_path, text)


def _finite_or_none(value):
    """``value`` with every NaN or infinite float in it (dicts and lists walked) replaced by None, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value


def read_report(folder: str | os.PathLike[str]) -> list[FaceReport]:
    """The rows of ``folder/cloak-report.json`` as :class:`CloakReport` wrote them (``null`` read back as NaN).

    Raises
    ------
    FileNotFoundError
        If the folder holds no ``cloak-report.json``.
    ValueError
        If the file is not such a report (damaged, or of another program), naming what is wrong.
    """
    path = Path(folder) / REPORT_JSON
    fix = f"delete {path} to cloak every photo again"
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a cloak report ({error}); {fix}.") from error
    if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
        raise ValueError(f"{path} is not a cloak report (not a list of rows); {fix}.")
    names = [item.name for item in fields(FaceReport)]
    floats = {item.name for item in fields(FaceReport) if item.type == "float"}
    rows = []
    for number, record in enumerate(records):
        if sorted(record) != sorted(names):
            raise ValueError(f"{path}: row {number} has the fields {sorted(record)}, not a cloak report's; {fix}.")
        verdicts = record["judges"]
        if not (isinstance(record["photo"], str) and isinstance(record["output"], str)
                and isinstance(verdicts, list) and all(isinstance(verdict, dict) for verdict in verdicts)):
            raise ValueError(f"{path}: row {number} is damaged (photo, output or judges of the wrong type); {fix}.")
        record = {key: math.nan if key in floats and value is None else value for key, value in record.items()}
        record["judges"] = [{key: math.nan if key in ("threshold", "similarity") and value is None else value
                             for key, value in verdict.items()} for verdict in verdicts]
        rows.append(FaceReport(**record))
    return rows


def write_report(rows: Sequence[FaceReport], folder: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``rows`` as ``cloak-report.csv`` and ``cloak-report.json`` into ``folder`` at once (:class:`CloakReport`).

    Returns the two paths (CSV, JSON).
    """
    report = CloakReport(folder, _judge_names(rows))
    report.add(rows)
    return report.csv_path, report.json_path


def _is_model_and_threshold(item: object) -> bool:
    """Whether ``item`` is a ``(torch.nn.Module, number)`` pair."""
    return (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], torch.nn.Module)
            and Interval(float).admits_type(item[1]))


class PhotoCloak:
    """Cloak the faces of real photos (a perturbation refined on each face, or the universal one), and check it.

    Every parameter is checked here, before any model runs; an error names the parameter.

    Parameters
    ----------
    attack : krtfuap.estimator.PerturbationEstimator
        A fitted attack (e.g. :class:`krtfuap.UAPAttack` or
        :func:`krtfuap.pretrained.default_cloak`); its ``perturbation_`` ``(3, S, S)``
        lives on the ``S x S`` ArcFace template and ``epsilon`` bounds it.
    detector : SCRFDDetector, optional
        Face detector (anything with SCRFD's ``detect``); by default
        ``SCRFDDetector(score_threshold=min_score)``.
    min_score : float
        Cloak faces the detector scores at least this, in ``[0, 1]``.
    min_size : float
        Cloak faces whose box is at least this many pixels wide and high, ``>= 0``.
    feather : float
        Width, in aligned-face pixels, of the border over which the cloak fades out, ``>= 0``.
    model : torch.nn.Module, optional
        The recogniser that judges :meth:`verify` (images ``(B, 3, H, W)`` in
        ``[0, 1]`` to embeddings); by default the attack's own model.
    threshold : float, optional
        Its verification threshold on cosine similarity, in ``[-1, 1]``; by default the
        attack's ``threshold_`` (pass one when ``model`` is another recogniser).
    refine_steps : int
        Gradient steps that make a perturbation for each face of each photo against
        the surrogates (:func:`krtfuap.refine.refine_on_photos`, which returns each
        face's best scored state; the default 45 steps took 1.5 s per face against ``w600k_mbf``
        alone and 2.6 s against :func:`~krtfuap.pretrained.default_surrogates` (FaceNet in
        bfloat16), in batches of 16 faces on two idle CPU cores, writing and verification
        included); 0: paste the universal perturbation as it is (instant, but little of it
        survives a JPEG save).
    batch_faces : int
        Most faces refined together (``>= 1``): :meth:`cloak_many` and :meth:`cloak_files` gather
        consecutive photos while they hold at most this many faces and refine them in one batched
        pass per model and step (:func:`krtfuap.refine.refine_on_photos`), which on a CPU costs far
        less per face than a pass per photo; a photo with more faces goes alone. A photo's result does not
        depend on the photos beside it (up to floating-point rounding).
    refine_from : {"zero", "cloak"}
        Where the refinement starts: from no perturbation (measured as strong,
        stealthier and better at fooling other models) or from the attack's universal
        perturbation.
    refine_lr : float
        The refinement's Adam learning rate, in image units (``> 0``).
    refine_colour : bool
        Let the refinement change R, G and B apart; False: one luminance change
        (fine grain instead of coloured texture, a little weaker).
    downscale : (float, float)
        Range of the side scale, within ``(0, 1]``, the refinement's simulated save shrinks the
        photo to at every step (a platform's resize); ``(1, 1)``: none.
    smoothing : float
        Gaussian sigma, in aligned-face pixels, of the blur on the refined change (``>= 0``; 0: none).
    input_diversity : float
        Probability per refinement step, in ``[0, 1]``, that the faces reach the surrogates shrunk to
        a random side scale in ``[diversity_min_scale, 1]`` and zero-padded back; 0: never.
    diversity_min_scale : float
        Smallest side scale of that shrink, in ``(0, 1]``.
    surrogates : sequence of (torch.nn.Module, float), optional
        The face models the refinement works against, each with its cosine threshold in
        ``[-1, 1]`` (one batched pass per model and step; the loss pushes the worst member below
        its threshold, :func:`krtfuap.losses.worst_member_loss`). None: the attack's own model
        and ``threshold_``.
    judges : sequence of Judge, optional
        Further recognisers that judge every face in :meth:`verify`
        (:class:`~krtfuap.apps.judges.ModelJudge`, :class:`~krtfuap.apps.judges.DlibJudge`);
        each is marked white box when its model is the attack's or one of the surrogates. Names must differ.
    target_ssim : float
        The face-box SSIM the refinement keeps above in its simulated save, in ``(0, 1]``;
        the report flags faces that miss it after the real save (``stealth_met``).
    random_state : int, optional
        Seed (``>= 0``) of the refinement's random JPEG qualities and jitter (None: unseeded).
    num_threads : int, optional
        Torch threads while cloaking and verifying (``>= 1``; the previous setting is restored
        after each call); by default :func:`krtfuap.threads.default_num_threads`, the cores other
        work leaves free.
    """

    #: What each parameter accepts (checked at construction, before any model runs).
    _parameter_constraints: dict[str, list] = {
        "detector": [InstanceOf(SCRFDDetector, description="an SCRFDDetector"), None],
        "min_score": [Interval(float, 0.0, 1.0)],
        "min_size": [Interval(float, 0.0, None, hint=" (pixels)")],
        "feather": [Interval(float, 0.0, None, hint=" (aligned-face pixels)")],
        "model": [FaceModelLike(), None],
        "threshold": REFINE_CONSTRAINTS["threshold"],
        "refine_steps": [Interval(int, 0, None, hint=" (0: no refinement)")],
        "batch_faces": [Interval(int, 1, None, hint=" (faces refined together)")],
        "refine_from": [Options("zero", "cloak")],
        "refine_lr": REFINE_CONSTRAINTS["lr"],
        "refine_colour": REFINE_CONSTRAINTS["colour"],
        "downscale": [SequenceOf(lambda item: isinstance(item, (int, float)) and 0.0 < item <= 1.0,
                                 description="a (low, high) range of side scales within (0, 1]")],
        "smoothing": REFINE_CONSTRAINTS["smoothing"],
        "input_diversity": REFINE_CONSTRAINTS["input_diversity"],
        "diversity_min_scale": REFINE_CONSTRAINTS["diversity_min_scale"],
        "surrogates": [SequenceOf(_is_model_and_threshold,
                                  description="a list of (torch.nn.Module, threshold) pairs"), None],
        "judges": [SequenceOf(lambda item: isinstance(item, Judge),
                              description="a list of krtfuap.apps.judges.Judge (ModelJudge, DlibJudge)"), None],
        "target_ssim": REFINE_CONSTRAINTS["target_ssim"],
        "random_state": [Interval(int, 0, None), None],
        "num_threads": [Interval(int, 1, None), None],
    }

    def __init__(
        self,
        attack,
        detector: SCRFDDetector | None = None,
        *,
        min_score: float = _DEFAULTS.min_score,
        min_size: float = _DEFAULTS.min_size,
        feather: float = _DEFAULTS.feather,
        model: torch.nn.Module | None = None,
        threshold: float | None = None,
        refine_steps: int = _DEFAULTS.refine_steps,
        batch_faces: int = _DEFAULTS.batch_faces,
        refine_from: str = _DEFAULTS.refine_from,
        refine_lr: float = _DEFAULTS.lr,
        refine_colour: bool = _DEFAULTS.refine_colour,
        downscale: tuple[float, float] = _DEFAULTS.downscale,
        smoothing: float = _DEFAULTS.smoothing,
        input_diversity: float = _DEFAULTS.input_diversity,
        diversity_min_scale: float = _DEFAULTS.diversity_min_scale,
        surrogates: Sequence[tuple[torch.nn.Module, float]] | None = None,
        judges: Sequence[Judge] | None = None,
        target_ssim: float = _DEFAULTS.target_ssim,
        random_state: int | None = _DEFAULTS.random_state,
        num_threads: int | None = None,
    ) -> None:
        _check_attack(attack)
        given = dict(locals())
        check_params(given, self._parameter_constraints)
        for index, (_, surrogate_threshold) in enumerate(surrogates or []):
            check_param(f"surrogates[{index}] threshold", surrogate_threshold,
                        [Interval(float, -1.0, 1.0, hint=" (a cosine similarity)")])
        check_downscale(downscale)
        names = [judge.name for judge in judges or []]
        if len(set(names)) != len(names):
            raise ValueError(f"judges must have different names (they name report columns), got {names}.")
        if model is not None and threshold is None:
            raise ValueError("a verification model needs its threshold: pass threshold= (cosine similarity).")
        if refine_steps and surrogates is None and getattr(attack, "model", None) is None:
            raise ValueError(
                "refining the cloak on each photo needs the attack's face model: load it with one "
                "(UAPAttack.load(path, model=...)) or pass refine_steps=0 to paste the perturbation as it is."
            )
        self.attack = attack
        self.detector = detector if detector is not None else SCRFDDetector(score_threshold=min_score)
        self.min_score = float(min_score)
        self.min_size = float(min_size)
        self.feather = float(feather)
        self.model = model if model is not None else getattr(attack, "model", None)
        self.threshold = float(threshold) if threshold is not None else getattr(attack, "threshold_", None)
        self.refine_steps = refine_steps
        self.batch_faces = batch_faces
        self.refine_from = refine_from
        self.refine_lr = refine_lr
        self.refine_colour = refine_colour
        self.downscale = downscale
        self.smoothing = smoothing
        self.input_diversity = input_diversity
        self.diversity_min_scale = diversity_min_scale
        self.surrogates = surrogates
        self.judges = judges
        self.target_ssim = float(target_ssim)
        self.random_state = random_state
        self.num_threads = num_threads

    def _threads(self) -> AbstractContextManager[None]:
        """Torch's thread count set to ``num_threads`` (or the default) for a block, restored after it."""
        return torch_threads(self.num_threads if self.num_threads is not None else default_num_threads())

    # ------------------------------------------------------------------ one photo
    def detect(self, image: np.ndarray) -> list[PhotoFace]:
        """Faces of ``image`` (``(H, W, 3)`` uint8 RGB) passing ``min_score`` and ``min_size``, best first."""
        boxes, scores, keypoints = detect_faces(image, self.detector, self.min_score, self.min_size)
        size = self.attack.perturbation_.shape[-1]
        return [locate_face(points, image.shape[:2], box=box, score=float(score), size=size)
                for box, score, points in zip(boxes, scores, keypoints)]

    def cloak(self, image: np.ndarray) -> tuple[np.ndarray, list[PhotoFace]]:
        """Cloak every face of one photo.

        Parameters
        ----------
        image : numpy.ndarray
            ``(H, W, 3)`` uint8 RGB.

        Returns
        -------
        cloaked : numpy.ndarray
            ``(H, W, 3)`` uint8 RGB; equal to ``image`` outside the faces' aligned squares
            (and everywhere when no face is found). With ``refine_steps`` the result
            depends on ``random_state`` and on the photo, not on other photos cloaked before.
        faces : list of PhotoFace
            The faces cloaked.
        """
        return self.cloak_many([image])[0]

    def cloak_many(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, list[PhotoFace]]]:
        """Cloak every face of several photos, refining up to ``batch_faces`` faces together.

        Parameters
        ----------
        images : sequence of numpy.ndarray
            ``(H_i, W_i, 3)`` uint8 RGB photos.

        Returns
        -------
        list of (numpy.ndarray, list of PhotoFace)
            Per photo, what :meth:`cloak` returns for it (the same, up to floating-point rounding).
        """
        with self._threads():
            faces = [self.detect(image) for image in images]
            cloaked: list[np.ndarray] = []
            for group in face_batches([len(photo_faces) for photo_faces in faces], self.batch_faces):
                cloaked += self.cloak_detected([images[index] for index in group], [faces[index] for index in group])
        return list(zip(cloaked, faces))

    def cloak_detected(self, images: Sequence[np.ndarray], faces: Sequence[Sequence[PhotoFace]]) -> list[np.ndarray]:
        """Cloak the given faces of photos, all refined together (one batch, whatever its size).

        Parameters
        ----------
        images : sequence of numpy.ndarray
            ``(H_i, W_i, 3)`` uint8 RGB photos.
        faces : sequence of sequence of PhotoFace
            Per photo, the faces to cloak (:meth:`detect`); a photo without any comes back as a copy.

        Returns
        -------
        list of numpy.ndarray
            The cloaked photos, ``(H_i, W_i, 3)`` uint8 RGB, in order.
        """
        if len(faces) != len(images):
            raise ValueError(f"faces must give one list per photo: {len(faces)} for {len(images)} photos.")
        with self._threads():
            perturbation = self.attack.perturbation_.float()
            epsilon = float(self.attack.epsilon)
            with_faces = [index for index, photo_faces in enumerate(faces) if photo_faces]
            cloaked = [image.copy() for image in images]
            if not with_faces:
                return cloaked
            if not self.refine_steps:
                for index in with_faces:
                    pasted = paste_perturbation(photo_to_tensor(images[index]), perturbation.cpu(), faces[index],
                                                epsilon=epsilon, feather=self.feather)
                    cloaked[index] = tensor_to_photo(pasted)
                return cloaked
            models, thresholds = self._surrogate_models()
            device = next(models[0].parameters(), perturbation).device
            generators = [None if self.random_state is None else torch.Generator().manual_seed(self.random_state)
                          for _ in with_faces]  # each photo draws as it would alone
            start = perturbation if self.refine_from == "cloak" else torch.zeros_like(perturbation)
            refined = refine_on_photos(
                [photo_to_tensor(images[index]).to(device) for index in with_faces], start.to(device),
                [faces[index] for index in with_faces], models, epsilon=epsilon, threshold=thresholds,
                feather=self.feather, steps=self.refine_steps, lr=float(self.refine_lr), target_ssim=self.target_ssim,
                downscale=tuple(self.downscale), smoothing=float(self.smoothing),
                input_diversity=float(self.input_diversity), diversity_min_scale=float(self.diversity_min_scale),
                colour=self.refine_colour, generators=generators,
            )
            for index, photo in zip(with_faces, refined):
                cloaked[index] = tensor_to_photo(photo.cpu())
            return cloaked

    def _surrogate_models(self) -> tuple[list[torch.nn.Module], list[float] | float | None]:
        """The models the refinement works against, and their thresholds."""
        if self.surrogates is None:
            return [self.attack.model], getattr(self.attack, "threshold_", None)
        return [model for model, _ in self.surrogates], [float(threshold) for _, threshold in self.surrogates]

    def _is_white_box(self, model: torch.nn.Module | None) -> bool:
        """Whether ``model`` is the attack's own (the universal perturbation's) or one the cloak was refined
        against (by identity, a bfloat16-run surrogate counting as its float32 model)."""
        refined_against = self._surrogate_models()[0] if self.refine_steps else []
        members = [full_precision(member) for member in [getattr(self.attack, "model", None), *refined_against]
                   if member is not None]
        return model is not None and any(full_precision(model) is member for member in members)

    def verify(self, original: np.ndarray, cloaked: np.ndarray, faces: Sequence[PhotoFace]) -> list[dict]:
        """Judge cloaked faces as a recogniser would: detect and align again, compare with the originals.

        Parameters
        ----------
        original, cloaked : numpy.ndarray
            ``(H, W, 3)`` uint8 RGB, the photo before and after (as read back from its file).
        faces : sequence of PhotoFace
            The faces found in ``original``.

        Returns
        -------
        list of dict
            Per face: ``redetected``, ``similarity`` (cosine of the two embeddings; NaN if the
            face is not found again), ``threshold``, ``protected`` (similarity below it, or not
            found), ``ssim_face``/``psnr_face``/``haarpsi_face`` over the face's box, ``ssim_aligned`` over the aligned
            crops, ``ssim_photo``/``psnr_photo``,
            ``target_ssim``, ``stealth_met``, ``white_box`` and ``judges`` (see :class:`FaceReport`).
        """
        self._check_judge()
        if original.shape != cloaked.shape:
            raise ValueError(f"original {original.shape} and cloaked {cloaked.shape} photos differ in size.")
        with self._threads():
            clean_photo, cloaked_photo = photo_to_tensor(original)[None], photo_to_tensor(cloaked)[None]
            photo_scores = {"ssim_photo": ssim(cloaked_photo, clean_photo).item(),
                            "psnr_photo": _psnr(cloaked_photo, clean_photo)}
            found_again = self.detect(cloaked)
            verifier = ModelJudge("model", self.model, self.threshold)
            results = []
            for face in faces:
                match = _best_match(face, found_again)
                result = {"redetected": match is not None, "threshold": self.threshold,
                          "white_box": self._is_white_box(self.model)}
                result["similarity"], result["protected"] = verifier.judge(original, cloaked, face, match)
                result.update(box_scores(clean_photo, cloaked_photo, face))
                result["ssim_aligned"] = aligned_ssim(original, cloaked, face)
                result.update(photo_scores)
                result["target_ssim"] = self.target_ssim
                result["stealth_met"] = _stealth_met(result["ssim_face"], self.target_ssim)
                result["judges"] = [self._judged(judge, original, cloaked, face, match) for judge in self.judges or []]
                results.append(result)
        return results

    def _judged(self, judge: Judge, original: np.ndarray, cloaked: np.ndarray, face: PhotoFace,
                match: PhotoFace | None) -> dict:
        similarity, protected = judge.judge(original, cloaked, face, match)
        return {"name": judge.name, "threshold": judge.threshold, "white_box": self._is_white_box(judge.model),
                "similarity": similarity, "protected": protected}

    def _check_judge(self) -> None:
        if self.model is None or self.threshold is None:
            raise ValueError(
                "verification needs a face model and its threshold: pass model= and threshold= to PhotoCloak, "
                "or an attack that has both (loaded attacks have no model: UAPAttack.load(path, model=...))."
            )

    # ------------------------------------------------------------------ files
    def cloak_files(
        self,
        inputs: Sequence[str | os.PathLike[str]],
        output: str | os.PathLike[str],
        *,
        file_format: str | None = None,
        quality: int = _DEFAULTS.write_quality,
        verify: bool = True,
        report: bool = True,
        resume: bool = False,
        progress: bool = False,
    ) -> list[FaceReport]:
        """Cloak photos and folders of photos into ``output``, and report every face.

        A photo that fails anywhere (unreadable, or an error detecting, cloaking, writing or
        verifying it) gets an ``error`` row with the message, is named on stderr, leaves no
        output file, and the other photos go on. Ctrl-C (``KeyboardInterrupt``) stops the run;
        the report then lists the photos done.

        Parameters
        ----------
        inputs : sequence of path-like
            Photos, or folders walked recursively (their structure is kept under ``output``).
        output : path-like
            Folder for the cloaked photos; created if missing; never inside an input.
        file_format : {"png", "jpeg"}, optional
            Format of the written photos; by default JPEG for JPEG inputs and PNG otherwise.
        quality : int
            JPEG quality, 1-100.
        verify : bool
            Re-read each written photo and judge it with :meth:`verify`.
        report : bool
            Write ``cloak-report.csv`` and ``cloak-report.json`` into ``output``, photo by photo
            (:class:`CloakReport`).
        resume : bool
            Continue a run into the same ``output`` (needs ``report``): a photo that the report
            there lists without an error, and whose output file exists, is kept as it is, with its
            rows; the others (not begun, failed, or whose output is gone) are cloaked. Rows of photos
            that are no longer among ``inputs`` are dropped. A run whose options differ from the
            first run's (``cloak-settings.json`` in ``output``: the attack's perturbation, the models'
            weights and thresholds, every option of the cloak, ``file_format``, ``quality``,
            ``verify``) is refused with the differences named.
        progress : bool
            Show a progress bar over photos.

        Returns
        -------
        list of FaceReport
            One row per face; one row with ``face = -1`` for a photo without a face
            (copied unchanged) or one that failed (``status = "error"``); with ``resume``, the
            kept photos' rows first.
        """
        if file_format is not None and file_format not in _FORMATS:
            raise ValueError(f"file_format must be 'png' or 'jpeg' (or None to follow the input), got {file_format!r}.")
        check_param("quality", quality, [Interval(int, 1, 100, hint=" (JPEG quality)")])
        for name, flag in (("verify", verify), ("report", report), ("resume", resume), ("progress", progress)):
            check_param(name, flag, [Boolean()])
        if resume and not report:
            raise ValueError("resume=True reads the report of the earlier run; pass report=True (the default).")
        if verify:
            self._check_judge()
        plan = plan_outputs(inputs, output, file_format)
        judges = [judge.name for judge in self.judges or []] if verify else []
        rows: list[FaceReport] = []
        settings = self._run_settings(file_format, quality, verify) if report else {}
        if resume:
            _check_same_settings(output, settings)
            rows, plan = self._resumed(output, plan)
        Path(output).mkdir(parents=True, exist_ok=True)
        written = None
        if report:
            text = _settings_json(settings)
            write_text_atomically(Path(output) / SETTINGS_FILE, text)
            written = CloakReport(output, judges, rows)

        def finish(window: list[list[FaceReport] | _Detected]) -> None:
            for photo_rows in self._finish(window, file_format, quality, verify):
                for row in photo_rows:
                    if row.status == "error":
                        _say(f"error: {row.photo}: {row.message}", progress)
                if written is not None:
                    written.add(photo_rows)
                rows.extend(photo_rows)
                bar.update(1)

        with self._threads(), _progress(len(plan), progress) as bar:
            window: list[list[FaceReport] | _Detected] = []  # photos read, in order, nothing written for them yet
            for source, target in plan:
                item = self._read_and_detect(source, target)
                waiting = sum(len(other.faces) for other in window if isinstance(other, _Detected))
                if isinstance(item, _Detected) and _opens_batch(waiting, len(item.faces), self.batch_faces):
                    finish(window)
                    window = []
                window.append(item)
            finish(window)
        return rows

    def _run_settings(self, file_format: str | None, quality: int, verify: bool) -> dict:
        """What decides a run's outputs and its report, as JSON values: the attack's perturbation and each model
        by a digest of its tensors, the cloak's options, the options of :meth:`cloak_files` given, and the
        judges (name, threshold, model digest) when verifying."""
        surrogates = self.surrogates or []
        return {
            "perturbation": _digest([self.attack.perturbation_]),
            "epsilon": float(self.attack.epsilon),
            "model": None if self.model is None else _module_digest(self.model),
            "threshold": self.threshold,
            "surrogates": [[_module_digest(model), float(threshold)] for model, threshold in surrogates],
            **{name: getattr(self, name) for name in (
                "min_score", "min_size", "feather", "refine_steps", "refine_from", "refine_lr", "refine_colour",
                "smoothing", "input_diversity", "diversity_min_scale", "target_ssim", "random_state")},
            "downscale": list(self.downscale),
            "file_format": file_format,
            "quality": quality,
            "verify": verify,
            "judges": [[judge.name, float(judge.threshold),
                        None if judge.model is None else _module_digest(judge.model)]
                       for judge in self.judges or []] if verify else [],
        }

    @staticmethod
    def _resumed(output: str | os.PathLike[str], plan: list[tuple[Path, Path]]
                 ) -> tuple[list[FaceReport], list[tuple[Path, Path]]]:
        """What a resumed run keeps, and what it still cloaks: the rows of ``output``'s report for the photos
        of ``plan`` that are done (no error row, and the output file exists), and the rest of ``plan``."""
        if not (Path(output) / REPORT_JSON).is_file():
            return [], plan
        earlier = read_report(output)
        unfinished = {row.photo for row in earlier if row.status == "error" or not Path(row.output).is_file()}
        located = {photo: Path(photo).resolve() for photo in {row.photo for row in earlier} - unfinished}
        sources = {source: source.resolve() for source, _ in plan}
        done = set(located.values()) & set(sources.values())
        rows = [row for row in earlier if located.get(row.photo) in done]
        return rows, [(source, target) for source, target in plan if sources[source] not in done]

    def _read_and_detect(self, source: Path, target: Path) -> list[FaceReport] | _Detected:
        """A photo read with its faces found (maybe none), or an ``error`` row; nothing is written yet."""
        try:
            image, icc_profile = read_photo(source)
        except Exception as error:  # the message alone: an unreadable file says what it is
            return [FaceReport(str(source), "", -1, "error", message=_detail(error))]
        try:
            faces = self.detect(image)
        except Exception as error:
            return [_error_row(source, "detecting", error)]
        # A photo without a face is only copied: its pixels need not wait in memory with the batch.
        return _Detected(source, target, image if faces else None, icc_profile, faces)

    def _finish(self, window: list[list[FaceReport] | _Detected], file_format: str | None, quality: int,
                verify: bool) -> list[list[FaceReport]]:
        """Per photo of ``window``, in order, its rows: the photos with faces cloaked together, written and
        verified one by one, those without copied. When the batch fails, each photo is cloaked alone, so an
        error is its photo's."""
        detected = [item for item in window if isinstance(item, _Detected) and item.faces]
        try:
            outcomes: list[np.ndarray | Exception] = list(
                self.cloak_detected([item.image for item in detected], [item.faces for item in detected]))
        except KeyboardInterrupt:
            raise
        except Exception as error:
            outcomes = [error] if len(detected) == 1 else [self._cloak_alone(item) for item in detected]
        cloaked_of = {id(item): outcome for item, outcome in zip(detected, outcomes)}
        finished = []
        for item in window:
            if not isinstance(item, _Detected):
                finished.append(item)
            elif not item.faces:
                finished.append(_copy_unchanged(item))
            elif isinstance(cloaked_of[id(item)], Exception):
                finished.append([_error_row(item.source, "cloaking", cloaked_of[id(item)])])
            else:
                finished.append(self._write_and_verify(item, cloaked_of[id(item)], file_format, quality, verify))
        return finished

    def _cloak_alone(self, item: _Detected) -> np.ndarray | Exception:
        try:
            return self.cloak_detected([item.image], [item.faces])[0]
        except KeyboardInterrupt:
            raise
        except Exception as error:
            return error

    def _write_and_verify(self, item: _Detected, cloaked: np.ndarray, file_format: str | None, quality: int,
                          verify: bool) -> list[FaceReport]:
        """The rows of one cloaked photo; an ``error`` row (and no output left behind) if writing or verifying fails."""
        stage = "writing"
        try:
            chosen = file_format or ("jpeg" if item.source.suffix.lower() in (".jpg", ".jpeg") else "png")
            write_photo(item.target, cloaked, file_format=chosen, quality=quality, icc_profile=item.icc_profile)
            checks: list[dict] = [{"target_ssim": self.target_ssim} for _ in item.faces]
            if verify:
                stage = "verifying"
                checks = self.verify(item.image, read_photo(item.target)[0], item.faces)
        except KeyboardInterrupt:  # stops the run; what is on disk stays what the report lists
            item.target.unlink(missing_ok=True)
            raise
        except Exception as error:  # any other failure is this photo's alone
            item.target.unlink(missing_ok=True)
            return [_error_row(item.source, stage, error)]
        return [
            FaceReport(str(item.source), str(item.target), index, "cloaked", face.score,
                       [round(float(v), 1) for v in face.box], **check)
            for index, (face, check) in enumerate(zip(item.faces, checks))
        ]


@dataclass
class _Detected:
    """A photo read and its faces found, waiting to be cloaked with the others of its batch."""

    source: Path
    target: Path
    image: np.ndarray | None  # (H, W, 3) uint8 RGB; None without faces (the photo is only copied)
    icc_profile: bytes | None
    faces: list[PhotoFace]


def _copy_unchanged(item: _Detected) -> list[FaceReport]:
    """The row of a photo without a face, copied unchanged to its target (or an ``error`` row)."""
    try:
        item.target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(item.source, item.target)
    except KeyboardInterrupt:
        item.target.unlink(missing_ok=True)
        raise
    except Exception as error:
        item.target.unlink(missing_ok=True)
        return [_error_row(item.source, "copying", error)]
    return [FaceReport(str(item.source), str(item.target), -1, "no face", message="no face found; copied unchanged")]


def _error_row(source: Path, stage: str, error: Exception) -> FaceReport:
    """The ``error`` row of a photo whose ``stage`` failed."""
    return FaceReport(str(source), "", -1, "error", message=f"{stage} failed: {_detail(error)}")


def _detail(error: Exception) -> str:
    """An error's message; with its type too unless it is an ``OSError`` or ``ValueError`` (which say enough)."""
    return str(error) if isinstance(error, (OSError, ValueError)) else f"{type(error).__name__}: {error}"


def face_batches(face_counts: Sequence[int], batch_faces: int) -> list[list[int]]:
    """Consecutive photo indices in groups of at most ``batch_faces`` faces (a photo with more is a group alone).

    Parameters
    ----------
    face_counts : sequence of int
        Faces per photo, ``>= 0``.
    batch_faces : int
        Most faces per group, ``>= 1``.

    Returns
    -------
    list of list of int
        The groups, covering ``range(len(face_counts))`` in order.
    """
    groups: list[list[int]] = []
    held = 0
    for index, count in enumerate(face_counts):
        if not groups or _opens_batch(held, count, batch_faces):
            groups.append([])
            held = 0
        groups[-1].append(index)
        held += count
    return groups


def _opens_batch(held: int, count: int, batch_faces: int) -> bool:
    """Whether a photo of ``count`` faces starts a new batch after one holding ``held`` faces (a batch of
    none takes any photo, so a photo with more than ``batch_faces`` faces goes alone)."""
    return held > 0 and held + count > batch_faces


def _check_attack(attack: object) -> None:
    """A fitted attack: a ``(3, S, S)`` ``perturbation_`` and an ``epsilon`` in ``(0, 1]``."""
    perturbation = getattr(attack, "perturbation_", None)
    if not isinstance(perturbation, torch.Tensor) or perturbation.ndim != 3 or perturbation.shape[0] != 3:
        raise ValueError(
            "attack must be a fitted krtfuap attack with a (3, S, S) perturbation_; call fit() first or load "
            "one (krtfuap.pretrained.default_cloak(), UAPAttack.load(path))."
        )
    check_param("attack.epsilon", getattr(attack, "epsilon", None), [Interval(float, 0.0, 1.0, closed="right")])


def _digest(tensors: Sequence[torch.Tensor], name: str = "") -> str:
    """A short SHA-256 of ``name`` and the values of ``tensors`` (as float32), to tell two runs' inputs apart."""
    digest = hashlib.sha256(name.encode())
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _module_digest(module: torch.nn.Module) -> str:
    """:func:`_digest` of a model's ``repr`` (its modules and their settings, e.g. an adapter's channel order,
    input size and flip averaging, which are not tensors) and its parameters and buffers."""
    return _digest(list(module.state_dict().values()), repr(module))


def _settings_json(settings: dict) -> str:
    """``settings`` as the text of ``cloak-settings.json`` (NumPy scalars as Python numbers)."""
    return json.dumps(settings, indent=1, default=lambda value: value.item() if isinstance(value, np.generic)
                      else repr(value)) + "\n"


def _check_same_settings(folder: str | os.PathLike[str], settings: dict) -> None:
    """Refuse to resume the run in ``folder`` with ``settings`` other than those it recorded, naming the
    differences; a folder without the record (nothing to resume, or a run of an older krtfuap) passes, and
    a setting the record lacks (one an older krtfuap did not record) is not compared."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        earlier = None
    if not isinstance(earlier, dict):
        raise ValueError(f"{path} is damaged; delete it to resume without comparing this run's options "
                         "with the first run's.")
    now = json.loads(_settings_json(settings))  # as read back: tuples as lists
    changed = [f"{key}: {earlier[key]!r} then, {now[key]!r} now"
               for key in sorted(set(earlier) & set(now)) if earlier[key] != now[key]]
    if changed:
        raise ValueError(
            f"the run in {folder} was made with other options ({'; '.join(changed)}): resume with the "
            "options of the first run, or cloak into a new folder."
        )


def _judge_names(rows: Sequence[FaceReport]) -> list[str]:
    """The further judges' names in ``rows``, in order of first appearance."""
    return list(dict.fromkeys(verdict["name"] for row in rows for verdict in row.judges))


def _stealth_met(face_ssim: float, target_ssim: float) -> bool | None:
    """Whether a face's SSIM after the real save meets the target, within the simulated save's usual lead."""
    return None if math.isnan(face_ssim) else face_ssim >= target_ssim - _DEFAULTS.stealth_tolerance


def _say(message: str, progress: bool) -> None:
    """One line on stderr (through the progress bar when one is shown)."""
    if progress:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def _best_match(face: PhotoFace, candidates: Sequence[PhotoFace]) -> PhotoFace | None:
    """The candidate whose box overlaps ``face``'s most (IoU >= 0.5), or None."""
    index = best_overlapping(face.box, [candidate.box for candidate in candidates], 0.5)
    return None if index is None else candidates[index]


def _psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    return math.inf if torch.equal(images, reference) else psnr(images, reference).item()


def box_scores(clean: torch.Tensor, cloaked: torch.Tensor, face: PhotoFace) -> dict[str, float]:
    """SSIM, PSNR and HaarPSI over the face's box (clipped to the photo), ``(1, 3, H, W)`` photos in
    ``[0, 1]``: ``ssim_face``, ``psnr_face`` and ``haarpsi_face`` of the report (NaN for a box under 2
    pixels a side; HaarPSI NaN under :data:`~krtfuap.metrics.HAARPSI_MIN_SIZE`)."""
    top, left, bottom, right = face.box_pixels
    if bottom - top < 2 or right - left < 2:
        return {"ssim_face": math.nan, "psnr_face": math.nan, "haarpsi_face": math.nan}
    a, b = cloaked[..., top:bottom, left:right], clean[..., top:bottom, left:right]
    perceptual = haarpsi(a, b).item() if min(a.shape[-2:]) >= HAARPSI_MIN_SIZE else math.nan
    return {"ssim_face": ssim(a, b).item(), "psnr_face": _psnr(a, b), "haarpsi_face": perceptual}


def aligned_ssim(original: np.ndarray, cloaked: np.ndarray, face: PhotoFace) -> float:
    """SSIM of the ``S x S`` crops of two ``(H, W, 3)`` uint8 photos aligned on the original's keypoints:
    ``ssim_aligned`` of the report."""
    crops = photo_to_tensor(np.stack([align_face(image, face.keypoints, face.size) for image in (cloaked, original)]))
    return ssim(crops[:1], crops[1:]).item()


def _progress(total: int, enabled: bool):
    """A progress bar over ``total`` photos (``update(n)`` as they finish), or one that shows nothing."""
    from tqdm import tqdm

    return tqdm(total=total, unit="photo", desc="cloaking", disable=not enabled)


def summarise(rows: Sequence[FaceReport]) -> dict[str, float | int]:
    """Counts and means over a report: photos, faces, errors, protected share, faces below the stealth target,
    mean similarity, face-box SSIM and HaarPSI, aligned-crop SSIM, and ``protection_rate_<name>`` and
    ``judged_<name>`` per further judge (the share over the faces it judged, and how many those were: a judge
    that finds no face in the original gives no verdict)."""
    faces = [row for row in rows if row.status == "cloaked"]
    judged = [row for row in faces if row.protected is not None]
    similarities = [row.similarity for row in judged if not math.isnan(row.similarity)]
    face_ssim = [row.ssim_face for row in faces if not math.isnan(row.ssim_face)]
    face_haarpsi = [row.haarpsi_face for row in faces if not math.isnan(row.haarpsi_face)]
    aligned_ssims = [row.ssim_aligned for row in faces if not math.isnan(row.ssim_aligned)]
    per_judge = {}
    for name in _judge_names(faces):
        verdicts = [verdict["protected"] for row in faces for verdict in row.judges
                    if verdict["name"] == name and verdict["protected"] is not None]
        per_judge[f"protection_rate_{name}"] = sum(verdicts) / len(verdicts) if verdicts else math.nan
        per_judge[f"judged_{name}"] = len(verdicts)
    return {
        "photos": len({row.photo for row in rows}),
        "faces": len(faces),
        "photos_without_face": sum(row.status == "no face" for row in rows),
        "errors": sum(row.status == "error" for row in rows),
        "judged": len(judged),
        "protected": sum(bool(row.protected) for row in judged),
        "protection_rate": sum(bool(row.protected) for row in judged) / len(judged) if judged else math.nan,
        "below_stealth_target": sum(row.stealth_met is False for row in faces),
        "mean_similarity": float(np.mean(similarities)) if similarities else math.nan,
        "mean_ssim_face": float(np.mean(face_ssim)) if face_ssim else math.nan,
        "mean_haarpsi_face": float(np.mean(face_haarpsi)) if face_haarpsi else math.nan,
        "mean_ssim_aligned": float(np.mean(aligned_ssims)) if aligned_ssims else math.nan,
        **per_judge,
    }
