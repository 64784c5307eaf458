"""CLIP's own arithmetic over a loaded model: encoding images and texts (:mod:`~clipcli.zeroshot.encode`),
prompt templates and ensembles (:mod:`~clipcli.zeroshot.prompts`), zero-shot classification and the
precision check (``bench-precision``)."""
