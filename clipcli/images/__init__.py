"""Images in: discovery (files, folders, globs, stdin), decoding with its guards, preprocessing and
batching (:mod:`~clipcli.images.core`), and decoding on a GPU (:mod:`~clipcli.images.gpu`)."""
