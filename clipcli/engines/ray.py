"""``embed`` and ``eval`` on a Ray cluster: Ray Data's batch-inference pattern over clipcli's own code.

The driver (this process) finds the inputs, loads the model once to learn what it writes (name,
checksum, width: the dataset's schema), plans the run with the same :class:`ParquetStore` as the local
engine, and hands Ray a list of (index, name, absolute path). Ray runs:

- with GPUs: CPU tasks that decode and resize (:func:`clipcli.images.batches.iter_batches`), then one model actor
  per GPU (``num_gpus=1``) that turns pixels into embeddings (:func:`clipcli.zeroshot.encode.embed_batches`);
- without: one model actor per node holding that node's cores, which decodes and embeds in turns as the
  local engine does (:func:`clipcli.zeroshot.encode.iter_image_embeddings`): on CPUs, decoding beside the model
  stalls the model's threads at every barrier, so taking turns is faster (see the README's benchmarks).

Each actor loads the model once (it is given the model's name, never the model) and writes every batch
it embeds as a whole part of the output (:class:`clipcli.store.parts.PartWriter`), then returns only names and
reasons for the driver's summary. A part is complete when it has its name, so a driver killed at any
moment leaves whole parts, which the next run keeps (its plan skips their files). Ray restarts an actor
whose process dies and retries its batch; a batch written twice that way, or by a run resumed after a
crash, leaves duplicate rows that the store drops at the end (one row per file). A container's members
(a WebDataset shard's samples) travel as one block, one call and one part, decoded in the actor: a
whole tar shard is the unit of work, and a killed run leaves all of its rows or none.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.engines.base import DatasetJob, EmbedJob, EmbedSummary, Engine, OnBatch, Run, Sink, StoreSink
from clipcli.engines.ray_cluster import connected
from clipcli.errors import ClipCliError, InputError, ModelError
from clipcli.images.decode import DEFAULT_MAX_PIXELS
from clipcli.images.sources import ImageRef, Skipped
from clipcli.store.clip_retrieval import ClipRetrievalStore
from clipcli.store.parts import PartWriter, Rows, Stat, stat_of

if TYPE_CHECKING:
    import numpy as np

    from clipcli.evaluation.run import ImageEmbeddings
    from clipcli.images.decode import ImageSpec
    from clipcli.models import LoadedModel
    from clipcli.store.dataset import ParquetStore
    from clipcli.store.remote import RemoteStore

GPU_ROWS_PER_CALL = 512  # decoded pixels travel through the object store: 512 x 150 KB per batch at 224 px


@dataclass(frozen=True)
class ModelSpec:
    """What an actor needs to load the model itself: the names the user gave, and the checksum the
    driver's copy had (a node that reads another file under that name is refused, not mixed in)."""

    model: str | None
    device: str
    precision: str
    checksum: str


@dataclass(frozen=True)
class Work:
    """How images become rows: the local engine's settings, shared by every task and actor."""

    geometry: ImageSpec | int
    batch_size: int
    exact: bool
    normalize: bool
    max_pixels: int | None


@dataclass(frozen=True)
class Layout:
    """Where the model runs: ``actors`` actors with these resources, decoding in tasks or in the actors."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    device: str
    decode_in_tasks: bool
    rows_per_call: int


def model_spec(model: str | None, device: str, precision: str, lm: LoadedModel) -> ModelSpec:
    """A checkpoint named by a relative path is named absolutely, as the actors' folders differ."""
    if model and os.path.isfile(model):
        model = os.path.abspath(model)
    return ModelSpec(model, device, precision, lm.checksum)


def _node_hint(reason: str) -> str:
    """A file the driver listed that a worker cannot read is most often not on a filesystem it shares."""
    if reason.startswith(("no such file", "permission denied")):
        return (
            f"{reason} on node {socket.gethostname()} (every Ray node must read the inputs at the same path: "
            "a shared filesystem)"
        )
    return reason


