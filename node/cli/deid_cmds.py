"""CLI of the de-identification area: ``ichnode deface`` and the ``ichnode deid`` group."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from node.cli.common import JSON_OPTION, STATE, console, fail, print_json, print_rows

deid_app = typer.Typer(help="De-identification: profile, pseudonym look-ups (PHI zone).",
                       no_args_is_help=True)


def _series_paths(folder: Path) -> list[Path]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not folder.is_dir():
        fail(f"{folder}: not a folder")
    paths = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        except (InvalidDicomError, OSError):
            continue
        paths.append(path)
    if not paths:
        fail(f"{folder}: no DICOM files")
    return paths


def _in_volume_order(paths: list[Path], sop_uids: list[str]) -> list[Path]:
    import pydicom

    by_uid = {}
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        by_uid[str(ds.SOPInstanceUID)] = path
    return [by_uid[u] for u in sop_uids]


def deface_cmd(
    source: Path = typer.Argument(..., help="Folder with one DICOM CT series"),
    target: Path = typer.Argument(..., help="Folder for the defaced, de-identified copy"),
    mode: str = typer.Option("ichnode", "--mode", help="ichnode (3D, brain-safe) or mosmed"),
    preview: bool = typer.Option(False, "--preview", help="Also write a before/after PNG"),
    preview_file: Optional[Path] = typer.Option(
        None, "--preview-file", help="Where the PNG goes (default: <TARGET>_preview.png)"),
    seed: int = typer.Option(0, "--seed", help="Random seed of the mosmed ellipses"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Deface a series and de-identify its headers (PS3.15 Annex E) into TARGET."""
    from models.preprocess.series import SeriesError, load_series
    from workers.deid.deface import DefaceError, deface
    from workers.deid.header import BurnedInAnnotationError, HeaderDeidentifier, ProfileOptions
    from workers.deid.pseudonyms import Pseudonymizer
    from workers.deid.series import write_copy

    if mode not in ("ichnode", "mosmed"):
        fail(f"unknown mode {mode!r}: use ichnode or mosmed")
    if target.exists() and any(target.iterdir()):
        fail(f"{target}: exists and is not empty")
    paths = _series_paths(source)
    try:
        volume = load_series(paths)
    except SeriesError as exc:
        fail(f"{source}: {exc}")
    try:
        result = deface(volume, mode, seed=seed)
    except DefaceError as exc:
        fail(f"not defaced: {exc}")
    deidentifier = HeaderDeidentifier(Pseudonymizer.from_settings(STATE.settings()),
                                      ProfileOptions(defaced=True))
    try:
        copied = write_copy(_in_volume_order(paths, volume.sop_instance_uids), result.volume.hu,
                            target, deidentifier)
    except (BurnedInAnnotationError, ValueError) as exc:
        fail(f"not de-identified: {exc}")
    summary = {"mode": mode, "slices": len(copied), "target": str(target),
               "replaced_voxels": int(result.replaced.sum()),
               "seconds": round(result.seconds, 2), **result.info}
    if preview or preview_file:
        from workers.deid.preview import write_preview

        out = preview_file or target.with_name(target.name + "_preview.png")
        summary["preview"] = str(write_preview(volume, result.volume, out,
                                               title=f"{mode} defacing"))
    if as_json:
        print_json(summary)
        return
    print_rows([{"field": k, "value": v} for k, v in summary.items()], ["field", "value"],
               title="defaced")


@deid_app.command("profile")
def profile_cmd(as_json: bool = JSON_OPTION) -> None:
    """Show the header de-identification profile: options and Annex E table actions."""
    from collections import Counter

    from workers.deid.header import TABLE_RELEASE, action_table

    exact, masked = action_table()
    counts = Counter(exact.values()) + Counter(a for *_x, a in masked)
    rows = [{"item": "table", "value": f"PS3.15 Table E.1-1 ({TABLE_RELEASE})"},
            {"item": "options", "value": "113100 Basic, 113107 Modified Dates, "
                                         "113108 Patient Characteristics, 113102 (if defaced)"},
            {"item": "private attributes", "value": "removed"},
            {"item": "UIDs", "value": "HMAC-SHA256(node secret) -> 2.25.<uuid>"}]
    rows += [{"item": f"action {a}", "value": n} for a, n in sorted(counts.items())]
    if as_json:
        print_json(rows)
        return
    print_rows(rows, ["item", "value"], title="de-identification profile")


@deid_app.command("lookup")
def lookup_cmd(pseudonym: str = typer.Argument(..., help="A pseudonymous UID, patient ID or "
                                                         "work-item id"),
               as_json: bool = JSON_OPTION) -> None:
    """Show the original behind a pseudonym (PHI: admins of the PHI zone only)."""
    from node.index import open_index
    from workers.deid.pseudonyms import originals_for

    index = open_index(STATE.settings())
    try:
        rows = originals_for(index, pseudonym)
    finally:
        index.dispose()
    if not rows:
        fail(f"unknown pseudonym {pseudonym!r}")
    print_rows(rows, ["kind", "original", "pseudonym", "study_uid"], title="pseudonym",
               as_json=as_json)


@deid_app.command("study")
def study_cmd(study_uid: str = typer.Argument(..., help="Original Study Instance UID"),
              as_json: bool = JSON_OPTION) -> None:
    """List the pseudonyms recorded for one original study (PHI zone)."""
    from node.index import open_index
    from workers.deid.pseudonyms import pseudonyms_for_study

    index = open_index(STATE.settings())
    try:
        rows = pseudonyms_for_study(index, study_uid)
    finally:
        index.dispose()
    if not rows and not as_json:
        console.print("no pseudonyms recorded for this study")
        return
    print_rows(rows, ["kind", "original", "pseudonym"], title="pseudonyms", as_json=as_json)


def register(app: typer.Typer, train_app: typer.Typer, evaluate_app: typer.Typer) -> None:
    """Add this area's commands to the top-level app and the train/evaluate groups."""
    app.command("deface")(deface_cmd)
    app.add_typer(deid_app, name="deid")
