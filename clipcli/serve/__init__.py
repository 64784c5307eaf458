"""``clipcli serve``: a local search page and JSON API over saved embeddings.

- :mod:`~clipcli.serve.server`: the run as one call (bind, load the model once, serve until stopped);
- :mod:`~clipcli.serve.app`: the FastAPI app factory, its routes and its guards;
- :mod:`~clipcli.serve.catalog`: the datasets served, reopened when they change, and the only files served;
- :mod:`~clipcli.serve.searching`: queries, filters, cutoffs, paging and near-duplicate groups;
- :mod:`~clipcli.serve.thumbcache` and :mod:`~clipcli.serve.uploads`: thumbnails on disk, pictures dropped;
- ``page/``: the page itself (plain HTML, CSS and JavaScript, no build step, nothing fetched from elsewhere).
"""
