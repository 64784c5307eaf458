"""``dedup`` as one call: a :class:`DedupRequest` in; the groups written to its output (or, with ``keep``,
the paths one could delete, for the caller to print) and a :class:`DedupResult` out.

Saved embeddings are grouped through their index when it is current, else by comparing every pair;
images are embedded first. The grouping itself is :mod:`clipcli.search.dedup`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING

from clipcli.errors import InputError
from clipcli.search.dedup import DEFAULT_THRESHOLD, Member, Prefer, StoredFiles
from clipcli.store.formats import OutputFormat

if TYPE_CHECKING:
    from clipcli.images.decode import ImageOptions
    from clipcli.images.sources import Skipped
    from clipcli.models import LoadedModel, ModelOptions

ImagesOf = Callable[[], "ImageOptions"]
COLUMNS = ("group", "path", "similarity_to_group_representative")
RESULT_FORMATS = (OutputFormat.TABLE, OutputFormat.CSV, OutputFormat.JSONL, OutputFormat.PARQUET)


@dataclass(frozen=True)
class DedupRequest:
    """``dedup``'s arguments: one embeddings source, or images; ``keep`` (which member is kept: only the
    others' paths are listed) or rows written to ``output`` in ``format``."""

    inputs: Sequence[str]
    threshold: float = DEFAULT_THRESHOLD
    keep: Prefer | None = None
    null: bool = False
    output: str | None = None
    format: OutputFormat | None = None
    no_index: bool = False


@dataclass(frozen=True)
class DedupHooks:
    """What a run tells its caller: ``load`` loads a model; ``on_skip`` hears of each input left out;
    ``on_note`` of an index skipped, and why."""

    load: Callable[[ModelOptions], LoadedModel]
    on_skip: Callable[[Skipped], None]
    on_note: Callable[[str], None]
    stdin: IO[str] | None = None


@dataclass(frozen=True)
class DedupResult:
    groups: list[list[Member]]
    paths: list[str] | None = None  # with keep: the paths one could delete, for the caller to print


def run_dedup(request: DedupRequest, models: ModelOptions, images: ImagesOf, hooks: DedupHooks) -> DedupResult:
    """Check the request, group the near-duplicates, and write the groups (or list the paths, with keep).

    ``images`` gives the image options when images are embedded, and only then (``--max-megapixels``
    is checked where it is used: saved embeddings never read it)."""
    from clipcli.store.formats import open_writer, stdout_is_tty
    from clipcli.store.output import parse_output
    from clipcli.store.parts import refuse_flat_embeddings
    from clipcli.store.refusals import refuse_output_over_inputs
    from clipcli.store.saved import is_embedding_source

    r = request
    refuse_output_over_inputs([r.output], [], datasets=r.inputs)
    saved = [i for i in r.inputs if i != "-" and is_embedding_source(i)]
    if saved and (len(saved) > 1 or len(r.inputs) > 1):
        raise InputError("give one embeddings source, or images (not both)")
    if r.null and r.keep is None:
        raise InputError("-0/--null ends the paths --keep prints: add --keep first or --keep largest")
    if r.keep is not None and saved:
        _refuse_unverifiable(saved[0])
    refuse_flat_embeddings(r.inputs)
    if r.keep is not None:
        return _keep(r, saved, models, images, hooks)
    out_format = parse_output(r.output, r.format, RESULT_FORMATS, tty=stdout_is_tty(), piped=OutputFormat.CSV).format
    schema = None
    if out_format is OutputFormat.PARQUET:
        import pyarrow as pa

        schema = pa.schema([(COLUMNS[0], pa.int64()), (COLUMNS[1], pa.string()), (COLUMNS[2], pa.float64())])
    with open_writer(out_format, r.output, schema=schema, columns=COLUMNS) as writer:
        groups, _ = _groups(r, saved, models, images, hooks, "largest")
        writer.write(
            [dict(zip(COLUMNS, (m.group, m.path, round(m.similarity, 6)), strict=True)) for g in groups for m in g]
        )
    return DedupResult(groups)


def _keep(r: DedupRequest, saved: list[str], models: ModelOptions, images: ImagesOf, hooks: DedupHooks) -> DedupResult:
    """The paths one could delete: all but the kept member of each group; saved rows only while their
    files are those embedded."""
    from clipcli.images.sources import Skipped
    from clipcli.search.dedup import listable

    if r.output or r.format:
        raise InputError("--keep prints paths one a line on stdout: leave out --output and --format")
    assert r.keep is not None
    # A video's frame or a shard's sample (``clip.mp4#t=2.000``, ``shard.tar#000042``) is no file of its
    # own: the groups leave them out, so that one is never listed, nor a file listed as its copy.
    groups, stored = _groups(r, saved, models, images, hooks, r.keep, files_only=True)
    # verified copies only: the kept file's picture; saved rows, only while the files are those embedded
    paths, refused = listable(groups, stored)
    for path, reason in refused:
        hooks.on_skip(Skipped(path, reason))
    if not r.null:
        for p in paths:
            if "\n" in p:
                raise InputError(
                    f"{p!r}: a name holding a newline cannot be listed one a line; pass -0 (NUL-separated "
                    "paths, for xargs -0)"
                )
    return DedupResult(groups, paths)


