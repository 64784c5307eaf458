"""The engine contract: what ``embed`` and ``eval`` ask of an engine, and the bookkeeping every engine shares.

An engine embeds images. :meth:`Engine.embed` writes an :class:`EmbedJob` (images, output, options) and
returns an :class:`EmbedSummary`; the plan (which images to embed, which are unchanged, which rows to
remove), the images skipped and the summary are kept here, once; an engine only runs the plan
(:meth:`Engine.run`). :meth:`Engine.embed_dataset` embeds a labelled dataset's images for ``eval``.

Engines are found by name in :data:`clipcli.engines.ENGINES` (``--engine``): :mod:`clipcli.engines.local` (this
process) and :mod:`clipcli.engines.ray` (a Ray cluster). A new engine subclasses :class:`Engine` and
adds itself to the table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.errors import InputError
from clipcli.images.containers import container_of
from clipcli.images.decode import ImageOptions
from clipcli.images.sources import ImageRef, Skipped
from clipcli.models import LoadedModel, ModelOptions
from clipcli.store.clip_retrieval import ClipRetrievalStore
from clipcli.store.dataset import ParquetStore
from clipcli.store.formats import OutputFormat, keep_partial, parquet_storable
from clipcli.store.output import Layout, Output, OutputKind
from clipcli.store.parts import ModelTag, Rows, schema

if TYPE_CHECKING:
    from clipcli.evaluation.datasets import CaptionPairs, LabelledImages
    from clipcli.evaluation.run import ImageEmbeddings
    from clipcli.store.remote import RemoteStore


OnBatch = Callable[[int], None] | None
"""Called with the number of images a batch held."""


@dataclass(frozen=True)
class DatasetJob:
    """``eval``'s image side: embed ``source``'s images, in dataset order, with these options."""

    source: LabelledImages | CaptionPairs
    model: ModelOptions
    images: ImageOptions


@dataclass
class EmbedSummary:
    embedded: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: int = 0


@dataclass(frozen=True)
class EmbedEvents:
    """What a run reports as it goes (each optional): the number of images it will embed once planned,
    each image it skips, the number of images done after each batch, and (Ray) that the cluster is ready."""

    on_plan: Callable[[int], None] | None = None
    on_skip: Callable[[Skipped], None] | None = None
    on_batch: Callable[[int], None] | None = None
    on_ready: Callable[[], None] | None = None


@dataclass(frozen=True)
class EmbedJob:
    """One ``embed`` run: the images, where they go, and how they are embedded and stored.

    ``prune`` lets an incremental run remove more than :data:`clipcli.store.parts.PRUNE_SHARE` of the
    rows (of files gone or changed); without it such a run is refused before the first image."""

    refs: Sequence[ImageRef]
    output: Output
    model: ModelOptions = field(default_factory=ModelOptions)
    images: ImageOptions = field(default_factory=ImageOptions)
    dtype: str = "float32"
    normalize: bool = True
    part_size: int = 4096
    prune: bool = False


def model_tag(lm: LoadedModel, normalized: bool) -> ModelTag:
    return ModelTag(lm.name, lm.checksum, normalized)


class Sink:
    """Where embedded rows go; ``finish(keep)`` ends the run, writing what it has when ``keep``, and
    returns the number of rows it removed (of files gone or changed)."""

    def add(self, rows: Rows) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """The run stops before its end: rows of an input it may have stopped inside are not kept."""

    def finish(self, keep: bool) -> int:
        raise NotImplementedError


class StoreSink(Sink):
    """An incremental store planned before the run: a Parquet dataset directory, local or in an object
    store, or a folder in clip-retrieval's layout."""

    def __init__(self, store: ParquetStore | RemoteStore | ClipRetrievalStore, plan: Sequence[ImageRef]) -> None:
        self.store = store
        self.plan = plan  # the inputs to embed, in the order their rows come
        self.last: str | None = None  # the path of the last row given

    def add(self, rows: Rows) -> None:
        if rows.paths:
            self.last = rows.paths[-1]  # first: a run stopped inside store.add may have these rows pending
        self.store.add(rows)

    def stop(self) -> None:
        """The rows of the container (a video, a shard) the run stopped inside are dropped; one whose last
        planned input was given is whole, and stays."""
        if self.last is None:
            return
        after = next((i + 1 for i, ref in enumerate(self.plan) if ref.path == self.last), len(self.plan))
        container = container_of(self.last)
        if container is not None and after < len(self.plan) and container_of(self.plan[after].path) == container:
            self.store.drop_container(container)

    def finish(self, keep: bool) -> int:
        if not keep:
            self.store.release()
            return 0
        return self.store.finish()


