"""Labels, prompt templates (built-in sets are data files) and the prompt-ensemble classifier."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from clipcli.errors import InputError

if TYPE_CHECKING:
    import torch

    from clipcli.models import LoadedModel

BUILTIN_TEMPLATE_SETS = ("simple", "cifar", "imagenet")
DEFAULT_TEMPLATES = "simple"


@dataclass(frozen=True)
class TemplateSet:
    name: str
    templates: tuple[str, ...]

    def fill(self, label: str) -> list[str]:
        # str.replace, not str.format: labels may contain braces.
        return [t.replace("{}", label) for t in self.templates]


def read_lines(file: Path | str, what: str) -> list[str]:
    """The non-empty, stripped lines of a UTF-8 text file (a byte-order mark at its start is not text)."""
    try:
        text = Path(file).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise InputError(f"{file}: cannot read {what} file ({reason})") from e
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_template(template: str, what: str = "template") -> str:
    """The one check of a template a label is put into (``classify``'s prompts, ``classify-text``'s
    hypotheses): it must hold ``{}`` where the label goes. Other replacement fields (``{0}``,
    ``{.__class__}``) are not a place for the label: without ``{}`` the template is refused."""
    if "{}" not in template:
        bare = ' (use "{}" for labels as they are)' if what == "template" else ""
        raise InputError(f"{what} {template!r} has no {{}} for the label{bare}")
    return template


def _check(templates: Sequence[str], source: str) -> tuple[str, ...]:
    if not templates:
        raise InputError(f"{source}: no templates")
    return tuple(check_template(t) for t in templates)


def builtin_templates(name: str) -> TemplateSet:
    text = (resources.files("clipcli") / "templates" / f"{name}.txt").read_text(encoding="utf-8")
    return TemplateSet(name, _check([ln.strip() for ln in text.splitlines() if ln.strip()], name))


def resolve_templates(
    template: Sequence[str] | None = None, templates: str | Sequence[str] | None = None
) -> TemplateSet:
    """``--template`` strings (repeatable) or ``--templates NAME|FILE`` (repeatable: the sets are pooled
    into one ensemble, each template once); the default is ``simple``."""
    if template and templates:
        raise InputError("give --template or --templates, not both")
    if template:
        return TemplateSet("custom" if len(template) > 1 else template[0], _check(template, "--template"))
    names = [templates] if isinstance(templates, str) else list(templates or [DEFAULT_TEMPLATES])
    sets = [template_set(name) for name in names]
    if len(sets) == 1:
        return sets[0]
    pooled = dict.fromkeys(t for s in sets for t in s.templates)
    return TemplateSet("+".join(s.name for s in sets), tuple(pooled))


def optional_templates(template: Sequence[str] | None, templates: Sequence[str] | None) -> TemplateSet | None:
    """As :func:`resolve_templates` where ``--template``/``--templates`` were given; None where neither was
    (the bare text, no prompt ensemble)."""
    return resolve_templates(template, templates) if (template or templates) else None


def template_set(name: str) -> TemplateSet:
    """A built-in set by name, or a file with one template per line."""
    if name in BUILTIN_TEMPLATE_SETS:
        return builtin_templates(name)
    if Path(name).is_file():
        return TemplateSet(Path(name).stem, _check(read_lines(name, "templates"), name))
    import difflib

    if Path(name).suffix or "/" in name:  # meant as a file
        raise InputError(f"{name}: no such templates file (or a built-in set: {', '.join(BUILTIN_TEMPLATE_SETS)})")
    close = difflib.get_close_matches(name.lower(), BUILTIN_TEMPLATE_SETS, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise InputError(f"unknown template set {name!r}{hint}: use {', '.join(BUILTIN_TEMPLATE_SETS)} or a file path")


def resolve_labels(labels: str | None = None, labels_file: str | None = None) -> list[str]:
    """``--labels a,b,c`` (CSV quoting: ``'"New York, NY",Paris'``) or ``--labels-file FILE`` (one per line)."""
    if labels and labels_file:
        raise InputError("give --labels or --labels-file, not both")
    if labels_file:
        found = read_lines(labels_file, "labels")
        source = labels_file
    elif labels:
        found = _split_labels(labels)
        source = "--labels"
    else:
        raise InputError("no labels: pass --labels a,b,c or --labels-file FILE")
    if not found:
        raise InputError(f"{source}: no labels")
    seen: set[str] = set()
    for label in found:
        if label in seen:
            raise InputError(f"{source}: label {label!r} appears twice")
        seen.add(label)
    return found


def _split_labels(labels: str) -> list[str]:
    """Comma-separated labels, read as one CSV record so a quoted label may hold a comma."""
    import csv

    try:
        # The csv module is lenient: a quote inside an unquoted label (5" screw) stays as it is.
        parts = [field for row in csv.reader(labels.splitlines(keepends=True), skipinitialspace=True) for field in row]
    except csv.Error as e:
        raise InputError(f"--labels: cannot read {labels!r} as comma-separated labels ({e})") from e
    return [part.strip() for part in parts if part.strip()]


def zero_shot_classifier(
    lm: LoadedModel,
    labels: Sequence[str],
    templates: TemplateSet,
    on_progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """One embedding per label: the renormalised mean of its normalised prompt embeddings (L x D).

    ``on_progress`` gets the number of prompts encoded after each text batch, out of
    ``len(labels) * len(templates.templates)``.
    """
    import torch

    from clipcli.zeroshot.encode import encode_texts

    prompts = [p for label in labels for p in templates.fill(label)]
    per_prompt = encode_texts(lm, prompts, on_progress=on_progress).view(len(labels), len(templates.templates), -1)
    return torch.nn.functional.normalize(per_prompt.mean(dim=1), dim=-1)


def zero_shot_logits(lm: LoadedModel, image_embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """``logit_scale`` x cosine similarity (+ ``logit_bias`` for SigLIP) of normalised image embeddings
    (N x D) with a classifier (L x D): the model's own ``logits_per_image`` (N x L). Rankings and
    accuracies are read from these, not from probabilities, which round far-off labels to the same 0."""
    return lm.logits(image_embeddings, classifier)


def zero_shot_probabilities(lm: LoadedModel, image_embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Each image's probability per label (N x L): for CLIP the softmax of :func:`zero_shot_logits` over
    the labels (rows sum to 1, as OpenAI's zero-shot example computes it); for SigLIP the sigmoid of each
    logit on its own (rows need not sum to 1). ``classify`` and ``eval`` both score with this one function,
    so their scores agree."""
    return lm.probabilities(zero_shot_logits(lm, image_embeddings, classifier))
