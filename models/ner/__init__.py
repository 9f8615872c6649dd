"""Named-entity recognition on clinical text (English and Chinese) for ICH triage.

* :mod:`models.ner.tags` — entity types, BIO/BIOES, span <-> tag conversion
* :mod:`models.ner.hichit` — HICH-IT "char TAG" files (reader/writer)
* :mod:`models.ner.synth` — synthetic emergency notes / CT requests with exact spans
* :mod:`models.ner.model` — tokenizer and token-classification model folders
* :mod:`models.ner.train`, :mod:`models.ner.evaluate` — training and entity-level metrics
* :mod:`models.ner.negation`, :mod:`models.ner.flags` — negation/uncertainty cues and triage flags
* :mod:`models.ner.textcheck` — empty/binary/oversize input checks (no torch)
* :mod:`models.ner.inference` — text -> entities + flags

Heavy imports (torch, transformers) happen only in model/train/inference/evaluate.
"""