class Run:
    """A run's tally: each image skipped is counted and reported in one place."""

    def __init__(self, summary: EmbedSummary, events: EmbedEvents) -> None:
        self.summary, self.events = summary, events

    def skip(self, skipped: Skipped) -> None:
        self.summary.skipped += 1
        if self.events.on_skip:
            self.events.on_skip(skipped)

    def batch(self, embedded: int, done: int) -> None:
        """``embedded`` rows written of ``done`` images handled."""
        self.summary.embedded += embedded
        if self.events.on_batch:
            self.events.on_batch(done)


class Engine:
    """One way to run ``embed`` (and ``eval``'s images); see the module's doc."""

    name = ""
    # The dataset layouts beside clipcli's own Parquet parts that this engine's runs write.
    layouts: frozenset[Layout] = frozenset()

    def embed(self, lm: LoadedModel, job: EmbedJob, events: EmbedEvents | None = None) -> EmbedSummary:
        """Embed ``job.refs`` into ``job.output``; a Parquet output (a dataset or one file) is incremental
        (see :mod:`clipcli.store.dataset`): its plan leaves out the images it holds unchanged.

        The output is locked and checked writable before the first image; whatever happens after that,
        the rows embedded so far are written where the engine keeps them (:meth:`keeps_partial`)."""
        events = events or EmbedEvents()
        summary = EmbedSummary()
        run = Run(summary, events)
        self.check(job)
        sch = schema(lm.embed_dim, job.dtype, model_tag(lm, job.normalize))
        refs = job.refs
        if job.output.format is OutputFormat.PARQUET:
            refs, unstorable = parquet_storable(refs)
            for s in unstorable:
                run.skip(s)
        layout = job.output.layout
        if layout is not Layout.PARQUET and layout not in self.layouts:
            raise InputError(
                f"{job.output.target}: the {self.name} engine cannot write {layout.value}; use --engine local"
            )
        sink: Sink
        if job.output.format is OutputFormat.PARQUET and job.output.kind is not OutputKind.STREAM:
            store = self._open_store(job, sch, lm.name)
            try:
                plan = store.plan(refs)
            except BaseException:
                store.release()
                raise
            refs, summary.unchanged = plan.to_embed, plan.unchanged
            sink = StoreSink(store, refs)
        else:
            sink = self.file_sink(lm, job, sch)
        if events.on_plan:
            events.on_plan(len(refs))
        try:
            self.run(lm, job, refs, sink, run)
        except BaseException as e:
            sink.stop()
            sink.finish(self.keeps_partial(e, summary))
            raise
        summary.removed = sink.finish(True)
        return summary

    def _open_store(self, job: EmbedJob, sch: Any, model: str) -> ParquetStore | RemoteStore | ClipRetrievalStore:
        """The incremental store of a dataset output (clipcli's Parquet, or clip-retrieval's layout), opened."""
        store: ParquetStore | RemoteStore | ClipRetrievalStore
        target = job.output.target or ""
        if job.output.layout is Layout.CLIP_RETRIEVAL:
            store = ClipRetrievalStore(Path(target), sch, model, part_rows=job.part_size, shard=job.output.shard)
        else:
            from clipcli.store.remote import parquet_store

            store = parquet_store(target, sch, model, part_rows=job.part_size, shard=job.output.shard)
            self.check_store(store, job)
        store.prune = job.prune
        store.open()
        return store

    def check(self, job: EmbedJob) -> None:
        """Refuse, before anything is read, a job this engine cannot run."""

    def check_store(self, store: ParquetStore | RemoteStore, job: EmbedJob) -> None:
        """Refuse, before it is opened, a store this engine cannot write."""

    def file_sink(self, lm: LoadedModel, job: EmbedJob, sch: Any) -> Sink:
        """The sink of an output that is one file or a stream (not a dataset directory)."""
        raise NotImplementedError(f"the {self.name} engine writes Parquet dataset directories only")

    def keeps_partial(self, error: BaseException, summary: EmbedSummary) -> bool:
        """Whether the rows of a run that ended with ``error`` are written (else the output is released)."""
        return keep_partial(error, summary.embedded)

    def run(self, lm: LoadedModel, job: EmbedJob, refs: Sequence[ImageRef], sink: Sink, run: Run) -> None:
        """Embed ``refs`` (the plan) into ``sink``, counting each batch and skip through ``run``."""
        raise NotImplementedError

    def embed_dataset(self, lm: LoadedModel, job: DatasetJob, on_batch: OnBatch = None) -> ImageEmbeddings:
        """``eval``'s image side: the embeddings of the job's images, in dataset order."""
        raise NotImplementedError
