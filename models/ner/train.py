"""Training: synthetic notes (or HICH-IT files) -> a token-classification model folder.

A plain PyTorch loop (AdamW, linear warm-up/decay) keeps the dependencies to torch and
transformers; the same loop fine-tunes a local pretrained checkpoint (``base``).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import get_linear_schedule_with_warmup

from models.ner import synth
from models.ner.document import Document
from models.ner.model import (bio_labels, build_tokenizer, default_labels, load_pretrained,
                              new_model, save_folder, token_labels)
from models.ner.tags import ENTITY_TYPES

log = logging.getLogger(__name__)
MODEL_NAME = "ichnode-ner"
MODEL_VERSION = "0.1.0"


@dataclass
class TrainConfig:
    steps: int = 1200
    batch_size: int = 32
    lr: float | None = None  # None: 1e-3 from scratch, 5e-5 for a pretrained base
    max_length: int = 192
    seed: int = synth.TRAIN_SEED
    n_train: int = 6000  # synthetic notes
    lang: str = "both"  # synthetic notes: en, zh or both (alternating)
    base: Path | None = None  # local pretrained checkpoint folder to fine-tune
    data: list[Path] = field(default_factory=list)  # HICH-IT files instead of synthetic notes
    hidden: int = 128
    layers: int = 2
    threads: int | None = None
    freeze_embeddings: bool = False  # fine-tuning: keep the (large) input embeddings fixed


def labels_for(docs: list[Document]) -> list[str]:
    """Our entity types if the documents use them, else the types found (e.g. HICH-IT LOC)."""
    found = sorted({s.type for d in docs for s in d.spans})
    if all(t in ENTITY_TYPES for t in found):
        return default_labels()
    return bio_labels(found)


def _encode(docs: list[Document], tokenizer, label2id: dict[str, int], max_length: int):
    enc = tokenizer([d.text for d in docs], truncation=True, max_length=max_length,
                    return_offsets_mapping=True)
    return [(ids, token_labels(doc, [tuple(o) for o in offs], label2id))
            for doc, ids, offs in zip(docs, enc["input_ids"], enc["offset_mapping"])]


def _batch(items, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (tok, lab) in enumerate(items):
        ids[row, :len(tok)] = torch.tensor(tok)
        labels[row, :len(lab)] = torch.tensor(lab)
        mask[row, :len(tok)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train(cfg: TrainConfig, out: Path, *, progress: Callable[[int, float], None] | None = None) -> dict:
    """Train and save to ``out``; returns the folder's metadata."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if cfg.data:
        from models.ner.hichit import read_hichit

        docs = [d for path in cfg.data for d in read_hichit(path)]
        source = {"kind": "hichit", "files": [p.name for p in cfg.data], "documents": len(docs)}
    else:
        docs = synth.generate(cfg.n_train, cfg.seed, cfg.lang)
        source = {"kind": "synthetic", "seed": cfg.seed, "documents": len(docs)}
    if not docs:
        raise ValueError("no training documents")
    labels = labels_for(docs)
    if cfg.base:
        model, tokenizer = load_pretrained(Path(cfg.base), labels)
        lr = cfg.lr or 5e-5
    else:
        tokenizer = build_tokenizer(d.text for d in docs)
        model = new_model(len(tokenizer), labels, hidden=cfg.hidden, layers=cfg.layers,
                          max_positions=max(256, cfg.max_length))
        lr = cfg.lr or 1e-3
    label2id = {l: i for i, l in enumerate(labels)}
    items = _encode(docs, tokenizer, label2id, cfg.max_length)
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, cfg.steps // 20), cfg.steps)
    model.train()
    started = time.monotonic()
    order: list[int] = []
    loss_value = float("nan")
    for step in range(1, cfg.steps + 1):
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(items)), len(items))
        chosen, order = order[:cfg.batch_size], order[cfg.batch_size:]
        batch = _batch([items[i] for i in chosen], tokenizer.pad_token_id or 0)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        loss_value = loss.item()
        if progress and (step % 50 == 0 or step == cfg.steps):
            progress(step, loss_value)
    model.eval()
    meta = {
        "name": MODEL_NAME, "version": MODEL_VERSION, "scheme": "BIO",
        "max_length": cfg.max_length,
        "base": cfg.base.name if cfg.base else None,
        "training": {**source, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": lr,
                     "final_loss": round(loss_value, 4),
                     "seconds": round(time.monotonic() - started, 1)},
    }
    return save_folder(model, tokenizer, out, meta)
