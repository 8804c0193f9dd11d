"""A tiny stand-in for MiniLM: a 1-layer BERT (hidden 16) with a word-level tokenizer over the
triage notes' words, written to a local Hugging Face model directory, for tests that build
``minilm-lora`` with ``[model.peft] path`` in well under a second (nothing downloaded)."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def _words() -> list[str]:
    from consortium.data.triage import _COMPLAINTS, _DISTRACTORS, SITES

    texts = [t for group in _COMPLAINTS for t in group] + list(_DISTRACTORS)
    texts += [t for spec in SITES.values() for key in ("openers", "who") for t in spec[key]]  # type: ignore[attr-defined]
    return sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})


def make_tiny_bert(directory: Path, *, seed: int = 0, hidden: int = 16) -> Path:
    """Write a tiny BERT and its tokenizer to ``directory``; ``seed`` sets its weights (two
    seeds: two different bases with the same architecture)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *_words()])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]",
                                        unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
