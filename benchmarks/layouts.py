"""Storage layouts side by side (issue 25): write speed, size on disk and ``rank`` latency of the same
embeddings as clipcli's Parquet dataset, an NPY with its sidecar, clip-retrieval's layout (float16, as
clip-retrieval writes it, and float32) and a Lance dataset.

    python benchmarks/layouts.py [--rows 1000000] [--dim 512] [--repeat 5] [--work DIR] [--json OUT]

Rows are random unit vectors (float32 unless said), with paths like an embed run's and the columns an
embed run stores beside them. Each clipcli layout is written through the code ``embed`` writes it with
(the Parquet store in parts of 4096 rows, the NPY writer, the clip-retrieval store), fed batches of 4096
rows as an embed run would, timed from the first batch to the last file in place (the batches' making,
the same for all, included).

``rank`` is timed on each source in a fresh process (its imports aside): the first search (for Parquet
this builds the search cache, a memory-mapped copy; the cache is emptied before) and the median of the
next ``--repeat`` ones, a query of 10 nearest rows, through :func:`clipcli.search.rank.rank_many`, the
call the command makes. The model is a stand-in with the rows' record, since no 512-wide model is needed
to scan saved rows. The page cache is warm for every layout alike (each was just written).

Lance (``pip install pylance``) was measured to decide whether clipcli should write it (it does not:
docs/formats.md): it is written as clipcli's writer for it did, data files of 65536 rows of the same
tables (vectors as a fixed-size list) committed once as a version, and ranked as clipcli's reader of it
did: the vector column scanned batch by batch into numpy, the same top-10 kept, the winners' paths read
by row number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from common import cpu_model

BATCH = 4096
TAG = ("bench-512", "b" * 64)


def batches(rows: int, dim: int):
    """(paths, unit vectors) in batches of BATCH rows, the same for every layout (a fixed seed)."""
    rng = np.random.default_rng(0)
    for start in range(0, rows, BATCH):
        n = min(BATCH, rows - start)
        vectors = rng.standard_normal((n, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        yield [f"photos/{i // 1000:04d}/img_{i:09d}.jpg" for i in range(start, start + n)], vectors


def as_rows(paths: list[str], vectors: np.ndarray):
    from clipcli.store.parts import Rows, Stat

    n = len(paths)
    return Rows(paths, vectors, [(512, 384)] * n, [Stat(50_000, 1.7e9)] * n)


def write(kind: str, target: Path, rows: int, dim: int) -> None:
    from clipcli.store import parts
    from clipcli.store.parts import ModelTag, schema

    # The rows name no real files: every file counts as present and unchanged, so that the incremental
    # stores' end-of-run reconciliation (it reads every part's paths) keeps them, as after a real run.
    parts.stat_of = lambda path: parts.Stat(50_000, 1.7e9)  # type: ignore[assignment]
    tag = ModelTag(*TAG, True)
    if kind == "npy":
        from clipcli.store.output import NpyWriter

        writer = NpyWriter(str(target), tag=tag, dim=dim)
        for paths, vectors in batches(rows, dim):
            writer.write_matrix(paths, vectors)
        writer.close()
        return
    if kind == "lance":
        write_lance(target, schema(dim, "float32", tag), rows, dim)
        return
    if kind == "parquet":
        from clipcli.store.dataset import ParquetStore

        store: object = ParquetStore(target, schema(dim, "float32", tag), TAG[0])
    else:
        from clipcli.store.clip_retrieval import ClipRetrievalStore

        dtype = "float32" if kind.endswith("f32") else "float16"
        store = ClipRetrievalStore(target, schema(dim, dtype, tag), TAG[0])
    store.open()  # type: ignore[attr-defined]
    for paths, vectors in batches(rows, dim):
        store.add(as_rows(paths, vectors))  # type: ignore[attr-defined]
    store.finish()  # type: ignore[attr-defined]


LANCE_ROWS = 1 << 16


def write_lance(target: Path, sch, rows: int, dim: int) -> None:
    import lance
    import pyarrow as pa

    at = sch.get_field_index("embedding")
    sch = sch.set(at, sch.field(at).with_name("vector"))
    fragments, pending = [], []

    def flush() -> None:
        table = pa.concat_tables(pending).rename_columns(sch.names).cast(sch)
        fragments.extend(lance.fragment.write_fragments(table, str(target), schema=sch))
        pending.clear()

    for paths, vectors in batches(rows, dim):
        pending.append(as_rows(paths, vectors).table(sch.set(at, sch.field(at).with_name("embedding")), TAG[0]))
        if sum(t.num_rows for t in pending) >= LANCE_ROWS:
            flush()
    if pending:
        flush()
    lance.LanceDataset.commit(str(target), lance.LanceOperation.Overwrite(sch, fragments))


def rank_lance(source: Path, query: np.ndarray) -> list[str]:
    import lance

    dataset = lance.dataset(str(source))
    best_scores, best_rows, start = np.empty(0, np.float32), np.empty(0, np.int64), 0
    for batch in dataset.to_batches(columns=["vector"], batch_size=LANCE_ROWS):
        matrix = batch.column(0).values.to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1)
        scores = matrix @ query[0]
        top = np.argpartition(-scores, 9)[:10]
        best_scores = np.concatenate([best_scores, scores[top]])
        best_rows = np.concatenate([best_rows, top + start])
        keep = np.argsort(-best_scores)[:10]
        best_scores, best_rows = best_scores[keep], best_rows[keep]
        start += batch.num_rows
    return [str(p) for p in dataset.take(best_rows.tolist(), columns=["path"]).column(0).to_pylist()]


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size + (path.with_name(path.stem + ".rows.jsonl").stat().st_size)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def rank_times(source: Path, dim: int, repeat: int) -> dict[str, float]:
    """In this process: the first search over ``source`` and the median of ``repeat`` more."""
    from clipcli.search.rank import rank_many
    from clipcli.store.search_cache import search_cache_dir

    shutil.rmtree(search_cache_dir(), ignore_errors=True)
    # Imported before the clock starts: what a search reads is timed, not the modules it loads.
    import clipcli.store.index
    import clipcli.store.saved  # noqa: F401

    if source.suffix == ".lance":
        import lance  # noqa: F401
    lm = SimpleNamespace(name=TAG[0], checksum=TAG[1], embed_dim=dim)
    query = np.random.default_rng(1).standard_normal((1, dim), dtype=np.float32)
    query /= np.linalg.norm(query)
    times = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        if source.suffix == ".lance":
            assert len(rank_lance(source, query)) == 10
        else:
            assert len(rank_many(lm, query, [str(source)], 10)[0]) == 10  # type: ignore[arg-type]
        times.append(time.perf_counter() - start)
    return {"first_s": times[0], "next_median_s": statistics.median(times[1:])}


LAYOUTS = {
    "parquet": "emb/",
    "npy": "emb.npy",
    "clip-retrieval": "cr/",
    "clip-retrieval-f32": "cr32/",
    "lance": "emb.lance",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/clipcli-layouts"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--rank-only", metavar="SOURCE")  # internal: one source's rank timings, as JSON
    args = ap.parse_args()
    if args.rank_only:
        print(json.dumps(rank_times(Path(args.rank_only), args.dim, args.repeat)))
        return
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    os.environ["CLIPCLI_CACHE"] = str(args.work / "cache")
    results = {}
    for kind, name in LAYOUTS.items():
        target = args.work / name
        start = time.perf_counter()
        write(kind, target, args.rows, args.dim)
        seconds = time.perf_counter() - start
        rank = [sys.executable, __file__, "--rank-only", str(target), "--dim", str(args.dim)]
        ran = subprocess.run(
            [*rank, "--repeat", str(args.repeat)],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ,
        )
        ranked = json.loads(ran.stdout.strip().splitlines()[-1])
        results[kind] = {
            "write_s": round(seconds, 2),
            "rows_per_s": round(args.rows / seconds),
            "size_mb": round(size_of(target) / 1e6, 1),
            "rank_first_s": round(ranked["first_s"], 3),
            "rank_next_s": round(ranked["next_median_s"], 3),
        }
        print(kind, results[kind], flush=True)
    report = {"rows": args.rows, "dim": args.dim, "cpu": cpu_model(), "cores": os.cpu_count(), "layouts": results}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
