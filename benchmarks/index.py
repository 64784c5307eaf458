"""ANN index: build cost, size, memory, latency and recall over generated clustered embeddings (issue 15).

    python benchmarks/index.py [--rows 1000000 10000000] [--compare 200000] [--queries 200]

Rows are 512-d unit vectors drawn around 1000 cluster centres, each cluster spread along a 16-d
subspace of its own plus a little isotropic noise: the low intrinsic dimension real CLIP embeddings
have (uniform noise in 512-d has no neighbours worth the name, and no ANN method can index it). They are
written in chunks as a float16 NPY with its sidecar (10M rows: 10 GB on disk, never whole in memory).

For each size, in separate processes so peak memory is each step's own:
  build: `build_index` with the automatic kind: wall time, peak RSS, size on disk;
  query: open the index (memory-mapped), then single queries one at a time (p50, p95) and one batch,
         and peak RSS of that process (the queries' source rows are paged in from the memory map);
  truth: the exact top 10 by a full scan, for recall@10.
Targets: at 1M, p50 single query <= 5 ms, recall@10 >= 0.95; at 10M, index <= 2 GiB, query peak
memory <= 1 GiB, recall@10 >= 0.9; each build <= 15 minutes on 2 cores.

``--compare N`` measures the candidate libraries on N rows in one process (faiss HNSW over 8-bit
vectors, faiss IVF-PQ with 4-bit fast-scan codes, usearch HNSW over i8): build time, recall@10 of the
raw index and after clipcli's exact re-scoring of 100 candidates, single-query latency, memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
from common import cpu_model

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as clipcli.store.index does: see there

DIM = 512
CLUSTERS = 1000
LATENT = 16
OUT = Path(__file__).parent / "out" / "index"


def clustered(n: int, seed: int) -> np.ndarray:
    """``n`` unit rows around fixed cluster centres (the same centres for every seed)."""
    shape_rng = np.random.default_rng(12345)
    centres = shape_rng.standard_normal((CLUSTERS, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = shape_rng.standard_normal((CLUSTERS, LATENT, DIM)).astype(np.float32) * (0.6 / np.sqrt(DIM))
    rng = np.random.default_rng(seed)
    which = rng.integers(0, CLUSTERS, n)
    rows = rng.standard_normal((n, DIM)).astype(np.float32) * (0.1 / np.sqrt(DIM))
    order = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[order], np.arange(CLUSTERS + 1))
    for c in range(CLUSTERS):
        members = order[bounds[c] : bounds[c + 1]]
        if len(members):
            latent = rng.standard_normal((len(members), LATENT)).astype(np.float32)
            rows[members] += centres[c] + latent @ bases[c]
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def make_source(n: int) -> Path:
    """A float16 NPY of ``n`` clustered rows and its sidecar, written chunk by chunk (kept between runs)."""
    from clipcli.store.npy import NpyHeader, npy_fingerprint, npy_sidecar
    from clipcli.store.parts import ModelTag

    path = OUT / f"rows-{n}.npy"
    if path.exists() and npy_sidecar(path).exists():
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    matrix = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, DIM))
    chunk = 1 << 18
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        matrix[start:stop] = clustered(stop - start, seed=start + 1)
    matrix.flush()
    header = NpyHeader(n, "path", ModelTag("benchmark", "0" * 64, True), npy_fingerprint(matrix))
    with open(npy_sidecar(path), "w") as f:
        f.write(header.line() + "\n")
        for start in range(0, n, chunk):
            f.write("".join(f'"photos/{i:08d}.jpg"\n' for i in range(start, min(n, start + chunk))))
    del matrix
    return path


def child(step: str, source: Path, queries: int) -> dict[str, float]:
    """Run one step in a fresh process; its JSON result plus its peak RSS."""
    ran = subprocess.run(
        [sys.executable, __file__, "--step", step, "--source", str(source), "--queries", str(queries)],
        capture_output=True,
        text=True,
        check=False,
    )
    if ran.returncode:
        raise SystemExit(f"{step} failed:\n{ran.stderr}")
    return dict(json.loads(ran.stdout.strip().splitlines()[-1]))


def peak_mib() -> float:
    """This process's peak RSS: VmHWM, since ru_maxrss counts a parent's RSS across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mib() -> dict[str, float]:
    """RSS now, split as /proc reports it: anonymous memory (the process's own) and file pages mapped in
    (a memory-mapped index and source: clean page cache that the kernel reclaims under pressure)."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            found[name] = int(value.split()[0]) / 1024
    return found


def step_build(source: Path) -> dict[str, float]:
    from clipcli.store.index import default_index_path
    from clipcli.store.index_build import build_index

    index = default_index_path(source)
    shutil.rmtree(index, ignore_errors=True)
    start = time.perf_counter()
    report = build_index(source)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in index.iterdir())
    return {"kind": report.kind.value, "build_s": seconds, "size_mib": size / 2**20, "peak_mib": peak_mib()}


def query_set(n: int) -> np.ndarray:
    return clustered(n, seed=999_999)


def step_truth(source: Path, queries: int) -> dict[str, object]:
    from clipcli.store.index import exact_search
    from clipcli.store.saved import Expect, open_matrix

    saved = open_matrix(source, Expect("benchmark", "0" * 64, DIM))
    start = time.perf_counter()
    _, rows = exact_search(saved, query_set(queries), 10)
    return {"rows": rows.tolist(), "scan_s_per_query_batched": (time.perf_counter() - start) / queries}


def step_query(source: Path, queries: int) -> dict[str, object]:
    from clipcli.store.index import default_index_path, open_index
    from clipcli.store.saved import Expect

    q = query_set(queries)
    start = time.perf_counter()
    index = open_index(default_index_path(source), source, Expect("benchmark", "0" * 64, DIM))
    open_s = time.perf_counter() - start
    after_open = peak_mib()
    single, found = [], []
    for row in q:
        start = time.perf_counter()
        _, rows = index.search(row[None, :], 10)
        single.append(time.perf_counter() - start)
        found.append(rows[0].tolist())
    start = time.perf_counter()
    index.search(q, 10)
    batched = (time.perf_counter() - start) / len(q)
    return {
        "open_s": open_s,
        "p50_ms": statistics.median(single) * 1000,
        "p95_ms": float(np.percentile(single, 95)) * 1000,
        "batched_ms": batched * 1000,
        "peak_after_open_mib": after_open,
        "peak_mib": peak_mib(),
        "resident_after": resident_mib(),
        "rows": found,
    }


def recall(found: list[list[int]], truth: list[list[int]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def measure(n: int, queries: int) -> None:
    start = time.perf_counter()
    source = make_source(n)
    print(
        f"\n{n:,} rows ({source.stat().st_size / 2**30:.1f} GiB float16, made in {time.perf_counter() - start:.0f} s)"
    )
    built = child("build", source, queries)
    print(
        f"  build ({built['kind']}): {built['build_s']:.0f} s, {built['size_mib']:.0f} MiB on disk, "
        f"peak RSS {built['peak_mib']:.0f} MiB"
    )
    truth = child("truth", source, queries)
    answered = child("query", source, queries)
    print(
        f"  query: open {answered['open_s'] * 1000:.0f} ms; single p50 {answered['p50_ms']:.2f} ms, "
        f"p95 {answered['p95_ms']:.2f} ms; batched {answered['batched_ms']:.2f} ms/query; "
        f"exact scan {float(truth['scan_s_per_query_batched']) * 1000:.0f} ms/query batched"
    )
    print(
        f"  peak RSS of the query process: {answered['peak_mib']:.0f} MiB "
        f"({answered['peak_after_open_mib']:.0f} MiB after opening); "
        f"recall@10 vs exact: {recall(answered['rows'], truth['rows']):.3f}"  # type: ignore[arg-type]
    )
    resident = answered["resident_after"]
    print(
        f"  after the queries: {resident.get('RssAnon', 0):.0f} MiB anonymous, "  # type: ignore[union-attr]
        f"{resident.get('RssFile', 0):.0f} MiB of mapped file pages"  # type: ignore[union-attr]
    )


def compare(n: int, queries: int) -> None:
    """faiss and usearch side by side on the same rows, in this process."""
    import faiss
    import usearch.index as us

    x = clustered(n, seed=1)
    q = query_set(queries)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    print(f"\nlibraries on {n:,} rows, {queries} queries (100 candidates re-scored exactly):")

    def report(name: str, build_s: float, candidates: np.ndarray, single_ms: float, size: int) -> None:
        raw = np.mean([len(set(c[:10]) & set(t)) / 10 for c, t in zip(candidates, truth, strict=True)])
        rescored = []
        for c, t, row in zip(candidates, truth, q, strict=True):
            c = c[c >= 0]
            top = c[np.argsort(-(x[c] @ row))[:10]]
            rescored.append(len(set(top) & set(t)) / 10)
        print(
            f"  {name:<28} build {build_s:6.1f} s  recall@10 raw {raw:.3f} rescored {np.mean(rescored):.3f}  "
            f"single query {single_ms:.2f} ms  index {size / 2**20:.0f} MiB"
        )

    def single(search: object) -> float:
        times = []
        for row in q[:100]:
            start = time.perf_counter()
            search(row[None, :])  # type: ignore[operator]
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000

    nlist = 2 ** round(np.log2(2 * np.sqrt(n)))
    for name, spec in [
        ("faiss HNSW32 SQ8", "HNSW32_SQ8"),
        (f"faiss IVF{nlist} PQ128x4fsr", f"IVF{nlist}_HNSW32,PQ128x4fsr"),
    ]:
        start = time.perf_counter()
        index = faiss.index_factory(DIM, spec, faiss.METRIC_INNER_PRODUCT)
        index.train(x[: 40 * nlist])
        index.add(x)
        build_s = time.perf_counter() - start
        if "IVF" in spec:
            faiss.extract_index_ivf(index).nprobe = 32
        else:
            faiss.downcast_index(index).hnsw.efSearch = 100
        _, ids = index.search(q, 100)
        faiss.write_index(index, str(OUT / "compare.faiss"))
        search = partial(index.search, k=100)
        report(name, build_s, ids, single(search), (OUT / "compare.faiss").stat().st_size)
    start = time.perf_counter()
    u = us.Index(ndim=DIM, metric="ip", dtype="i8")
    u.add(np.arange(n), x, threads=os.cpu_count() or 1)
    build_s = time.perf_counter() - start
    keys = u.search(q, 100, threads=1).keys.astype(np.int64)
    u.save(str(OUT / "compare.usearch"))
    report(
        "usearch HNSW16 i8",
        build_s,
        keys,
        single(lambda v: u.search(v, 100, threads=1)),
        (OUT / "compare.usearch").stat().st_size,
    )
    (OUT / "compare.faiss").unlink()
    (OUT / "compare.usearch").unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--compare", type=int, default=0, metavar="N")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--step", choices=["build", "query", "truth"], help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        result = {"build": step_build, "query": step_query, "truth": step_truth}[args.step]
        print(json.dumps(result(args.source, args.queries) if args.step != "build" else step_build(args.source)))
        return
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; numpy {np.__version__}")
    OUT.mkdir(parents=True, exist_ok=True)
    if args.compare:
        compare(args.compare, args.queries)
    for n in args.rows:
        measure(n, args.queries)


if __name__ == "__main__":
    main()
