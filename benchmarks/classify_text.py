"""`clipcli classify-text` against Hugging Face's zero-shot-classification pipeline, same model.

One run: a random-weight BART-MNLI-shaped model (BART-base or BART-large size, the latter
``facebook/bart-large-mnli``'s shapes; compute does not depend on the weights' values) with a byte-level
BPE tokenizer trained here on the benchmark's own words, so texts take realistic numbers of tokens; texts
x 10 labels. The pipeline runs its documented batched use, ``classifier(texts, candidate_labels=...,
batch_size=B)`` (``--pipeline-batch-sizes``, default 1, its default, and 8), at ``--pipeline-precision``
(by default the dtype clipcli's ``auto`` picks: bf16 on CPUs with native bf16). When the pipeline is slow it
scores fewer texts (``--pipeline-texts``), drawn evenly from the same list, and its rate is taken from
those: texts/s does not depend on how many.

``--precisions int8,bf16,fp32`` runs clipcli at each of those precisions side by side with the pipeline
(rounds taken in turns, so that a shared machine's drift slows all alike), on texts of tweet to paragraph
length (``--lengths tweets``), and prints each one's texts/s, its ratio to the pipeline's best batch size,
where its time went (tokeniser, model, softmax), and how far its scores moved from fp32's.
``--emulate-avx2`` limits torch's, oneDNN's, FBGEMM's and MKL's kernels to AVX2 (an emulation of an
AVX2-only CPU on a newer one, not a measurement on one).

    python benchmarks/classify_text.py --size base                       # the issue's run: long on 2 cores
    python benchmarks/classify_text.py --texts 120 --pipeline-texts 24 --rounds 4 --no-process  # README's CPU row
    python benchmarks/classify_text.py --size large --device cuda --pipeline-texts 200 --pipeline-batch-sizes 1,8,64
    python benchmarks/classify_text.py --size large --lengths tweets --texts 8 --pipeline-texts 8 \
        --pipeline-precision fp32 --pipeline-batch-sizes 8 --precisions int8,bf16,fp32 --rounds 2 \
        --no-process          # docs/precision.md#texts, a few minutes on 2 cores; with --precisions int8,fp32
                              # --emulate-avx2: what an AVX2-only CPU gets (emulated)
    python benchmarks/classify_text.py --size large --lengths tweets --texts 8 --precisions fp32,int8 --forward \
        --rounds 3 --emulate-avx2                      # forward passes alone, kernels limited to AVX2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from common import clipcli

LABELS = ["sports", "politics", "music", "science", "business", "health", "travel", "food", "technology", "weather"]
TEMPLATE = "This text is about {}."
SIZES = {  # BART-base and BART-large (facebook/bart-large-mnli's shape)
    "base": {"d_model": 768, "layers": 6, "heads": 12, "ffn": 3072},
    "large": {"d_model": 1024, "layers": 12, "heads": 16, "ffn": 4096},
}
_WORDS = (
    "the of and to in is was for on that with as by at from his her they this have had not are but were "
    "been one all which their said there when would who will more no if out so up what about into than "
    "them can only other new some could time these two may then first any like now my such make over "
    "our even most me state after also made many did must before back see through way where get much go "
    "well your know should down work year because come people just each those how too little good very "
    "game team season player coach score match league win final government election vote minister law "
    "policy court party song album band concert music singer study research data scientists results "
    "market company shares profit bank price patients doctors hospital health trip hotel city flight "
    "recipe dinner restaurant taste software phone computer users storm rain weather forecast"
)
WORDS = _WORDS.split()


def mixed_texts(n: int, seed: int = 0) -> list[str]:
    """Lengths as in a file of tickets or reviews: many short, some long, a few very long."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        kind = rng.random()
        words = rng.randint(3, 15) if kind < 0.4 else rng.randint(16, 80) if kind < 0.85 else rng.randint(81, 350)
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        texts.append(text[0].upper() + text[1:] + ".")
    return texts


