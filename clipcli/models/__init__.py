"""Models of every family behind one contract.

- :mod:`~clipcli.models.contract`: :class:`LoadedModel`, what every family implements and every command holds;
- :mod:`~clipcli.models.loader`: ``--model``'s grammar, the family table, :func:`load_model`, :func:`list_models`;
- :mod:`~clipcli.models.families`: one module per family (OpenAI, open_clip, Hugging Face CLIP and SigLIP);
- what the families share: weights built without random fills and identified across files
  (:mod:`~clipcli.models.weights`), a Hugging Face folder's files (:mod:`~clipcli.models.hf_files`);
- NLI models for ``classify-text`` (:mod:`~clipcli.models.nli`), through the same Hugging Face files;
- checkpoints read without running code (:mod:`~clipcli.models.checkpoint`, TorchScript archives in
  :mod:`~clipcli.models.torchscript`), downloads, digests, the Hugging Face cache (:mod:`~clipcli.models.hub`),
  precision and int8 (:mod:`~clipcli.models.quantize`).
"""

from clipcli.models.contract import DownloadProgress, LoadedModel, ModelEntry, Scoring, require_extra
from clipcli.models.loader import DEFAULT_MODEL, ModelOptions, default_model, family_of, list_models, load_model

__all__ = [
    "DEFAULT_MODEL",
    "DownloadProgress",
    "LoadedModel",
    "ModelEntry",
    "ModelOptions",
    "Scoring",
    "default_model",
    "family_of",
    "list_models",
    "load_model",
    "require_extra",
]
