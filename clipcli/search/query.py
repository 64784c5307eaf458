"""The query language of ``rank`` and ``serve``: a weighted sum of texts and images.

Grammar (``docs/search.md`` says the same for users)::

    query  := [sign] term (sign term)*
    sign   := "+" | "-"                  an operator: a + or - standing apart (a space or a quote on each side)
    term   := [weight ":"] (quoted | image | words)
    weight := a number (2, 0.5, -1.5)
    quoted := "text" | 'text'            a text, taken as written (no operators or images inside)
    image  := a run that is an existing file, starts with ./ ../ / ~ or http(s)://, ends with an image
              extension (.jpg, .png, ...), or names a video's frame or a shard's sample (clip.mp4#t=4.000)
    words  := any other run of words

A query with no operator is the whole text as one text term, verbatim (``"a photo of a dog, running"``,
quotes and all, as before the language existed). Each term is embedded, normalised, multiplied by its
weight (negated after ``-``) and summed; the sum is normalised again. A weight may also open a quoted
text (``"2:dog"``, rclip's form). ``--negative TEXT`` adds the term ``- TEXT``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from clipcli.errors import InputError

if TYPE_CHECKING:
    import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGE_PREFIXES = ("./", "../", "/", "~", "http://", "https://")
_WEIGHT = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+)):")
QUOTES = "\"'"


@dataclass(frozen=True)
class Term:
    """One term of a query: a text or an image, and its weight (negative after ``-`` and for --negative)."""

    weight: float
    text: str | None = None
    image: str | None = None  # a path or URL (a dataset row's path, or a file)


@dataclass(frozen=True)
class Query:
    terms: tuple[Term, ...]

    @property
    def plain_text(self) -> str | None:
        """The text when the query is one text of weight 1 (answered exactly as before the language)."""
        if len(self.terms) == 1 and self.terms[0].weight == 1.0 and self.terms[0].text is not None:
            return self.terms[0].text
        return None


def looks_like_image(run: str) -> bool:
    """Whether an unquoted run names an image: a file, a path-like or URL start, an image extension, or
    a member of a video or a shard as rows name it (``clip.mp4#t=4.000``, ``shard.tar#000042``)."""
    from clipcli.images.containers import container_of

    return (
        run.startswith(IMAGE_PREFIXES)
        or run.lower().endswith(IMAGE_SUFFIXES)
        or os.path.isfile(run)
        or container_of(run) is not None
    )


def parse_query(text: str, negative: Sequence[str] = ()) -> Query:
    """The terms of ``text`` (see the module's grammar), then ``- N`` for each of ``negative``; a malformed
    query is an :class:`InputError` naming its 1-based column."""
    return Query((*_parse(text), *negative_terms(negative)))


def negative_terms(negative: Sequence[str]) -> tuple[Term, ...]:
    """``--negative`` texts as terms of weight -1."""
    for n in negative:
        if not n.strip():
            raise InputError("--negative: an empty text")
    return tuple(Term(-1.0, text=n) for n in negative)


def _is_operator(text: str, i: int) -> bool:
    """A + or - at ``i`` is an operator when it stands apart: nothing but space or a quote beside it."""
    if text[i] not in "+-":
        return False
    before = i == 0 or text[i - 1].isspace() or text[i - 1] in QUOTES
    after = i + 1 == len(text) or text[i + 1].isspace() or text[i + 1] in QUOTES
    return before and after


def _parse(text: str) -> list[Term]:
    if not text.strip():
        raise InputError("an empty query: give a text, or terms joined by + and -")
    if not any(_is_operator(text, i) for i in range(len(text))) and not _quoted_term_only(text):
        return [Term(1.0, text=text)]
    terms: list[Term] = []
    sign, i, n = 1.0, 0, len(text)
    op_at: int | None = None  # where the operator before the next term stands
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i == n:
            if op_at is not None:
                raise _bad(text, op_at + 1, f"a term is missing after {text[op_at]!r}")
            return terms
        if _is_operator(text, i):
            if op_at is not None:
                raise _bad(text, i + 1, f"{text[i]!r} where a term should be (after {text[op_at]!r})")
            sign, op_at = (1.0 if text[i] == "+" else -1.0), i
            i += 1
            continue
        if terms and op_at is None:
            raise _bad(text, i + 1, "two terms in a row: join them with + or -")
        term, i = _term(text, i, sign)
        terms.append(term)
        sign, op_at = 1.0, None


def _quoted_term_only(text: str) -> bool:
    """No operator, but a weight before a quote (``2:"dog"``): still a term of the language."""
    return bool(re.match(r"\s*" + _WEIGHT.pattern + r"\s*[\"']", text))


def _term(text: str, start: int, sign: float) -> tuple[Term, int]:
    """The term at ``start`` and where the next token begins."""
    i, weight = start, 1.0
    m = _WEIGHT.match(text, i)
    if m:
        weight, i = float(m.group(1)), m.end()
        if i == len(text) or text[i].isspace() or _is_operator(text, i):
            raise _bad(text, i + 1, f"the weight {m.group(1)} has no term after it")
    if text[i] in QUOTES:
        close = text.find(text[i], i + 1)
        if close < 0:
            raise _bad(text, i + 1, f"a {text[i]} that is never closed")
        inner = text[i + 1 : close]
        if not inner.strip():
            raise _bad(text, i + 1, "an empty quoted text")
        w = _WEIGHT.match(inner)
        if w and not m and inner[w.end() :].strip():  # rclip's "2:dog"
            weight, inner = float(w.group(1)), inner[w.end() :]
        return Term(sign * weight, text=inner), close + 1
    end = i
    while end < len(text) and not _is_operator(text, end) and text[end] not in QUOTES:
        end += 1
    run = text[i:end].strip()
    if end < len(text) and text[end] in QUOTES:
        raise _bad(text, end + 1, "a quote inside an unquoted term: quote the whole term")
    if looks_like_image(run):
        return Term(sign * weight, image=run), end
    return Term(sign * weight, text=run), end


def _bad(text: str, column: int, why: str) -> InputError:
    return InputError(f"query {text!r}, column {column}: {why}")


def query_vector(
    query: Query,
    encode_texts: Callable[[list[str]], np.ndarray],
    image_vector: Callable[[str], np.ndarray],
) -> np.ndarray:
    """The (D,) float32 unit vector of a query: each term embedded (texts in one call), normalised,
    times its weight, summed, and the sum normalised; terms that cancel out are an error."""
    import numpy as np

    texts = [t.text for t in query.terms if t.text is not None]
    text_rows = iter(np.asarray(encode_texts(texts), np.float64)) if texts else iter(())
    total: np.ndarray | None = None
    for term in query.terms:
        v = next(text_rows) if term.text is not None else np.asarray(image_vector(term.image or ""), np.float64)
        v = v.reshape(-1)
        norm = float(np.linalg.norm(v))
        if not norm:
            raise InputError(f"query term {term.text or term.image!r}: embeds to a zero vector")
        part = (term.weight / norm) * v
        total = part if total is None else total + part
    if total is None:
        raise InputError("an empty query: give a text, or terms joined by + and -")
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise InputError("the query's terms cancel out: nothing is left to search for")
    return (total / norm).astype(np.float32)


__all__ = ["Query", "Term", "looks_like_image", "negative_terms", "parse_query", "query_vector"]
