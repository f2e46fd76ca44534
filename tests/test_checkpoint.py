"""Checkpoints of ``UAPAttack.fit``: survive SIGKILL, resume bit-identically, never half-written.

The kill test runs the fit in a real child process (``subprocess.Popen``). The child says on
stdout when a checkpoint of epoch 2 is on disk and waits there, in the middle of epoch 3; the
test then kills it with SIGKILL, resumes it in a new process and compares the result with an
uninterrupted run of the same script.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch
from fakes import TinyEmbedder, random_faces, tiny_attack, untimed
from processes import TIMEOUT_S
from torch import nn

from krtfuap.attack import UAPAttack
from krtfuap.key_regions import KeyRegions

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
MAX_EPOCHS = 10
PAUSED = "paused after the checkpoint of epoch 2"

# The child script. Its model counts forwards, so the parent can tell a resumed fit (which skips
# the finished epochs) from one that silently started afresh. In mode "pause" the model is also
# where the child stops: at its first forward after a checkpoint of epoch 2 is on disk, it prints
# PAUSED and waits on stdin, which the parent never writes to.
FIT_SCRIPT = textwrap.dedent(
    f"""
    import json
    import sys

    import torch

    torch.set_num_threads(1)

    from fakes import TinyEmbedder, random_faces
    from krtfuap.attack import UAPAttack

    checkpoint, output, mode = sys.argv[1:4]


    def checkpointed_epochs():
        try:
            return torch.load(checkpoint, map_location="cpu", weights_only=True)["n_epochs"]
        except FileNotFoundError:
            return 0


    class PausingEmbedder(TinyEmbedder):
        def forward(self, images):
            if mode == "pause" and checkpointed_epochs() >= 2:
                print({PAUSED!r}, flush=True)
                sys.stdin.readline()
            return super().forward(images)


    model = PausingEmbedder()
    attack = UAPAttack(
        model, threshold=-1.0, stealth_loss="ssim", max_epochs={MAX_EPOCHS}, batch_size=2,
        random_state=0, checkpoint_path=checkpoint, checkpoint_every=1,
    )
    attack.fit(random_faces(48), resume=mode == "resume")
    attack.save(output)
    print(json.dumps({{"forwards": len(model.calls), "n_iter": attack.n_iter_}}))
    """
)
STEPS_PER_EPOCH = 48 // 2


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The child must import this checkout, not whatever krtfuap is installed, and the tests' fakes.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(TESTS), env.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def start_fit(tmp_path):
    """``start_fit(checkpoint, output, mode)`` runs ``FIT_SCRIPT`` in mode "fresh", "resume" or "pause".

    Children still running when the test ends (it failed) are killed.
    """
    script = tmp_path / "fit_script.py"
    script.write_text(FIT_SCRIPT)
    children: list[subprocess.Popen] = []

    def start(checkpoint: Path, output: Path, mode: str) -> subprocess.Popen:
        children.append(subprocess.Popen(
            [sys.executable, str(script), str(checkpoint), str(output), mode],
            cwd=REPO, env=_child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        ))
        return children[-1]

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
            child.communicate(timeout=TIMEOUT_S)


def _next_line(process: subprocess.Popen) -> str:
    """The child's next line on stdout; "" when it exits first (or says nothing for ``TIMEOUT_S``)."""
    readable, _, _ = select.select([process.stdout], [], [], TIMEOUT_S)
    return process.stdout.readline().strip() if readable else ""


