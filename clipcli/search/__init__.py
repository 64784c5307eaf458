"""Search over saved embeddings: ranking by text or image (:mod:`~clipcli.search.rank`), near-duplicate
groups (:mod:`~clipcli.search.dedup`), and the ``rank`` and ``dedup`` runs as one call each
(:mod:`~clipcli.search.run`, :mod:`~clipcli.search.duplicates`)."""
