"""clipcli: zero-shot image classification, embedding, ranking and evaluation with CLIP."""

__version__ = "0.1.0"
