"""WebDataset shards as images: a ``.tar`` file whose members are grouped into samples by WebDataset's
convention (``KEY.jpg``, ``KEY.txt``, ``KEY.json``, ``KEY.cls`` next to each other; the key is the
member's name up to its first dot), each sample's image one input whose row path is ``SHARD.tar#KEY``.

Nothing is extracted: a shard is indexed once (the offset and length of every member, from the tar
headers alone, with :mod:`tarfile`) and a member's bytes are read at their offset when it is decoded.
The index is kept per shard and per process (a few shards at a time: decoding reads shards in order)
and made again when the shard's size or mtime changes; each decoding thread keeps the shard it reads
open (samples are decoded in order, so opening it for each would cost more than reading the sample).
The stat of every member is the shard's, so an incremental run re-embeds a shard's samples exactly
when the shard changed.

A sample with no image (jpg, jpeg, png, webp), a member cut short and the end of a truncated shard are
reported with the shard and the key; a member whose bytes are no image is reported when decoding meets
it; every other sample of the shard is used. A sample's caption is its ``txt`` member, else the
``caption`` (or ``text``) field of its ``json`` member; its class (``cls``, an integer) is read by
CLIP_benchmark-layout evaluation (:mod:`clipcli.evaluation.datasets`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from PIL import Image

from clipcli.images.decode import FORMATS, decode_opened
from clipcli.images.refs import ContainerOptions, Decoded, FileStat, ImageRef, Skipped

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")  # in order of preference, when a sample has two
CAPTION_FIELDS = ("caption", "text")  # fields of a sample's json member that hold its caption
CACHED_SHARDS = 8  # indexes kept per process
_MAX_TEXT = 1 << 20  # a caption or class member larger than this is not read


class ExtraMissing(ImportError):
    """The ``webdataset`` package is not installed."""


def _webdataset() -> Any:
    """WebDataset's own tar conventions (how a member's name splits into key and suffix)."""
    try:
        import webdataset.tariterators as wds
    except ImportError as e:
        extra = "pip install 'clipcli[webdataset]'"
        raise ExtraMissing(f"WebDataset shards need the webdataset extra: {extra} ({e})") from None
    return wds


@dataclass(frozen=True, slots=True)
class Span:
    """Where a member's bytes lie in the shard."""

    offset: int
    size: int


@dataclass
class Sample:
    key: str
    members: dict[str, Span] = field(default_factory=dict)  # suffix (lower case) -> bytes

    @property
    def image(self) -> Span | None:
        return next((self.members[s] for s in IMAGE_SUFFIXES if s in self.members), None)


@dataclass
class ShardIndex:
    stat: FileStat
    samples: dict[str, Sample]  # in the shard's order
    problems: list[tuple[str | None, str]]  # (key or None for the shard, reason)


END_OF_ARCHIVE = 1024  # the two zero blocks that end every tar
# What may follow them: zeros up to the end of the last record (tar's writers fill the archive to a
# multiple of their record: 20 blocks by default, Python's and GNU's; up to 128 with GNU tar's -b).
# Anything more is data tarfile would not reach, or the zeros of a download that stopped.
END_PADDING = 128 * tarfile.BLOCKSIZE
# An extended header (pax, or GNU's long name) larger than this is not parsed: real ones hold a name
# and a few attributes, and Python's tarfile takes time quadratic in their size before 3.11.10
# (CVE-2024-6232): 50 KB took 4 s, 200 KB 43 s.
MAX_EXTENDED_HEADER = 16 * 1024
# tarfile reads a chain of extended headers (each for the next) in one call, recursively: a chain longer
# than this is not handed to it (600 in a row overflowed its recursion).
MAX_EXTENDED_CHAIN = 8
_EXTENDED = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


def _read_at(handle: IO[bytes], offset: int, size: int) -> bytes:
    """``size`` bytes of ``handle`` at ``offset`` (fewer at its end), leaving its position as it was."""
    if not 0 <= offset < 1 << 62:
        return b""  # where a header's size points past any file
    try:
        return os.pread(handle.fileno(), size, offset)
    except (OSError, io.UnsupportedOperation, AttributeError):
        at = handle.tell()
        try:
            handle.seek(offset)
            return handle.read(size)
        finally:
            handle.seek(at)


