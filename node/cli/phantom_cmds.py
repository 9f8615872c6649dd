"""``ichnode phantom``: write synthetic head CT studies with hemorrhage and their ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from node.cli.common import JSON_OPTION, fail, print_rows

SUBTYPE_ALIASES = {"edh": "epidural", "sdh": "subdural", "sah": "subarachnoid",
                   "iph": "intraparenchymal", "ich": "intraparenchymal",
                   "ivh": "intraventricular"}


def register(app: typer.Typer, train_app: typer.Typer, evaluate_app: typer.Typer) -> None:
    """Add this area's commands to the top-level app and the train/evaluate groups."""
    app.command("phantom")(phantom)


def _subtypes(values: list[str]) -> tuple[str, ...] | None:
    from models.phantom import SUBTYPES

    out: list[str] = []
    for v in values:
        for part in v.split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part in ("normal", "none"):
                return ()
            if part == "random":
                return None
            name = SUBTYPE_ALIASES.get(part, part)
            if name not in SUBTYPES:
                fail(f"unknown subtype {part!r}; use {', '.join(SUBTYPES)} (or edh/sdh/sah/iph/ivh,"
                     " normal, random)")
            out.append(name)
    return tuple(out)


def phantom(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (one sub-folder per study)"),
    subtype: List[str] = typer.Option(
        [], "--subtype", "-s",
        help="Hemorrhage subtype(s): epidural, subdural, subarachnoid, intraparenchymal, "
             "intraventricular (or edh/sdh/sah/iph/ivh), 'normal', or 'random' (the default)"),
    seed: int = typer.Option(1, "--seed", help="Seed of the first study (next ones: +1, +2...)"),
    count: int = typer.Option(1, "--count", "-n", min=1, max=10000, help="Number of studies"),
    thickness: Optional[float] = typer.Option(None, "--thickness",
                                              help="Slice thickness mm (default: from seed)"),
    matrix: int = typer.Option(512, "--matrix", help="512, or 256/128 for fast training data"),
    bone: bool = typer.Option(False, "--bone", help="Also write a bone-kernel series"),
    localizer: bool = typer.Option(False, "--localizer", help="Also write a lateral localizer"),
    preview: bool = typer.Option(False, "--preview", help="Write preview.png per study"),
    fmt: str = typer.Option("npz", "--labels", help="Label format: npz or nifti"),
    no_dicom: bool = typer.Option(False, "--no-dicom", help="Labels + volume.npz only"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Write synthetic head CT studies (DICOM series + masks + truth.json) with known bleeds."""
    from models.phantom import PhantomSpec, generate_study, write_dicom_series, write_labels
    from models.phantom.dicom import write_localizer

    subs = _subtypes(subtype)
    if matrix not in (128, 256, 512):
        fail("--matrix must be 128, 256 or 512")
    if thickness is not None and not 0.5 <= thickness <= 10:
        fail("--thickness must be between 0.5 and 10 mm")
    if fmt not in ("npz", "nifti"):
        fail("--labels must be npz or nifti")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create {out}: {exc.strerror}")
    rows = []
    for n in range(count):
        s = seed + n
        kw = dict(matrix=matrix, slice_thickness_mm=thickness)
        spec = PhantomSpec.random(s, **kw) if subs is None else PhantomSpec(seed=s, subtypes=subs,
                                                                            **kw)
        study = generate_study(spec)
        folder = out / f"phantom_{s:06d}"
        if not no_dicom:
            write_dicom_series(study, folder / "series_soft")
            if bone:
                write_dicom_series(study, folder / "series_bone", kernel="bone")
            if localizer:
                write_localizer(study, folder / "localizer")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            study.volume.save(folder / "volume.npz")
        write_labels(study, folder / "labels", fmt=fmt)
        if preview:
            from models.phantom.preview import write_preview

            write_preview(study, folder / "preview.png")
        t = study.truth
        rows.append({"seed": s, "folder": str(folder),
                     "subtypes": ",".join(study.spec.subtypes) or "normal",
                     "slices": study.volume.hu.shape[0],
                     "thickness_mm": study.spec.slice_thickness_mm,
                     "hematoma_ml": t["hematoma_volume_ml"],
                     "shift_mm": t["midline_shift_mm"]})
    print_rows(rows, ["seed", "subtypes", "slices", "thickness_mm", "hematoma_ml", "shift_mm",
                      "folder"], title="phantom studies", as_json=as_json)