def _groups(
    r: DedupRequest,
    saved: list[str],
    models: ModelOptions,
    images: ImagesOf,
    hooks: DedupHooks,
    prefer: Prefer,
    files_only: bool = False,
) -> tuple[list[list[Member]], StoredFiles | None]:
    """The groups, and what embed recorded of the files behind saved rows (None for images)."""
    if saved:
        if models.spec is not None:  # asked for by name: the saved rows must be that model's, as rank requires
            from clipcli.store.saved import Expect, require_saved_model, saved_tag

            lm = hooks.load(models)
            require_saved_model(saved_tag(Path(saved[0]))[0], Expect.of(lm), Path(saved[0]))
        return _saved_groups(Path(saved[0]), r.threshold, r.no_index, prefer, hooks.on_note, files_only)
    return _image_groups(r, models, images, hooks, prefer, files_only), None


def _image_groups(
    r: DedupRequest, models: ModelOptions, images: ImagesOf, hooks: DedupHooks, prefer: Prefer, files_only: bool
) -> list[list[Member]]:
    """Embed the images, then group them by comparing every pair."""
    import numpy as np

    from clipcli.images.sources import discover, found_nothing, nothing_found
    from clipcli.search.dedup import find_duplicates, matrix_search
    from clipcli.zeroshot.encode import iter_image_embeddings

    refs, missing = discover(list(r.inputs), hooks.stdin, images().containers)
    if found_nothing(refs, missing):
        raise nothing_found(list(r.inputs), missing)
    for m in missing:
        hooks.on_skip(m)
    options = images()
    lm = hooks.load(models)
    names: list[str] = []
    pixels: dict[str, int] = {}
    rows = []
    for batch in iter_image_embeddings(lm, refs, options.batch_size, options.workers, max_pixels=options.max_pixels):
        for s in batch.skipped:
            hooks.on_skip(s)
        names += batch.names
        pixels.update((name, w * h) for name, (w, h) in zip(batch.names, batch.sizes, strict=True))
        rows.append(batch.embeddings.numpy())
    matrix = np.concatenate(rows) if rows else np.zeros((0, lm.embed_dim), np.float32)
    return find_duplicates(
        len(names),
        lambda rows: matrix[rows],
        lambda rows: [names[i] for i in rows],
        r.threshold,
        None,
        matrix_search(matrix),
        prefer=prefer,
        pixels_of=lambda path: pixels.get(path, 0),
        files_only=str if files_only else None,
    )


def _refuse_unverifiable(source: str) -> None:
    """--keep lists saved rows only once their files are checked: an NPY stores nothing to check with."""
    if Path(source).suffix.lower() == ".npy":
        raise InputError(
            f"{source}: an NPY records no file sizes or mtimes, so --keep cannot check that its files are "
            "still those embedded; embed to Parquet (-o emb.parquet or a folder) for --keep, or leave --keep out"
        )


def _saved_groups(
    path: Path, threshold: float, no_index: bool, prefer: Prefer, on_note: Callable[[str], None], files_only: bool
) -> tuple[list[list[Member]], StoredFiles | None]:
    from clipcli.search.dedup import file_size, find_duplicates
    from clipcli.store.index import META, Stale, default_index_path, exact_search, open_index
    from clipcli.store.saved import Expect, open_matrix, row_files, saved_tag

    tag, dim = saved_tag(path)
    expect = Expect(tag.name, tag.sha256, dim)
    opened = None
    index_path = default_index_path(path)
    if not no_index and (index_path / META).exists():
        try:
            opened = open_index(index_path, path, expect, command="dedup").verified()
        except Stale as e:
            on_note(f"{e}; comparing every pair meanwhile")
    saved = opened.saved if opened is not None else open_matrix(path, expect)
    if opened is not None and opened.vectors is None:
        opened = None  # a flat index is the exact search itself
    stored = None
    if path.suffix.lower() != ".npy":
        files, key = row_files(path)
        stored = StoredFiles([str(f) for f in files], _recorded_base(files), key)
    groups = find_duplicates(
        saved.matrix.shape[0],
        saved.take,
        saved.name_rows,
        threshold,
        opened,
        partial(exact_search, saved),
        prefer=prefer,
        size_of=stored.size if stored is not None else file_size,
        pixels_of=stored.pixels if stored is not None else None,
        files_only=(stored.locate if stored is not None else str) if files_only else None,
    )
    return groups, stored


def _recorded_base(files: list[Path]) -> str | None:
    """The folder the dataset's relative paths are relative to, as its first readable part records it;
    None for a dataset written before clipcli recorded one: its paths are relative to the working folder,
    and are checked from here like any other (what does not match is not listed)."""
    import pyarrow.parquet as pq

    from clipcli.store.parts import dataset_base

    for part in files:
        try:
            return dataset_base(pq.read_schema(part).metadata)
        except (OSError, ValueError):
            continue
    return None
