"""CLI of the ICH models: train, evaluate, list/verify bundles, analyse a series from disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import typer

from node.cli.common import JSON_OPTION, STATE, console, fail, print_json, print_rows

KINDS = ("triage", "segment")


def _progress(items: Iterable, description: str, total: int) -> Iterable:
    from rich.progress import track

    return track(items, description=description, total=total, console=console, transient=True)


def _train(kind: str, studies: int, val_studies: int, epochs: int, out: Optional[Path], seed: int,
           dataset: str, matrix: int, thickness: float, cache: Optional[Path],
           max_minutes: Optional[float], threads: int, init: Optional[Path],
           lr: float, spacing_mm: float, size: int, segment_bundle: Optional[Path],
           hard_mining: float, study_stage_only: bool, calcified_share: float,
           matrices: str) -> None:
    import logging

    from models.ich.train import TrainConfig, train

    logging.getLogger("models.ich").setLevel(logging.INFO)
    out = out or Path("var") / "models" / kind
    if dataset != "phantom" and ":" not in dataset:
        fail("--dataset is 'phantom' or FORMAT:FOLDER (rsna:, physionet:, hichit:)")
    cfg = TrainConfig(kind=kind, out=out, studies=studies, val_studies=val_studies, epochs=epochs,
                      seed=seed, dataset=dataset, matrix=matrix, thickness=thickness or None,
                      cache_dir=cache or (Path("var") / "cache" / "phantoms"),
                      max_minutes=max_minutes, threads=threads, init=init, lr=lr,
                      spacing_mm=spacing_mm, size=size, segment_bundle=segment_bundle,
                      hard_mining=hard_mining, study_stage_only=study_stage_only,
                      calcified_share=calcified_share, matrices=_matrices(matrices))
    try:
        path = train(cfg, _progress)
    except (ValueError, FileNotFoundError) as exc:
        fail(f"training failed: {exc}")
    meta = json.loads((path / "metadata.json").read_text())
    console.print(f"[green]{kind} bundle written to {path}[/] (sha256 {meta['sha256'][:16]}...)")
    console.print(f"validation: {json.dumps(meta.get('validation'))}", highlight=False)


def _matrices(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        fail(f"--matrices takes comma-separated integers, got {text!r}")
    if any(not 64 <= v <= 1024 for v in values):
        fail("--matrices: each matrix must lie between 64 and 1024")
    return values


def _operating_points(config: dict) -> str:
    """A triage bundle's "any" thresholds: the default one and one per pixel-spacing band."""
    if "thresholds" not in config:
        return ""
    points = [f"default: any >= {config['thresholds'].get('any', 0.5):.3f}"]
    for band in config.get("spacing_bands", []):
        lo, hi = band["pixel_spacing_mm"]
        points.append(f"pixels {lo:g}-{hi:g} mm: any >= {band['thresholds'].get('any', 0.5):.3f}")
    return "; ".join(points)