def _number(field: bytes, empty: int = 0) -> int | None:
    """A tar header's number field as tarfile reads it: octal digits, or base-256 (GNU) when its first
    byte's top bit is set (negative when that byte is 0xff); None when it is neither."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field, "big", signed=True) if field[0] == 0xFF else int.from_bytes(field[1:], "big")
    try:
        return int(field.split(b"\0", 1)[0].strip() or str(empty).encode(), 8)
    except ValueError:
        return None


def _checksum_holds(block: bytes) -> bool:
    """Whether ``block`` is a tar header: its checksum field is the sum of its bytes, the field itself
    counted as spaces (unsigned, or signed as some old tars summed)."""
    stored = _number(block[148:156], -1)
    blanked = block[:148] + b" " * 8 + block[156:]
    return stored in (sum(blanked), sum(b - 256 if b > 127 else b for b in blanked))


def _header_problem(handle: IO[bytes], offset: int) -> str | None:
    """Why the header at ``offset`` must not be handed to tarfile, if it must not: a size that is negative
    or unreadable (tarfile would step back and read the same member for ever), or an extended header
    too large to parse or a chain of too many (see :data:`MAX_EXTENDED_HEADER`); tarfile parses the
    chain of extended headers before a member in one go, so each is checked."""
    for link in range(MAX_EXTENDED_CHAIN + 1):
        block = _read_at(handle, offset, tarfile.BLOCKSIZE)
        if len(block) < tarfile.BLOCKSIZE or not _checksum_holds(block):
            return None  # the end, a truncated shard, a damaged header or no tar: tarfile's answers serve
        size = _number(block[124:136])
        if size is None or size < 0:
            return f"the member header at byte {offset} gives no valid size"
        if block[156:157] not in _EXTENDED:
            return None
        if size > MAX_EXTENDED_HEADER:
            return f"the member header at byte {offset} has an extended header of {size} bytes (more than 16 KB)"
        if link == MAX_EXTENDED_CHAIN:
            return f"more than {MAX_EXTENDED_CHAIN} extended headers in a row end at byte {offset}"
        offset += tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return None


def _end_problem(handle: IO[bytes], offset: int, size: int) -> str | None:
    """Why the shard does not really end at ``offset``, where tarfile found no further member: a header
    damaged there (a checksum that fails, a block zeroed), or more than the end blocks and their
    record's padding after it (the zeros of an unfinished download, say)."""
    rest = size - offset
    if rest < END_OF_ARCHIVE:
        return "it ends without the end-of-archive blocks"
    block = _read_at(handle, offset, tarfile.BLOCKSIZE)
    if any(block):
        return f"the member header at byte {offset} is damaged"
    if rest > END_OF_ARCHIVE + END_PADDING or any(_read_at(handle, offset, rest)):
        left = f"{rest} bytes are left: a header zeroed, or a cut download"
        return f"zero blocks at byte {offset} end the archive, yet {left}"
    return None