def tweets_to_paragraphs(n: int, seed: int = 0) -> list[str]:
    """Lengths from a tweet to a paragraph: 8 to 40 words (40%), 40 to 100 (40%), 100 to 160 (20%)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        kind = rng.random()
        words = rng.randint(8, 40) if kind < 0.4 else rng.randint(40, 100) if kind < 0.8 else rng.randint(100, 160)
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        texts.append(text[0].upper() + text[1:] + ".")
    return texts


def build_model(folder: Path, size: str) -> Path:
    """A random BART classifier with MNLI's labels, and a byte-level BPE trained on the benchmark's words."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import BartConfig, BartForSequenceClassification, BartTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    corpus = mixed_texts(5000, seed=1) + [TEMPLATE.format(label) for label in LABELS]
    bpe.train_from_iterator(corpus, vocab_size=5000, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    tokenizer = BartTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.model_max_length = 1024
    shape = SIZES[size]
    config = BartConfig(
        vocab_size=50265,
        d_model=shape["d_model"],
        encoder_layers=shape["layers"],
        decoder_layers=shape["layers"],
        encoder_attention_heads=shape["heads"],
        decoder_attention_heads=shape["heads"],
        encoder_ffn_dim=shape["ffn"],
        decoder_ffn_dim=shape["ffn"],
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        id2label={0: "contradiction", 1: "neutral", 2: "entailment"},
        label2id={"contradiction": 0, "neutral": 1, "entailment": 2},
    )
    torch.manual_seed(0)
    BartForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class Pipeline:
    """The pipeline's documented batched call, timed over successive slices of its texts."""

    def __init__(self, folder: Path, dtype: object, device: str, batch_size: int) -> None:
        from transformers import pipeline
        from transformers.utils import logging

        logging.set_verbosity_error()
        self.classifier = pipeline(
            "zero-shot-classification", model=str(folder), tokenizer=str(folder), dtype=dtype, device=device
        )
        self.batch_size = batch_size
        self.classifier(["warm up"], candidate_labels=LABELS, hypothesis_template=TEMPLATE)
        self.texts = self.seconds = 0.0

    def run(self, texts: list[str]) -> None:
        start = time.perf_counter()
        out = self.classifier(texts, candidate_labels=LABELS, hypothesis_template=TEMPLATE, batch_size=self.batch_size)
        self.seconds += time.perf_counter() - start
        self.texts += len(out)


class Clipcli:
    """clipcli's core after loading (what `classify-text` runs per text), timed the same way."""

    def __init__(self, folder: Path, device: str, batch_size: int, precision: str = "auto") -> None:
        from clipcli.models.nli import load_nli_model
        from clipcli.text.nli import StageSeconds, iter_scores

        self.nm = load_nli_model(str(folder), device, precision)
        self.iter_scores = iter_scores
        self.batch_size = batch_size
        self.stages = StageSeconds()
        list(iter_scores(self.nm, ["warm up"], LABELS, TEMPLATE))
        self.texts = self.seconds = 0.0
        self.scores: dict[str, object] = {}  # text -> its scores, to compare precisions

    def run(self, texts: list[str]) -> None:
        start = time.perf_counter()
        rows = self.iter_scores(self.nm, texts, LABELS, TEMPLATE, batch_size=self.batch_size, seconds=self.stages)
        for text, row in zip(texts, rows, strict=True):
            self.scores[text] = row
            self.texts += 1
        self.seconds += time.perf_counter() - start


def time_process(folder: Path, texts: list[str], out: Path) -> float:
    """Wall seconds of a whole `clipcli classify-text --texts-file` process, model loading included."""
    import subprocess

    file = out / "texts.txt"
    file.write_text("\n".join(texts) + "\n")
    cmd = [*clipcli(), "classify-text", "--texts-file", str(file), "--labels", ",".join(LABELS), "-m", str(folder)]
    start = time.perf_counter()
    subprocess.run([*cmd, "-o", str(out / "preds.csv")], check=True, capture_output=True)
    return time.perf_counter() - start


def cpu_class() -> str:
    from clipcli.models.precision import cpu_has_native_bf16

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, native bf16: {cpu_has_native_bf16()}"


AVX2_ONLY = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


def precisions_side_by_side(args: argparse.Namespace, folder: Path, texts: list[str]) -> dict[str, object]:
    """clipcli at each of ``--precisions`` and the pipeline at ``--pipeline-precision``, in turns."""
    import numpy as np
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    ours = {p: Clipcli(folder, args.device, args.batch_size, p) for p in args.precisions.split(",")}
    pipe_precision = args.pipeline_precision or "fp32"
    sizes = [int(b) for b in args.pipeline_batch_sizes.split(",")]
    pipes = {b: Pipeline(folder, dtypes[pipe_precision], args.device, b) for b in sizes}
    step = max(1, len(texts) // args.pipeline_texts)
    subset = texts[::step][: args.pipeline_texts]
    for r in range(args.rounds):
        for run in ours.values():
            run.run(texts[r * len(texts) // args.rounds : (r + 1) * len(texts) // args.rounds])
        for pipe in pipes.values():
            pipe.run(subset[r * len(subset) // args.rounds : (r + 1) * len(subset) // args.rounds])
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    results: dict[str, object] = {}
    best = 0.0
    for b, pipe in pipes.items():
        rate = pipe.texts / pipe.seconds
        best = max(best, rate)
        results[f"pipeline_{pipe_precision}_batch_{b}_texts_per_s"] = rate
        print(f"pipeline batch_size={b} ({pipe_precision}, {int(pipe.texts)} texts): {rate:.3f} texts/s")
    reference = ours.get("fp32")
    for precision, run in ours.items():
        rate = run.texts / run.seconds
        results[f"clipcli_{precision}_texts_per_s"] = rate
        results[f"clipcli_{precision}_vs_best_pipeline"] = rate / best
        shares = ", ".join(f"{k} {v:.2%}" for k, v in run.stages.shares().items())
        line = f"clipcli {precision} ({int(run.texts)} texts): {rate:.3f} texts/s, {rate / best:.2f}x the best pipeline"
        if reference is not None and run is not reference:
            a = np.stack([reference.scores[t] for t in texts])  # type: ignore[misc]
            b = np.stack([run.scores[t] for t in texts])  # type: ignore[misc]
            same = float((a.argmax(1) == b.argmax(1)).mean())
            moved = float(np.abs(a - b).max())
            results[f"clipcli_{precision}_top1_agreement"], results[f"clipcli_{precision}_max_abs_change"] = same, moved
            line += f"; vs fp32: top label kept {same:.2%}, largest probability change {moved:.4f}"
        print(f"{line}; time: {shares}", flush=True)
    return results


def forward_passes(args: argparse.Namespace, folder: Path, texts: list[str]) -> dict[str, object]:
    """Seconds of the model's forward passes alone over the texts' pairs, at each of ``--precisions``, in
    turns: the share of a precision's gain that does not depend on batching (and quick enough to repeat
    with ``--emulate-avx2``)."""
    from clipcli.models.nli import load_nli_model
    from clipcli.text.nli import StageSeconds, batch_tokens_for, hypotheses, pair_logits

    filled = hypotheses(TEMPLATE, LABELS)
    models = {p: load_nli_model(str(folder), args.device, p) for p in args.precisions.split(",")}
    seconds = {p: 0.0 for p in models}
    for r in range(args.rounds):
        for precision, nm in models.items():
            stages = StageSeconds()
            pair_logits(nm, texts, filled, (args.batch_size, batch_tokens_for(nm)), seconds=stages)
            seconds[precision] += stages.model if r else 0.0  # the first round warms up
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    base = next(iter(seconds.values()))
    for precision, s in seconds.items():
        print(f"forward passes at {precision}: {s:.1f} s, {base / s:.2f}x {next(iter(seconds))}", flush=True)
    return {f"forward_{p}_s": s for p, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", choices=["mixed", "tweets"], default="mixed", help="mixed: up to 350 words")
    parser.add_argument("--precisions", default="", help="clipcli precisions side by side, e.g. int8,bf16,fp32")
    parser.add_argument("--pipeline-precision", choices=["fp32", "bf16", "fp16"], default=None)
    parser.add_argument("--emulate-avx2", action="store_true", help="limit the kernels to AVX2 (see above)")
    parser.add_argument("--forward", action="store_true", help="time the forward passes alone, no pipeline")
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--pipeline-texts", type=int, default=100, help="texts the pipeline scores (its rate)")
    parser.add_argument("--pipeline-batch-sizes", default="1,8")
    parser.add_argument("--batch-size", type=int, default=64, help="clipcli's pairs per forward pass")
    parser.add_argument("--rounds", type=int, default=5, help="turns the runs take, so that drift hits all alike")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-process", action="store_true", help="skip the whole-process run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    if args.emulate_avx2:  # before torch loads its kernels
        os.environ.update(AVX2_ONLY)

    import torch

    emulated = " (emulated AVX2-only: kernels limited to AVX2 on this CPU)" if args.emulate_avx2 else ""
    print(f"CPU: {cpu_class()}{emulated}; torch {torch.__version__} ({torch.get_num_threads()} threads)", flush=True)
    if args.device != "cpu":
        print(f"device: {torch.cuda.get_device_name(args.device)}", flush=True)
    folder = build_model(args.out / f"random-bart-{args.size}-mnli", args.size)
    texts = (tweets_to_paragraphs if args.lengths == "tweets" else mixed_texts)(args.texts)
    from transformers import AutoTokenizer

    lengths = sorted(len(AutoTokenizer.from_pretrained(folder)(t)["input_ids"]) for t in texts)
    print(
        f"model: random BART-{args.size}-MNLI shape; {len(texts)} texts x {len(LABELS)} labels; tokens per text: "
        f"median {lengths[len(lengths) // 2]}, max {lengths[-1]}, mean {sum(lengths) / len(lengths):.0f}",
        flush=True,
    )
    if args.precisions and args.forward:
        print(json.dumps(forward_passes(args, folder, texts)))
        return
    if args.precisions:
        print(json.dumps(precisions_side_by_side(args, folder, texts)))
        return
    ours = Clipcli(folder, args.device, args.batch_size)
    precision = ours.nm.precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.pipeline_precision or precision]
    pipes = {int(b): Pipeline(folder, dtype, args.device, int(b)) for b in args.pipeline_batch_sizes.split(",")}
    step = max(1, len(texts) // args.pipeline_texts)
    subset = texts[::step][: args.pipeline_texts]
    # Turns: each round runs a slice of clipcli's texts, then a slice of the pipeline's, so that a machine
    # whose speed drifts (shared cores) slows both alike.
    for r in range(args.rounds):
        ours.run(texts[r * len(texts) // args.rounds : (r + 1) * len(texts) // args.rounds])
        for pipe in pipes.values():
            pipe.run(subset[r * len(subset) // args.rounds : (r + 1) * len(subset) // args.rounds])
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    rate = ours.texts / ours.seconds
    results: dict[str, object] = {"precision": precision, "clipcli_texts_per_s": rate}
    print(f"clipcli classify-text (after load, {precision}, {int(ours.texts)} texts): {rate:.2f} texts/s")
    best = 0.0
    for b, pipe in pipes.items():
        pipe_rate = pipe.texts / pipe.seconds
        best = max(best, pipe_rate)
        results[f"pipeline_batch_{b}_texts_per_s"] = pipe_rate
        print(
            f"pipeline batch_size={b} ({precision}, {int(pipe.texts)} of the texts): {pipe_rate:.2f} texts/s; "
            f"clipcli is {rate / pipe_rate:.2f}x"
        )
    results["speedup_vs_best_pipeline"] = rate / best
    print(f"clipcli vs the pipeline's best: {rate / best:.2f}x", flush=True)
    if not args.no_process and args.device == "cpu":
        with tempfile.TemporaryDirectory() as tmp:
            seconds = time_process(folder, texts, Path(tmp))
        print(f"whole `clipcli classify-text` process: {seconds:.1f} s, {len(texts) / seconds:.2f} texts/s", flush=True)
        results["process_s"] = seconds
    print(json.dumps(results))


if __name__ == "__main__":
    main()
