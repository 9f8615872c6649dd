"""NER commands: ``ichnode ner FILE|-``, ``train ner``, ``evaluate ner``, ``ner-synth``, ``hl7-listen``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from node.cli.common import JSON_OPTION, STATE, console, fail, print_json, print_rows

ENTITY_COLUMNS = ("type", "text", "value", "negated", "uncertain", "score", "start", "end")


def _read_input(source: str, max_chars: int) -> bytes:
    limit = max_chars * 4 + 1  # never read more than an oversize note needs to be recognised
    if source == "-":
        return sys.stdin.buffer.read(limit)
    path = Path(source)
    if not path.is_file():
        fail(f"{source}: no such file")
    try:
        with path.open("rb") as fh:
            return fh.read(limit)
    except OSError as exc:
        fail(f"{source}: cannot read ({exc.strerror})")


def _load_model(model_dir: Optional[Path]):  # noqa: ANN202
    from models.ner.inference import NerModel
    from models.ner.model import ModelFolderError

    folder = model_dir or STATE.settings().models.ner
    try:
        return NerModel(folder)
    except (ModelFolderError, OSError, ValueError) as exc:
        fail(f"NER model: {exc}")


def ner(
    source: str = typer.Argument(..., help="Text file (UTF-8 or GB18030) or - for stdin"),
    model_dir: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: configured/demo)"),
    max_chars: int = typer.Option(20_000, "--max-chars", min=1, help="Refuse longer texts"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Extract entities (with negation/uncertainty) and triage flags from a clinical note."""
    from models.ner.inference import NerInputError

    data = _read_input(source, max_chars)
    model = _load_model(model_dir)
    try:
        result = model.extract(data, max_chars=max_chars)
    except NerInputError as exc:
        fail(f"{source}: {exc}")
    if as_json:
        print_json({"model": model.info, **result})
        return
    print_rows(result["entities"], ENTITY_COLUMNS, title=f"entities ({result['lang']})")
    flags = {k: v for k, v in result["flags"].items() if v not in (None, False)}
    console.print("flags: " + (", ".join(f"{k}={v}" for k, v in flags.items()) or "none"),
                  highlight=False)


def _prf_rows(scores: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, row in scores.items():
        if isinstance(row, dict) and key not in ("macro avg", "weighted avg"):
            rows.append({"type": key, **row})
    return rows


def train_ner(
    out: Optional[Path] = typer.Option(None, "--out", help="Model folder to write (default <root>/models/ner)"),
    steps: int = typer.Option(1500, "--steps", min=1, help="Optimisation steps"),
    base: Optional[Path] = typer.Option(None, "--base", help="Local pretrained checkpoint folder to fine-tune"),
    data: Optional[list[Path]] = typer.Option(None, "--data", help="HICH-IT file(s) instead of synthetic notes"),
    n_train: int = typer.Option(6000, "--n-train", min=10, help="Synthetic training notes"),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default 1e-3 scratch, 5e-5 base)"),
    seed: int = typer.Option(1, "--seed", help="Seed of the synthetic training notes"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch"),
    n_eval: int = typer.Option(600, "--n-eval", min=0, help="Held-out synthetic notes to evaluate on (0 = skip)"),
    lang: str = typer.Option("both", "--lang", help="Synthetic notes: en, zh or both"),
    freeze_embeddings: bool = typer.Option(False, "--freeze-embeddings",
                                           help="Keep the base model's input embeddings fixed"),
) -> None:
    """Train the NER model (synthetic notes or HICH-IT files); evaluates on held-out notes."""
    from models.ner.hichit import HichitFormatError
    from models.ner.model import ModelFolderError
    from models.ner.synth import HELDOUT_SEED
    from models.ner.train import TrainConfig, train

    if lang not in ("en", "zh", "both"):
        fail(f"--lang must be en, zh or both, not {lang!r}")
    if seed == HELDOUT_SEED:
        fail(f"seed {seed} is the held-out seed; choose another")
    out = out or STATE.settings().storage.root / "models" / "ner"
    for path in data or []:
        if not path.is_file():
            fail(f"{path}: no such file")
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, n_train=n_train,
                      base=base, data=list(data or []), threads=threads, lang=lang,
                      freeze_embeddings=freeze_embeddings)
    try:
        meta = train(cfg, out, progress=lambda s, loss: console.print(f"step {s}/{steps} loss {loss:.4f}",
                                                                       highlight=False))
    except (ModelFolderError, HichitFormatError, OSError, ValueError) as exc:
        fail(f"training failed: {exc}")
    console.print(f"[green]saved[/] {out} ({meta['training']['seconds']} s)", highlight=False)
    if n_eval and not data:
        _evaluate_into(out, n_eval)