def index_shard(handle: IO[bytes], stat: FileStat) -> ShardIndex:
    """Every sample of the open shard ``handle`` (``stat``: its size and mtime), from the tar headers.

    Each header is checked before :mod:`tarfile` parses it (see :func:`_header_problem`), tarfile must
    move forward at each member, and where it finds the end the rest of the file must be the end (see
    :func:`_end_problem`): damage stops the index there, reported, with the samples before it used."""
    wds = _webdataset()
    samples: dict[str, Sample] = {}
    problems: list[tuple[str | None, str]] = []

    def damaged(why: str) -> None:
        problems.append((None, f"damaged shard ({why}); its first {len(samples)} samples are used"))

    why = _header_problem(handle, 0)  # tarfile.open parses the first header
    if why is not None:
        raise OSError(f"damaged shard ({why})")
    try:
        tar = tarfile.open(fileobj=handle, mode="r:")  # noqa: SIM115 (closed below; the handle is the caller's)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise OSError(f"not a tar file ({e or type(e).__name__})") from None
    except (ValueError, IndexError, OverflowError, RecursionError, MemoryError) as e:
        raise OSError(f"damaged shard (tarfile cannot read its first header: {type(e).__name__})") from None
    current: Sample | None = None
    last = -1  # the offset of the last member's header: each must lie further on
    try:
        while True:
            at = tar.offset  # where the next header is read (tarfile.open has read the first already)
            pending = getattr(tar, "firstmember", None)  # the first member, read but not yet given
            why = _header_problem(handle, at) if pending is None else None
            if why is not None:
                damaged(why)
                break
            try:
                info = tar.next()
            except (tarfile.TarError, OSError, EOFError) as e:
                done = len(samples)
                problems.append((None, f"truncated shard ({e or type(e).__name__}); its first {done} samples are used"))
                break
            except (ValueError, IndexError, OverflowError, RecursionError, MemoryError) as e:
                damaged(f"tarfile cannot read the member header at byte {at}: {type(e).__name__}")
                break
            if info is None:
                # tarfile ends at two zero blocks, and also (past the first header) at a damaged header
                # or at the file's end: only the first is the shard's end.
                why = _end_problem(handle, at, stat[0])
                if why is not None:
                    problem = "truncated shard" if why.startswith("it ends") else "damaged shard"
                    problems.append((None, f"{problem} ({why}); its first {len(samples)} samples are used"))
                break
            tar.members = []  # type: ignore[attr-defined]  # the index keeps spans, not tarfile's record of every member
            if info.size < 0 or info.offset <= last or tar.offset <= info.offset:
                damaged(f"the member header at byte {info.offset} does not move the archive forward")
                break
            last = info.offset
            name = info.name
            if name.startswith(wds.meta_prefix) and name.endswith(wds.meta_suffix):
                continue
            key, suffix = wds.base_plus_ext(name)
            if key is None:
                continue
            if info.issym() or info.islnk():
                problems.append((key, f"member {name} is a link, not read"))
                continue
            if not info.isreg():
                continue
            if info.offset_data + info.size > stat[0]:
                problems.append((key, f"member {name} is cut short (truncated shard)"))
                break
            if current is None or current.key != key:
                if key in samples:
                    problems.append((key, f"member {name}: the key appears twice in the shard; the first is used"))
                    current = None
                    continue
                current = samples[key] = Sample(key)
            current.members.setdefault(suffix.lower(), Span(info.offset_data, info.size))
    finally:
        tar.members = []  # type: ignore[attr-defined]
        tar.close()
    return ShardIndex(stat, samples, problems)


class _Indexes:
    """The last few shards' indexes, by path; remade when a shard's stat changes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.cache: OrderedDict[str, ShardIndex] = OrderedDict()

    def get(self, file: Path, handle: IO[bytes]) -> ShardIndex:
        st = os.fstat(handle.fileno())
        stat: FileStat = (st.st_size, st.st_mtime)
        key = os.path.abspath(file)
        with self.lock:
            found = self.cache.get(key)
            if found is not None and found.stat == stat:
                self.cache.move_to_end(key)
                return found
        made = index_shard(handle, stat)
        with self.lock:
            self.cache[key] = made
            self.cache.move_to_end(key)
            while len(self.cache) > self.size:
                self.cache.popitem(last=False)
        return made


INDEXES = _Indexes(CACHED_SHARDS)


def _open(file: Path) -> IO[bytes]:
    from clipcli.images.decode import require_regular_file

    require_regular_file(file)
    return open(file, "rb")


class _Held:
    """A decoding thread's open shard, closed when the thread ends or moves on to another shard."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.handle = _open(file)

    def current(self, file: Path) -> bool:
        """Whether ``file`` still names the file held (not another shard written in its place)."""
        if file != self.file:
            return False
        now, held = os.stat(file), os.fstat(self.handle.fileno())
        return all(getattr(now, f) == getattr(held, f) for f in ("st_ino", "st_dev", "st_size", "st_mtime"))

    def __del__(self) -> None:
        if hasattr(self, "handle"):  # not when opening failed
            self.handle.close()


_THREAD = threading.local()


def _held(file: Path) -> IO[bytes]:
    """This thread's open handle on ``file``: decoding reads a shard's samples in order, so one handle a
    thread serves them all (opening the shard for each sample costs more than reading the sample)."""
    held: _Held | None = getattr(_THREAD, "held", None)
    if held is None or not held.current(file):
        _THREAD.held = None  # closes the shard held before
        _THREAD.held = held = _Held(file)
    return held.handle


