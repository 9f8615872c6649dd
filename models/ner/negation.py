"""NegEx-style cue rules: is an entity negated ("denies warfarin") or uncertain ("? on apixaban")?

For each entity we look at a window of text before it (and a shorter one after it) inside the
same clause. A cue counts only when no terminator (sentence end, "but", "然而", a Chinese comma,
an affirmative verb such as "takes") lies between the cue and the entity. Text of other entities
is masked first so that "言语不清" (contains 不) or "肢体无力" (contains 无) never act as cues, and
pseudo-cues ("no obvious cause", "无明显诱因", "without contrast") are removed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from models.ner.tags import Span


@dataclass(frozen=True)
class CueRules:
    pre_neg: tuple[str, ...]
    post_neg: tuple[str, ...]
    pre_unc: tuple[str, ...]
    post_unc: tuple[str, ...]
    pseudo: tuple[str, ...]
    terminators: tuple[str, ...]
    pre_window: int  # characters
    post_window: int
    words: bool  # cues must sit on word boundaries (English)


EN = CueRules(
    pre_neg=("no", "not", "denies", "denied", "deny", "without", "w/o", "negative for", "free of",
             "no history of", "no h/o", "no hx of", "not on", "not taking", "denies taking",
             "never", "none of", "absence of", "no evidence of", "ruled out for", "nor"),
    post_neg=("none", "negative", "denied", "ruled out", "absent", "not present", "not taken"),
    pre_unc=("possible", "possibly", "probable", "probably", "suspected", "suspect", "suspicion of",
             "?", "query", "questionable", "r/o", "rule out", "unclear if", "unclear whether",
             "unsure", "may be", "may have", "might", "cannot exclude", "uncertain", "unknown if",
             "likely", "presumed", "concern for", "eval for possible"),
    post_unc=("unknown", "unclear", "not excluded", "cannot be excluded", "?", "uncertain",
              "not known", "not confirmed", "questionable"),
    pseudo=("no obvious", "no apparent cause", "not only", "no change", "without contrast",
            "w/o contrast", "no increase", "not certain if", "gram negative"),
    terminators=(".", ";", "\n", "but", "however", "although", "though", "except", "apart from",
                 "aside from", "takes", "taking", "uses", "using", "on", "reports", "presents",
                 "presented", "complains", "with", "has", "now", "which", "started", "cc:",
                 "pmh:", "meds:", "vitals:"),
    pre_window=60,
    post_window=30,
    words=True,
)

ZH = CueRules(
    pre_neg=("无", "否认", "未", "没有", "未见", "未诉", "不伴", "未服用", "未使用", "排除", "非"),
    post_neg=("(-)", "（-）", "阴性", "：无", ":无", "已排除"),
    pre_unc=("可能", "疑似", "疑为", "疑", "考虑", "不除外", "待排", "？", "?", "或许", "怀疑", "不能排除"),
    post_unc=("不详", "待排", "可能", "？", "?", "不除外", "待查", "不明", "不清楚"),
    pseudo=("无明显诱因", "无诱因", "无明显原因", "未规律服药", "未规律", "无法", "不佳"),
    terminators=("，", ",", "。", "；", ";", "\n", "但", "然而", "伴", "出现", "突发", "表现为",
                 "：", ":"),
    pre_window=15,
    post_window=8,
    words=False,
)


def _with_verbs(cues: tuple[str, ...]) -> tuple[str, ...]:
    # "possibly on X", "unclear if taking X": the verb is an affirmative terminator on its own,
    # so a cue followed by it is a cue of its own.
    return cues + tuple(f"{c} {v}" for c in cues for v in ("on", "taking", "using"))


EN = CueRules(**{**EN.__dict__, "pre_neg": _with_verbs(EN.pre_neg), "pre_unc": _with_verbs(EN.pre_unc)})


def rules_for(lang: str) -> CueRules:
    return ZH if lang == "zh" else EN


def _cue_positions(window: str, cues: tuple[str, ...], words: bool) -> list[tuple[int, int]]:
    found = []
    for cue in cues:
        if words and cue[0].isalnum():
            pattern = r"(?<![\w/])" + re.escape(cue) + (r"(?![\w/])" if cue[-1].isalnum() else "")
        else:
            pattern = re.escape(cue)
        found += [(m.start(), m.end()) for m in re.finditer(pattern, window)]
    return found


def _terminated(text: str, rules: CueRules) -> bool:
    return bool(_cue_positions(text, rules.terminators, rules.words))


def _masked(text: str, spans: list[Span], keep: Span, rules: CueRules) -> str:
    chars = list(text.lower() if rules.words else text)
    for sp in spans:
        if sp != keep:
            chars[sp.start:sp.end] = "_" * (sp.end - sp.start)
    masked = "".join(chars)
    for pseudo in rules.pseudo:
        masked = masked.replace(pseudo, " " * len(pseudo))
    return masked


def _has_pre_cue(masked: str, span: Span, cues: tuple[str, ...], rules: CueRules) -> bool:
    lo = max(0, span.start - rules.pre_window)
    window = masked[lo:span.start]
    for _start, end in _cue_positions(window, cues, rules.words):
        if not _terminated(window[end:], rules):
            return True
    return False


def _has_post_cue(masked: str, span: Span, cues: tuple[str, ...], rules: CueRules) -> bool:
    window = masked[span.end:span.end + rules.post_window]
    for start, _end in _cue_positions(window, cues, rules.words):
        between = window[:start]
        # '.'/'?' right after the entity ends the clause, but a '?' cue itself may sit there.
        if not _terminated(between, rules):
            return True
    return False


# Measurements and demographics are never negated or uncertain ("r/o ICH, GCS 13": the GCS
# is a fact); cues apply to findings, drugs and history.
NO_CUE_TYPES = frozenset({"AGE", "SEX", "ONSET", "GCS", "BP", "HEM_VOL"})


def assess(text: str, spans: list[Span], lang: str) -> list[tuple[bool, bool]]:
    """(negated, uncertain) for each span, in order."""
    rules = rules_for(lang)
    out = []
    for span in spans:
        if span.type in NO_CUE_TYPES:
            out.append((False, False))
            continue
        masked = _masked(text, spans, span, rules)
        negated = (_has_pre_cue(masked, span, rules.pre_neg, rules)
                   or _has_post_cue(masked, span, rules.post_neg, rules))
        uncertain = (_has_pre_cue(masked, span, rules.pre_unc, rules)
                     or _has_post_cue(masked, span, rules.post_unc, rules))
        out.append((negated, uncertain))
    return out
