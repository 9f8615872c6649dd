"""Routing rules: YAML conditions on DICOM attributes and results -> forward / priority / notify.

A rule file (``routing.rules_file``) is parsed with ``yaml.safe_load`` and validated by pydantic
at start-up (``ichnode routes check FILE``, ``ichnode config check``, the report step): unknown
keys, unknown fields, bad operators, bad regexes and unknown destinations are errors with the
exact place (``rules[2].when.all[0].op: ...``). Nothing is evaluated as code (no eval).

Example::

    rules:
      - name: big-bleed-to-neuro
        when:
          all:
            - {field: dicom.Modality, op: equals, value: CT}
            - any:
                - {field: results.hematoma_volume_ml, op: ">", value: 30}
                - {field: results.intraventricular.present, op: equals, value: true}
        actions:
          - {forward: results, to: [neuro_pacs]}
          - {set_priority: STAT}
          - {notify: true}

Fields (``field:``):
  dicom.<Keyword>      any DICOM keyword, read from the original study's first instance
  study.calling_ae, study.station, study.instance_count, study.state
  results.status ("ok"/"not_analysed"), results.reason, results.hematoma_volume_ml,
  results.hematoma_abc2_ml, results.midline_shift_mm, results.ventricle_left_ml,
  results.ventricle_right_ml, results.present_subtypes (list),
  results.<label>.probability / results.<label>.present   (label: any, epidural, subdural,
  subarachnoid, intraparenchymal, intraventricular)
  ner.<flag> (e.g. ner.anticoagulated), ner.labels (list of entity labels)
  priority.level       the level computed from the thresholds, before rules

Operators: equals, not_equals, in, regex, contains, <, <=, >, >=, exists; and the combinators
``all``, ``any``, ``not``. String comparison ignores case and surrounding spaces; for a
multi-valued attribute (e.g. ImageType) equals/in/regex match if any value matches. A missing
value makes every operator false except ``exists: false``. Every rule is evaluated in file order;
``stop: true`` on a rule that fires skips the rules after it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.datadict import keyword_dict

from models.results import LABELS

OPS = ("equals", "not_equals", "in", "regex", "contains", "<", "<=", ">", ">=", "exists")
NUMERIC_OPS = ("<", "<=", ">", ">=")
MAX_REGEX = 200  # pattern length
MAX_SUBJECT = 1024  # characters of a value a regex looks at
_NESTED_QUANTIFIER = re.compile(r"\([^)]*[+*}][^)]*\)\s*[+*{]")
STUDY_FIELDS = {"study.calling_ae", "study.station", "study.instance_count", "study.state"}
RESULT_FIELDS = {"results.status", "results.reason", "results.hematoma_volume_ml",
                 "results.hematoma_abc2_ml", "results.midline_shift_mm", "results.ventricle_left_ml",
                 "results.ventricle_right_ml", "results.present_subtypes"}
RESULT_FIELDS |= {f"results.{label}.{attr}" for label in LABELS for attr in ("probability", "present")}
OTHER_FIELDS = {"ner.labels", "priority.level"}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class RulesError(Exception):
    """A rule file that cannot be used; the message names the file and the place."""


def check_field(name: str) -> str:
    if name in STUDY_FIELDS or name in RESULT_FIELDS or name in OTHER_FIELDS:
        return name
    if name.startswith("dicom."):
        keyword = name[6:]
        if keyword not in keyword_dict:
            raise ValueError(f"unknown DICOM keyword {keyword!r} (use the keyword, e.g. dicom.Modality)")
        return name
    if name.startswith("ner.") and _IDENT.match(name[4:]):
        return name
    raise ValueError(f"unknown field {name!r}: use dicom.<Keyword>, study.*, results.*, ner.*, priority.level")


class Condition(BaseModel):
    """A leaf (field/op/value) or one combinator (all / any / not)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    field: str | None = None
    op: Literal[OPS] | None = None  # type: ignore[valid-type]
    value: Any = None
    all: list["Condition"] | None = None
    any: list["Condition"] | None = None
    not_: "Condition | None" = Field(None, alias="not")

    @field_validator("field")
    @classmethod
    def _field(cls, v: str | None) -> str | None:
        return None if v is None else check_field(v)

    @model_validator(mode="after")
    def _shape(self) -> "Condition":
        forms = [self.field is not None, self.all is not None, self.any is not None, self.not_ is not None]
        if sum(forms) != 1:
            raise ValueError("a condition is exactly one of: {field, op, value}, all, any, not")
        if self.field is None:
            if self.op is not None or self.value is not None:
                raise ValueError("op/value belong to a field condition")
            if (self.all is not None and not self.all) or (self.any is not None and not self.any):
                raise ValueError("all/any need at least one condition")
            return self
        if self.op is None:
            raise ValueError(f"condition on {self.field} needs an op ({', '.join(OPS)})")
        if self.op == "exists":
            self.value = True if self.value is None else self.value
            if not isinstance(self.value, bool):
                raise ValueError("exists takes true or false")
        elif self.value is None:
            raise ValueError(f"op {self.op!r} needs a value")
        if self.op in NUMERIC_OPS and (isinstance(self.value, bool) or not isinstance(self.value, (int, float))):
            raise ValueError(f"op {self.op!r} needs a number, got {self.value!r}")
        if self.op == "in" and not isinstance(self.value, list):
            raise ValueError("op 'in' needs a list")
        if self.op == "regex":
            if not isinstance(self.value, str) or len(self.value) > MAX_REGEX:
                raise ValueError(f"regex must be a string of at most {MAX_REGEX} characters")
            if _NESTED_QUANTIFIER.search(self.value):
                raise ValueError("regex with a nested quantifier (e.g. (a+)+) is refused: catastrophic backtracking")
            try:
                re.compile(self.value)
            except re.error as exc:
                raise ValueError(f"invalid regex: {exc}") from None
        return self


