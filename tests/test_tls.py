"""Results sent over DICOM TLS to an Orthanc that only speaks TLS."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest

from node.config import TLS, Destination
from node.export.scu import SendError, echo, send_files
from node.phantom.generate import SERIES_DIR
from tests.servers import orthanc


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    folder.mkdir(parents=True, exist_ok=True)
    p = {
        k: folder / k
        for k in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt", "ext.cnf")
    }

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(p["ca.key"]),
        "-out",
        str(p["ca.crt"]),
        "-days",
        "2",
        "-subj",
        "/CN=IDAICS test CA",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(p["server.key"]),
        "-out",
        str(p["server.csr"]),
        "-subj",
        "/CN=127.0.0.1",
    )
    p["ext.cnf"].write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    run(
        "x509",
        "-req",
        "-in",
        str(p["server.csr"]),
        "-CA",
        str(p["ca.crt"]),
        "-CAkey",
        str(p["ca.key"]),
        "-CAcreateserial",
        "-out",
        str(p["server.crt"]),
        "-days",
        "2",
        "-extfile",
        str(p["ext.cnf"]),
    )
    return p


def test_results_go_over_tls_and_an_untrusted_server_is_refused(phantom, tmp_path):
    certs = make_certificates(tmp_path / "certs")
    tls = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(certs["server.crt"]),
        "DicomTlsPrivateKey": str(certs["server.key"]),
        "DicomTlsTrustedCertificates": str(certs["ca.crt"]),
        "DicomTlsRemoteCertificateRequired": False,
    }
    files = sorted((phantom.folder / SERIES_DIR).glob("*.dcm"))[:5]
    with orthanc(tmp_path / "orthanc", extra=tls) as pacs:
        dest = Destination(
            name="tls",
            ae_title=pacs.aet,
            host="127.0.0.1",
            port=pacs.dicom_port,
            tls=TLS(ca_file=certs["ca.crt"]),
        )
        assert echo(dest) == 0
        assert send_files(files, dest) == len(files)
        sent = pydicom.dcmread(files[0])
        found = pacs.post_json(
            "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sent.SOPInstanceUID}}
        )
        assert len(found) == 1
        plain = Destination(name="plain", ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port)
        with pytest.raises(SendError):
            send_files(files[:1], plain, timeout=5)
        other = make_certificates(tmp_path / "other")  # a CA that did not sign the server
        wrong = dest.model_copy(update={"tls": TLS(ca_file=other["ca.crt"])})
        with pytest.raises(SendError):
            send_files(files[:1], wrong, timeout=5)
