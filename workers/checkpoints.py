"""A job's training checkpoints: a local directory that training writes and resumes from,
mirrored through the artifact store when that is the database.

The training code (`accelerator`, `workers.pipeline`) only knows local files: it writes a
checkpoint after every epoch and resumes when the file exists. With the `local` artifact
backend the directory lies under `artifact_dir`, the volume workers on many machines already
share, so nothing more is needed. With `database`, each worker has its own disk: then

1. `restore()` before training puts the stored files of this job into the local directory
   (a job taken over on another machine resumes at the last epoch any worker stored);
2. `save()` after every epoch (`on_progress` runs after the file is written) stores each
   file that changed since, replacing the previous copy: one row per file;
3. `discard()` when the job is done drops the local directory and the stored files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sqlalchemy import Engine

from app.core.config import Settings
from app.services.artifacts import (
    checkpoint_names,
    delete_checkpoints,
    put_checkpoint,
    read_checkpoint,
    shares_checkpoints,
)


def _is_checkpoint(path: Path) -> bool:
    # training writes `<name>.tmp` then renames it: never store a half-written file
    return path.is_file() and not path.name.startswith(".") and not path.name.endswith(".tmp")


class JobCheckpoints:
    """Checkpoint directory `<artifact_dir>/checkpoints/<key>` of one job (`key` unique per
    job subject, e.g. `group-12`), shared between machines when `shared`."""

    def __init__(self, engine: Engine, settings: Settings, key: str) -> None:
        self.engine = engine
        self.key = key
        self.dir = Path(settings.artifact_dir or ".") / "checkpoints" / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shared = shares_checkpoints(settings)
        self._stored: dict[str, tuple[int, int]] = {}  # file name -> (mtime_ns, size) last stored

    def path(self, name: str) -> Path:
        return self.dir / name

    def restore(self) -> list[str]:
        """Bring this job's stored files into the local directory; returns their names.

        When the store holds any, it wins over what this disk still has: it is the latest
        epoch any worker finished (this disk may hold an older attempt of the same job)."""
        if not self.shared:
            return []
        names = checkpoint_names(self.engine, self.key)
        if not names:
            return []
        for stale in self.dir.iterdir():
            if _is_checkpoint(stale) and stale.name not in names:
                stale.unlink()
        restored = []
        for name in names:
            data = read_checkpoint(self.engine, self.key, name)
            if data is None:  # discarded meanwhile (the job finished elsewhere)
                continue
            target = self.path(name)
            tmp = target.with_name(f".{name}.restore")
            tmp.write_bytes(data)
            os.replace(tmp, target)
            st = target.stat()
            self._stored[name] = (st.st_mtime_ns, st.st_size)
            restored.append(name)
        return restored

    def save(self) -> int:
        """Store every file that changed since it was last stored; returns how many."""
        if not self.shared:
            return 0
        n = 0
        for path in sorted(self.dir.iterdir()):
            if not _is_checkpoint(path):
                continue
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if self._stored.get(path.name) == stamp:
                continue
            put_checkpoint(self.engine, self.key, path.name, path.read_bytes())
            self._stored[path.name] = stamp
            n += 1
        return n

    def discard(self) -> None:
        """The job is done with its checkpoints: drop them here and in the store."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self._stored.clear()
        if self.shared:
            delete_checkpoints(self.engine, self.key)