class Action(BaseModel):
    model_config = ConfigDict(extra="forbid")

    forward: Literal["original", "results", "defaced"] | None = None
    to: list[str] = Field(default_factory=list)
    set_priority: Literal["STAT", "URGENT", "ROUTINE"] | None = None
    notify: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> "Action":
        if sum(x is not None for x in (self.forward, self.set_priority, self.notify)) != 1:
            raise ValueError("an action is exactly one of: forward (+ to), set_priority, notify")
        if self.forward is not None and not self.to:
            raise ValueError("forward needs 'to': a list of destination names")
        if self.forward is None and self.to:
            raise ValueError("'to' only goes with forward")
        return self


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    description: str = ""
    enabled: bool = True
    when: Condition
    actions: list[Action] = Field(min_length=1)
    stop: bool = False


class RuleFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> "RuleFile":
        seen = set()
        for n, r in enumerate(self.rules):
            if r.name in seen:
                raise ValueError(f"rules[{n}].name: duplicate rule name {r.name!r}")
            seen.add(r.name)
        return self


# ------------------------------------------------------------------------- loading
def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out.replace(".not_", ".not") or "(top level)"


def parse_rules(data: Any, source: str, destinations: set[str] | None = None) -> RuleFile:
    if data is None:
        data = {"rules": []}
    if isinstance(data, list):
        data = {"rules": data}
    try:
        rf = RuleFile.model_validate(data)
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            where = _where(tuple(err["loc"]))
            # Whole-file checks (duplicate names) already say where in their message.
            msgs.append(msg if where == "(top level)" and msg.startswith("rules[") else f"{where}: {msg}")
        raise RulesError(f"{source}: " + "; ".join(msgs[:5])) from None
    if destinations is not None:
        for n, rule in enumerate(rf.rules):
            for m, action in enumerate(rule.actions):
                unknown = [d for d in action.to if d not in destinations]
                if unknown:
                    known = ", ".join(sorted(destinations)) or "none configured"
                    raise RulesError(f"{source}: rules[{n}].actions[{m}].to: unknown destination(s) "
                                     f"{', '.join(unknown)} (configured: {known})")
    return rf


def load_rules(path: Path, destinations: set[str] | None = None) -> RuleFile:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulesError(f"{path}: not valid YAML: {exc}") from None
    return parse_rules(data, str(path), destinations)


def rules_for(settings) -> RuleFile:  # noqa: ANN001 - Settings
    """The configured rules (empty when no rules_file), validated against the destinations."""
    path = settings.routing.rules_file
    if not path:
        return RuleFile()
    return load_rules(Path(path), set(settings.destinations))


