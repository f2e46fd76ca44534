"""The photo cloak's default settings, defined once.

:func:`krtfuap.paste.paste_perturbation`, :func:`krtfuap.refine.refine_on_photo`,
:class:`krtfuap.apps.cloak.PhotoCloak`, ``krtfuap cloak`` and ``krtfuap demo`` all take their
defaults from :data:`CLOAK_DEFAULTS`. The module imports nothing but the standard library, so
the command line reads it to build ``--help`` without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CloakDefaults", "CLOAK_DEFAULTS"]


@dataclass(frozen=True)
class CloakDefaults:
    """Defaults of the photo cloak (see :doc:`cloak` for what each does and how they were chosen).

    Attributes
    ----------
    min_score : float
        Detector score from which a face is cloaked, in ``[0, 1]``.
    min_size : float
        Smallest box side, in photo pixels, of a face that is cloaked.
    feather : float
        Width, in aligned-face pixels, of the border over which the cloak fades out.
    surrogates : tuple of str
        Face models (:func:`krtfuap.models.load_face_model` names) ``krtfuap cloak`` and ``krtfuap
        demo`` refine against at once: the ready cloak's model first, then each further one with its
        own threshold (:data:`krtfuap.models.FACE_MODEL_THRESHOLDS`); see
        :func:`krtfuap.pretrained.default_surrogates`.
    refine_steps : int
        Adam steps that make a perturbation for each face (0: paste the universal one).
    batch_faces : int
        Most faces ``krtfuap cloak`` refines together, gathered from consecutive photos: one batched
        pass per model and step over all of them, which costs a CPU far less per face than one pass
        per photo (:func:`krtfuap.refine.refine_on_photos`; a photo with more faces goes alone).
    refine_from : str
        Where the refinement starts: ``"zero"`` or ``"cloak"`` (the universal perturbation).
    refine_colour : bool
        Refine R, G and B apart (False: one luminance change).
    lr : float
        The refinement's Adam learning rate, in image units.
    target_ssim : float
        Face-box SSIM the refinement holds in its simulated save.
    stealth_weight : float
        Weight of the penalty when that SSIM falls below ``target_ssim``.
    stealth_tolerance : float
        How far below ``target_ssim`` a face's SSIM after the real save may land and still count as
        meeting the target in the cloak report: the simulated save reads about 0.01 above a real one,
        and the lowest of the demo's 23 faces measured 0.923 against 0.945.
    jpeg_quality : (float, float)
        Range of the JPEG quality the refinement's simulated save draws from at every step.
    jitter : (float, float)
        Largest re-alignment shift (aligned-face pixels) and turn (degrees) drawn at every step.
    downscale : (float, float)
        Range of the side scale the refinement's simulated save shrinks the photo to at every step.
    smoothing : float
        Gaussian sigma, in aligned-face pixels, of the blur on the refinement's learnt change.
    input_diversity : float
        Probability per refinement step that the faces reach the models shrunk and zero-padded.
    diversity_min_scale : float
        Smallest side scale of that shrink.
    margin : float
        Cosine margin below the threshold by which a refinement state must fool the model to count
        as fooling when the best state is chosen.
    random_state : int
        Seed of the refinement's draws.
    write_quality : int
        JPEG quality ``krtfuap cloak`` writes JPEG photos at.
    demo_quality : int
        JPEG quality ``krtfuap demo`` saves its photos at (a typical upload).
    """

    min_score: float = 0.5
    min_size: float = 20.0
    feather: float = 6.0
    surrogates: tuple[str, ...] = ("insightface_mbf", "facenet_casia")
    refine_steps: int = 45
    batch_faces: int = 16
    refine_from: str = "zero"
    refine_colour: bool = True
    lr: float = 0.012
    target_ssim: float = 0.945
    stealth_weight: float = 40.0
    stealth_tolerance: float = 0.025
    jpeg_quality: tuple[float, float] = (75.0, 95.0)
    jitter: tuple[float, float] = (1.0, 1.5)
    downscale: tuple[float, float] = (1.0, 1.0)
    smoothing: float = 1.0
    input_diversity: float = 1.0
    diversity_min_scale: float = 0.9
    margin: float = 0.1
    random_state: int = 0
    write_quality: int = 95
    demo_quality: int = 85


#: The one instance every default of the photo cloak is read from.
CLOAK_DEFAULTS = CloakDefaults()

