"""The committed Istio CA API code is exactly what scripts/gen-proto makes of proto/."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ca_service.rpc.generated.istio.v1.auth import ca_pb2, ca_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "ca_service" / "rpc" / "generated"


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_regenerating_the_istio_ca_code_reproduces_the_committed_files(tmp_path: Path) -> None:
    proc = subprocess.run([str(ROOT / "scripts" / "gen-proto"), str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    fresh, committed = _files(tmp_path), _files(COMMITTED)
    assert sorted(fresh) == sorted(committed)
    changed = [name for name in fresh if fresh[name] != committed[name]]
    assert not changed, f"committed generated code differs from proto/: {changed}; run scripts/gen-proto"


def test_the_generated_messages_carry_the_istio_wire_field_numbers() -> None:
    fields = {f.name: f.number for f in ca_pb2.IstioCertificateRequest.DESCRIPTOR.fields}
    assert fields == {"csr": 1, "validity_duration": 3, "metadata": 4}
    assert ca_pb2.IstioCertificateResponse.DESCRIPTOR.fields_by_name["cert_chain"].number == 1
    assert ca_pb2.DESCRIPTOR.package == "istio.v1.auth"
    assert hasattr(ca_pb2_grpc, "add_IstioCertificateServiceServicer_to_server")
