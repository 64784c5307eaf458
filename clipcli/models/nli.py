"""NLI models for zero-shot text classification: a Hugging Face sequence-classification model fine-tuned on
NLI, its tokenizer, and where entailment and contradiction are in its logits (scoring is
:mod:`clipcli.text.nli`).

Models are loaded as data only: a folder (or a Hub repository, through the Hugging Face cache) whose
config or tokenizer asks for custom code is refused, ``trust_remote_code`` is never set, and weights
come from safetensors files, or from ``pytorch_model.bin`` read with ``torch.load(weights_only=True)``.

``--precision`` is the images' (:mod:`clipcli.models.precision`): bf16 and fp16 load the model in that
type; int8 (CPU only, for :data:`INT8_MODEL_TYPES`) loads it at fp32 and rewrites its body's linear layers
as :class:`clipcli.models.quantize.Int8Linear`, per output channel (docs/precision.md, "Texts").
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.errors import ModelError
from clipcli.models.digest import file_sha256
from clipcli.models.hf_files import read_json_object, weight_files
from clipcli.models.hub import hub_cache, hub_unavailable
from clipcli.models.precision import Precision, keep_freed_memory, resolve_device, resolve_precision

if TYPE_CHECKING:
    import torch

DEFAULT_NLI_MODEL = "hf:facebook/bart-large-mnli"
HF_PREFIX = "hf:"
EXTRA_HINT = "pip install 'clipcli[hf]'"

# The files a model folder needs: config, tokenizer (whichever kind it has) and weights. The rest of a
# repository (TF, Flax, ONNX exports, READMEs) is never fetched.
_CONFIG_FILES = ["config.json"]
_TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
]
_SAFETENSORS = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
_PICKLED = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Position tables of these families start after the padding index, so they hold two fewer tokens.
_OFFSET_POSITIONS = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "longformer": 2}
# The architectures whose int8 scores are measured against fp32 (tests/test_text_precision.py); v3 is
# model_type deberta-v2.
INT8_MODEL_TYPES = ("bart", "bert", "roberta", "deberta-v2")


@dataclass
class NliModel:
    """A ready sequence-classification model, its tokenizer, and where entailment is in its logits."""

    name: str
    folder: Path
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any
    device: torch.device
    precision: Precision
    entailment: int
    contradiction: int
    max_length: int
    input_names: tuple[str, ...]
    plain_tokenizer: Any = field(default=None, repr=False)  # its backend unpadded, untruncated: see text.nli
    _sha256: str | None = field(default=None, repr=False)

    @property
    def checksum(self) -> str:
        """SHA-256 identifying the weights: of the one weights file, or of the shards' own digests.

        Each file is read once per version (:mod:`clipcli.models.digest`)."""
        if self._sha256 is None:
            digests = [file_sha256(f) for f in _weight_files(self.folder)]
            self._sha256 = digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()
        return self._sha256


# --- loading -------------------------------------------------------------------------------------


def load_nli_model(spec: str | None, device: str = "auto", precision: str = "auto") -> NliModel:
    """``hf:ORG/REPO`` (through the Hugging Face cache), ``hf:DIR`` or ``DIR`` (a saved folder)."""
    name = spec or DEFAULT_NLI_MODEL
    transformers = _import_transformers()
    folder = resolve_folder(name)
    refuse_custom_code(folder)
    config = _read_json(folder / "config.json")
    entailment, contradiction = nli_indices(config.get("label2id") or {}, name)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    if prec == "int8":
        check_int8(name, config, dev)
    model = _load_weights(transformers, folder, name, "fp32" if prec == "int8" else prec).to(dev).eval()
    if prec == "int8":
        quantize_nli(model)
    tokenizer = _load_tokenizer(transformers, folder, name)
    limit, inputs = _max_length(tokenizer, config), tuple(tokenizer.model_input_names)
    nm = NliModel(name, folder, model, tokenizer, dev, prec, entailment, contradiction, limit, inputs)
    nm.checksum  # noqa: B018  # now, from the files just read: see clipcli.models.loader._load_family
    if dev.type == "cpu":
        keep_freed_memory()
    return nm


def check_int8(name: str, config: dict[str, Any], device: torch.device) -> None:
    """Refuse int8 before any weight is read: on a device other than the CPU, or for a model type whose
    layers have not been checked against fp32 (:data:`INT8_MODEL_TYPES`)."""
    from clipcli.models.quantize import check_int8_device

    check_int8_device(device)
    kind = str(config.get("model_type"))
    if kind not in INT8_MODEL_TYPES:
        raise ModelError(
            f"{name}: --precision int8 is offered for {', '.join(INT8_MODEL_TYPES)} NLI models, not {kind}; "
            "use --precision fp32 or bf16"
        )


def quantize_nli(model: Any) -> None:
    """The body's linear layers (attention projections, feed-forward layers) as int8, per output channel
    (:class:`clipcli.models.quantize.Int8Linear`), in place. Embeddings, layer norms, the attention scores
    and the classification head (and BERT's pooler), which see one row per pair, stay fp32."""
    import torch

    from clipcli.models.quantize import quantize_module

    with torch.inference_mode(False):
        for name, child in model.base_model.named_children():
            if name != "pooler":
                quantize_module(child)


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ModelError(f"NLI models need the Hugging Face libraries: {EXTRA_HINT}") from e
    # The core never prints: no "Loading weights" bars or advice on stderr from the library.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def resolve_folder(name: str) -> Path:
    """The local folder holding the model named ``name``, from the Hub cache (or the Hub) if need be."""
    target = name[len(HF_PREFIX) :] if name.startswith(HF_PREFIX) else name
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{target}: no config.json; pass a folder written by save_pretrained")
        return path
    if path.exists():
        raise ModelError(f"{target}: not a folder; an NLI model is a folder written by save_pretrained")
    if not name.startswith(HF_PREFIX) or not _REPO.match(target) or target.count("/") > 1:
        raise ModelError(f"{name}: no such folder; name a Hugging Face model as hf:ORG/REPO, or pass a folder")
    return hub_snapshot(target)


def hub_snapshot(repo: str) -> Path:
    """The cached snapshot of ``repo``, downloading only the files a model needs when not cached.

    The cache is tried first without any network call; offline (``HF_HUB_OFFLINE=1``) a missing model is
    an error at once, never a wait on a network that is not there."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ModelError(f"hf:{repo} needs the Hugging Face libraries: {EXTRA_HINT}") from e
    cache = hub_cache()
    patterns = _CONFIG_FILES + _TOKENIZER_FILES + _SAFETENSORS
    try:
        folder = Path(snapshot_download(repo, cache_dir=cache, allow_patterns=patterns, local_files_only=True))
        if _weight_files(folder, required=False):
            return folder
    except Exception:  # not cached (the hub raises several kinds of "not found")
        pass
    why = hub_unavailable()
    if why:
        raise ModelError(
            f"hf:{repo} is not in the Hugging Face cache ({cache}) and {why}: download it "
            "once with a network, or pass a folder written by save_pretrained"
        )
    try:
        folder = Path(snapshot_download(repo, cache_dir=cache, allow_patterns=patterns, etag_timeout=10))
        if not _weight_files(folder, required=False):  # an older repository with pickled weights only
            folder = Path(snapshot_download(repo, cache_dir=cache, allow_patterns=_PICKLED, etag_timeout=10))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"hf:{repo}: cannot download into {cache} ({reason}); offline, pass a folder written by save_pretrained"
        ) from e
    return folder


def refuse_custom_code(folder: Path) -> None:
    """A model that only runs with code from its repository is refused: clipcli loads data, never code."""
    for file in ("config.json", "tokenizer_config.json"):
        path = folder / file
        if path.is_file() and "auto_map" in _read_json(path):
            raise ModelError(
                f"{folder}: {file} asks for custom code (auto_map), which clipcli never runs; "
                "use a model that transformers supports natively"
            )


def nli_indices(label2id: dict[str, Any], name: str) -> tuple[int, int]:
    """The entailment and contradiction logits, found as the zero-shot pipeline finds them.

    Entailment is the first label starting with "entail" (any case). The pipeline takes contradiction
    to be logit 0 (the last one when entailment is 0); a label starting with "contradict" or
    "not_entail" is preferred where there is one, which is the same logit in every NLI model's layout
    (contradiction/neutral/entailment, entailment/neutral/contradiction, entailment/not_entailment)."""
    ids = {str(label).lower(): int(i) for label, i in label2id.items()}
    entail = next((i for label, i in ids.items() if label.startswith("entail")), None)
    if entail is None:
        known = ", ".join(map(str, label2id)) or "none"
        raise ModelError(
            f"{name}: no entailment label in the model's label2id (it has {known}); "
            "zero-shot classification needs a model fine-tuned on NLI"
        )
    n_labels = max(ids.values()) + 1
    contra = next((i for label, i in ids.items() if label.startswith(("contradict", "not_entail", "not entail"))), None)
    if contra is None:
        contra = n_labels - 1 if entail == 0 else 0
    return entail, contra


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, lambda e: f"{path}: cannot read ({e})", f"{path}: not a JSON object")


def _weight_files(folder: Path, required: bool = True) -> list[Path]:
    found = weight_files(folder)
    if found and all(f.is_file() for f in found):
        return found
    if required:
        raise ModelError(f"{folder}: no weights (model.safetensors or pytorch_model.bin)")
    return []


def _load_weights(transformers: Any, folder: Path, name: str, precision: Precision) -> Any:
    import torch

    files = _weight_files(folder)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    try:
        with warnings.catch_warnings():  # torch's own advice on a refused pickle is to trust it: not ours
            warnings.simplefilter("ignore")
            model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
                folder,
                dtype=dtype,
                trust_remote_code=False,
                local_files_only=True,
                use_safetensors=files[0].suffix == ".safetensors",
                weights_only=True,
                output_loading_info=True,
            )
    except Exception as e:
        if _refused_pickle(e):
            raise ModelError(
                f"{name}: {files[0].name} holds objects other than tensors, which clipcli never unpickles "
                "(they could run code); use the model's safetensors weights"
            ) from e
        raise ModelError(f"{name}: cannot load as a sequence-classification model ({_first_line(e)})") from e
    from clipcli.models.checkpoint import refuse_incomplete

    refuse_incomplete(info, name if str(folder) in name else f"{name}: {folder}")
    return model


def _refused_pickle(e: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused the file (maybe wrapped by transformers)."""
    import pickle

    chain: BaseException | None = e
    while chain is not None:
        if isinstance(chain, pickle.UnpicklingError) or "Weights only load failed" in str(chain):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def _load_tokenizer(transformers: Any, folder: Path, name: str) -> Any:
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except Exception as e:
        raise ModelError(f"{name}: cannot load its tokenizer ({_first_line(e)})") from e
    if tokenizer.pad_token is None:  # as the pipeline does for tokenizers without padding
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _max_length(tokenizer: Any, config: dict[str, Any]) -> int:
    """The tokenizer's own limit, which the pipeline truncates to; where a tokenizer states none (a huge
    sentinel), the model's position table, so that a long text is cut rather than crash the model."""
    limit = int(tokenizer.model_max_length)
    if limit < 1_000_000:
        return limit
    positions = int(config.get("max_position_embeddings") or 512)
    return positions - _OFFSET_POSITIONS.get(str(config.get("model_type")), 0)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