class Embedder:
    """A model actor: loads the model once, then embeds batches (and writes them as parts)."""

    def __init__(self, spec: ModelSpec, work: Work, writer: PartWriter | None) -> None:
        self.work, self.writer = work, writer
        self.error: str | None = None
        try:
            from clipcli.models import load_model

            self.lm = load_model(spec.model, spec.device, spec.precision)
            if self.lm.checksum != spec.checksum:
                raise ModelError(f"{spec.model}: the file has another checksum here than on the driver")
        except Exception as e:
            # Raised with the first batch: a constructor that fails is restarted by Ray Data, model load
            # after model load, before the run gives up; a failing batch ends the run at once.
            self.error = f"{type(e).__name__}: {e}" if not isinstance(e, ClipCliError) else str(e)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        if self.error is not None:
            raise ModelError(f"the model failed to load on Ray node {socket.gethostname()}: {self.error}")
        refs = batch_refs(batch)
        names, files = [r.path for r in refs], [str(r.file) for r in refs]
        errors = [""] * len(refs)
        chunks: list[np.ndarray] = []
        rows: list[int] = []
        sizes: list[tuple[int, int]] = []
        meta: list[dict[str, Any]] = []
        position = {name: i for i, name in enumerate(names)}
        for embedded in self._embedded(batch, refs):
            for s in embedded.skipped:
                errors[position[s.path]] = _node_hint(s.reason)
            chunks.append(embedded.embeddings.numpy())
            rows.extend(embedded.indices)
            sizes.extend(embedded.sizes)
            meta.extend(embedded.meta or [{} for _ in embedded.indices])
        dim = self.lm.embed_dim
        matrix = np.concatenate(chunks) if chunks else np.empty((0, dim), np.float32)
        out = {"index": np.asarray(batch["index"], np.int64), "error": np.array(errors, dtype=object)}
        if self.writer is None:  # eval: the embeddings go back to the driver, in input order
            full = np.zeros((len(refs), dim), np.float32)
            full[rows] = matrix
            out["embedding"] = full
        elif rows:
            stats = [stat_of(files[i]) or Stat(0, 0.0) for i in rows]
            self.writer.write(Rows([names[i] for i in rows], matrix, sizes, stats, meta))
        return out

    def _embedded(self, batch: dict[str, np.ndarray], refs: list[ImageRef]) -> Iterator[Any]:
        from clipcli.images.batches import Batch
        from clipcli.zeroshot.encode import embed_batches, iter_image_embeddings

        w = self.work
        names = [r.path for r in refs]
        if "pixels" not in batch:
            yield from iter_image_embeddings(
                self.lm, refs, w.batch_size, 0, w.exact, w.normalize, max_pixels=w.max_pixels
            )
            return
        bad = {i: str(batch["error"][i]) for i in range(len(refs)) if batch["error"][i]}
        for start in range(0, len(refs), w.batch_size):
            span = range(start, min(len(refs), start + w.batch_size))
            good = [i for i in span if i not in bad]
            images = batch["pixels"][good] if good else None
            sizes = [(int(batch["width"][i]), int(batch["height"][i])) for i in good]
            decoded = Batch(good, images, sizes, [(i, bad[i]) for i in span if i in bad])
            yield from embed_batches(self.lm, [decoded], names, w.normalize)


def batch_refs(batch: dict[str, np.ndarray]) -> list[ImageRef]:
    """The images of a Ray batch; a container's member carries its ``member`` (empty for a file)."""
    members = batch.get("member")
    return [
        ImageRef(str(n), Path(str(f)), str(members[i]) if members is not None and members[i] else None)
        for i, (n, f) in enumerate(zip(batch["path"], batch["file"], strict=True))
    ]


def _units(refs: Sequence[ImageRef], rows_per_call: int) -> list[list[int]]:
    """The inputs split into units of work: each container's members together (a whole tar shard,
    however many samples it holds), files in runs of up to ``rows_per_call``."""
    units: list[list[int]] = []
    current: list[int] = []
    for i, ref in enumerate(refs):
        same = current and (
            refs[current[-1]].file == ref.file if ref.member is not None else refs[current[-1]].member is None
        )
        if current and (not same or (ref.member is None and len(current) >= rows_per_call)):
            units.append(current)
            current = []
        current.append(i)
    if current:
        units.append(current)
    return units