def _evaluate_into(folder: Path, n_eval: int) -> None:
    import json

    from models.ner.evaluate import evaluate, negation_agreement
    from models.ner.inference import NerModel
    from models.ner.model import META_FILE
    from models.ner.synth import HELDOUT_SEED, generate

    model = NerModel(folder)
    docs = generate(n_eval, HELDOUT_SEED)
    result = evaluate(model, docs)
    result["negation"] = negation_agreement(model, docs)
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["evaluation"] = {"heldout_seed": HELDOUT_SEED, "documents": len(docs),
                          "f1": {lang: r["micro avg"]["f1"] for lang, r in result["by_lang"].items()},
                          "negation": result["negation"]}
    meta_path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for lang, scores in result["by_lang"].items():
        print_rows(_prf_rows(scores), ("type", "precision", "recall", "f1", "support"),
                   title=f"held-out synthetic, {lang} ({scores['documents']} notes)")


def evaluate_ner(
    model_dir: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: configured/demo)"),
    data: Optional[list[Path]] = typer.Option(None, "--data", help="HICH-IT file(s); default held-out synthetic"),
    n: int = typer.Option(600, "--n", min=1, help="Held-out synthetic notes"),
    lang: str = typer.Option("both", "--lang", help="en, zh or both (synthetic notes)"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Entity-level precision/recall/F1 per type and language (seqeval, exact spans)."""
    from models.ner.evaluate import evaluate, negation_agreement
    from models.ner.hichit import HichitFormatError, read_hichit
    from models.ner.synth import HELDOUT_SEED, generate

    model = _load_model(model_dir)
    if data:
        try:
            docs = [d for path in data for d in read_hichit(path)]
        except (HichitFormatError, OSError) as exc:
            fail(str(exc))
        if not docs:
            fail("no documents in the given file(s)")
    else:
        if lang not in ("en", "zh", "both"):
            fail(f"--lang must be en, zh or both, not {lang!r}")
        docs = generate(n, HELDOUT_SEED, lang)
    result = evaluate(model, docs)
    if not data:
        result["negation"] = negation_agreement(model, docs)
    if as_json:
        print_json(result)
        return
    print_rows(_prf_rows(result["overall"]), ("type", "precision", "recall", "f1", "support"),
               title=f"all ({result['documents']} documents)")
    for name, scores in result["by_lang"].items():
        print_rows(_prf_rows(scores), ("type", "precision", "recall", "f1", "support"),
                   title=f"{name} ({scores['documents']} documents)")
    if "negation" in result:
        neg = result["negation"]
        console.print(f"negation cues agree on {neg['negated_accuracy']:.1%}, uncertainty on "
                      f"{neg['uncertain_accuracy']:.1%} of {neg['entities']} matched entities",
                      highlight=False)


def ner_synth(
    out: Path = typer.Option(..., "--out", help="HICH-IT-style file to write"),
    n: int = typer.Option(100, "--n", min=1, help="Notes"),
    lang: str = typer.Option("both", "--lang", help="en, zh or both"),
    seed: int = typer.Option(1, "--seed"),
    scheme: str = typer.Option("BIOES", "--scheme", help="BIO or BIOES"),
    collapse_loc: bool = typer.Option(False, "--hichit-loc", help="Write HICH-IT's single LOC type"),
) -> None:
    """Write synthetic labelled notes as a HICH-IT-style "char TAG" file."""
    from models.ner.hichit import write_hichit
    from models.ner.synth import generate
    from models.ner.tags import HICHIT_TYPE

    if lang not in ("en", "zh", "both") or scheme not in ("BIO", "BIOES"):
        fail("--lang must be en/zh/both and --scheme BIO/BIOES")
    docs = generate(n, seed, lang)
    write_hichit(docs, out, scheme=scheme, collapse_to=HICHIT_TYPE if collapse_loc else None)
    console.print(f"wrote {len(docs)} notes to {out}", highlight=False)


def hl7_listen(
    host: Optional[str] = typer.Option(None, "--host", help="Override hl7_in.host"),
    port: Optional[int] = typer.Option(None, "--port", min=1, max=65535, help="Override hl7_in.port"),
) -> None:
    """Run the HL7 v2 MLLP listener for clinical text in the foreground (Ctrl-C stops)."""
    from node.hl7_listener import serve_forever

    settings = STATE.settings()
    if host or port:
        settings = settings.model_copy(update={"hl7_in": settings.hl7_in.model_copy(
            update={k: v for k, v in (("host", host), ("port", port)) if v})})
    console.print(f"MLLP listener on {settings.hl7_in.host}:{settings.hl7_in.port}", highlight=False)
    try:
        serve_forever(settings)
    except OSError as exc:
        fail(f"cannot listen on {settings.hl7_in.host}:{settings.hl7_in.port}: {exc.strerror}")


def register(app: typer.Typer, train_app: typer.Typer, evaluate_app: typer.Typer) -> None:
    """Add this area's commands to the top-level app and the train/evaluate groups."""
    app.command("ner")(ner)
    app.command("ner-synth")(ner_synth)
    app.command("hl7-listen")(hl7_listen)
    train_app.command("ner")(train_ner)
    evaluate_app.command("ner")(evaluate_ner)
