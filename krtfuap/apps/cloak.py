"""Cloak real photos: detect every face, paste the universal perturbation onto it, save, verify.

:class:`PhotoCloak` works on one photo (a ``(H, W, 3)`` uint8 RGB array) or on
files and folders (:meth:`PhotoCloak.cloak_files`, behind ``krtfuap cloak``):

1. SCRFD finds each face and its five keypoints (:mod:`krtfuap.alignment`);
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
   box and of the whole photo.

Originals are never written: outputs inside an input folder are refused. EXIF
metadata is not copied (its orientation is applied to the pixels; GPS and camera
data are dropped on purpose); an RGB photo's ICC colour profile is kept.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from krtfuap.alignment import SCRFDDetector, align_face, detect_faces, photo_to_tensor, tensor_to_photo
from krtfuap.datasets import is_image_file, load_image
from krtfuap.metrics import cosine_similarity, embed, fooled_by_similarity, psnr, ssim
from krtfuap.paste import box_pixels, paste_perturbation
from krtfuap.refine import refine_on_photo

__all__ = ["DetectedFace", "FaceReport", "PhotoCloak", "plan_outputs", "read_photo", "write_photo"]

_FORMATS = {"png": ("PNG", ".png"), "jpeg": ("JPEG", ".jpg")}


@dataclass(frozen=True)
class DetectedFace:
    """One face found in a photo: box ``(x1, y1, x2, y2)`` and five ``(x, y)`` keypoints, in photo pixels."""

    box: np.ndarray
    score: float
    keypoints: np.ndarray


@dataclass
class FaceReport:
    """What happened to one face (or to a photo without faces, ``face = -1``), one row of the report."""

    photo: str
    output: str
    face: int
    status: str
    detection_score: float = math.nan
    box: list[float] = field(default_factory=list)
    redetected: bool | None = None
    similarity: float = math.nan
    threshold: float = math.nan
    protected: bool | None = None
    ssim_face: float = math.nan
    psnr_face: float = math.nan
    ssim_photo: float = math.nan
    psnr_photo: float = math.nan
    message: str = ""


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
    """Write ``(H, W, 3)`` uint8 RGB as PNG or JPEG (``quality`` 1-100), creating parent folders."""
    pil_format, _ = _FORMATS[file_format]
    options: dict[str, object] = {"quality": quality} if pil_format == "JPEG" else {}
    if icc_profile:
        options["icc_profile"] = icc_profile
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format=pil_format, **options)


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


class PhotoCloak:
    """Cloak the faces of real photos (a perturbation refined on each face, or the universal one), and check it.

    Parameters
    ----------
    attack : krtfuap.estimator.PerturbationEstimator
        A fitted attack (e.g. :class:`krtfuap.UAPAttack` or
        :func:`krtfuap.pretrained.default_cloak`); its ``perturbation_`` ``(3, S, S)``
        lives on the ``S x S`` ArcFace template and ``epsilon`` bounds it.
    detector : SCRFDDetector, optional
        Face detector; by default ``SCRFDDetector(score_threshold=min_score)``.
    min_score : float
        Cloak faces the detector scores at least this, in ``[0, 1]``.
    min_size : float
        Cloak faces whose box is at least this many pixels wide and high.
    feather : float
        Width, in aligned-face pixels, of the border over which the cloak fades out.
    model : torch.nn.Module, optional
        The recogniser that judges :meth:`verify` (images ``(B, 3, H, W)`` in
        ``[0, 1]`` to embeddings); by default the attack's own model.
    threshold : float, optional
        Its verification threshold on cosine similarity; by default the attack's
        ``threshold_`` (pass one when ``model`` is another recogniser).
    refine_steps : int
        Gradient steps that make a perturbation for each face of each photo against
        the attack's own model (:func:`krtfuap.refine.refine_on_photo`; 40-70 ms
        per face and step on two CPU cores); 0: paste the universal perturbation as
        it is (instant, but little of it survives a JPEG save).
    refine_from : {"zero", "cloak"}
        Where the refinement starts: from no perturbation (measured as strong,
        stealthier and better at fooling other models) or from the attack's universal
        perturbation.
    refine_colour : bool
        Let the refinement change R, G and B apart; False: one luminance change
        (fine grain instead of coloured texture, a little weaker).
    target_ssim : float
        The face-box SSIM the refinement keeps above in its simulated save, in ``(0, 1]``.
    random_state : int, optional
        Seed of the refinement's random JPEG qualities and jitter (None: unseeded).
    """

    def __init__(
        self,
        attack,
        detector: SCRFDDetector | None = None,
        *,
        min_score: float = 0.5,
        min_size: float = 20.0,
        feather: float = 6.0,
        model: torch.nn.Module | None = None,
        threshold: float | None = None,
        refine_steps: int = 30,
        refine_from: str = "zero",
        refine_colour: bool = True,
        target_ssim: float = 0.945,
        random_state: int | None = 0,
    ) -> None:
        perturbation = getattr(attack, "perturbation_", None)
        if not isinstance(perturbation, torch.Tensor) or perturbation.ndim != 3 or perturbation.shape[0] != 3:
            raise ValueError(
                "attack must be a fitted krtfuap attack with a (3, S, S) perturbation_; call fit() first or load "
                "one (krtfuap.pretrained.default_cloak(), UAPAttack.load(path))."
            )
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {min_score}.")
        if model is not None and threshold is None:
            raise ValueError("a verification model needs its threshold: pass threshold= (cosine similarity).")
        if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
            raise ValueError(f"refine_steps must be an integer >= 0 (0: no refinement), got {refine_steps!r}.")
        if refine_from not in ("zero", "cloak"):
            raise ValueError(f"refine_from must be 'zero' or 'cloak', got {refine_from!r}.")
        if not 0.0 < target_ssim <= 1.0:
            raise ValueError(f"target_ssim must be in (0, 1], got {target_ssim}.")
        if refine_steps and getattr(attack, "model", None) is None:
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
        self.refine_from = refine_from
        self.refine_colour = bool(refine_colour)
        self.target_ssim = float(target_ssim)
        self.random_state = random_state

    # ------------------------------------------------------------------ one photo
    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """Faces of ``image`` (``(H, W, 3)`` uint8 RGB) passing ``min_score`` and ``min_size``, best first."""
        boxes, scores, keypoints = detect_faces(image, self.detector, self.min_score, self.min_size)
        return [DetectedFace(box, float(score), kps) for box, score, kps in zip(boxes, scores, keypoints)]

    def cloak(self, image: np.ndarray) -> tuple[np.ndarray, list[DetectedFace]]:
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
        faces : list of DetectedFace
            The faces cloaked.
        """
        faces = self.detect(image)
        if not faces:
            return image.copy(), faces
        perturbation = self.attack.perturbation_.float()
        keypoints, epsilon = [face.keypoints for face in faces], float(self.attack.epsilon)
        if not self.refine_steps:
            pasted = paste_perturbation(photo_to_tensor(image), perturbation.cpu(), keypoints, epsilon=epsilon,
                                        feather=self.feather)
            return tensor_to_photo(pasted), faces
        model = self.attack.model
        device = next(model.parameters(), perturbation).device
        generator = None if self.random_state is None else torch.Generator().manual_seed(self.random_state)
        start = perturbation if self.refine_from == "cloak" else torch.zeros_like(perturbation)
        refined = refine_on_photo(
            photo_to_tensor(image).to(device), start.to(device), keypoints, model, epsilon=epsilon,
            boxes=[face.box for face in faces], feather=self.feather, steps=self.refine_steps,
            target_ssim=self.target_ssim, colour=self.refine_colour, generator=generator,
        )
        return tensor_to_photo(refined.cpu()), faces

    def verify(self, original: np.ndarray, cloaked: np.ndarray, faces: Sequence[DetectedFace]) -> list[dict]:
        """Judge cloaked faces as a recogniser would: detect and align again, compare with the originals.

        Parameters
        ----------
        original, cloaked : numpy.ndarray
            ``(H, W, 3)`` uint8 RGB, the photo before and after (as read back from its file).
        faces : sequence of DetectedFace
            The faces found in ``original``.

        Returns
        -------
        list of dict
            Per face: ``redetected``, ``similarity`` (cosine of the two embeddings; NaN if the
            face is not found again), ``threshold``, ``protected`` (similarity below it, or not
            found), ``ssim_face``/``psnr_face`` over the face's box, ``ssim_photo``/``psnr_photo``.
        """
        self._check_judge()
        if original.shape != cloaked.shape:
            raise ValueError(f"original {original.shape} and cloaked {cloaked.shape} photos differ in size.")
        clean_photo, cloaked_photo = photo_to_tensor(original)[None], photo_to_tensor(cloaked)[None]
        photo_scores = {"ssim_photo": ssim(cloaked_photo, clean_photo).item(), "psnr_photo": _psnr(cloaked_photo, clean_photo)}
        found_again = self.detect(cloaked)
        results = []
        for face in faces:
            match = _best_match(face, found_again)
            result = {"redetected": match is not None, "similarity": math.nan, "threshold": self.threshold}
            if match is not None:
                pair = np.stack([align_face(original, face.keypoints), align_face(cloaked, match.keypoints)])
                embeddings = embed(self.model, photo_to_tensor(pair))
                result["similarity"] = cosine_similarity(embeddings[:1].cpu(), embeddings[1:].cpu()).item()
            result["protected"] = match is None or bool(fooled_by_similarity(result["similarity"], self.threshold))
            result.update(_box_scores(clean_photo, cloaked_photo, face.box))
            result.update(photo_scores)
            results.append(result)
        return results

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
        quality: int = 95,
        verify: bool = True,
        progress: bool = False,
    ) -> list[FaceReport]:
        """Cloak photos and folders of photos into ``output``, and report every face.

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
        progress : bool
            Show a progress bar over photos.

        Returns
        -------
        list of FaceReport
            One row per face; one row with ``face = -1`` for a photo without a face
            (copied unchanged) or one that could not be read (``status = "error"``,
            nothing written, the other photos go on).
        """
        if file_format is not None and file_format not in _FORMATS:
            raise ValueError(f"file_format must be 'png' or 'jpeg' (or None to follow the input), got {file_format!r}.")
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"quality must be an integer JPEG quality in 1-100, got {quality!r}.")
        if verify:
            self._check_judge()
        plan = plan_outputs(inputs, output, file_format)
        Path(output).mkdir(parents=True, exist_ok=True)
        rows: list[FaceReport] = []
        for source, target in _progress(plan, progress):
            rows += self._cloak_one(source, target, file_format, quality, verify)
        return rows

    def _cloak_one(self, source: Path, target: Path, file_format: str | None, quality: int, verify: bool) -> list[FaceReport]:
        try:
            image, icc_profile = read_photo(source)
        except (ValueError, OSError) as error:
            return [FaceReport(str(source), "", -1, "error", message=str(error))]
        cloaked, faces = self.cloak(image)
        if not faces:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            return [FaceReport(str(source), str(target), -1, "no face", message="no face found; copied unchanged")]
        chosen = file_format or ("jpeg" if source.suffix.lower() in (".jpg", ".jpeg") else "png")
        write_photo(target, cloaked, file_format=chosen, quality=quality, icc_profile=icc_profile)
        checks: list[dict] = [{} for _ in faces]
        if verify:
            written, _ = read_photo(target)
            checks = self.verify(image, written, faces)
        return [
            FaceReport(
                str(source), str(target), index, "cloaked", face.score, [round(float(v), 1) for v in face.box], **check
            )
            for index, (face, check) in enumerate(zip(faces, checks))
        ]


