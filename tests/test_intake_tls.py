"""DICOM TLS: our SCP with settings.dicom.tls_*, reached by node.scu (mutual TLS) and refused
to a plain-TCP peer."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from pydicom import dcmread
from sqlalchemy import select

from intake_helpers import make_head_ct, node_settings, running_node
from node.index import Instance, open_index
from node.scu import Outbox, echo

pytestmark = pytest.mark.skipif(not shutil.which("openssl"), reason="openssl CLI not installed")


@pytest.fixture
def cert(tmp_path):
    key, crt = tmp_path / "node.key", tmp_path / "node.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    return crt, key


def test_tls_echo_and_store(tmp_path, cert):
    crt, key = cert
    tls = {"tls_cert": str(crt), "tls_key": str(key), "tls_ca": str(crt)}
    server = node_settings(tmp_path / "server", dicom=tls)
    with running_node(server) as node:
        client = node_settings(tmp_path / "client", dicom=tls, destinations={
            "node": {"ae_title": "ICHNODE", "host": "127.0.0.1", "port": node.port,
                     "tls": True},
            "plain": {"ae_title": "ICHNODE", "host": "127.0.0.1", "port": node.port}})
        assert echo("node", client)
        assert not echo("plain", client)  # no TLS handshake: no association
        files = make_head_ct(tmp_path / "ct")[:2]
        index = open_index(client)
        outbox = Outbox(client, index)
        outbox.enqueue("node", files)
        assert outbox.deliver_due() == 2
        index.dispose()
        with node.index.session() as s:
            got = set(s.scalars(select(Instance.sop_instance_uid)))
        assert got == {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
