"""`clipcli eval` on a text manifest (``text,label`` columns): NLI models x hypothesis templates.

Called by `eval` when its DATA is such a manifest; the table, the report, the predictions file and the
``--min-acc1`` gate are `eval`'s own, so text and image runs read the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import typer


def evaluate_texts(
    data: Path,
    models: list[str] | None,
    hypothesis_options: tuple[list[str] | None, list[str] | None],
    subset: tuple[int | None, int],
    outputs: tuple[Path | None, str | None, float | None],
    run: tuple[str, str, int],
    image_only: Mapping[str, object],
) -> None:
    """Evaluate ``models`` x hypotheses on ``data``. The options come as `eval` groups them:
    (--template, --templates), (--limit, --seed), (--report, --predictions, --min-acc1) and
    (--device, --precision, --batch-size); ``image_only`` maps the options that have no meaning for
    texts (--plots, --classnames) to their values, and any given is refused rather than ignored."""
    template, templates = hypothesis_options
    limit, seed = subset
    report, predictions, min_acc1 = outputs
    device, precision, batch_size = run
    from clipcli.commands.console import Progress, err
    from clipcli.commands.eval_table import print_table
    from clipcli.errors import EXIT_PARTIAL, InputError
    from clipcli.evaluation.run import gate_failures, write_report
    from clipcli.evaluation.text import (
        PREDICTION_COLUMNS,
        limit_texts,
        prediction_rows,
        text_classification_result,
        text_manifest,
    )
    from clipcli.models.nli import DEFAULT_NLI_MODEL, load_nli_model
    from clipcli.store.formats import open_writer, printable
    from clipcli.store.output import lock_files, prediction_format
    from clipcli.text.classify import whole_texts
    from clipcli.text.nli import hypotheses

    given = [flag for flag, value in image_only.items() if value]
    if given:
        raise InputError(
            f"{data}: a text manifest (text,label) is scored by NLI models: {', '.join(given)} apply to images"
        )
    pred_format = prediction_format(predictions)
    source = limit_texts(text_manifest(data), limit, seed)
    candidates = hypothesis_list(template, templates)
    for h in candidates:
        hypotheses(h, source.classes)  # every template is checked before any model loads
    results = []
    with lock_files(report, predictions):
        for name in models or [DEFAULT_NLI_MODEL]:
            nm = load_nli_model(name, device, precision)
            for h in candidates:
                with Progress(f"scoring ({name})", len(source), unit="texts") as bar:
                    on_progress = whole_texts(bar.advance)
                    results.append(text_classification_result(nm, source, h, batch_size, on_progress))
        print_table(err, results)
        if report:
            write_report(results, report)
        if predictions and pred_format:
            with open_writer(pred_format, predictions, columns=PREDICTION_COLUMNS) as writer:
                for r in results:
                    writer.write(prediction_rows(r, source))
    failed = gate_failures(results, min_acc1)
    for line in failed:
        err.print(printable(line), markup=False, highlight=False)
    if failed:
        raise typer.Exit(EXIT_PARTIAL)


def hypothesis_list(template: list[str] | None, templates: list[str] | None) -> list[str]:
    """Each hypothesis to compare: every --template, then every line of every --templates FILE; the
    tutorial's "This text is about {}." when none is given. The image template sets are not hypotheses."""
    from clipcli.errors import InputError
    from clipcli.text.nli import DEFAULT_HYPOTHESIS
    from clipcli.zeroshot.prompts import BUILTIN_TEMPLATE_SETS, read_lines

    found = list(template or [])
    for name in templates or []:
        if name in BUILTIN_TEMPLATE_SETS and not Path(name).is_file():
            raise InputError(
                f"--templates {name} is a set of image templates; for texts give hypotheses with --template "
                '"This text is about {}." (repeatable) or --templates FILE (one per line)'
            )
        found += read_lines(name, "hypothesis templates")
    return list(dict.fromkeys(found)) or [DEFAULT_HYPOTHESIS]
