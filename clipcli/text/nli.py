"""Zero-shot text classification with a Hugging Face sequence-classification model fine-tuned on NLI.

Each (text, label) pair is posed as premise = the text, hypothesis = the template filled with the label,
and scored as Hugging Face's ``zero-shot-classification`` pipeline scores it: single-label, a softmax
of the entailment logits over the labels; multi-label (or a single label), for each label on its own, a
softmax over (contradiction, entailment). The results are the pipeline's to float rounding (a test
holds them to 1e-5); what differs is how the work is done: the pairs of many texts are tokenised in one
call, sorted by length so that a batch holds pairs of nearly one length (little padding), and run in
large batches under ``inference_mode`` at the chosen precision, while results stream out window by
window in input order, so memory stays flat over any number of texts.

Models are loaded as data only: a folder (or a Hub repository, through the Hugging Face cache) whose
config or tokenizer asks for custom code is refused, ``trust_remote_code`` is never set, and weights
come from safetensors files, or from ``pytorch_model.bin`` read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from clipcli.errors import InputError, ModelError
from clipcli.models.digest import file_sha256
from clipcli.models.hub import hub_cache, hub_unavailable
from clipcli.models.precision import Precision, resolve_device, resolve_precision

if TYPE_CHECKING:
    import numpy as np
    import torch

T = TypeVar("T")
DEFAULT_NLI_MODEL = "hf:facebook/bart-large-mnli"
DEFAULT_HYPOTHESIS = "This text is about {}."
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

DEFAULT_BATCH_SIZE = 64  # pairs per forward pass, at most
DEFAULT_BATCH_TOKENS = 8192  # and at most this many padded tokens
DEFAULT_WINDOW = 512  # texts sorted together; results appear window by window


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
        raise ModelError("classify-text runs NLI models at fp32, bf16 or fp16; int8 is for the image models' towers")
    model = _load_weights(transformers, folder, name, prec).to(dev).eval()
    tokenizer = _load_tokenizer(transformers, folder, name)
    nm = NliModel(
        name=name,
        folder=folder,
        model=model,
        tokenizer=tokenizer,
        device=dev,
        precision=prec,
        entailment=entailment,
        contradiction=contradiction,
        max_length=_max_length(tokenizer, config),
        input_names=tuple(tokenizer.model_input_names),
    )
    nm.checksum  # noqa: B018  # now, from the files just read: see clipcli.models.loader._load_family
    return nm


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
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read ({e})") from e
    if not isinstance(value, dict):
        raise ModelError(f"{path}: not a JSON object")
    return value


def _weight_files(folder: Path, required: bool = True) -> list[Path]:
    for patterns in (["model.safetensors", "model-*.safetensors"], ["pytorch_model.bin", "pytorch_model-*.bin"]):
        found = sorted(f for p in patterns for f in folder.glob(p))
        if found:
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


# --- scoring -------------------------------------------------------------------------------------


def hypotheses(template: str, labels: Sequence[str]) -> list[str]:
    """The template filled with each label (``str.format``, as the pipeline fills it), once it has passed
    the check ``classify`` gives its templates."""
    from clipcli.zeroshot.prompts import check_template

    check_template(template, "hypothesis")
    try:
        filled = [template.format(label) for label in labels]
    except (IndexError, KeyError, ValueError) as e:
        raise InputError(f"hypothesis {template!r}: cannot fill it with a label ({e}); put {{}} where it goes") from e
    if filled and filled[0] == template:
        raise InputError(f"hypothesis {template!r} has no {{}} for the label")
    return filled


def scores_from_logits(logits: np.ndarray, nm: NliModel, multi_label: bool) -> np.ndarray:
    """Texts x labels scores from texts x labels x classes logits, defined as the pipeline defines them."""
    import numpy as np

    logits = logits.astype(np.float32)
    if multi_label or logits.shape[1] == 1:
        pair = logits[..., [nm.contradiction, nm.entailment]]
        return _softmax(pair, axis=-1)[..., 1]
    return _softmax(logits[..., nm.entailment], axis=-1)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    import numpy as np

    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def iter_scores(
    nm: NliModel,
    texts: Iterable[str],
    labels: Sequence[str],
    template: str = DEFAULT_HYPOTHESIS,
    multi_label: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    window: int = DEFAULT_WINDOW,
    on_progress: Callable[[float], None] | None = None,
) -> Iterator[np.ndarray]:
    """For each text, in input order, its score for each label (one row of floats per text).

    Texts are read ``window`` at a time, so ``texts`` may be a generator over any number of lines.
    ``on_progress`` gets the number of texts done after each forward pass (a fraction when a pass
    ends part-way through a text's labels)."""
    filled = hypotheses(template, labels)
    for chunk in _windows(texts, window):
        logits = pair_logits(nm, chunk, filled, batch_size, batch_tokens, on_progress)
        yield from scores_from_logits(logits, nm, multi_label)


def _windows(texts: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def pair_logits(
    nm: NliModel,
    texts: Sequence[str],
    filled: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    on_progress: Callable[[float], None] | None = None,
) -> np.ndarray:
    """Texts x hypotheses x classes logits. The same text twice is run once."""
    import numpy as np

    unique = list(dict.fromkeys(texts))
    encoded = encode_pairs(nm, unique, filled)
    n_classes = int(nm.model.config.num_labels)
    logits = np.empty((len(encoded["input_ids"]), n_classes), np.float32)
    per_pass = len(filled) * len(unique) / max(len(texts), 1)  # pairs that make one input text
    for rows in length_batches([len(ids) for ids in encoded["input_ids"]], batch_size, batch_tokens):
        logits[rows] = _forward(nm, {k: [encoded[k][i] for i in rows] for k in nm.input_names})
        if on_progress:
            on_progress(len(rows) / per_pass)
    by_text = logits.reshape(len(unique), len(filled), n_classes)
    where = {text: i for i, text in enumerate(unique)}
    return by_text[[where[t] for t in texts]]


def encode_pairs(nm: NliModel, texts: Sequence[str], filled: Sequence[str]) -> dict[str, list[list[int]]]:
    """Token ids of every (text, hypothesis) pair, text-major, truncated as the pipeline truncates:
    the text is cut (``only_first``), never the hypothesis; where even that cannot make a pair fit,
    the pipeline leaves the pair whole, and so does this."""
    premises = [t for t in texts for _ in filled]
    hyps = [h for _ in texts for h in filled]
    tok = nm.tokenizer
    try:
        out = tok(premises, hyps, truncation="only_first", max_length=nm.max_length, padding=False)
    except Exception as e:
        if "too short" not in str(e):
            raise
        out = {k: [] for k in nm.input_names}
        for p, h in zip(premises, hyps, strict=True):
            try:
                one = tok(p, h, truncation="only_first", max_length=nm.max_length, padding=False)
            except Exception as inner:
                if "too short" not in str(inner):
                    raise
                one = tok(p, h, truncation=False, padding=False)
            for k in nm.input_names:
                out[k].append(one[k])
    return {k: list(out[k]) for k in nm.input_names}


def length_batches(lengths: Sequence[int], batch_size: int, batch_tokens: int) -> Iterator[list[int]]:
    """Indices grouped into batches of nearly equal length, longest first (so a batch that does not fit
    in memory fails at once), each with at most ``batch_size`` rows and ``batch_tokens`` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        longest = lengths[batch[0]] if batch else lengths[i]
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * longest > batch_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _forward(nm: NliModel, features: dict[str, list[list[int]]]) -> np.ndarray:
    """Logits of one batch, padded as the pipeline pads (its tokenizer's pad id and side)."""
    import numpy as np
    import torch

    tensors = {k: _padded(v, nm.tokenizer.pad_token_id if k == "input_ids" else 0, nm) for k, v in features.items()}
    kwargs: dict[str, Any] = {"use_cache": False} if _takes_use_cache(nm.model) else {}
    with torch.inference_mode():
        try:
            out = nm.model(**tensors, **kwargs).logits
        except ValueError:
            # BART refuses a batch whose rows hold different numbers of </s> (a text that contains the
            # string itself); one row at a time, as the pipeline runs them, it is fine.
            if len(features["input_ids"]) == 1:
                raise
            rows = [_forward(nm, {k: [v[i]] for k, v in features.items()}) for i in range(len(features["input_ids"]))]
            return np.concatenate(rows)
        return out.float().cpu().numpy()


def _padded(rows: list[list[int]], value: int, nm: NliModel) -> torch.Tensor:
    import numpy as np
    import torch

    width = max(len(r) for r in rows)
    array = np.full((len(rows), width), value, dtype=np.int64)
    left = nm.tokenizer.padding_side == "left"
    for i, r in enumerate(rows):
        if left:
            array[i, width - len(r) :] = r
        else:
            array[i, : len(r)] = r
    return torch.from_numpy(array).to(nm.device)


def _takes_use_cache(model: Any) -> bool:
    import inspect

    return "use_cache" in inspect.signature(model.forward).parameters


# --- predictions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextPrediction:
    """One text's best labels. ``id`` is its line or row number in a file (None for an argument)."""

    id: int | None
    text: str
    labels: tuple[str, ...]  # best first
    scores: tuple[float, ...]

    def rows(self) -> list[dict[str, Any]]:
        """Tidy rows, one per rank (rank 1 = best)."""
        first = {} if self.id is None else {"id": self.id}
        return [
            {**first, "text": self.text, "rank": r, "label": label, "score": score}
            for r, (label, score) in enumerate(zip(self.labels, self.scores, strict=True), start=1)
        ]

    def record(self) -> dict[str, Any]:
        first = {} if self.id is None else {"id": self.id}
        preds = [{"label": lab, "score": s} for lab, s in zip(self.labels, self.scores, strict=True)]
        return {**first, "text": self.text, "predictions": preds}


def prediction_columns(with_id: bool) -> tuple[str, ...]:
    return ("id", "text", "rank", "label", "score") if with_id else ("text", "rank", "label", "score")


def prediction_schema(with_id: bool) -> Any:
    import pyarrow as pa

    fields = [("text", pa.string()), ("rank", pa.int64()), ("label", pa.string()), ("score", pa.float64())]
    return pa.schema(([("id", pa.int64())] if with_id else []) + fields)


def classify_texts(
    nm: NliModel,
    items: Iterable[tuple[int | None, str]],
    labels: Sequence[str],
    template: str = DEFAULT_HYPOTHESIS,
    multi_label: bool = False,
    top_k: int = 5,
    batch_size: int = DEFAULT_BATCH_SIZE,
    window: int = DEFAULT_WINDOW,
    on_progress: Callable[[float], None] | None = None,
) -> Iterator[TextPrediction]:
    """The ``top_k`` best labels of each (id, text), best first, in input order, as they are computed."""
    import numpy as np

    k = min(top_k, len(labels))
    for chunk in _windows(items, window):
        rows = iter_scores(
            nm,
            [t for _, t in chunk],
            labels,
            template,
            multi_label,
            batch_size,
            window=len(chunk),
            on_progress=on_progress,
        )
        for (key, text), scores in zip(chunk, rows, strict=True):
            best = np.argsort(-scores, kind="stable")[:k]
            yield TextPrediction(key, text, tuple(labels[i] for i in best), tuple(float(scores[i]) for i in best))
