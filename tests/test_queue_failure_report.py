"""A failed analysis is never silent: the dispatcher plans a 'not analysed' report for it."""

from __future__ import annotations

from sqlalchemy import select

from node.dispatcher import Dispatcher
from node.index import Job, JobState, Study, open_index


def _study_with_job(index, state: JobState, reason: str) -> int:
    with index.session() as s:
        study = Study(study_uid="1.2.3.4")
        s.add(study)
        s.flush()
        s.add(Job(study_id=study.id, kind="analyze", state=state, reason=reason))
        return study.id


def test_failed_job_gets_exactly_one_not_analysed_job(settings):
    index = open_index(settings)
    study_id = _study_with_job(index, JobState.FAILED, "analyze: SeriesError: too few slices")
    dispatcher = Dispatcher(settings, index)
    assert dispatcher.report_failures() == 1
    assert dispatcher.report_failures() == 0  # the new job is later: nothing more to do
    with index.session() as s:
        jobs = s.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.id)).all()
        study = s.get(Study, study_id)
    assert [j.kind for j in jobs] == ["analyze", "not_analysed"]
    assert jobs[1].state == JobState.RECEIVED
    assert "too few slices" in study.state_reason


def test_done_jobs_and_pipelines_without_report_are_left_alone(settings):
    index = open_index(settings)
    _study_with_job(index, JobState.DONE, None)
    assert Dispatcher(settings, index).report_failures() == 0
    short = settings.model_copy(update={"queue": settings.queue.model_copy(
        update={"steps": ["prepare"]})})
    with index.session() as s:
        s.execute(Job.__table__.update().values(state=JobState.FAILED))
    assert Dispatcher(short, index).report_failures() == 0
    assert Dispatcher(settings, index).report_failures() == 1