def _best_match(face: DetectedFace, candidates: Iterable[DetectedFace]) -> DetectedFace | None:
    """The candidate whose box overlaps ``face``'s most (IoU >= 0.5), or None."""
    best, best_iou = None, 0.5
    for candidate in candidates:
        iou = _iou(face.box, candidate.box)
        if iou >= best_iou:
            best, best_iou = candidate, iou
    return best


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    return math.inf if torch.equal(images, reference) else psnr(images, reference).item()


def _box_scores(clean: torch.Tensor, cloaked: torch.Tensor, box: np.ndarray) -> dict[str, float]:
    """SSIM and PSNR over the face's box (clipped to the photo), ``(1, 3, H, W)`` photos in ``[0, 1]``."""
    top, left, bottom, right = box_pixels(box, *clean.shape[-2:])
    if bottom - top < 2 or right - left < 2:
        return {"ssim_face": math.nan, "psnr_face": math.nan}
    a, b = cloaked[..., top:bottom, left:right], clean[..., top:bottom, left:right]
    return {"ssim_face": ssim(a, b).item(), "psnr_face": _psnr(a, b)}


def _progress(plan: list, enabled: bool):
    if not enabled:
        return plan
    from tqdm import tqdm

    return tqdm(plan, unit="photo", desc="cloaking")


