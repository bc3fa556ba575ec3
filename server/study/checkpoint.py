"""A run's completed phases on disk, so a restarted coordinator resumes where it stopped.

The driver saves what each long phase produced — the fitted pipeline, the evaluation,
each held-out site's leave-one-site-out entry — in the run folder's ``checkpoint/``.
A resumed run (``radfed run --resume``) loads them instead of asking the sites again and
asks only for what is missing. The sites answer a resumed run as before: their split
and folds come from their own secret, so they are the same, and asking again for a
patient set they already answered passes the differencing rule (it differs by nothing).

Checkpoints hold the coordinator's own results (aggregates and fits, never rows), are
written atomically, and are tied to the study: a checkpoint of another protocol or other
settings is refused rather than mixed into this run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

from radfed.shared.config import StudyConfig
from radfed.shared.errors import RadfedError

log = logging.getLogger(__name__)

FOLDER = "checkpoint"
STUDY = "study.json"


def study_digest(config: StudyConfig) -> str:
    """What a checkpoint must match: the protocol and every setting of the study."""
    settings = {"protocol": config.protocol(), "params": config.as_params()}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


class Checkpoint:
    """The completed phases of one run, in ``run_folder/checkpoint/``.

    Parameters
    ----------
    run_folder : Path
        The run's output folder.
    config : StudyConfig
        The study; a checkpoint written for another study or other settings is refused.
    """

    def __init__(self, run_folder: Path, config: StudyConfig) -> None:
        self.folder = Path(run_folder) / FOLDER
        self.digest = study_digest(config)
        marker = self.folder / STUDY
        if marker.is_file():
            saved = json.loads(marker.read_text()).get("study_digest")
            if saved != self.digest:
                raise RadfedError(
                    f"{self.folder} belongs to another study or other settings: the study "
                    "file changed since that run; start a new run instead of resuming"
                )
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write(marker, json.dumps({"study_digest": self.digest}).encode())

    def load(self, key: str) -> Any | None:
        """What phase ``key`` produced, or None when it has not completed."""
        path = self.folder / f"{key}.pkl"
        if not path.is_file():
            return None
        log.info("resuming: %s loaded from %s", key, self.folder)
        with path.open("rb") as f:
            return pickle.load(f)  # the coordinator's own file, written by save()

    def save(self, key: str, value: Any) -> None:
        """Keep what phase ``key`` produced (atomically: a kill leaves the old state)."""
        _write(self.folder / f"{key}.pkl", pickle.dumps(value))

    def clear(self) -> None:
        """Forget the run's checkpoints once its results are recorded."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def unfinished_run(root: Path) -> Path | None:
    """The newest run folder under ``root`` with checkpoints and no results.json."""
    if not Path(root).is_dir():
        return None
    runs = [
        p
        for p in Path(root).iterdir()
        if not p.is_symlink() and (p / FOLDER).is_dir() and not (p / "results.json").is_file()
    ]
    return max(runs, key=lambda p: p.name, default=None)