def register(app: typer.Typer, train_app: typer.Typer, evaluate_app: typer.Typer) -> None:
    """Add this area's commands to the top-level app and the train/evaluate groups."""

    def make_train(kind: str):
        def command(
            studies: int = typer.Option(160, help="Training studies (phantom seeds or dataset cases)"),
            val_studies: int = typer.Option(40, help="Validation studies (checkpoint, calibration)"),
            epochs: int = typer.Option(6, min=1),
            out: Optional[Path] = typer.Option(None, help="Bundle folder (default var/models/KIND)"),
            seed: int = typer.Option(0, help="Seed of initialisation, sampling and augmentation"),
            dataset: str = typer.Option("phantom", help="phantom, rsna:DIR, physionet:DIR or hichit:DIR"),
            matrix: int = typer.Option(128, help="Phantom matrix (128 is fast, same field of view)"),
            thickness: float = typer.Option(5.0, help="Phantom slice thickness mm (0 = random)"),
            cache: Optional[Path] = typer.Option(None, help="Phantom cache folder"),
            max_minutes: Optional[float] = typer.Option(None, help="Stop after this long (saved)"),
            threads: int = typer.Option(2, min=1, help="CPU threads"),
            init: Optional[Path] = typer.Option(None, help="Fine-tune from this bundle's weights"),
            lr: float = typer.Option(2e-3, help="Peak learning rate (one-cycle schedule)"),
            spacing_mm: float = typer.Option(2.0, help="Model grid pixel (mm)"),
            size: int = typer.Option(112, help="Model window (pixels, square)"),
            segment_bundle: Optional[Path] = typer.Option(
                None, help="triage: the segmenter whose probabilities it sees (default: the demo one)"),
            hard_mining: float = typer.Option(
                0.0, min=0.0, help="segment: draw studies by (running loss)^this (0 = off)"),
            study_stage_only: bool = typer.Option(
                False, "--study-stage-only",
                help="triage: keep --init's slice encoder, retrain only the study stage"),
            calcified: float = typer.Option(
                0.0, "--calcified", min=0.0, max=1.0,
                help="phantoms: share of training studies given calcification mimics"),
            matrices: str = typer.Option(
                "", "--matrices",
                help="phantoms: matrices drawn per training study, e.g. 128,256,512 "
                     "(validation stays at --matrix)"),
        ) -> None:
            _train(kind, studies, val_studies, epochs, out, seed, dataset, matrix, thickness,
                   cache, max_minutes, threads, init, lr, spacing_mm, size, segment_bundle,
                   hard_mining, study_stage_only, calcified, matrices)

        command.__doc__ = f"Train the {kind} model and write a verified bundle."
        return command

    for kind in KINDS:
        train_app.command(kind)(make_train(kind))

    @evaluate_app.command("triage")
    def evaluate_triage(studies: int = typer.Option(60), matrix: int = typer.Option(256),
                        thickness: float = typer.Option(5.0),
                        out: Optional[Path] = typer.Option(None, help="Write the metrics JSON here"),
                        as_json: bool = JSON_OPTION) -> None:
        """Triage AUC and sensitivity/specificity on held-out phantoms."""
        _evaluate("triage", studies, matrix, thickness, out, as_json)

    @evaluate_app.command("segment")
    def evaluate_segment(studies: int = typer.Option(60), matrix: int = typer.Option(256),
                         thickness: float = typer.Option(5.0),
                         out: Optional[Path] = typer.Option(None, help="Write the metrics JSON here"),
                         as_json: bool = JSON_OPTION) -> None:
        """Dice, volume and midline-shift errors, false positives on normals (held-out phantoms)."""
        _evaluate("segment", studies, matrix, thickness, out, as_json)

    @evaluate_app.command("all")
    def evaluate_all(studies: int = typer.Option(60), matrix: int = typer.Option(256),
                     thickness: float = typer.Option(5.0),
                     out: Optional[Path] = typer.Option(None, help="Write the metrics JSON here"),
                     as_json: bool = JSON_OPTION) -> None:
        """Triage and segmentation metrics together."""
        _evaluate("all", studies, matrix, thickness, out, as_json)

    @app.command("models")
    def models_list(as_json: bool = JSON_OPTION) -> None:
        """The configured triage/segmentation bundles, checksum verified."""
        from models.ich.bundle import BundleError, load_bundle

        settings = STATE.settings()
        rows = []
        for kind in KINDS:
            path = getattr(settings.models, kind)
            try:
                b = load_bundle(path, kind)
                rows.append({"kind": kind, "name": b.name, "version": b.version, "path": str(b.path),
                             "sha256": b.sha256, "verified": True,
                             "operating_points": _operating_points(b.config)})
            except BundleError as exc:
                rows.append({"kind": kind, "path": str(path or "(demo)"), "verified": False,
                             "error": str(exc)})
        print_rows(rows, ["kind", "name", "version", "verified", "sha256", "path",
                          "operating_points", "error"], title="ICH models", as_json=as_json)
        if not all(r["verified"] for r in rows):
            raise typer.Exit(1)

    @app.command("analyze")
    def analyze(path: Path = typer.Argument(..., help="DICOM series folder/files or a volume.npz"),
                masks: Optional[Path] = typer.Option(None, help="Write masks.npz here"),
                as_json: bool = JSON_OPTION) -> None:
        """Run triage + segmentation on a series from disk and print the findings."""
        from models.ich.bundle import BundleError
        from models.ich.inference import analyze_volume
        from models.preprocess.series import SeriesError, load_series
        from models.volume import Volume

        from models.preprocess.cavity import load_mask

        try:
            intracranial = None
            if path.suffix == ".npz":
                volume = Volume.load(path)
                # A work item's own mask (found on the original voxels by the deid step).
                if (path.parent / "intracranial.npz").is_file():
                    intracranial = load_mask(path.parent / "intracranial.npz")
            else:
                files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
                volume = load_series(files)
            result, mask_arrays = analyze_volume(volume, STATE.settings(), intracranial=intracranial)
        except (SeriesError, BundleError, FileNotFoundError) as exc:
            fail(str(exc))
        if masks:
            import numpy as np

            np.savez_compressed(masks, **mask_arrays)
        if as_json:
            print_json(result.model_dump(mode="json"))
            return
        rows = [{"label": k, "probability": f"{v.probability:.3f}", "threshold": f"{v.threshold:.3f}",
                 "present": v.present} for k, v in result.findings.items()]
        print_rows(rows, ["label", "probability", "threshold", "present"],
                   title=f"Findings (operating point: {result.operating_point})")
        console.print(f"hematoma {result.hematoma_volume_ml} mL (ABC/2 {result.hematoma_abc2_ml}), "
                      f"midline shift {result.midline_shift_mm} mm, ventricles L/R "
                      f"{result.ventricle_left_ml}/{result.ventricle_right_ml} mL, "
                      f"{result.seconds.get('total')} s", highlight=False)


