"""What is written and read back.

Output formats and writers (:mod:`~clipcli.store.formats`), incremental Parquet datasets
(:mod:`~clipcli.store.dataset`, built of :mod:`~clipcli.store.parts`), NPY files (:mod:`~clipcli.store.npy`),
object stores (:mod:`~clipcli.store.remote`), shards of a dataset (:mod:`~clipcli.store.shard`), reading
saved embeddings (:mod:`~clipcli.store.saved`), the search cache and the ANN index (:mod:`~clipcli.store.index`,
built by :mod:`~clipcli.store.index_build`).
"""
