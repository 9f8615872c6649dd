"""Series selection and study assembly on studies stored through the real intake spool."""

from __future__ import annotations

import pytest
from pydicom.uid import generate_uid
from queue_helpers import SeriesSpec, age_studies, head_study, index_files, write_series
from sqlalchemy import select

from node.assembly import Assembler
from node.index import Job, JobState, Study, StudyState, open_index
from node.selection import kernel_class


@pytest.fixture
def index(settings):
    idx = open_index(settings)
    yield idx
    idx.dispose()


def _study(index, uid) -> Study:
    with index.session() as s:
        return s.execute(select(Study).where(Study.study_uid == uid)).scalar_one()


def _jobs(index, uid) -> list[Job]:
    with index.session() as s:
        return list(s.execute(select(Job).join(Study).where(Study.study_uid == uid)
                              .order_by(Job.id)).scalars())


def test_selection_prefers_soft_tissue_and_explains_every_series(settings, index, tmp_path):
    uid, specs, paths = head_study(tmp_path / "in", size=64)
    # A thicker soft-tissue series too: the thinner one must win.
    paths += write_series(tmp_path / "in", uid, SeriesSpec(4, "Head 5mm brain thick", "H31s",
                                                           6.0, 20, size=64))
    index_files(index, settings, paths, received_ago_s=3600)
    settings.assembly.max_slice_thickness_mm = 10.0
    jobs = Assembler(settings, index).complete_due()
    assert len(jobs) == 1
    study = _study(index, uid)
    assert study.state == StudyState.SELECTED
    assert study.selected_series_uid == specs["soft"].series_uid
    log = {d["series_uid"]: d for d in study.selection_log["series"]}
    assert len(log) == 4 and all(d["reason"] for d in log.values())
    assert log[specs["soft"].series_uid]["decision"] == "selected"
    assert log[specs["bone"].series_uid]["decision"] == "usable"
    assert "bone kernel" in log[specs["bone"].series_uid]["reason"]
    assert log[specs["scout"].series_uid]["decision"] == "rejected"
    assert "localizer" in log[specs["scout"].series_uid]["reason"]
    thick = next(d for d in log.values() if d["thickness_mm"] == 6.0)
    assert thick["decision"] == "usable" and "thicker" in thick["reason"]
    assert _jobs(index, uid)[0].kind == "analyze"


@pytest.mark.parametrize("spec, reason", [
    (SeriesSpec(2, "Chest", "B31f", body_part="CHEST"), "BodyPartExamined CHEST is not head"),
    (SeriesSpec(2, "Head", slices=10), "only 10 slice positions"),
    (SeriesSpec(2, "Head", thickness=8.0), "8 mm thick"),
    (SeriesSpec(2, "Head MPR", image_type=("DERIVED", "SECONDARY", "MPR")), "not ORIGINAL"),
    (SeriesSpec(2, "Head cor", orientation=(1, 0, 0, 0, 0, -1)), "not axial (coronal"),
    (SeriesSpec(2, "Axial 5mm", body_part=None), None),  # study description says HEAD: usable
])
def test_single_series_decisions(settings, index, tmp_path, spec, reason):
    uid = generate_uid()
    spec.size = 32
    index_files(index, settings, write_series(tmp_path / "in", uid, spec), received_ago_s=3600)
    Assembler(settings, index).complete_due()
    study = _study(index, uid)
    decision = study.selection_log["series"][0]
    if reason is None:
        assert study.state == StudyState.SELECTED and decision["decision"] == "selected"
        assert "StudyDescription mentions head" in decision["reason"]
        return
    assert study.state == StudyState.SKIPPED
    assert reason in decision["reason"] and reason in study.state_reason
    jobs = _jobs(index, uid)
    assert [j.kind for j in jobs] == ["not_analysed"]


def test_missing_slice_is_uneven_spacing(settings, index, tmp_path):
    uid = generate_uid()
    paths = write_series(tmp_path / "in", uid, SeriesSpec(2, "Head", slices=20, size=32))
    del paths[7]
    index_files(index, settings, paths, received_ago_s=3600)
    Assembler(settings, index).complete_due()
    study = _study(index, uid)
    assert study.state == StudyState.SKIPPED
    assert "uneven slice spacing" in study.state_reason


