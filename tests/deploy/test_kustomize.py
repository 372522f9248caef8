"""deploy/kubernetes: every overlay renders with the pinned kubectl, passes the real API server's
server-side dry run, and carries a daemon config that the daemon's own validation accepts."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ca_service.adapters.signing_pool import CLOSE_GRACE
from ca_service.config import ConfigError, load_settings
from ca_service.rpc.sds_listeners import DEFAULT_GRACE
from tests.deploy.daemon_config import PENDING_KEYS, PENDING_PROBLEMS, key_exists, strip_pending
from tests.deploy.manifests import (
    KUSTOMIZE_DIR,
    OVERLAYS,
    ROOT,
    Doc,
    container,
    daemon_config,
    find,
    kubectl,
    one,
    render,
)
from tests.kube import Cluster

GEN_SCRIPT = ROOT / "scripts" / "gen-prometheusrule"
ALERTS = ROOT / "deploy" / "prometheus" / "ca-service-alerts.yaml"

def for_v1_20(docs: list[Doc]) -> str:
    """The manifests as this v1.20 server takes them: PodDisruptionBudget policy/v1 is GA only from
    1.21, so its apiVersion (and nothing else: the spec is identical) becomes policy/v1beta1."""
    out = []
    for doc in docs:
        if doc["kind"] == "PodDisruptionBudget":
            assert doc["apiVersion"] == "policy/v1", "ship the current PodDisruptionBudget version"
            doc = {**doc, "apiVersion": "policy/v1beta1"}
        out.append(yaml.safe_dump(doc, sort_keys=False))
    return "---\n".join(out)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_passes_a_server_side_dry_run_with_zero_errors(cluster: Cluster, overlay: str) -> None:
    docs = render(overlay)
    proc = kubectl("apply", "--dry-run=server", "-f", "-", kubeconfig=cluster.kubeconfig, stdin=for_v1_20(docs),
                   check=False)
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr.lower(), proc.stderr
    # One "(server dry run)" line per object: nothing was skipped.
    assert proc.stdout.count("(server dry run)") == len(docs), proc.stdout


def _wrong_type(pod: Doc) -> None:
    pod["securityContext"]["runAsUser"] = "not-a-number"


def _misspelt_field(pod: Doc) -> None:
    pod["containers"][0]["readinesProbe"] = pod["containers"][0].pop("readinessProbe")


@pytest.mark.parametrize("mistake", [_wrong_type, _misspelt_field], ids=["a wrong type", "a misspelt field"])
def test_the_dry_run_rejects_a_manifest_with(cluster: Cluster, mistake: Any) -> None:
    deployment = one(render("base"), "Deployment", "ca-service")
    mistake(deployment["spec"]["template"]["spec"])
    proc = kubectl("apply", "--dry-run=server", "-f", "-", kubeconfig=cluster.kubeconfig,
                   stdin=yaml.safe_dump(deployment), check=False)
    assert proc.returncode != 0


def test_the_istio_snippets_point_at_the_service_and_its_certificate() -> None:
    docs = render("overlays/istio-external-ca")
    service = one(docs, "Service", "ca-service")
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    (grpc,) = (p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc-ca")
    values = yaml.safe_load((KUSTOMIZE_DIR / "overlays/istio-external-ca/istio-values.yaml").read_text())
    assert values["kind"] == "IstioOperator"
    assert values["spec"]["values"]["global"]["caAddress"] == f"{host}:{grpc}"
    assert values["spec"]["values"]["ztunnel"]["caAddress"] == f"{host}:{grpc}"
    assert values["spec"]["values"]["pilot"]["env"]["ENABLE_CA_SERVER"] == "false"
    config = daemon_config(docs)
    assert host in config["grpc"][0]["tls"]["dns_names"]
    assert values["spec"]["meshConfig"]["trustDomain"] == config["trust_domain"]
    plugin = yaml.safe_load((KUSTOMIZE_DIR / "overlays/istio-plugin-ca/istio-values.yaml").read_text())
    plugin_config = daemon_config(render("overlays/istio-plugin-ca"))
    assert plugin["spec"]["meshConfig"]["trustDomain"] == plugin_config["trust_domain"]
    assert "caAddress" not in plugin["spec"]["values"].get("global", {})  # istiod stays the CA


# ---------------------------------------------------------------- the daemon config


def _environment(docs: list[Doc]) -> dict[str, str]:
    """The daemon's CA_SERVICE_* environment from the Deployment (the config file path excepted)."""
    env = {e["name"]: e["value"] for e in container(docs).get("env", []) if "value" in e}
    return {k: v for k, v in env.items() if k.startswith("CA_SERVICE_") and k != "CA_SERVICE_CONFIG"}