def _evaluate(what: str, studies: int, matrix: int, thickness: float, out: Optional[Path],
              as_json: bool) -> None:
    from models.ich.bundle import BundleError
    from models.ich.evaluate import EvalConfig, evaluate_phantoms

    cfg = EvalConfig(what=what, studies=studies, matrix=matrix, thickness=thickness or None)
    try:
        metrics = evaluate_phantoms(cfg, STATE.settings(), _progress)
    except (BundleError, ImportError) as exc:
        fail(f"evaluation failed: {exc}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2) + "\n")
    if as_json:
        print_json(metrics)
        return
    if "triage" in metrics:
        rows = [{"label": k, **v} for k, v in metrics["triage"].items()]
        print_rows(rows, ["label", "auc", "sensitivity", "specificity", "threshold", "positives",
                          "negatives"], title=f"Triage ({metrics['held_out']}; operating points "
                                              f"{metrics['operating_points']})")
        print_rows([metrics["worklist_flag"]], ["sensitivity", "specificity", "false_alarms",
                                                 "missed"], title="Worklist flag (ICH present)")
    if "segment" in metrics:
        seg = dict(metrics["segment"])
        per_subtype = seg.pop("hematoma_by_subtype", {})
        rows = [{"metric": k, **(v if isinstance(v, dict) else {"mean": v})} for k, v in seg.items()]
        print_rows(rows, ["metric", "mean", "median", "p90", "max", "n"], title="Segmentation")
        rows = [{"subtype": k, "studies": v["studies"],
                 "recall": (v["recall"] or {}).get("mean"),
                 "dice_alone": (v["dice_single_subtype"] or {}).get("mean"),
                 "n_alone": (v["dice_single_subtype"] or {}).get("n", 0)}
                for k, v in per_subtype.items()]
        print_rows(rows, ["subtype", "studies", "recall", "dice_alone", "n_alone"],
                   title="Hematoma by subtype (voxel recall; Dice of single-subtype studies)")
    print_rows([{"bar": k, "met": v} for k, v in metrics["bars"].items()], ["bar", "met"],
               title="Bars (issue 4)")
