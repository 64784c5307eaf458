"""The engine and output contracts, tested directly (clipcli.engines, clipcli.store.output)."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import pytest

from clipcli.atomic import OutputLock
from clipcli.errors import InputError, OutputError
from clipcli.store.formats import OutputFormat, RowWriter, format_choices
from clipcli.store.output import WRITERS, OutputKind, lock_files, parse_dataset_output, parse_output
from clipcli.store.shard import Shard, ShardLocks

ALL = tuple(OutputFormat)
EMBED = (OutputFormat.CSV, OutputFormat.JSONL, OutputFormat.PARQUET, OutputFormat.NPY)


def test_stdout_is_a_stream_without_a_lock() -> None:
    for given in (None, "-"):
        out = parse_output(given, None, ALL, tty=True)
        assert (out.target, out.kind, out.format) == (None, OutputKind.STREAM, OutputFormat.TABLE)
        assert isinstance(out.lock(), nullcontext)
    piped = parse_output(None, None, ALL, tty=False, piped=OutputFormat.TSV)
    assert piped.format is OutputFormat.TSV


def test_a_fifo_is_a_stream(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    out = parse_output(str(fifo), OutputFormat.JSONL, ALL)
    assert out.kind is OutputKind.STREAM and out.format is OutputFormat.JSONL
    assert isinstance(out.lock(), nullcontext)


def test_a_file_has_its_format_from_the_extension_and_its_own_lock(tmp_path: Path) -> None:
    out = parse_output(str(tmp_path / "x.parquet"), None, ALL)
    assert (out.kind, out.format) == (OutputKind.FILE, OutputFormat.PARQUET)
    with out.lock() as held:
        assert isinstance(held, OutputLock)
    with pytest.raises(OutputError, match="cannot tell the format"):
        parse_output(str(tmp_path / "x.weird"), None, ALL)
    npy = parse_output(str(tmp_path / "x.npy"), None, EMBED)
    assert npy.written_files() == [str(tmp_path / "x.npy"), str(tmp_path / "x.rows.jsonl")]


def test_a_command_restricts_the_formats(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="not available here"):
        parse_output(str(tmp_path / "x.npy"), None, (OutputFormat.CSV,))
    choices = format_choices("Choices", EMBED)
    assert [c.value for c in choices] == ["csv", "jsonl", "parquet", "npy"]
    assert parse_output(str(tmp_path / "x.csv"), choices("jsonl"), EMBED).format is OutputFormat.JSONL


def test_dataset_directories(tmp_path: Path) -> None:
    named = parse_dataset_output(str(tmp_path / "emb") + "/", None, EMBED, tty=False)
    assert (named.kind, named.format) == (OutputKind.DATASET, OutputFormat.PARQUET) and named.is_dataset
    spark = tmp_path / "x.parquet"
    spark.mkdir()
    assert parse_dataset_output(str(spark), None, EMBED, tty=False).kind is OutputKind.DATASET
    assert parse_dataset_output(str(tmp_path / "y.parquet"), None, EMBED, tty=False).kind is OutputKind.FILE
    (tmp_path / "x.foo").mkdir()
    with pytest.raises(InputError, match="end the name with a slash"):
        parse_dataset_output(str(tmp_path / "x.foo"), None, EMBED, tty=False)
    local = parse_dataset_output(f"file://{tmp_path}/emb/", None, EMBED, tty=False)
    assert local.target == f"{tmp_path}/emb/" and local.kind is OutputKind.DATASET


def test_a_shard_run_takes_its_shard_locks(tmp_path: Path) -> None:
    import dataclasses

    out = parse_dataset_output(str(tmp_path / "emb") + "/", None, EMBED, tty=False)
    sharded = dataclasses.replace(out, shard=Shard.parse("1/2"))
    assert isinstance(sharded.lock(), ShardLocks)
    assert isinstance(out.lock(), OutputLock)


def test_an_object_store_uri_is_a_dataset_without_a_lock() -> None:
    out = parse_dataset_output("s3://b/p/", None, EMBED, tty=False)
    assert (out.kind, out.format, out.target) == (OutputKind.URI, OutputFormat.PARQUET, "s3://b/p/")
    assert isinstance(out.lock(), nullcontext)
    with pytest.raises(InputError, match="URI output is a Parquet dataset"):
        parse_dataset_output("s3://b/p.csv", None, EMBED, tty=False)
    with pytest.raises(InputError, match="URI output is a Parquet dataset"):
        parse_dataset_output("s3://b/p/", None, EMBED, tty=False, text=True)


def test_one_writer_per_format() -> None:
    assert set(WRITERS) == set(OutputFormat)
    assert all(issubclass(w, RowWriter) for w in WRITERS.values())


def test_lock_files_holds_every_output(tmp_path: Path) -> None:
    with lock_files(tmp_path / "r.json", None, folders=[tmp_path / "plots", None]) as held:
        assert len(held._exit_callbacks) == 2  # type: ignore[attr-defined]


def test_the_engine_registry() -> None:
    from clipcli.engines import ENGINES, get_engine
    from clipcli.engines.base import Engine
    from clipcli.engines.local import LocalEngine
    from clipcli.engines.ray import RayEngine

    assert set(ENGINES) == {"local", "ray"}
    assert isinstance(get_engine("local"), LocalEngine)
    ray = get_engine("ray", address="head:6379")
    assert isinstance(ray, RayEngine) and isinstance(ray, Engine) and ray.address == "head:6379"
    with pytest.raises(InputError, match="no such engine"):
        get_engine("spark")


def test_the_engine_options_follow_the_registry() -> None:
    from clipcli.commands.options import Engine
    from clipcli.engines import ENGINES

    assert [e.value for e in Engine] == list(ENGINES)


def test_the_ray_engine_refuses_a_file_before_reading_anything(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from clipcli.engines.base import EmbedJob
    from clipcli.engines.ray import RayEngine

    job = EmbedJob([], parse_output(str(tmp_path / "x.parquet"), None, EMBED))
    lm = SimpleNamespace(embed_dim=4, name="m", checksum="0" * 64)
    with pytest.raises(InputError, match="--engine ray writes a Parquet dataset directory"):
        RayEngine().embed(lm, job)  # type: ignore[arg-type]
    assert not (tmp_path / "x.parquet").exists()