def _mounted_from_objects(docs: list[Doc]) -> list[Path]:
    """Mount paths of ConfigMap / Secret volumes: files the cluster, not the image, provides."""
    pod = one(docs, "Deployment", "ca-service")["spec"]["template"]["spec"]
    sourced = {v["name"] for v in pod["volumes"] if "configMap" in v or "secret" in v}
    return [Path(m["mountPath"]) for m in container(docs)["volumeMounts"] if m["name"] in sourced]


def load_overlay_settings(docs: list[Doc], tmp_path: Path) -> tuple[Any, set[str], list[str]]:
    """Validate the overlay's config with ``load_settings``: (settings or None, stubbed keys, problems)."""
    doc, stubbed = strip_pending(daemon_config(docs))
    path = tmp_path / "ca-service.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        return load_settings(path, environ=_environment(docs)), stubbed, []
    except ConfigError as exc:
        return None, stubbed, list(exc.problems)


def _is_mounted_file_problem(problem: str, mounts: list[Path]) -> bool:
    # `file X does not exist`: fine when X is provided by a ConfigMap/Secret volume of the pod.
    if "does not exist or is not readable" not in problem:
        return False
    missing = Path(problem.split("file ", 1)[1].split(" does not exist", 1)[0])
    return any(missing.is_relative_to(m) for m in mounts)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_daemon_config_of_every_overlay_passes_the_daemons_own_validation(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    _, stubbed, problems = load_overlay_settings(docs, tmp_path)
    assert stubbed <= PENDING_KEYS, f"keys the daemon does not know and nobody is adding: {stubbed - PENDING_KEYS}"
    mounts = _mounted_from_objects(docs)
    real = [p for p in problems if p not in PENDING_PROBLEMS and not _is_mounted_file_problem(p, mounts)]
    assert real == []


def test_a_config_with_a_mistake_fails_the_same_validation(tmp_path: Path) -> None:
    docs = render("base")
    cm = find(docs, "ConfigMap")[0]
    config = yaml.safe_load(cm["data"]["ca-service.yaml"])
    config["ca"]["workload_ttl"] = "90d"  # longer than the intermediate: must be refused
    cm["data"]["ca-service.yaml"] = yaml.safe_dump(config)
    _, _, problems = load_overlay_settings(docs, tmp_path)
    assert any(p.startswith("ca.workload_ttl") for p in problems)


def test_stubbed_keys_are_only_those_still_missing_from_the_settings(tmp_path: Path) -> None:
    landed = sorted(k for k in PENDING_KEYS if key_exists(k))
    assert landed == [], f"these keys exist now: take them off PENDING_KEYS (tests/deploy/daemon_config.py): {landed}"
    _, _, problems = load_overlay_settings(render("base"), tmp_path)
    gone = sorted(PENDING_PROBLEMS - set(problems))
    assert gone == [], f"the daemon no longer reports these: remove them from PENDING_PROBLEMS: {gone}"


# ---------------------------------------------------------------- what the base promises


@pytest.fixture(scope="module")
def base() -> list[Doc]:
    return render("base")


def test_the_deployment_runs_three_spread_replicas_under_a_disruption_budget(base: list[Doc]) -> None:
    deployment = one(base, "Deployment", "ca-service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 3
    (term,) = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    pdb = one(base, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


def test_the_pod_is_hardened(base: list[Doc]) -> None:
    pod = one(base, "Deployment", "ca-service")["spec"]["template"]["spec"]
    ctx, main = pod["securityContext"], container(base)["securityContext"]
    assert ctx["runAsNonRoot"] is True and isinstance(ctx["runAsUser"], int) and ctx["runAsUser"] > 0
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert main["readOnlyRootFilesystem"] is True
    assert main["allowPrivilegeEscalation"] is False
    assert main["capabilities"] == {"drop": ["ALL"]}


def test_termination_outlasts_the_prestop_pause_the_sds_drain_and_the_pool_close(base: list[Doc]) -> None:
    pod = one(base, "Deployment", "ca-service")["spec"]["template"]["spec"]
    pre_stop = container(base)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    stop = int(pre_stop[1]) + DEFAULT_GRACE.total_seconds() + CLOSE_GRACE.total_seconds()
    assert pod["terminationGracePeriodSeconds"] > stop


def test_probes_resources_and_the_replica_id(base: list[Doc]) -> None:
    main = container(base)
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["startupProbe"]["httpGet"]["path"] == "/healthz"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= main["resources"][kind].keys()
    (pod_name,) = (e for e in main["env"] if e["name"] == "POD_NAME")
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_path_the_daemon_writes_is_on_a_writable_volume(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    settings, _, _ = load_overlay_settings(docs, tmp_path)
    config = daemon_config(docs)
    data_dir = Path(settings.data_dir if settings else config["data_dir"])
    pod = one(docs, "Deployment", "ca-service")["spec"]["template"]["spec"]
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    writable = [Path(m["mountPath"]) for m in container(docs)["volumeMounts"]
                if m["name"] in empty_dirs and not m.get("readOnly")]
    written = [data_dir, Path("/tmp")]  # /tmp: tempfile, where the TLS code hands keys to OpenSSL
    if settings is not None:
        written += [settings.admin_token_file, settings.audit_log_file, settings.bundle_dir]
    for path in written:
        assert any(path.is_relative_to(w) for w in writable), f"{path} is on the read-only root filesystem"


def test_service_ports_reach_the_daemons_listeners_and_the_network_policy_admits_them(base: list[Doc],
                                                                                       tmp_path: Path) -> None:
    service = one(base, "Service", "ca-service")
    ports = {p["port"] for p in service["spec"]["ports"]}
    assert ports == {15012, 15014, 15443}
    named = {p["name"]: p["containerPort"] for p in container(base)["ports"]}
    assert {named[p["targetPort"]] for p in service["spec"]["ports"]} == ports
    config = daemon_config(base)
    listening = {config["grpc"][0]["address"], config["http"]["address"], config["bundle_endpoint"]["address"]}
    assert listening == {f"0.0.0.0:{p}" for p in ports}
    policy = one(base, "NetworkPolicy", "ca-service")
    admitted = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert admitted == ports


def test_the_grpc_serving_certificate_names_the_service(base: list[Doc]) -> None:
    service = one(base, "Service", "ca-service")
    name = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert name in daemon_config(base)["grpc"][0]["tls"]["dns_names"]
    assert daemon_config(base)["grpc"][0]["tls"]["enabled"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_rbac_grants_each_writer_only_where_the_config_turns_it_on(overlay: str) -> None:
    docs = render(overlay)
    config = daemon_config(docs)
    istiod, istio_ca = config["istiod"], config.get("istio_ca", {})
    rules = [r for role in find(docs, "Role") + find(docs, "ClusterRole") for r in role["rules"]]
    names = {n for r in rules for n in r.get("resourceNames", [])}
    resources = {res for r in rules for res in r["resources"]}
    assert config["storage"]["kubernetes"]["secret_name"] in names
    assert ("cacerts" in names) == istiod["cacerts_secret"]["enabled"]
    assert ("trust-bundle" in names) == istiod["trust_bundle_configmap"]["enabled"]
    assert ("istio-ca-root-cert" in names) == istiod["root_cert_configmap"]["enabled"]
    assert ("tokenreviews" in resources) == bool(istio_ca.get("clusters"))
    assert ("pods" in resources) == bool(istio_ca.get("trusted_node_accounts"))


# ---------------------------------------------------------------- monitoring


def test_the_committed_prometheus_rule_is_generated_from_the_alert_rules() -> None:
    proc = subprocess.run([sys.executable, str(GEN_SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rule = one(render("base"), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def test_an_edited_alert_rule_makes_the_generated_file_stale(tmp_path: Path) -> None:
    render_rule = runpy.run_path(str(GEN_SCRIPT))["render"]
    edited = tmp_path / "alerts.yaml"
    edited.write_text(ALERTS.read_text().replace("vector(90 * 86400)", "vector(91 * 86400)", 1))
    target = ROOT / "deploy" / "kubernetes" / "base" / "prometheusrule.yaml"
    assert render_rule(edited) != target.read_text()
    assert render_rule(ALERTS) == target.read_text()


def test_the_service_monitor_scrapes_the_side_port_as_job_ca_service(base: list[Doc]) -> None:
    monitor = one(base, "ServiceMonitor")
    service = one(base, "Service", "ca-service")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" and endpoint["honorLabels"] is True
    # The alert rules select job="ca-service": the job label is the value of this Service label.
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "ca-service"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


# ---------------------------------------------------------------- multi-region


def test_the_two_regions_federate_with_each_other_as_in_config_regions() -> None:
    regions = {r: daemon_config(render(f"overlays/multi-region/{r}")) for r in ("us", "eu")}
    for region, peer in (("us", "eu"), ("eu", "us")):
        config = regions[region]
        local = yaml.safe_load((ROOT / "config" / "regions" / f"{region}.yaml").read_text())
        assert config["trust_domain"] == local["trust_domain"] == f"{region}.cluster.local"
        (remote,) = config["federation"]["peers"]
        (local_peer,) = local["federation"]["peers"]
        assert remote["trust_domain"] == regions[peer]["trust_domain"] == local_peer["trust_domain"]
        assert remote["endpoint_spiffe_id"] == local_peer["endpoint_spiffe_id"]
        assert remote["profile"] == regions[peer]["bundle_endpoint"]["profile"] == "https_spiffe"
