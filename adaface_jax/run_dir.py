"""A training run's folder: the one place that knows its layout. The loop, the checkpointer, evaluation
and calibration ask it for paths; none of them joins names onto a workdir.

    <workdir>/checkpoints/<step>/   orbax: the last K steps (state + meta)
    <workdir>/best/<step>/          orbax: the best step by the validation metric
    <workdir>/metrics.jsonl         one JSON line per log step (process 0)
    <workdir>/tensorboard/          TensorBoard event files (process 0)
    <workdir>/training_samples.png  a grid of augmented training images
    <workdir>/calibration.json      thresholds stored by ``adaface-jax calibrate``

The workdir may be a local folder or a ``gs://`` URL (``adaface_jax.io``).
"""
from __future__ import annotations

import dataclasses

from adaface_jax import io

CHECKPOINTS = "checkpoints"
BEST = "best"


@dataclasses.dataclass(frozen=True)
class RunDir:
    root: str

    @classmethod
    def of(cls, workdir, what: str = "--workdir") -> "RunDir":
        """The run folder of a user's path (checked: a URL the file layer cannot serve is refused)."""
        root = io.check_path(workdir, what)
        if io.exists(root) and not io.isdir(root):
            from adaface_jax.errors import InputError  # noqa: PLC0415
            raise InputError(f"{what} {root}: exists and is not a directory")
        return cls(root)

    def create(self) -> "RunDir":
        io.makedirs(self.root)
        return self

    @property
    def checkpoints(self) -> str:
        return io.join(self.root, CHECKPOINTS)

    @property
    def best(self) -> str:
        return io.join(self.root, BEST)

    @property
    def metrics(self) -> str:
        return io.join(self.root, "metrics.jsonl")

    @property
    def tensorboard(self) -> str:
        return io.join(self.root, "tensorboard")

    @property
    def training_samples(self) -> str:
        return io.join(self.root, "training_samples.png")

    @property
    def calibration(self) -> str:
        return io.join(self.root, "calibration.json")

    @staticmethod
    def of_step_dir(step_dir: str) -> "RunDir":
        """The run folder holding a step directory (``<workdir>/checkpoints/<step>`` or ``best/<step>``); a
        step directory elsewhere is its own run folder's parent."""
        parent = io.dirname(step_dir)
        return RunDir(io.dirname(parent) if io.basename(parent) in (CHECKPOINTS, BEST) else parent)

    def __fspath__(self) -> str:
        return self.root

    def __str__(self) -> str:
        return self.root


def is_run_dir(path: str) -> bool:
    """Whether ``path`` looks like a training workdir (it has a checkpoints folder)."""
    return io.isdir(io.join(path, CHECKPOINTS))


__all__ = ["RunDir", "is_run_dir", "CHECKPOINTS", "BEST"]
