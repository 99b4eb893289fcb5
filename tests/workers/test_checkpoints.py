"""A job's checkpoints through the artifact store: with the `database` backend a second machine
(another artifact dir) restores what the first stored and training resumes there; with `local`
the directory is the shared store and nothing goes to the database. Real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, func, select

from app.core.config import Settings
from app.db.migrate import upgrade
from app.db.models import CheckpointFile

pytest.importorskip("torch")
import torch  # noqa: E402

import accelerator as acc  # noqa: E402
from tests.conftest import _pg_error, fresh_pg_database, unavailable  # noqa: E402
from workers.checkpoints import JobCheckpoints  # noqa: E402

pytestmark = pytest.mark.integration  # PostgreSQL: the database backend needs it


@pytest.fixture(scope="module")
def pg_engine() -> Iterator[Engine]:
    err = _pg_error()
    if err:
        unavailable(err)
    with fresh_pg_database() as url:
        upgrade(url)
        engine = create_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


def _machine(engine: Engine, artifact_dir: Path, backend: str = "database") -> Settings:
    return Settings(
        database_url=engine.url.render_as_string(hide_password=False),
        artifact_backend=backend,  # type: ignore[arg-type]
        artifact_dir=artifact_dir,
        var_dir=artifact_dir.parent / "var",
    )


def _stored(engine: Engine, key: str) -> dict[str, bytes]:
    with engine.connect() as conn:
        rows = conn.execute(select(CheckpointFile.name, CheckpointFile.data).where(CheckpointFile.key == key))
        return {r.name: bytes(r.data) for r in rows}


def test_checkpoint_files_go_to_another_machine_through_the_database(pg_engine: Engine, tmp_path: Path) -> None:
    a = JobCheckpoints(pg_engine, _machine(pg_engine, tmp_path / "a"), "group-1")
    other = JobCheckpoints(pg_engine, _machine(pg_engine, tmp_path / "a"), "group-2")
    assert a.shared and a.dir == tmp_path / "a" / "checkpoints" / "group-1"
    assert a.restore() == []  # a first attempt: nothing stored, nothing changed
    a.path("chunk-0000.pt").write_bytes(b"chunk 0, epoch 1")
    a.path("chunk-0004.pt").write_bytes(b"chunk 4, epoch 1")
    a.path("chunk-0004.pt.tmp").write_bytes(b"half written")  # training's temporary file
    other.path("chunk-0000.pt").write_bytes(b"another job")
    assert a.save() == 2 and other.save() == 1
    assert a.save() == 0, "an unchanged file is stored again"
    a.path("chunk-0004.pt").write_bytes(b"chunk 4, epoch 2!")
    assert a.save() == 1
    stored = _stored(pg_engine, "group-1")
    assert stored == {"chunk-0000.pt": b"chunk 0, epoch 1", "chunk-0004.pt": b"chunk 4, epoch 2!"}

    # machine B, an empty artifact dir: it gets the files; an older attempt's file it still had goes
    b_dir = tmp_path / "b" / "checkpoints" / "group-1"
    b_dir.mkdir(parents=True)
    (b_dir / "chunk-0008.pt").write_bytes(b"from an older attempt")
    b = JobCheckpoints(pg_engine, _machine(pg_engine, tmp_path / "b"), "group-1")
    assert b.restore() == ["chunk-0000.pt", "chunk-0004.pt"]
    assert sorted(p.name for p in b.dir.iterdir()) == ["chunk-0000.pt", "chunk-0004.pt"]
    assert b.path("chunk-0004.pt").read_bytes() == b"chunk 4, epoch 2!"
    assert b.save() == 0, "restored files are stored again"

    b.discard()
    assert not b.dir.exists() and _stored(pg_engine, "group-1") == {}
    assert _stored(pg_engine, "group-2") == {"chunk-0000.pt": b"another job"}  # another job's untouched
    other.discard()


def test_with_the_local_backend_the_directory_is_the_store(pg_engine: Engine, tmp_path: Path) -> None:
    ck = JobCheckpoints(pg_engine, _machine(pg_engine, tmp_path / "shared", backend="local"), "robust-plan7")
    assert not ck.shared
    ck.path("robust-0000.pt").write_bytes(b"x")
    assert ck.save() == 0 and ck.restore() == []
    assert ck.path("robust-0000.pt").exists()  # the restore keeps the shared volume's files
    with pg_engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(CheckpointFile)) == 0
    ck.discard()
    assert not ck.dir.exists()


def test_training_killed_on_one_machine_resumes_on_another(pg_engine: Engine, tmp_path: Path) -> None:
    """Real training: 3 epochs with a kill after epoch 2 on machine A, finished on machine B from
    the stored checkpoint, give the weights of 3 epochs in one go (and B trains only epoch 3)."""
    data = acc.load_dataset("digits").subset(300, 100)

    def fresh() -> torch.nn.Module:  # `acc.train` trains in place: every run its own copy
        return acc.build_model("mlp", data.input_shape, 10, seed=3)

    kw = dict(lr=0.05, batch_size=32, seed=5)
    full = acc.train(fresh(), data, 3, **kw)  # type: ignore[arg-type]

    a = JobCheckpoints(pg_engine, _machine(pg_engine, tmp_path / "a"), "model-9")

    def on_a(epoch: int, _n: int, _m: dict[str, float]) -> None:
        a.save()
        if epoch == 2:
            raise KeyboardInterrupt  # the machine dies after epoch 2 was stored

    with pytest.raises(KeyboardInterrupt):
        acc.train(fresh(), data, 3, checkpoint=a.path("train.pt"), on_progress=on_a, **kw)  # type: ignore[arg-type]

    b = JobCheckpoints(pg_engine, _machine(pg_engine, tmp_path / "b"), "model-9")
    assert not b.path("train.pt").exists()
    assert b.restore() == ["train.pt"]
    seen: list[int] = []
    resumed = acc.train(
        fresh(),
        data,
        3,
        checkpoint=b.path("train.pt"),
        on_progress=lambda e, _n, _m: seen.append(e),
        **kw,  # type: ignore[arg-type]
    )
    assert seen == [3]
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    b.discard()
    assert _stored(pg_engine, "model-9") == {}
