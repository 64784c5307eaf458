"""Zero-shot text classification with a Hugging Face sequence-classification model fine-tuned on NLI.

Each (text, label) pair is posed as premise = the text, hypothesis = the template filled with the label,
and scored as Hugging Face's ``zero-shot-classification`` pipeline scores it: single-label, a softmax
of the entailment logits over the labels; multi-label (or a single label), for each label on its own, a
softmax over (contradiction, entailment). The results are the pipeline's to float rounding (a test
holds them to 1e-5, at fp32); what differs is how the work is done: each text and each hypothesis is
tokenised once and the pairs joined from them (:func:`encode_pairs`), sorted by length so that a batch
holds pairs of nearly one length (little padding), and run in large batches under ``inference_mode`` at
the chosen precision (bf16, fp16, or int8: :mod:`clipcli.models.nli`), while results stream out window
by window in input order, so memory stays flat over any number of texts. :class:`StageSeconds` says
where the time went.

The model itself (loading, the files it needs, its labels) is :mod:`clipcli.models.nli`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from clipcli.errors import InputError
from clipcli.models.nli import NliModel

if TYPE_CHECKING:
    import numpy as np
    import torch

T = TypeVar("T")
DEFAULT_HYPOTHESIS = "This text is about {}."

DEFAULT_BATCH_SIZE = 64  # pairs per forward pass, at most
DEFAULT_BATCH_TOKENS = 8192  # and at most this many padded tokens on a GPU;
CPU_BATCH_TOKENS = 1024  # on a CPU, where batches that fit in its caches run faster (see batch_tokens_for)
DEFAULT_WINDOW = 512  # texts sorted together; results appear window by window

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


@dataclass
class StageSeconds:
    """Where scoring time goes: tokenising the pairs, the model's forward passes (padding the batches
    included), and the softmax of the logits into scores. Summed over the calls it is handed to."""

    tokenize: float = 0.0
    model: float = 0.0
    scores: float = 0.0

    def shares(self) -> dict[str, float]:
        total = self.tokenize + self.model + self.scores or 1.0
        return {"tokenize": self.tokenize / total, "model": self.model / total, "scores": self.scores / total}


def iter_scores(
    nm: NliModel,
    texts: Iterable[str],
    labels: Sequence[str],
    template: str = DEFAULT_HYPOTHESIS,
    multi_label: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_tokens: int | None = None,
    window: int = DEFAULT_WINDOW,
    on_progress: Callable[[float], None] | None = None,
    seconds: StageSeconds | None = None,
) -> Iterator[np.ndarray]:
    """For each text, in input order, its score for each label (one row of floats per text).

    Texts are read ``window`` at a time, so ``texts`` may be a generator over any number of lines.
    ``on_progress`` gets the number of texts done after each forward pass (a fraction when a pass
    ends part-way through a text's labels); ``seconds``, where given, adds up the time of each stage."""
    filled = hypotheses(template, labels)
    clock = seconds if seconds is not None else StageSeconds()
    for chunk in _windows(texts, window):
        limits = (batch_size, batch_tokens or batch_tokens_for(nm))
        logits = pair_logits(nm, chunk, filled, limits, on_progress, clock)
        start = time.perf_counter()
        scores = scores_from_logits(logits, nm, multi_label)
        clock.scores += time.perf_counter() - start
        yield from scores


def batch_tokens_for(nm: NliModel) -> int:
    """Padded tokens a forward pass takes at most, by default: 8,192 on a GPU; 1,024 on a CPU, where a
    batch's activations then stay in the caches (the GELU, layer norms and residual sums between the matrix
    products read and write them): on 2 Zen 4 cores a BART forward pass ran 1.3x faster at fp32 and 1.4x at
    int8 than with 8,192 tokens (and 512 was no faster)."""
    return DEFAULT_BATCH_TOKENS if nm.device.type != "cpu" else CPU_BATCH_TOKENS


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
    limits: tuple[int, int] | None = None,
    on_progress: Callable[[float], None] | None = None,
    seconds: StageSeconds | None = None,
) -> np.ndarray:
    """Texts x hypotheses x classes logits. The same text twice is run once. A forward pass takes at most
    ``limits`` = (batch size, padded tokens); by default 64 pairs and :func:`batch_tokens_for` the device."""
    import numpy as np

    limits = limits or (DEFAULT_BATCH_SIZE, batch_tokens_for(nm))

    clock = seconds if seconds is not None else StageSeconds()
    start = time.perf_counter()
    unique = list(dict.fromkeys(texts))
    encoded = encode_pairs(nm, unique, filled)
    clock.tokenize += time.perf_counter() - start
    n_classes = int(nm.model.config.num_labels)
    logits = np.empty((len(encoded["input_ids"]), n_classes), np.float32)
    per_pass = len(filled) * len(unique) / max(len(texts), 1)  # pairs that make one input text
    for rows in length_batches([len(ids) for ids in encoded["input_ids"]], *limits):
        start = time.perf_counter()
        logits[rows] = _forward(nm, {k: [encoded[k][i] for i in rows] for k in nm.input_names})
        clock.model += time.perf_counter() - start
        if on_progress:
            on_progress(len(rows) / per_pass)
    by_text = logits.reshape(len(unique), len(filled), n_classes)
    where = {text: i for i, text in enumerate(unique)}
    return by_text[[where[t] for t in texts]]