def decode_batch(batch: dict[str, np.ndarray], work: Work) -> dict[str, np.ndarray]:
    """A CPU task: decode and resize images to the model's input, uint8 (the actor normalises them)."""
    import numpy as np

    from clipcli.images.batches import iter_batches
    from clipcli.images.decode import image_spec

    refs = batch_refs(batch)
    size = image_spec(work.geometry).size
    pixels = np.zeros((len(refs), size, size, 3), np.uint8)
    width, height = np.zeros(len(refs), np.int32), np.zeros(len(refs), np.int32)
    errors = [""] * len(refs)
    for decoded in iter_batches(refs, work.geometry, max(1, len(refs)), 0, work.exact, False, work.max_pixels):
        if decoded.images is not None:
            pixels[decoded.indices] = decoded.images
        for i, (w, h) in zip(decoded.indices, decoded.sizes, strict=True):
            width[i], height[i] = w, h
        for i, reason in decoded.skipped:
            errors[i] = _node_hint(reason)
    return {**batch, "pixels": pixels, "width": width, "height": height, "error": np.array(errors, dtype=object)}


def plan_layout(ray: Any, device: str, n: int, batch_size: int, part_size: int) -> Layout:
    """One actor per GPU when the cluster has GPUs (and ``device`` allows them), else one per node
    holding the smallest node's cores; batches small enough that every actor gets several."""
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    gpus = int(sum(node["Resources"].get("GPU", 0) for node in nodes))
    wants_gpu = device == "auto" or device.startswith("cuda")
    if device.startswith("cuda") and not gpus:
        raise ModelError(f"--device {device}: the Ray cluster has no GPU")
    if gpus and wants_gpu:
        actors = gpus
        rows = min(part_size, max(batch_size, GPU_ROWS_PER_CALL))
        rows = min(rows, max(batch_size, math.ceil(n / (actors * 4))))
        return Layout(min(actors, max(1, math.ceil(n / rows))), 1, 1, "cuda", True, rows)
    cpus = min((node["Resources"].get("CPU", 0) for node in nodes), default=1) or 1
    rows = min(part_size, max(batch_size, math.ceil(n / (len(nodes) * 4))))
    return Layout(min(len(nodes), max(1, math.ceil(n / rows))), cpus, 0, "cpu", False, rows)


def _pipeline(
    ray: Any, refs: Sequence[ImageRef], layout: Layout, spec: ModelSpec, work: Work, writer: PartWriter | None
) -> Any:
    if any(r.member is not None for r in refs):
        # Containers (WebDataset shards) are whole units of work: one block per shard, one call per
        # block, so an actor writes a shard's rows as one part, and decodes them itself.
        import pyarrow as pa

        blocks = [
            pa.table(
                {
                    "index": unit,
                    "path": [refs[i].path for i in unit],
                    "file": [os.path.abspath(refs[i].file) for i in unit],
                    "member": [refs[i].member or "" for i in unit],
                }
            )
            for unit in _units(refs, layout.rows_per_call)
        ]
        ds, per_call = ray.data.from_arrow(blocks), None
    else:
        items = [{"index": i, "path": r.path, "file": os.path.abspath(r.file)} for i, r in enumerate(refs)]
        blocks_n = max(1, math.ceil(len(items) / layout.rows_per_call))
        ds, per_call = ray.data.from_items(items, override_num_blocks=blocks_n), layout.rows_per_call
        if layout.decode_in_tasks:
            ds = ds.map_batches(decode_batch, batch_size=work.batch_size, fn_kwargs={"work": work}, num_cpus=1)
    # Ray Data restarts an actor whose process dies and retries its batch (max_restarts and
    # max_task_retries are unlimited by default), and retries a task whose worker dies.
    return ds.map_batches(
        Embedder,
        batch_size=per_call,
        fn_constructor_kwargs={
            "spec": ModelSpec(spec.model, layout.device, spec.precision, spec.checksum),
            "work": work,
            "writer": writer,
        },
        compute=ray.data.ActorPoolStrategy(size=layout.actors),
        num_cpus=layout.cpus_per_actor,
        num_gpus=layout.gpus_per_actor,
    )


def _cause(error: BaseException) -> ClipCliError | None:
    """The clipcli error a Ray task raised, under the layers Ray and Ray Data wrap around it."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ClipCliError) and type(e).__module__.startswith("clipcli"):
            return e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    # Ray Data hands back a user error as the text of its traceback: its last clipcli line is the error.
    import re

    from clipcli import errors

    found = re.findall(r"^clipcli\.errors\.(\w+): (.+)$", str(error), re.MULTILINE)
    if found:
        kind = getattr(errors, found[-1][0], None)
        if isinstance(kind, type) and issubclass(kind, ClipCliError):
            return kind(found[-1][1])
    return None


def _results(ds: Any) -> Iterator[dict[str, np.ndarray]]:
    """The pipeline's output batches; a clipcli error raised on a worker is raised here as itself."""
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except ClipCliError:
        raise
    except Exception as e:
        cause = _cause(e)
        if cause is not None:
            raise type(cause)(str(cause)) from None
        raise


