"""Worklist priority: STAT / URGENT / ROUTINE per study, with the flags that set it.

Thresholds and switches live in ``[routing]`` (stat_volume_ml, stat_shift_mm, urgent_on_any_ich,
stat_on_ivh, stat_on_anticoagulation, not_analysed_priority). Routing rules may raise a level
further (never lower it). The flags dict says why, in words a RIS or a radiologist can read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.results import AnalysisResult
from workers.report.entities import flags as ner_flags

LEVELS = ("STAT", "URGENT", "ROUTINE")
RANK = {level: n for n, level in enumerate(LEVELS)}  # lower = more urgent


def higher(a: str, b: str) -> str:
    """The more urgent of two levels."""
    return a if RANK[a] <= RANK[b] else b


@dataclass
class Priority:
    level: str = "ROUTINE"
    flags: dict = field(default_factory=dict)  # flag name -> value that triggered it
    reasons: list[str] = field(default_factory=list)

    def raise_to(self, level: str, flag: str, value, reason: str) -> None:
        self.level = higher(self.level, level)
        self.flags[flag] = value
        self.reasons.append(f"{level}: {reason}")

    def as_dict(self) -> dict:
        return {"level": self.level, "flags": self.flags, "reasons": self.reasons}


def compute_priority(result: AnalysisResult | None, entities, routing) -> Priority:  # noqa: ANN001
    """Priority of one study from the analysis result, NER output and ``settings.routing``."""
    p = Priority()
    if result is None or result.status != "ok":
        reason = (result.reason if result is not None else None) or "not analysed"
        p.raise_to(routing.not_analysed_priority, "not_analysed", True, f"not analysed ({reason})")
        return p
    any_ich = result.findings.get("any")
    present = [k for k, f in result.findings.items() if k != "any" and f.present]
    ich = bool(any_ich and any_ich.present) or bool(present)
    if ich and routing.urgent_on_any_ich:
        p.raise_to("URGENT", "ich_present", present or ["any"], "intracranial hemorrhage present")
    vol = result.hematoma_volume_ml
    if vol is not None and vol > routing.stat_volume_ml:
        p.raise_to("STAT", "volume_ml", round(vol, 1), f"hematoma volume {vol:.1f} mL > {routing.stat_volume_ml:g} mL")
    shift = result.midline_shift_mm
    if shift is not None and shift > routing.stat_shift_mm:
        p.raise_to("STAT", "midline_shift_mm", round(shift, 1), f"midline shift {shift:.1f} mm > {routing.stat_shift_mm:g} mm")
    ivh = result.findings.get("intraventricular")
    if ivh is not None and ivh.present and routing.stat_on_ivh:
        p.raise_to("STAT", "ivh", True, "intraventricular hemorrhage")
    f = ner_flags(entities)
    if f.get("anticoagulated"):
        p.flags["anticoagulated"] = True
        if ich and routing.stat_on_anticoagulation:
            p.raise_to("STAT", "anticoagulated", True, "hemorrhage in an anticoagulated patient")
    if not p.reasons:
        p.reasons.append("ROUTINE: no hemorrhage found")
    return p