# ------------------------------------------------------------------------- facts
def _plain(value: Any) -> Any:
    """pydicom values -> str / float / list for comparisons."""
    from pydicom.multival import MultiValue

    if isinstance(value, (MultiValue, list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if hasattr(value, "real") and not isinstance(value, str):  # DSfloat, IS
        return float(value)
    return str(value)


def build_facts(*, dataset=None, study=None, result=None, entities=None, priority=None) -> dict:  # noqa: ANN001
    """Everything a rule can look at, as a flat mapping (missing values are simply absent)."""
    from workers.report.entities import entity_list
    from workers.report.entities import flags as ner_flags

    facts: dict[str, Any] = {}
    if dataset is not None:
        for elem in dataset:
            if elem.keyword and elem.VR not in ("SQ", "OB", "OW", "OF", "OD", "OL", "UN"):
                facts[f"dicom.{elem.keyword}"] = _plain(elem.value)
        facts["study.station"] = _plain(dataset.get("StationName"))
    if study is not None:
        facts["study.calling_ae"] = study.calling_ae
        facts["study.instance_count"] = study.instance_count
        facts["study.state"] = getattr(study.state, "value", study.state)
    if result is not None:
        facts["results.status"] = result.status
        facts["results.reason"] = result.reason
        for name in ("hematoma_volume_ml", "hematoma_abc2_ml", "midline_shift_mm",
                     "ventricle_left_ml", "ventricle_right_ml"):
            facts[f"results.{name}"] = getattr(result, name)
        for label, f in result.findings.items():
            facts[f"results.{label}.probability"] = f.probability
            facts[f"results.{label}.present"] = f.present
        facts["results.present_subtypes"] = [k for k, f in result.findings.items() if k != "any" and f.present]
    for flag, value in ner_flags(entities).items():
        facts[f"ner.{flag}"] = value
    facts["ner.labels"] = sorted({label for label, _ in entity_list(entities)})
    if priority is not None:
        facts["priority.level"] = priority
    return {k: v for k, v in facts.items() if v is not None}


# ------------------------------------------------------------------------- evaluation
def _norm(v: Any) -> Any:
    return v.strip().casefold() if isinstance(v, str) else v


def _equal(actual: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return bool(actual) == bool(expected) if isinstance(actual, bool) and isinstance(expected, bool) else False
    if isinstance(expected, (int, float)):
        try:
            return float(actual) == float(expected)
        except (TypeError, ValueError):
            return False
    return _norm(str(actual)) == _norm(str(expected))


def _leaf(c: Condition, facts: dict) -> tuple[bool, str]:
    present = c.field in facts
    actual = facts.get(c.field)
    values = actual if isinstance(actual, list) else [actual]
    if c.op == "exists":
        ok = present if c.value else not present
    elif not present:
        ok = False
    elif c.op == "equals":
        ok = any(_equal(v, c.value) for v in values)
    elif c.op == "not_equals":
        ok = not any(_equal(v, c.value) for v in values)
    elif c.op == "in":
        ok = any(_equal(v, e) for v in values for e in c.value)
    elif c.op == "contains":
        ok = (any(_equal(v, c.value) for v in actual) if isinstance(actual, list)
              else _norm(str(c.value)) in _norm(str(actual)))
    elif c.op == "regex":
        ok = any(re.search(c.value, str(v)[:MAX_SUBJECT]) is not None for v in values)
    else:
        try:
            a = float(actual)
        except (TypeError, ValueError):
            ok = False
        else:
            ok = {"<": a < c.value, "<=": a <= c.value, ">": a > c.value, ">=": a >= c.value}[c.op]
    shown = "missing" if not present else repr(actual)
    return ok, f"{c.field} {c.op} {c.value!r} (actual {shown}) -> {'true' if ok else 'false'}"


def evaluate(c: Condition, facts: dict, depth: int = 0) -> tuple[bool, list[str]]:
    """(result, explanation lines) of one condition tree."""
    pad = "  " * depth
    if c.field is not None:
        ok, line = _leaf(c, facts)
        return ok, [pad + line]
    if c.not_ is not None:
        ok, lines = evaluate(c.not_, facts, depth + 1)
        return not ok, [pad + f"not -> {'true' if not ok else 'false'}"] + lines
    parts = c.all if c.all is not None else c.any
    results, lines = [], []
    for sub in parts:
        ok, sub_lines = evaluate(sub, facts, depth + 1)
        results.append(ok)
        lines += sub_lines
    ok = all(results) if c.all is not None else any(results)
    kind = "all" if c.all is not None else "any"
    return ok, [pad + f"{kind} -> {'true' if ok else 'false'}"] + lines


@dataclass
class Decision:
    """What the rules ask for: destinations per purpose, a priority floor, notify."""

    forward: dict[str, set[str]] = field(default_factory=lambda: {"original": set(), "results": set(),
                                                                  "defaced": set()})
    priority: str | None = None
    notify: bool = False
    fired: list[str] = field(default_factory=list)
    trace: dict[str, list[str]] = field(default_factory=dict)  # rule name -> explanation


def decide(rules: RuleFile, facts: dict) -> Decision:
    from node.priority import higher

    d = Decision()
    for rule in rules.rules:
        if not rule.enabled:
            d.trace[rule.name] = ["disabled"]
            continue
        ok, lines = evaluate(rule.when, facts)
        d.trace[rule.name] = lines
        if not ok:
            continue
        d.fired.append(rule.name)
        for a in rule.actions:
            if a.forward:
                d.forward[a.forward].update(a.to)
            elif a.set_priority:
                d.priority = a.set_priority if d.priority is None else higher(d.priority, a.set_priority)
            elif a.notify is not None:
                d.notify = d.notify or a.notify
        if rule.stop:
            break
    return d
