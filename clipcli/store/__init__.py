"""What is written and read back.

Output formats and writers (:mod:`~clipcli.store.formats`), incremental Parquet datasets and NPY
(:mod:`~clipcli.store.dataset`), object stores (:mod:`~clipcli.store.remote`), shards of a dataset
(:mod:`~clipcli.store.shard`), reading saved embeddings (:mod:`~clipcli.store.saved`), the search cache
and the ANN index (:mod:`~clipcli.store.index`).
"""
