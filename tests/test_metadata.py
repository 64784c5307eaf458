"""Metadata beside the vectors: what `embed` stores per image for filters (capture time, camera, GPS,
folder), read from the file as it is decoded, and datasets written before these columns kept working."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_image
from PIL import Image

from clipcli.store.parts import META_COLUMNS

MODEL = ("-m", "tiny-shapes", "--precision", "fp32")


def exif_photo(path: Path, *, taken: str | None, make: str | None = None, gps: bool = False, seed: int = 0) -> Path:
    """A JPEG with the EXIF fields a camera writes (DateTimeOriginal in the Exif IFD, GPS in its own)."""
    make_image(path, (48, 40), seed=seed)
    image = Image.open(path)
    exif = Image.Exif()
    if taken is not None:
        exif.get_ifd(0x8769)[0x9003] = taken
    if make is not None:
        exif[0x010F], exif[0x0110] = make, f"{make} Model 7"
    if gps:
        # 48 deg 51' 29.6" N, 2 deg 17' 40.2" W
        exif.get_ifd(0x8825).update({1: "N", 2: (48.0, 51.0, 29.6), 3: "W", 4: (2.0, 17.0, 40.2)})
    image.save(path, exif=exif.tobytes())
    return path


def rows(folder: Path) -> dict[str, dict]:
    table = pq.read_table(folder)
    return {r["path"]: r for r in table.to_pylist()}


def test_embed_stores_capture_time_camera_gps_and_folder(cli, tmp_path):
    photos = tmp_path / "photos"
    exif_photo(photos / "holiday" / "a.jpg", taken="2024:06:01 14:30:05", make="Canon", gps=True, seed=1)
    exif_photo(photos / "b.jpg", taken=None, seed=2)
    exif_photo(photos / "c.jpg", taken="not a date", make="\0\0", seed=3)  # malformed fields: left out
    os.utime(photos / "b.jpg", (1_700_000_000, 1_700_000_000))
    ran = cli("embed", str(photos), *MODEL, "-o", f"{tmp_path / 'emb'}/")
    assert ran.exit_code == 0, ran.stderr
    got = rows(tmp_path / "emb")
    a, b, c = (got[str(photos / n)] for n in ("holiday/a.jpg", "b.jpg", "c.jpg"))
    assert a["taken"] == datetime.datetime(2024, 6, 1, 14, 30, 5)
    assert (a["camera_make"], a["camera_model"]) == ("Canon", "Canon Model 7")
    assert a["gps_lat"] == pytest.approx(48 + 51 / 60 + 29.6 / 3600)
    assert a["gps_lon"] == pytest.approx(-(2 + 17 / 60 + 40.2 / 3600))
    assert a["folder"] == str(photos / "holiday") and b["folder"] == str(photos)
    # No DateTimeOriginal: the file's mtime, as a local time like the camera's.
    assert b["taken"] == datetime.datetime.fromtimestamp(1_700_000_000)
    assert b["camera_make"] is None and b["gps_lat"] is None
    assert c["camera_make"] is None and c["taken"] == datetime.datetime.fromtimestamp(
        int((photos / "c.jpg").stat().st_mtime)
    )
    assert a["t"] is None and a["caption"] is None  # a photo is no video frame and has no caption


def test_a_dataset_written_before_the_columns_keeps_its_own(cli, tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "emb"
    exif_photo(photos / "a.jpg", taken="2020:01:02 03:04:05", seed=1)
    assert cli("embed", str(photos), *MODEL, "-o", f"{out}/").exit_code == 0
    # Make it a dataset of the old layout: the same part without the metadata columns.
    (part,) = out.glob("part-*.parquet")
    table = pq.read_table(part)
    old = table.drop_columns(list(META_COLUMNS)).replace_schema_metadata(table.schema.metadata)
    pq.write_table(old, part)
    exif_photo(photos / "b.jpg", taken="2021:01:02 03:04:05", seed=2)
    ran = cli("embed", str(photos), *MODEL, "-o", f"{out}/")
    assert ran.exit_code == 0, ran.stderr
    assert "embedded 1, unchanged 1" in ran.stderr
    for p in out.glob("part-*.parquet"):
        assert pq.read_schema(p).names == old.schema.names  # new parts match the old ones
    whole = pq.read_table(out)
    assert sorted(whole.column("path").to_pylist()) == [str(photos / "a.jpg"), str(photos / "b.jpg")]
    assert isinstance(whole, pa.Table) and "taken" not in whole.schema.names
