"""Images in: discovery of files, folders, globs and stdin (:mod:`~clipcli.images.sources`), decoding with
its guards and preprocessing (:mod:`~clipcli.images.decode`), batching and decoding workers
(:mod:`~clipcli.images.batches`), and decoding on a GPU (:mod:`~clipcli.images.gpu`,
with the JPEG headers it reads in :mod:`~clipcli.images.jpeg`)."""