def write_report(rows: Sequence[FaceReport], folder: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``cloak-report.csv`` and ``cloak-report.json`` (one entry per face) into ``folder``.

    Returns the two paths. In the JSON file a value that is not measured (NaN, or an infinite
    PSNR of an unchanged crop) is ``null``.
    """
    folder = Path(folder)
    records = [asdict(row) for row in rows]
    json_path, csv_path = folder / "cloak-report.json", folder / "cloak-report.csv"
    finite = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in records]
    json_path.write_text(json.dumps(finite, indent=1, allow_nan=False) + "\n")  # NaN / inf -> null: strict JSON
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(FaceReport.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(records)
    return csv_path, json_path


def summarise(rows: Sequence[FaceReport]) -> dict[str, float | int]:
    """Counts and means over a report: photos, faces, protected share, mean similarity and face SSIM."""
    faces = [row for row in rows if row.status == "cloaked"]
    judged = [row for row in faces if row.protected is not None]
    similarities = [row.similarity for row in judged if not math.isnan(row.similarity)]
    face_ssim = [row.ssim_face for row in faces if not math.isnan(row.ssim_face)]
    return {
        "photos": len({row.photo for row in rows}),
        "faces": len(faces),
        "photos_without_face": sum(row.status == "no face" for row in rows),
        "errors": sum(row.status == "error" for row in rows),
        "protected": sum(bool(row.protected) for row in judged),
        "protection_rate": sum(bool(row.protected) for row in judged) / len(judged) if judged else math.nan,
        "mean_similarity": float(np.mean(similarities)) if similarities else math.nan,
        "mean_ssim_face": float(np.mean(face_ssim)) if face_ssim else math.nan,
    }