class RayEngine(Engine):
    """A Ray cluster (``address``: else $RAY_ADDRESS, else a Ray instance started here); it writes Parquet
    dataset directories only: its workers write the parts (see the module's doc)."""

    name = "ray"

    def __init__(self, address: str | None = None) -> None:
        self.address = address

    def check_store(self, store: ParquetStore | RemoteStore, job: EmbedJob) -> None:
        if not store.is_dir:
            raise InputError(
                f"{job.output.target}: --engine ray writes a Parquet dataset directory: name one (-o DIR/)"
            )

    def keeps_partial(self, error: BaseException, summary: EmbedSummary) -> bool:
        return False  # the parts the workers wrote are whole and stay; the next run resumes from them

    def run(self, lm: LoadedModel, job: EmbedJob, refs: Sequence[ImageRef], sink: Sink, run: Run) -> None:
        if not refs:
            return
        assert isinstance(sink, StoreSink) and not isinstance(sink.store, ClipRetrievalStore)  # refused before
        im, spec = job.images, model_spec(job.model.spec, job.model.device, job.model.precision, lm)
        work = Work(lm.image, im.batch_size, im.exact, job.normalize, im.max_pixels)
        with connected(self.address) as ray:
            layout = plan_layout(ray, spec.device, len(refs), im.batch_size, job.part_size)
            ds = _pipeline(ray, refs, layout, spec, work, sink.store.part_writer())
            if run.events.on_ready:
                run.events.on_ready()
            for batch in _results(ds):
                done = 0
                for index, error in zip(batch["index"], batch["error"], strict=True):
                    if error:
                        run.skip(Skipped(refs[int(index)].path, str(error)))
                    else:
                        done += 1
                run.batch(done, len(batch["index"]))

    def embed_dataset(self, lm: LoadedModel, job: DatasetJob, on_batch: OnBatch = None) -> ImageEmbeddings:
        source, model, images = job.source, job.model, job.images
        if source.refs is None:
            raise InputError("--engine ray embeds image files; a torchvision benchmark lives in this process's memory")
        spec = model_spec(model.spec, model.device, model.precision, lm)
        return embed_dataset_on_ray(
            lm,
            spec,
            source.refs,
            address=self.address,
            batch_size=images.batch_size,
            exact=images.exact,
            on_batch=on_batch,
            max_pixels=images.max_pixels,
        )


def embed_dataset_on_ray(
    lm: LoadedModel,
    spec: ModelSpec,
    refs: Sequence[ImageRef],
    *,
    address: str | None = None,
    batch_size: int = 32,
    exact: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    on_batch: Callable[[int], None] | None = None,
) -> ImageEmbeddings:
    """``eval``'s image side on a Ray cluster: the embeddings of ``refs`` back in this process, in input
    order, as :func:`clipcli.evaluation.run.embed_dataset` returns them (the text side stays here: it is small)."""
    import time

    import numpy as np

    from clipcli.evaluation.run import ImageEmbeddings

    start = time.perf_counter()
    matrix = np.zeros((len(refs), lm.embed_dim), np.float32)
    errors: dict[int, str] = {}
    if refs:
        work = Work(lm.image, batch_size, exact, True, max_pixels)
        with connected(address) as ray:
            layout = plan_layout(ray, spec.device, len(refs), batch_size, 4096)
            for batch in _results(_pipeline(ray, refs, layout, spec, work, None)):
                for row, (index, error) in enumerate(zip(batch["index"], batch["error"], strict=True)):
                    if error:
                        errors[int(index)] = str(error)
                    else:
                        matrix[int(index)] = batch["embedding"][row]
                if on_batch:
                    on_batch(len(batch["index"]))
    kept = [i for i in range(len(refs)) if i not in errors]
    skipped = [Skipped(refs[i].path, errors[i]) for i in sorted(errors)]
    return ImageEmbeddings(matrix[kept], kept, skipped, time.perf_counter() - start)
