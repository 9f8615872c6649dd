"""Inference: text -> entities (type, span, value, negated, uncertain, score) -> flags.

Input is checked first (:func:`check_text`): empty, binary or oversize input raises
:class:`NerInputError` with a one-line reason, which the CLI prints and the worker step records,
instead of crashing. Texts longer than the model's window are read in overlapping windows; each
token takes its label from the window in which it sits farthest from an edge.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from models.ner.document import guess_lang
from models.ner.flags import derive_flags, entity_value
from models.ner.model import decode_tokens, load_folder
from models.ner.negation import assess
from models.ner.textcheck import MAX_CHARS, NerInputError, check_text  # noqa: F401 - re-exported

DEMO_DIR = Path(__file__).resolve().parents[1] / "weights" / "ner"
STRIDE = 32


@dataclass
class Entity:
    type: str
    text: str
    start: int
    end: int
    value: Any
    negated: bool
    uncertain: bool
    score: float


class NerModel:
    """A loaded NER folder; thread-safe predictions (one forward pass at a time)."""

    def __init__(self, folder: Path | None = None, *, device: str = "cpu") -> None:
        self.folder = Path(folder) if folder else DEMO_DIR
        self.model, self.tokenizer, self.meta = load_folder(self.folder)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.window = int(self.meta.get("max_length", 192))
        self._lock = threading.Lock()

    @property
    def info(self) -> dict[str, str]:
        return {"name": self.meta.get("name", "ner"), "version": self.meta.get("version", "?"),
                "sha256": self.meta.get("sha256", "")}

    def _token_predictions(self, texts: list[str]) -> list[list[tuple[int, int, str, float]]]:
        enc = self.tokenizer(texts, truncation=True, max_length=self.window, stride=STRIDE,
                             return_overflowing_tokens=True, return_offsets_mapping=True,
                             padding=True, return_tensors="pt")
        sample_of = enc.pop("overflow_to_sample_mapping").tolist()
        offsets = enc.pop("offset_mapping").tolist()
        inputs = {k: v.to(self.device) for k, v in enc.items()
                  if k in ("input_ids", "attention_mask", "token_type_ids")}
        with self._lock, torch.inference_mode():
            probs = self.model(**inputs).logits.softmax(-1).cpu()
        best_p, best_i = probs.max(-1)
        id2label = self.model.config.id2label
        # Word level: a word takes the label of its first sub-word and spans the whole word,
        # so an entity never starts or ends inside a word ("resting" -> "ing").
        chosen: list[dict[int, tuple[int, int, str, float]]] = [{} for _ in texts]
        for row, sample in enumerate(sample_of):
            words = self._words(enc, row, offsets[row])
            first = row == 0 or sample_of[row - 1] != sample
            last = row == len(sample_of) - 1 or sample_of[row + 1] != sample
            for rank, (start, end, j) in enumerate(words):
                # A window's outer words may be cut; the neighbouring window has them whole.
                if (rank == 0 and not first) or (rank == len(words) - 1 and not last):
                    continue
                edge = min(rank, len(words) - 1 - rank)
                prev = chosen[sample].get(start)
                if prev is None or edge > prev[0]:
                    chosen[sample][start] = (edge, end, id2label[int(best_i[row, j])],
                                             float(best_p[row, j]))
        return [[(s, v[1], v[2], v[3]) for s, v in sorted(c.items())] for c in chosen]

    @staticmethod
    def _words(enc, row: int, offsets: list[list[int]]) -> list[tuple[int, int, int]]:  # noqa: ANN001
        """(start, end, index of first token) per word of one window."""
        words: list[tuple[int, int, int]] = []
        last_word = None
        for j, word in enumerate(enc.word_ids(row)):
            start, end = offsets[j]
            if word is None or end <= start:
                continue
            if word == last_word:
                words[-1] = (words[-1][0], end, words[-1][2])
            else:
                words.append((start, end, j))
                last_word = word
        return words

    def predict(self, texts: list[str], *, langs: list[str] | None = None,
                batch_size: int = 16) -> list[list[Entity]]:
        """Entities for each (already checked) text."""
        out: list[list[Entity]] = []
        for lo in range(0, len(texts), batch_size):
            chunk = texts[lo:lo + batch_size]
            for k, (text, tokens) in enumerate(zip(chunk, self._token_predictions(chunk))):
                lang = (langs[lo + k] if langs else None) or guess_lang(text)
                spans = decode_tokens(text, tokens)
                cues = assess(text, [s for s, _ in spans], lang)
                out.append([
                    Entity(s.type, text[s.start:s.end], s.start, s.end,
                           entity_value(s.type, text[s.start:s.end]), neg, unc, round(p, 4))
                    for (s, p), (neg, unc) in zip(spans, cues)])
        return out

    def extract(self, data: bytes | str, *, max_chars: int = MAX_CHARS) -> dict[str, Any]:
        """One note -> {"lang", "entities": [...], "flags": {...}} (raises NerInputError)."""
        text = check_text(data, max_chars=max_chars)
        lang = guess_lang(text)
        entities = [asdict(e) for e in self.predict([text], langs=[lang])[0]]
        return {"lang": lang, "entities": entities, "flags": derive_flags(entities)}


_CACHE: dict[tuple[str, str], NerModel] = {}
_CACHE_LOCK = threading.Lock()


def get_model(folder: Path | None = None, device: str = "cpu") -> NerModel:
    """A process-wide loaded model per folder (workers load once, not per task)."""
    key = (str(Path(folder).resolve()) if folder else str(DEMO_DIR), device)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = NerModel(folder, device=device)
        return _CACHE[key]
