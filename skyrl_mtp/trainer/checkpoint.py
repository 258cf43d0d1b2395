"""Run checkpoints: atomic directories, keep-last-N, and ``trainer.resume=auto``.

Layout: ``<run_dir>/checkpoints/step_000010/`` holds every model-parallel rank's shard
(``model_tp{r}.pt``: policy, MTP head, both optimizers and schedules, RNG) and
``trainer_state.json`` (step, data cursor, driver RNG, the settings a resume must keep).
A checkpoint is written into ``step_N.tmp`` and renamed into place only when complete; ``latest``
is then replaced atomically. An interrupted save leaves a ``.tmp`` directory that is ignored and
cleaned up, so the latest complete checkpoint always stays loadable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

STATE_FILE = "trainer_state.json"


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last_n: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last_n = keep_last_n

    def _dir(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    def complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        steps = []
        for d in self.root.iterdir():
            if d.is_dir() and d.name.startswith("step_") and not d.name.endswith(".tmp") and (d / STATE_FILE).is_file():
                steps.append(int(d.name.split("_")[1]))
        return sorted(steps)

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if pointer.is_file():
            d = self.root / pointer.read_text().strip()
            if (d / STATE_FILE).is_file():
                return d
        steps = self.complete_steps()
        return self._dir(steps[-1]) if steps else None

    def save(self, step: int, write_shards: Callable[[Path], None], state: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self._dir(step)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_shards(tmp)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        if final.exists():  # re-saving a step (e.g. after resume): replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
        pointer_tmp = self.root / "latest.tmp"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, self.root / "latest")
        self._prune(keep=final)
        return final

    def _prune(self, keep: Path) -> None:
        for d in self.root.iterdir():
            if d.name.endswith(".tmp") and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
        steps = self.complete_steps()
        for step in steps[:-self.keep_last_n]:
            if self._dir(step) != keep:
                shutil.rmtree(self._dir(step), ignore_errors=True)

    @staticmethod
    def read_state(directory: Path) -> dict[str, Any]:
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {directory} is not a complete checkpoint")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is corrupted ({err}); delete it or resume from another checkpoint") from err


def check_compatible(saved: dict[str, Any], current: dict[str, Any], directory: Path) -> None:
    """The settings a resumed run must keep (model, MTP on/off, parallel layout)."""
    for key, value in current.items():
        if key in saved and saved[key] != value:
            raise ValueError(f"checkpoint {directory} was written with {key}={saved[key]!r}, this run has "
                             f"{key}={value!r}: resume with the same setting or start a new run_dir")
