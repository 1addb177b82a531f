"""Shared builders for the tests: a tiny BERT model directory and NSMC-format data.

Everything here is offline and deterministic: the WordPiece vocabulary is trained on the same
synthetic corpus the data files are drawn from, so a tokenizer loaded from the directory maps
the synthetic texts to real ids (not [UNK]).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

# Words that carry the label. Korean-looking and English words in both lists.
POSITIVE_WORDS = [
    "최고", "재밌다", "감동", "명작", "추천", "좋아요", "훌륭하다",
    "great", "wonderful", "excellent", "loved", "amazing", "brilliant",
]
NEGATIVE_WORDS = [
    "최악", "지루하다", "별로", "실망", "노잼", "싫어요", "엉망",
    "awful", "boring", "terrible", "hated", "waste", "dull",
]
# Label-free filler.
FILLER_WORDS = [
    "영화", "배우", "연기", "스토리", "장면", "감독", "그냥", "정말", "이", "그", "오늘", "보고",
    "movie", "actor", "story", "scene", "the", "a", "plot", "film", "really", "just", "today", "watched",
]
# Texts with quote characters: NSMC has many, and a reader with quoting on mangles them.
QUOTE_TEMPLATES = [
    '"{w}" 라고 말하고 싶다',
    "it's {w}",
    'he said "{w}" and left',
    "'{w}' 이라는 말",
    '""{w}',
    "{w} 6'2\" actor",
]

NSMC_HEADER = "id\tdocument\tlabel"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _corpus() -> list[str]:
    """The text the vocabulary is trained on: every word many times, plus sample rows."""
    words = POSITIVE_WORDS + NEGATIVE_WORDS + FILLER_WORDS
    lines = [" ".join(words)] * 20
    lines += [text for _, text, _ in synthetic_rows(400, seed=12345)]
    return lines


def write_tiny_model_dir(path: Path, vocab_size_hint: int = 300) -> Path:
    """A directory with a tiny BERT config and a WordPiece tokenizer trained on the synthetic corpus.

    The WordPiece trainer of `tokenizers` breaks ties between equally frequent merges differently
    from run to run, so its vocabulary is not reproducible. The trained vocabulary is therefore
    made canonical: the special tokens, every character and ##character of the trained alphabet,
    and every whole word of the corpus (as the tokenizer normalises and splits it), each group
    sorted. The result is the same on every call, and every corpus word is a single token.
    `vocab_size_hint` bounds the training run; the real size is written to config.json.

    No weights are written: load it with `from_scratch=True` (or build the model from its config).
    """
    from tokenizers import BertWordPieceTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    corpus = _corpus()
    tokenizer = BertWordPieceTokenizer(lowercase=True, clean_text=True)
    tokenizer.train_from_iterator(
        corpus,
        vocab_size=vocab_size_hint,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    trained = set(tokenizer.get_vocab())
    alphabet = sorted(
        t for t in trained if t not in SPECIAL_TOKENS and (len(t) == 1 or (t.startswith("##") and len(t) == 3))
    )
    words = set()
    for line in corpus:
        normalized = tokenizer.normalize(line)
        words.update(word for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized))
    vocab = SPECIAL_TOKENS + alphabet + sorted(words - set(alphabet) - set(SPECIAL_TOKENS))
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "model_max_length": 128, "tokenizer_class": "BertTokenizer"}),
        encoding="utf-8",
    )
    (path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "bert",
                "vocab_size": len(vocab),
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 128,
                "type_vocab_size": 2,
                "pad_token_id": 0,
                "hidden_act": "gelu",
                "hidden_dropout_prob": 0.1,
                "attention_probs_dropout_prob": 0.1,
                "initializer_range": 0.02,
                "layer_norm_eps": 1e-12,
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    _check_tokenizer(path)
    return path


def _check_tokenizer(path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    sample = "정말 최고 명작 movie was great but the plot 지루하다"
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    unknown = sum(1 for i in ids if i == tokenizer.unk_token_id)
    if not ids or unknown > len(ids) // 4:
        raise RuntimeError(
            f"tiny tokenizer in {path} maps {unknown}/{len(ids)} tokens of {sample!r} to [UNK]: "
            f"{tokenizer.convert_ids_to_tokens(ids)}"
        )


def synthetic_rows(n: int, seed: int) -> list[tuple[str, str, int]]:
    """(id, text, label) rows of a learnable sentiment task, balanced, deterministic by seed.

    Label 1 texts hold 1-3 words from POSITIVE_WORDS, label 0 texts 1-3 from NEGATIVE_WORDS,
    mixed with 2-12 filler words. About one row in ten uses a template with quote characters.
    """
    rng = random.Random(seed)
    labels = [i % 2 for i in range(n)]
    rng.shuffle(labels)
    rows = []
    for i, label in enumerate(labels):
        signal = rng.sample(POSITIVE_WORDS if label else NEGATIVE_WORDS, rng.randint(1, 3))
        words = [rng.choice(FILLER_WORDS) for _ in range(rng.randint(2, 12))] + signal
        rng.shuffle(words)
        text = " ".join(words)
        if i % 10 == 3:
            text = rng.choice(QUOTE_TEMPLATES).format(w=text)
        rows.append((str(10_000_000 + seed * 100_000 + i), text, label))
    return rows


def _write_tsv(path: Path, rows: list[tuple[str, str, int]]) -> None:
    lines = [NSMC_HEADER] + [f"{row_id}\t{text}\t{label}" for row_id, text, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_nsmc_dir(path: Path, n_train: int, n_test: int, seed: int = 0, empty_train: int = 2) -> Path:
    """ratings_train.txt / ratings_test.txt in the NSMC format (UTF-8 TSV, no quoting).

    `empty_train` training rows (spread through the file) have an empty document and a valid label.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    train = synthetic_rows(n_train, seed)
    if empty_train:
        step = max(1, n_train // empty_train)
        for k in range(min(empty_train, n_train)):
            position = min(n_train - 1, k * step + step // 2)
            row_id, _, label = train[position]
            train[position] = (row_id, "", label)
    test = synthetic_rows(n_test, seed + 1)
    _write_tsv(path / "ratings_train.txt", train)
    _write_tsv(path / "ratings_test.txt", test)
    return path


# Small encoders of each BERT-family type, for checks that the modeling code of the installed
# transformers still computes what trainer_pkg's shortcuts assume.
SMALL = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
SMALL_BY_TYPE = {"distilbert": {"vocab_size": 100, "dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64},
                 "albert": {**SMALL, "embedding_size": 16}, "electra": {**SMALL, "embedding_size": 16}}


def padded_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    """Four labelled rows of 3 to 16 tokens, padded to 16 (padding id 0)."""
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([16, 9, 3, 12])
    mask = (torch.arange(16) < lengths[:, None]).long()
    input_ids = torch.randint(5, vocab_size, (4, 16), generator=generator) * mask
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}


def small_encoder(model_type: str, **overrides):
    """A randomly initialised 2-layer classifier of `model_type` (SDPA attention), and a padded batch for it."""
    config = AutoConfig.for_model(model_type, **{**SMALL_BY_TYPE.get(model_type, SMALL), **overrides})
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    batch = padded_batch(100)
    batch["input_ids"][batch["attention_mask"] == 0] = config.pad_token_id or 0
    return model, batch