def read_span(handle: IO[bytes], span: Span) -> bytes:
    handle.seek(span.offset)
    data = handle.read(span.size)
    if len(data) != span.size:
        raise OSError("member cut short (truncated shard)")
    return data


def _text(handle: IO[bytes], span: Span | None) -> str | None:
    if span is None or span.size > _MAX_TEXT:
        return None
    return read_span(handle, span).decode("utf-8", "replace").strip()


def _caption(handle: IO[bytes], sample: Sample) -> str | None:
    text = _text(handle, sample.members.get("txt"))
    if text is not None:
        return text
    raw = _text(handle, sample.members.get("json"))
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    value = next((record[f] for f in CAPTION_FIELDS if isinstance(record.get(f), str)), None)
    return value.strip() if value is not None else None


def sample_fields(refs: Sequence[ImageRef]) -> list[dict[str, Any]]:
    """Each member's ``caption`` and ``cls`` (an int), where its sample has them (evaluation reads these);
    each shard is opened once. Raises OSError for a shard that cannot be read."""
    out: list[dict[str, Any]] = []
    handle: IO[bytes] | None = None
    index: ShardIndex | None = None
    opened: Path | None = None
    try:
        for ref in refs:
            if ref.file != opened or handle is None or index is None:
                if handle is not None:
                    handle.close()
                handle = _open(ref.file)
                index, opened = INDEXES.get(ref.file, handle), ref.file
            sample = index.samples.get(ref.member or "")
            if sample is None:
                raise OSError(f"{ref.path}: no such sample in the shard (changed since it was listed?)")
            fields: dict[str, Any] = {}
            caption = _caption(handle, sample)
            if caption is not None:
                fields["caption"] = caption
                fields["txt"] = _text(handle, sample.members.get("txt"))
            label = _text(handle, sample.members.get("cls"))
            if label is not None:
                with contextlib.suppress(ValueError, IndexError):
                    fields["cls"] = int(label.split()[0])
            out.append(fields)
    finally:
        if handle is not None:
            handle.close()
    return out


def member_path(shard: str, key: str) -> str:
    return f"{shard}#{key}"


class WebDatasetShards:
    """The :class:`clipcli.images.refs.Container` of ``.tar`` shards."""

    def expand(self, ref: ImageRef, options: ContainerOptions) -> tuple[list[ImageRef], list[Skipped]]:
        try:
            with _open(ref.file) as handle:
                index = INDEXES.get(ref.file, handle)
        except ExtraMissing as e:
            return [], [Skipped(ref.path, str(e))]
        except OSError as e:  # the index's own reasons (no errno: "not a tar file (...)"), or the system's
            from clipcli.images.decode import describe_error

            return [], [Skipped(ref.path, str(e) if e.errno is None else describe_error(e), read=True)]
        members, skipped = [], []
        for key, sample in index.samples.items():
            if sample.image is None:
                have = ", ".join(sorted(sample.members)) or "nothing"
                reason = f"no image in the sample (jpg, jpeg, png or webp; it has {have})"
                skipped.append(Skipped(member_path(ref.path, key), reason, read=True))
            else:
                members.append(ImageRef(member_path(ref.path, key), ref.file, key))
        for where, reason in index.problems:
            skipped.append(Skipped(ref.path if where is None else member_path(ref.path, where), reason, read=True))
        if not index.samples and not index.problems:
            skipped.append(Skipped(ref.path, "a tar file with no samples", read=True))
        return members, skipped

    def decode(self, ref: ImageRef, draft_size: int | None, max_pixels: int | None) -> Decoded:
        assert ref.member is not None
        handle = _held(ref.file)
        index = INDEXES.get(ref.file, handle)
        sample = index.samples.get(ref.member)
        if sample is None or sample.image is None:
            raise OSError(f"no image for {ref.member} in the shard (changed since it was listed?)")
        data = read_span(handle, sample.image)
        caption = _caption(handle, sample)
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            got = decode_opened(im, index.stat, draft_size, max_pixels)
        shard = ref.path[: -len(ref.member) - 1] if ref.path.endswith("#" + ref.member) else str(ref.file)
        got.meta["folder"] = os.path.dirname(shard)
        if caption is not None:
            got.meta["caption"] = caption
        return got


CONTAINER = WebDatasetShards()
