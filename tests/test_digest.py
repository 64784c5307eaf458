"""Model files are hashed once per version: a rewritten file is hashed again, whatever its mtime says."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from clipcli.models.digest import file_sha256


def entries(cache: Path) -> list[Path]:
    return sorted((cache / "clipcli-digests").iterdir())


def test_the_digest_is_remembered_for_this_version_of_the_file(tmp_path):
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"a" * 5000)
    assert file_sha256(weights) == hashlib.sha256(b"a" * 5000).hexdigest()
    (entry,) = entries(Path(os.environ["CLIPCLI_CACHE"]))
    # What is remembered is what is returned: a planted digest shows the file was not read again.
    planted = "0" * 64
    entry.write_text(planted)
    assert file_sha256(weights) == planted
    assert file_sha256(tmp_path / "." / "model.pt") == planted  # the same file by another spelling


def test_a_rewritten_file_is_hashed_again_even_with_its_old_size_and_mtime(tmp_path):
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"a" * 5000)
    first = file_sha256(weights)
    st = weights.stat()
    time.sleep(0.01)
    weights.write_bytes(b"b" * 5000)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # as a careless copy tool might leave it
    assert weights.stat().st_mtime_ns == st.st_mtime_ns
    assert file_sha256(weights) == hashlib.sha256(b"b" * 5000).hexdigest() != first


def test_a_cache_that_cannot_be_written_only_costs_a_read(tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("CLIPCLI_CACHE", str(blocked))
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"xyz")
    assert file_sha256(weights) == file_sha256(weights) == hashlib.sha256(b"xyz").hexdigest()


def test_a_damaged_entry_is_not_believed(tmp_path):
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"abc")
    file_sha256(weights)
    (entry,) = entries(Path(os.environ["CLIPCLI_CACHE"]))
    entry.write_bytes(b"\xff\xfe half a dig")
    assert file_sha256(weights) == hashlib.sha256(b"abc").hexdigest()
    assert entry.read_text().strip() == hashlib.sha256(b"abc").hexdigest()  # and it is written anew


def test_no_digest_is_taken_from_a_name(tmp_path):
    """A Hugging Face cache blob is named by its SHA-256, but any path can be made to look like one."""
    claimed = hashlib.sha256(b"the model the dataset was made with").hexdigest()
    blob = tmp_path / "blobs" / claimed
    blob.parent.mkdir()
    blob.write_bytes(b"another model's weights")
    assert file_sha256(blob) == hashlib.sha256(b"another model's weights").hexdigest()


def test_an_entry_that_is_not_a_regular_file_is_ignored_not_waited_on(tmp_path):
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"abc")
    file_sha256(weights)
    (entry,) = entries(Path(os.environ["CLIPCLI_CACHE"]))
    entry.unlink()
    os.mkfifo(entry)  # opening it for reading would block until a writer came
    assert file_sha256(weights) == hashlib.sha256(b"abc").hexdigest()
