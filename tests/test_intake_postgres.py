"""Intake with the index on PostgreSQL (127.0.0.1:5432, db ``test``), in a schema of its own."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import create_engine, select, text

from intake_helpers import have_dcmtk, make_head_ct, node_settings, running_node, storescu
from node.index import Instance, Series, Study, StudyState, open_index

BASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not have_dcmtk(), reason="DCMTK not installed")]


@pytest.fixture
def pg_schema():
    schema = f"intake_{uuid.uuid4().hex[:10]}"
    engine = create_engine(BASE_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # noqa: BLE001
        engine.dispose()
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 (db test, user postgres) unreachable: "
                    f"{type(exc).__name__}")
    try:
        yield f"{BASE_URL}?options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


def test_intake_with_postgres_index(tmp_path, pg_schema):
    files = make_head_ct(tmp_path / "ct")
    settings = node_settings(tmp_path, storage={"index_url": pg_schema})
    index = open_index(settings)
    try:
        with running_node(settings, index=index) as node:
            assert storescu(node.port, files).returncode == 0
            with index.session() as s:
                s.scalars(select(Study)).one().state = StudyState.COMPLETE
            assert storescu(node.port, files[:2]).returncode == 0  # idempotent re-send
            with index.session() as s:
                study = s.scalars(select(Study)).one()
                assert study.instance_count == len(files)
                assert study.state == StudyState.COMPLETE  # nothing new arrived
                assert len(s.scalars(select(Instance)).all()) == len(files)
                assert sorted(s.scalars(select(Series.instance_count))) == [1, 6, 8]
                inst = s.scalars(select(Instance)).first()
                assert inst.meta["Rows"] == 512 and inst.transfer_syntax_uid
            # The tables really are in our schema on the server.
            with index.engine.connect() as conn:
                assert conn.execute(text("select current_schema()")).scalar().startswith("intake_")
    finally:
        index.dispose()
