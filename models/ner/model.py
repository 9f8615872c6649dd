"""Tokenizer and token-classification model: built from scratch (demo) or loaded from a folder.

The demo model is a small BERT (``BertForTokenClassification``) with a WordPiece vocabulary
learnt from the synthetic corpus by the ``tokenizers`` library: Chinese is split into single
characters by the BERT normaliser, English into words and sub-words. Any local Hugging Face
token-classification checkpoint folder with a fast tokenizer (e.g. a MiniLM/BERT copy) works
too: nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import torch
from transformers import (AutoConfig, AutoModelForTokenClassification, AutoTokenizer, BertConfig,
                          BertForTokenClassification, PreTrainedTokenizerFast)

from models.ner.document import Document
from models.ner.tags import ENTITY_TYPES, Span, spans_to_tags

from transformers.utils import logging as _hf_logging

_hf_logging.disable_progress_bar()  # no tqdm bars in CLI output or worker logs

META_FILE = "ner.json"
WEIGHTS_FILE = "model.safetensors"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class ModelFolderError(Exception):
    """A model folder that cannot be used (missing files, checksum mismatch)."""


def bio_labels(types: Iterable[str]) -> list[str]:
    labels = ["O"]
    for typ in types:
        labels += [f"B-{typ}", f"I-{typ}"]
    return labels


def default_labels() -> list[str]:
    return bio_labels(ENTITY_TYPES)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 3000) -> PreTrainedTokenizerFast:
    """A WordPiece vocabulary learnt from ``texts`` (lower-cased; CJK characters split)."""
    from tokenizers import BertWordPieceTokenizer

    wp = BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True, strip_accents=True,
                                lowercase=True)
    wp.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=1,
                           special_tokens=SPECIAL_TOKENS, show_progress=False)
    from tokenizers import processors

    wp._tokenizer.post_processor = processors.BertProcessing(
        ("[SEP]", wp.token_to_id("[SEP]")), ("[CLS]", wp.token_to_id("[CLS]")))
    # Wrapping the trained tokenizers object works the same in transformers 4 and 5; the
    # folder then holds tokenizer.json (the exact pipeline) and vocab.txt for readers.
    return PreTrainedTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]",
                                   pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                   mask_token="[MASK]", model_max_length=512)


def new_model(vocab_size: int, labels: list[str], *, hidden: int = 128, layers: int = 2,
              heads: int = 4, max_positions: int = 256) -> BertForTokenClassification:
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=hidden * 2,
        max_position_embeddings=max_positions, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
    )
    return BertForTokenClassification(config)


def load_pretrained(folder: Path, labels: list[str]) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """A local checkpoint (any family with a fast tokenizer) with a fresh head for ``labels``."""
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"{folder}: no config.json (not a Hugging Face model folder)")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if not tokenizer.is_fast:
        raise ModelFolderError(f"{folder}: needs a fast tokenizer (tokenizer.json) for offsets")
    config = AutoConfig.from_pretrained(folder, local_files_only=True, num_labels=len(labels),
                                        id2label=dict(enumerate(labels)),
                                        label2id={l: i for i, l in enumerate(labels)})
    model = AutoModelForTokenClassification.from_pretrained(folder, config=config,
                                                            local_files_only=True)
    return model, tokenizer


def token_labels(doc: Document, offsets: list[tuple[int, int]], label2id: dict[str, int]) -> list[int]:
    """Label id per token from the document's character spans (-100 for special tokens)."""
    spans = [s for s in doc.spans if f"B-{s.type}" in label2id]
    char_tags = spans_to_tags(len(doc.text), spans, "BIO")
    out = []
    prev_type = None
    for start, end in offsets:
        if start == end:
            out.append(-100)
            continue
        tag = char_tags[start]
        typ = None if tag == "O" else tag[2:]
        if tag.startswith("I-") and prev_type != typ:
            tag = f"B-{typ}"  # a span that starts inside this token
        out.append(label2id[tag])
        prev_type = typ
    return out


def decode_tokens(text: str, tokens: list[tuple[int, int, str, float]]) -> list[tuple[Span, float]]:
    """(start, end, BIO label, probability) per token, in order -> spans with a mean confidence."""
    spans: list[tuple[Span, float]] = []
    cur: list | None = None  # [type, start, end, probs]
    for start, end, label, prob in tokens:
        typ = None if label == "O" else label[2:]
        if typ is None or label.startswith("B-") or (cur and cur[0] != typ):
            if cur:
                spans.append((Span(cur[1], cur[2], cur[0]), sum(cur[3]) / len(cur[3])))
            cur = [typ, start, end, [prob]] if typ else None
        elif cur is None:
            cur = [typ, start, end, [prob]]
        else:
            cur[2], cur[3] = end, cur[3] + [prob]
    if cur:
        spans.append((Span(cur[1], cur[2], cur[0]), sum(cur[3]) / len(cur[3])))
    # Trim whitespace the tokens never cover (defensive: offsets exclude it already).
    return [(s, p) for s, p in spans if text[s.start:s.end].strip()]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_folder(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, folder: Path,
                meta: dict) -> dict:
    """Weights, config, tokenizer and ``ner.json`` (with the weights' sha256)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no tqdm bars in CLI output or worker logs
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    meta = {**meta, "sha256": sha256_file(folder / WEIGHTS_FILE),
            "labels": [model.config.id2label[i] for i in range(model.config.num_labels)]}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
    return meta


def load_folder(folder: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, dict]:
    """A trained NER folder; the weights' checksum must match ``ner.json``."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise ModelFolderError(f"{folder}: no {META_FILE} (train one with `ichnode train ner`)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFolderError(f"{folder}: no {WEIGHTS_FILE}")
    if meta.get("sha256") and sha256_file(weights) != meta["sha256"]:
        raise ModelFolderError(f"{folder}: {WEIGHTS_FILE} does not match the checksum in {META_FILE}")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForTokenClassification.from_pretrained(folder, local_files_only=True)
    model.eval()
    return model, tokenizer, meta
