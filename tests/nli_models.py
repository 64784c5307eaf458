"""Tiny random-weight NLI models saved as Hugging Face folders, with tokenizers that need no download.

Shared by the classify-text tests and the parity tests (pytest imports this folder's modules by name,
as the other tests import ``conftest``). The label order differs between the two architectures so that
the entailment and contradiction indices are really read from ``config.label2id``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
MAX_LENGTH = 64  # small, so that a test text can be longer than the model takes


def _byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE (GPT-2, RoBERTa, BART) uses for the bytes 0-255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def bart_folder(folder: Path, seed: int = 0, label2id: dict[str, int] | None = None) -> Path:
    """A 2-layer BART classifier whose tokenizer has one token per byte (a byte-level BPE, no merges)."""
    import torch
    from transformers import BartConfig, BartForSequenceClassification, BartTokenizer

    label2id = label2id or {"contradiction": 0, "neutral": 1, "entailment": 2}
    vocab = {token: i for i, token in enumerate(SPECIALS + _byte_symbols())}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = BartTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.model_max_length = MAX_LENGTH
    config = BartConfig(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        decoder_start_token_id=vocab["</s>"],
        id2label={i: name for name, i in label2id.items()},
        label2id=label2id,
        init_std=0.3,
    )
    # A wide initialisation spreads the scores: at the usual 0.02 every label gets nearly the same
    # probability, and the parity tests would compare nothing.
    torch.manual_seed(seed)
    model = BartForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def bert_folder(folder: Path, seed: int = 1, label2id: dict[str, int] | None = None) -> Path:
    """A 2-layer BERT classifier with a WordPiece vocabulary of letters, digits and a few words."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    label2id = label2id or {"ENTAILMENT": 0, "NEUTRAL": 1, "CONTRADICTION": 2}
    words = ["this", "text", "is", "about", "sports", "politics", "music", "the", "a", "game", "vote"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *chars, *(f"##{c}" for c in chars)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"))
    tokenizer.model_max_length = MAX_LENGTH
    config = BertConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=MAX_LENGTH,
        id2label={i: name for name, i in label2id.items()},
        label2id=label2id,
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


PARITY_TEXTS = [
    "I love playing basketball.",
    "Parliament voted on the new budget late last night, after a long debate.",
    "ok",
    "The concert was loud, the crowd sang along to every song, and the band played two encores. " * 3,
    "Who won the game?",
]


@pytest.fixture(scope="session")
def bart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bart_folder(tmp_path_factory.mktemp("nli") / "tiny-bart-mnli")


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bert_folder(tmp_path_factory.mktemp("nli") / "tiny-bert-nli")


def roberta_folder(folder: Path, seed: int = 2, label2id: dict[str, int] | None = None) -> Path:
    """A 2-layer RoBERTa classifier on the byte-level vocabulary of :func:`bart_folder`."""
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaTokenizer

    label2id = label2id or {"contradiction": 0, "neutral": 1, "entailment": 2}
    vocab = {token: i for i, token in enumerate(SPECIALS + _byte_symbols())}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = RobertaTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.model_max_length = MAX_LENGTH
    config = RobertaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=MAX_LENGTH + 2,  # RoBERTa's positions start after the padding index
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        id2label={i: name for name, i in label2id.items()},
        label2id=label2id,
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    model = RobertaForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def deberta_v2_folder(folder: Path, seed: int = 3, label2id: dict[str, int] | None = None) -> Path:
    """A 2-layer DeBERTa-v2 (v3's architecture: relative positions, shared attention keys) classifier with a
    unigram vocabulary of letters and a few words, as its SentencePiece tokenizers have."""
    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, DebertaV2Tokenizer

    label2id = label2id or {"entailment": 0, "neutral": 1, "contradiction": 2}
    words = ["this", "text", "is", "about", "sports", "politics", "music", "the", "a", "game", "vote"]
    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-")
    pieces = [("[PAD]", 0.0), ("[UNK]", 0.0), ("[CLS]", 0.0), ("[SEP]", 0.0), ("[MASK]", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in words] + [(c, -3.0) for c in chars] + [(f"▁{c}", -3.5) for c in chars]
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = DebertaV2Tokenizer(vocab=pieces)
    tokenizer.model_max_length = MAX_LENGTH
    config = DebertaV2Config(
        vocab_size=len(pieces),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=MAX_LENGTH,
        relative_attention=True,
        position_buckets=16,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        pad_token_id=0,
        id2label={i: name for name, i in label2id.items()},
        label2id=label2id,
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    model = DebertaV2ForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def distilbert_folder(folder: Path, seed: int = 4) -> Path:
    """A 2-layer DistilBERT classifier (a model type int8 is not offered for) on :func:`bert_folder`'s vocabulary."""
    import torch
    from transformers import BertTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    label2id = {"entailment": 0, "neutral": 1, "contradiction": 2}
    bert_folder(folder / "_bert")
    tokenizer = BertTokenizer(vocab=str(folder / "_bert" / "vocab.txt"))
    tokenizer.model_max_length = MAX_LENGTH
    config = DistilBertConfig(
        vocab_size=tokenizer.vocab_size,
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=64,
        max_position_embeddings=MAX_LENGTH,
        id2label={i: name for name, i in label2id.items()},
        label2id=label2id,
    )
    torch.manual_seed(seed)
    DistilBertForSequenceClassification(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def roberta_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return roberta_folder(tmp_path_factory.mktemp("nli") / "tiny-roberta-mnli")


@pytest.fixture(scope="session")
def deberta_v2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return deberta_v2_folder(tmp_path_factory.mktemp("nli") / "tiny-deberta-v3-mnli")