def encode_pairs(nm: NliModel, texts: Sequence[str], filled: Sequence[str]) -> dict[str, list[list[int]]]:
    """Token ids of every (text, hypothesis) pair, text-major, as the pipeline tokenises them.

    Pre-tokenised: each text and each hypothesis is tokenised once, on its own, and every pair is
    joined from the two by the tokenizer's own post-processor (its special tokens and token types),
    which is how a tokenizer builds a pair anyway; ``n`` texts x ``k`` labels cost ``n + k`` tokenisations,
    not ``n x k``. A pair too long for the model is tokenised whole, as the pipeline does (see
    :func:`encode_pairs_jointly`), and so is every pair of a tokenizer without a Rust backend."""
    plain = _plain_backend(nm)
    if plain is None:
        return encode_pairs_jointly(nm, [t for t in texts for _ in filled], [h for _ in texts for h in filled])
    singles = plain.encode_batch(list(texts), add_special_tokens=False)
    hyps = plain.encode_batch(list(filled), add_special_tokens=False)
    room = nm.max_length - nm.tokenizer.num_special_tokens_to_add(pair=True)
    out: dict[str, list[list[int]]] = {k: [] for k in nm.input_names}
    too_long: list[tuple[int, str, str]] = []  # (pair index, text, hypothesis)
    fields = {"input_ids": "ids", "token_type_ids": "type_ids", "attention_mask": "attention_mask"}
    for text, single in zip(texts, singles, strict=True):
        for hyp, h in zip(filled, hyps, strict=True):
            if len(single.ids) + len(h.ids) > room:
                too_long.append((len(out["input_ids"]), text, hyp))
                for k in nm.input_names:
                    out[k].append([])
                continue
            pair = plain.post_process(single, h, add_special_tokens=True)
            for k in nm.input_names:
                out[k].append(list(getattr(pair, fields[k])))
    if too_long:
        whole = encode_pairs_jointly(nm, [t for _, t, _ in too_long], [h for _, _, h in too_long])
        for j, (i, _, _) in enumerate(too_long):
            for k in nm.input_names:
                out[k][i] = whole[k][j]
    return out


def _plain_backend(nm: NliModel) -> Any:
    """A copy of the tokenizer's Rust backend that neither truncates nor pads (the tokenizer sets both
    on its backend per call), made once per model; None for a tokenizer without one, or whose inputs are
    not ids, token types and attention masks."""
    tokenizer = nm.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not set(tokenizer.model_input_names) <= {"input_ids", "token_type_ids", "attention_mask"}:
        return None
    if nm.plain_tokenizer is None:
        from tokenizers import Tokenizer

        nm.plain_tokenizer = Tokenizer.from_str(backend.to_str())
        nm.plain_tokenizer.no_truncation()
        nm.plain_tokenizer.no_padding()
    return nm.plain_tokenizer


def encode_pairs_jointly(nm: NliModel, premises: Sequence[str], hyps: Sequence[str]) -> dict[str, list[list[int]]]:
    """Token ids of each (premise, hypothesis) pair tokenised together, truncated as the pipeline
    truncates: the text is cut (``only_first``), never the hypothesis; where even that cannot make a pair
    fit, the pipeline leaves the pair whole, and so does this."""
    tok = nm.tokenizer
    try:
        out = tok(list(premises), list(hyps), truncation="only_first", max_length=nm.max_length, padding=False)
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