@pytest.mark.parametrize("kernel, expected", [
    ("H31s", "soft"), ("J40s", "soft"), ("Hr38", "soft"), ("H70h", "bone"), ("Br64", "bone"),
    ("FC21", "soft"), ("FC30", "bone"), ("STANDARD", "soft"), ("SOFT", "soft"),
    ("BONE", "bone"), ("BONEPLUS", "bone"), ("UB", "soft"), ("D", "bone"), ("XYZ", "unknown"),
])
def test_kernel_classes(kernel, expected):
    assert kernel_class(kernel) == expected


def test_quiet_period_and_late_instance_reopens(settings, index, tmp_path):
    settings.assembly.quiet_period_s = 30
    uid = generate_uid()
    spec = SeriesSpec(2, "Head", slices=21, size=32)
    paths = write_series(tmp_path / "in", uid, spec)
    late = paths.pop()  # the top slice arrives late
    index_files(index, settings, paths)
    asm = Assembler(settings, index)
    assert asm.complete_due() == []  # still inside the quiet period
    assert _study(index, uid).state == StudyState.RECEIVING
    age_studies(index, [uid], 31)
    first = asm.complete_due()
    assert len(first) == 1 and _study(index, uid).selection_log["series"][0]["slices"] == 20
    assert asm.complete_due() == []  # complete studies are not completed again

    index_files(index, settings, [late])  # intake re-opens the study
    assert _study(index, uid).state == StudyState.RECEIVING
    age_studies(index, [uid], 31)
    second = asm.complete_due()
    assert len(second) == 1 and second != first
    jobs = _jobs(index, uid)
    assert [j.id for j in jobs] == first + second
    assert jobs[0].state == JobState.FAILED and f"superseded by job {second[0]}" in jobs[0].reason
    assert jobs[1].state == JobState.RECEIVED
    assert _study(index, uid).selection_log["series"][0]["slices"] == 21

    # A late series that does not change the selection: re-completed, no new job.
    other = write_series(tmp_path / "in2", uid, SeriesSpec(9, "Dose report", modality="OT",
                                                            slices=1, size=16))
    index_files(index, settings, other, received_ago_s=31)
    assert asm.complete_due() == []
    study = _study(index, uid)
    assert study.state == StudyState.SELECTED and len(study.selection_log["series"]) == 2
    assert len(_jobs(index, uid)) == 2


def test_reprocess_creates_a_new_job(settings, index, tmp_path):
    uid = generate_uid()
    index_files(index, settings, write_series(tmp_path / "in", uid, SeriesSpec(2, size=32)),
                received_ago_s=3600)
    asm = Assembler(settings, index)
    asm.complete_due()
    job = asm.reprocess(uid)
    assert [j.id for j in _jobs(index, uid)][-1] == job.id
    with pytest.raises(LookupError):
        asm.reprocess("1.2.3.4")


@pytest.mark.postgres
def test_assembly_and_jobs_on_postgresql(tmp_path):
    """The same claim/selection/supersede SQL on PostgreSQL (own throw-away database)."""
    import uuid

    import psycopg

    from node.config import Settings
    from node.dispatcher import Dispatcher

    name = f"ichq_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True,
                                connect_timeout=3)
    except psycopg.OperationalError:
        pytest.skip("PostgreSQL not running on 127.0.0.1:5432")
    admin.execute(f"CREATE DATABASE {name}")
    settings = Settings(storage={"root": tmp_path / "var", "min_free_mb": 0,
                                 "index_url": f"postgresql+psycopg://postgres@127.0.0.1/{name}"},
                        queue={"steps": []})
    index = open_index(settings)
    try:
        uid, specs, paths = head_study(tmp_path / "in", slices=20, size=32)
        index_files(index, settings, paths, received_ago_s=3600)
        asm = Assembler(settings, index)
        [first] = asm.complete_due()
        assert _study(index, uid).selected_series_uid == specs["soft"].series_uid
        second = asm.reprocess(uid)
        jobs = _jobs(index, uid)
        assert [j.id for j in jobs] == [first, second.id]
        assert jobs[0].state == JobState.FAILED and "superseded" in jobs[0].reason
        # No chain steps configured: the dispatcher finishes the job without a broker.
        Dispatcher(settings, index).dispatch_pending()
        done = _jobs(index, uid)[1]
        assert done.state == JobState.DONE and "no pipeline steps" in done.reason
    finally:
        index.dispose()
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        admin.close()