def _finish(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, f"fit script failed ({process.returncode}):\n{stderr}"
    return json.loads(stdout.strip().splitlines()[-1])


def _assert_same_fit(a: UAPAttack, b: UAPAttack) -> None:
    for name in ("perturbation_", "flow_", "noise_", "warped_mask_", "mask_"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), f"{name} differs: max |diff| {(x - y).abs().max().item()}"
    assert untimed(a.history_) == untimed(b.history_)
    assert (a.n_iter_, a.n_epochs_, a.stop_reason_) == (b.n_iter_, b.n_epochs_, b.stop_reason_)


@pytest.mark.skipif(os.name != "posix" or not hasattr(signal, "SIGKILL"), reason="needs POSIX signals (SIGKILL)")
def test_sigkill_mid_fit_then_resume_matches_uninterrupted_run(tmp_path, start_fit):
    checkpoint = tmp_path / "fit.ckpt"
    killed_out, resumed_out = tmp_path / "killed.safetensors", tmp_path / "resumed.safetensors"
    reference_out = tmp_path / "reference.safetensors"

    # The uninterrupted reference runs alongside the run that gets killed.
    reference = start_fit(tmp_path / "reference.ckpt", reference_out, "fresh")
    victim = start_fit(checkpoint, killed_out, "pause")
    announcement = _next_line(victim)  # blocks until the child has paused (or ended)
    victim.send_signal(signal.SIGKILL)
    _, stderr = victim.communicate(timeout=TIMEOUT_S)
    assert announcement == PAUSED, f"the fit never paused after the checkpoint of epoch 2:\n{stderr}"
    assert victim.returncode == -signal.SIGKILL
    assert not killed_out.exists(), "the killed run reached the end of the fit"

    # What the kill left behind is the complete checkpoint of epoch 2.
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    killed_at = state["n_epochs"]
    assert killed_at == 2
    assert state["n_iter"] == len(state["history"]) == killed_at * STEPS_PER_EPOCH

    resumed_counts = _finish(start_fit(checkpoint, resumed_out, "resume"))
    reference_counts = _finish(reference)

    # The resumed run only did the epochs left: per batch and epoch one adversarial forward to step
    # and one to score the epoch, plus the clean forwards of the faces once per process (cached) and
    # channels_last's probe of the model's layout.
    def forwards(epochs: int) -> int:
        return STEPS_PER_EPOCH * (2 * epochs + 1) + 1

    assert resumed_counts["forwards"] == forwards(MAX_EPOCHS - killed_at)
    assert reference_counts["forwards"] == forwards(MAX_EPOCHS)
    assert resumed_counts["n_iter"] == reference_counts["n_iter"] == MAX_EPOCHS * STEPS_PER_EPOCH

    resumed, uninterrupted = UAPAttack.load(resumed_out), UAPAttack.load(reference_out)
    _assert_same_fit(resumed, uninterrupted)
    assert [r["step"] for r in resumed.history_] == list(range(MAX_EPOCHS * STEPS_PER_EPOCH))
    assert not Path(f"{checkpoint}.partial").exists()


# ------------------------------------------------------------ crash while writing
_faces = partial(random_faces, seed=1)


def _attack(checkpoint: Path, model: nn.Module | None = None, **params) -> UAPAttack:
    settings = dict(
        threshold=-1.0, stealth_loss="ssim", key_regions=KeyRegions(), max_epochs=3, batch_size=4, random_state=0,
        checkpoint_path=checkpoint, checkpoint_every=1,
    )
    return tiny_attack(UAPAttack, model, **{**settings, **params})


def test_crash_while_writing_checkpoint_keeps_previous_one(tmp_path, monkeypatch):
    checkpoint = tmp_path / "fit.ckpt"
    real_save = torch.save
    calls, before_crash = [], {}

    def crashing_save(obj, f, *args, **kwargs):
        calls.append(os.fspath(getattr(f, "name", f)))  # a path or an open file
        if len(calls) == 1:
            return real_save(obj, f, *args, **kwargs)
        # Second checkpoint: remember the good one, then die half-way through writing.
        before_crash["bytes"] = checkpoint.read_bytes()
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full (simulated)")

    model = TinyEmbedder()
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        _attack(checkpoint, model).fit(_faces())
    monkeypatch.setattr(torch, "save", real_save)

    # torch.save never wrote to the checkpoint itself, only to the side file.
    assert calls == [f"{checkpoint}.partial"] * 2
    assert checkpoint.read_bytes() == before_crash["bytes"]
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["n_epochs"] == 1 and len(state["history"]) == state["n_iter"] == 4
    # The model is handed back unfrozen even though fit raised.
    assert all(p.requires_grad for p in model.parameters())

    # Resuming from the surviving checkpoint gives the uninterrupted result.
    resumed = _attack(checkpoint).fit(_faces(), resume=True)
    uninterrupted = _attack(tmp_path / "other.ckpt").fit(_faces())
    _assert_same_fit(resumed, uninterrupted)
    assert not Path(f"{checkpoint}.partial").exists()


# ------------------------------------------------------- resuming past a limit
@pytest.mark.parametrize("limits, reason", [
    (dict(max_epochs=1), "max_epochs"),
    (dict(max_epochs=3), "max_epochs"),
    (dict(max_epochs=5, max_steps=12), "max_steps"),
    (dict(max_epochs=5, max_time=0.0), "max_time"),
])
def test_resuming_a_checkpoint_that_reached_a_limit_ends_at_once_with_its_state(tmp_path, limits, reason):
    checkpoint = tmp_path / "fit.ckpt"
    done = _attack(checkpoint, max_epochs=3).fit(_faces())  # 3 epochs of 4 steps, a checkpoint after each
    model, calls = TinyEmbedder(), []
    model.register_forward_hook(lambda module, inputs, output: calls.append(bool(inputs[0].any())))
    resumed = _attack(checkpoint, model, **limits).fit(_faces(), resume=True)
    assert not any(calls)  # no face passes (no step, no scoring; channels_last's probe is two blank faces)
    assert (resumed.n_epochs_, resumed.n_iter_, resumed.stop_reason_) == (3, 12, reason)
    assert torch.equal(resumed.perturbation_, done.perturbation_) and resumed.best_epoch_ == done.best_epoch_
    assert untimed(resumed.history_) == untimed(done.history_)
