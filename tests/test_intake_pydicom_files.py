"""Every storage instance among pydicom's bundled test files, sent as stored by a pynetdicom SCU:
accepted (and kept byte for byte) or refused with a precise status; the node serves after all."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

from pydicom.data import get_testdata_files
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification, _STORAGE_CLASSES
from sqlalchemy import select

from intake_helpers import dataset_bytes, node_settings, running_node
from node.index import Instance
from node.scp import TRANSFER_SYNTAXES

KEPT = {0x0000, 0xB007}  # success; kept with a SOP class mismatch warning
REFUSED = {0xA900, 0xC000}  # does not match SOP class; cannot understand


def _storage_files() -> list[tuple[Path, str, str]]:
    storage = set(_STORAGE_CLASSES.values())
    out = []
    for name in sorted(get_testdata_files()):  # local files only: never downloads
        path = Path(name)
        if not path.is_file():
            continue
        try:
            meta = read_file_meta_info(path)
            sop_class = str(meta.MediaStorageSOPClassUID)
            tsyntax = str(meta.TransferSyntaxUID)
            str(meta.MediaStorageSOPInstanceUID)
        except Exception:  # noqa: BLE001 - no usable file meta: not something an SCU can send
            continue
        if sop_class in storage:
            out.append((path, sop_class, tsyntax))
    return out


def test_bundled_storage_files(tmp_path):
    files = _storage_files()
    assert len(files) > 100
    outcomes: dict[str, str] = {}
    old, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        # fsync off: durability is tested elsewhere; this loop is about statuses and bytes.
        with running_node(node_settings(tmp_path, storage={"fsync": False})) as node:
            ae = AE(ae_title="PYSCU")
            contexts = sorted({(c, t) for _, c, t in files})
            # One association per group of up to 128 presentation contexts.
            for start in range(0, len(contexts), 128):
                group = set(contexts[start:start + 128])
                ae.requested_contexts = []
                for sop_class, tsyntax in sorted(group):
                    ae.add_requested_context(sop_class, tsyntax)
                assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHNODE")
                assert assoc.is_established
                accepted = {(cx.abstract_syntax, cx.transfer_syntax[0])
                            for cx in assoc.accepted_contexts}
                for path, sop_class, tsyntax in files:
                    if (sop_class, tsyntax) not in group:
                        continue
                    if (sop_class, tsyntax) not in accepted:
                        # Only transfer syntaxes we do not list may be refused at negotiation.
                        assert tsyntax not in TRANSFER_SYNTAXES, path.name
                        outcomes[path.name] = "context rejected (transfer syntax)"
                        continue
                    status = assoc.send_c_store(path).Status
                    assert status in KEPT | REFUSED, f"{path.name}: 0x{status:04X}"
                    outcomes[path.name] = f"0x{status:04X}"
                    if status in KEPT:
                        _assert_kept(node, path)
                assoc.release()
            ae.requested_contexts = []
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHNODE")
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    tally = Counter(outcomes.values())
    print("bundled storage files:", dict(tally))
    assert tally["0x0000"] >= 80
    # Known bad files are refused with the right status, not swallowed.
    for name, expected in {"MR_truncated.dcm": "0xC000", "rtplan_truncated.dcm": "0xC000",
                           "JPEGLSNearLossless_16.dcm": "0xA900"}.items():
        if name in outcomes:
            assert outcomes[name] == expected, name


def _assert_kept(node, path: Path) -> None:
    uid = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
    with node.index.session() as s:
        row = s.scalars(select(Instance).where(Instance.sop_instance_uid == uid.strip())).first()
    assert row is not None, path.name
    stored = node.spool.path_of(row.path)
    assert row.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert dataset_bytes(stored) == dataset_bytes(path), path.name
    assert os.path.getsize(stored) == row.size
