"""k8s/ against the real schemas: KubeRay v1.7.0 CRDs, Kubernetes' built-in kinds, Ray Serve's config
schema, TinyServe's config schema, Prometheus' PromQL parser (promtool) and Grafana's published dashboard
schema (npm @grafana/schema, checked by the TypeScript compiler).

Unknown fields are rejected everywhere, as an API server with strict field validation does.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
HERE = Path(__file__).resolve().parent
DASHBOARD = K8S / "grafana" / "tinyserve-dashboard.json"


def _kuberay_dir() -> Path:
    for base in (ROOT.parent / "shared", ROOT / "shared", Path(os.environ.get("TINYSERVE_SHARED", "/nonexistent"))):
        if (base / "kuberay-v1.7.0").is_dir():
            return base / "kuberay-v1.7.0"
    pytest.skip("KubeRay v1.7.0 CRDs (shared/kuberay-v1.7.0) not found")


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _one(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs(name) if d["kind"] == kind]
    return doc


# ---- KubeRay CRDs, strict ----------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """An OpenAPI v3 structural schema as JSON Schema that rejects unknown fields, like the API server."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.get("nullable"):
        t = out.get("type")
        if isinstance(t, str):
            out["type"] = [t, "null"]
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _crd_validator(file: str, kind: str):
    jsonschema = pytest.importorskip("jsonschema")
    crd = yaml.safe_load((_kuberay_dir() / file).read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    # metadata is the API server's ObjectMeta; the CRD leaves it open.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def _errors(validator, doc) -> list[str]:
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc))


@pytest.fixture(scope="module")
def rayservice_validator():
    return _crd_validator("ray.io_rayservices.yaml", "RayService")


@pytest.fixture(scope="module")
def raycluster_validator():
    return _crd_validator("ray.io_rayclusters.yaml", "RayCluster")


def test_rayservice_validates_against_kuberay_crd(rayservice_validator):
    doc = _one("rayservice.yaml", "RayService")
    assert doc["apiVersion"] == "ray.io/v1"
    assert _errors(rayservice_validator, doc) == []


def test_raycluster_part_validates_against_kuberay_crd(raycluster_validator):
    svc = _one("rayservice.yaml", "RayService")
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "tinyserve"}, "spec": svc["spec"]["rayClusterConfig"]}
    assert _errors(raycluster_validator, cluster) == []


@pytest.mark.parametrize(
    "path",
    [
        ("spec", "bogusField"),
        ("spec", "rayClusterConfig", "headGroupSpec", "replicas"),  # only worker groups have replicas
        ("spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "gpus"),
    ],
)
def test_unknown_fields_are_rejected(rayservice_validator, path):
    doc = copy.deepcopy(_one("rayservice.yaml", "RayService"))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = 1
    assert any("Additional properties" in e for e in _errors(rayservice_validator, doc))


def test_cluster_shape_head_gpu_workers_in_tree_autoscaling():
    spec = _one("rayservice.yaml", "RayService")["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # replicas go to GPU workers
    (gpu,) = spec["workerGroupSpecs"]
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert 0 < gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]


# ---- serveConfigV2 and the TinyServe config it names ------------------------------------------


def test_serve_config_validates_with_ray_serve_schema_and_names_build_app():
    from ray.serve.schema import ServeDeploySchema

    svc = _one("rayservice.yaml", "RayService")
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    assert app.import_path == "tinyserve.deployments:build_app"
    from ray._common.utils import import_attr

    assert import_attr(app.import_path).__name__ == "build_app"
    # The config file build_app reads is the mounted ConfigMap key, on head and workers.
    config_path = Path(app.args["config"])
    configmap = _one("tinyserve-config.yaml", "ConfigMap")
    assert config_path.name in configmap["data"]
    cluster = svc["spec"]["rayClusterConfig"]
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        mounts = {m["mountPath"]: m["name"] for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])}
        volume = mounts[str(config_path.parent)]
        (vol,) = [v for v in template["spec"]["volumes"] if v["name"] == volume]
        assert vol["configMap"]["name"] == configmap["metadata"]["name"]


def test_tinyserve_config_validates_and_its_policy_loads():
    from tinyserve.autoscaling import KVPressurePolicy
    from tinyserve.deployments.config import TinyServeConfig

    data = yaml.safe_load(_one("tinyserve-config.yaml", "ConfigMap")["data"]["tinyserve.yaml"])
    config = TinyServeConfig.from_dict(data)
    auto = config.deployment.autoscaling
    assert auto is not None and auto.policy == "kv_pressure"
    KVPressurePolicy(**auto.policy_kwargs)  # the kwargs Ray will instantiate the policy with


# ---- built-in kinds against Kubernetes' schemas -----------------------------------------------


def _builtin_docs() -> list[dict[str, Any]]:
    docs = []
    for name in _kustomization()["resources"]:
        docs += [d for d in _docs(name) if "/" not in d["apiVersion"] or d["apiVersion"].startswith("apps/")]
    return docs


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def test_builtin_kinds_validate_against_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.latest_version()
    docs = _builtin_docs()
    assert {d["kind"] for d in docs} >= {"Namespace", "ConfigMap"}
    for doc in docs:
        kv.validate(doc, version, strict=True)


def test_pod_templates_validate_as_kubernetes_pod_templates():
    kv = pytest.importorskip("kubernetes_validate")
    cluster = _one("rayservice.yaml", "RayService")["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for i, template in enumerate(templates):
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": template}
        kv.validate(doc, kv.latest_version(), strict=True)
    bad = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "bad"}, "template": copy.deepcopy(templates[0])}
    bad["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, kv.latest_version(), strict=True)


def test_podmonitor_scrapes_the_ray_pods_and_strips_the_ray_prefix():
    from tinyserve.deployments.replica_metrics import RAY_PREFIX_RELABEL

    pm = _one("podmonitor.yaml", "PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    cluster = _one("rayservice.yaml", "RayService")["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    for template in templates:
        labels = template["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in pm["spec"]["selector"]["matchLabels"].items())
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert endpoint["port"] in ports
    group_params = [cluster["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in cluster["workerGroupSpecs"]]
    assert {p["metrics-export-port"] for p in group_params} == {str(ports[endpoint["port"]])}
    (rule,) = endpoint["metricRelabelings"]
    camel = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    assert {camel.get(k, k): v for k, v in rule.items()} == RAY_PREFIX_RELABEL


def test_kustomization_lists_every_manifest():
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    expected = sorted((d["kind"], d["metadata"]["name"]) for n in listed for d in _docs(n))
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == expected


# ---- the Grafana dashboard ---------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def dashboard_exprs(dash: dict[str, Any] | None = None) -> list[str]:
    return [t["expr"] for p in _panels(dash or _dashboard()) for t in p.get("targets", [])]


def test_dashboard_configmap_embeds_the_dashboard_verbatim():
    cm = _one("grafana-dashboard-configmap.yaml", "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["tinyserve-dashboard.json"] == DASHBOARD.read_text()


def test_dashboard_has_the_panels_the_issue_lists():
    titles = " | ".join(p["title"].lower() for p in _panels(_dashboard()))
    for needed in (
        "kv utilisation",
        "effective capacity",
        "free-space scatter",
        "free runs",
        "runs per request",
        "pages attended",
        "achieved vs available",
        "requests per replica",
        "decision latency",
        "index size",
        "event lag",
        "time to first token",
        "inter-token latency",
        "queue",
        "replicas",
    ):
        assert needed in titles, needed


def test_dashboard_metrics_are_ones_tinyserve_exports():
    from tinyserve.deployments.replica_metrics import metric_names

    router_source = (ROOT / "tinyserve" / "cache_router" / "router_metrics.py").read_text()
    router_names = set(re.findall(r'"(tinyserve_router_[a-z_]+)"', router_source))
    known = set(metric_names()) | router_names
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in dashboard_exprs() for m in re.findall(r"\btinyserve_[a-z_]+", e)}
    assert used and used <= known, used - known
    # Every replica metric is on the dashboard except the block size and the preemption and abort totals
    # (rare events, for alerts and incident reading rather than a panel).
    assert set(metric_names()) - used == {"tinyserve_kv_block_size_tokens", "tinyserve_scheduler_preemptions_total",
                                       "tinyserve_scheduler_aborted_requests_total"}


def test_every_dashboard_expression_parses_as_promql(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) not installed")
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"tinyserve:panel_expr_{i}", "expr": e} for i, e in enumerate(dashboard_exprs())]}]}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    out = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    (tmp_path / "bad.yml").write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "a:b", "expr": "sum by (x (y)"}]}]}))
    assert subprocess.run([promtool, "check", "rules", str(tmp_path / "bad.yml")], capture_output=True, timeout=60).returncode != 0


# Grafana publishes its dashboard schema as TypeScript types (@grafana/schema). The check compiles a module
# that assigns the dashboard JSON to `Dashboard`, each time-series panel's options and field config to the
# time-series panel types and each target to a Prometheus query; excess-property checks reject unknown fields.
_TS_HEADER = """\
import type { Dashboard, DataQuery } from '@grafana/schema';
import type { Options as TimeSeriesOptions, FieldConfig as TimeSeriesFieldConfig } from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';
interface PrometheusQuery extends DataQuery { expr: string; legendFormat?: string; instant?: boolean; range?: boolean; interval?: string; }
// A JSON file holds an enum's value, not the enum: accept each string enum's literal values, nothing else.
type Json<T> = T extends string ? `${T}` : T extends number | boolean | null | undefined ? T
  : T extends Array<infer U> ? Array<Json<U>> : T extends object ? { [K in keyof T]: Json<T[K]> } : T;
"""


def _ts_module(dash: dict[str, Any]) -> str:
    panels = [p for p in _panels(dash) if p["type"] == "timeseries"]
    parts = [
        _TS_HEADER,
        f"export const dashboard: Json<Dashboard> = {json.dumps(dash, indent=1)};",
        f"export const timeseriesOptions: Json<TimeSeriesOptions>[] = {json.dumps([p['options'] for p in panels], indent=1)};",
        f"export const timeseriesFieldConfig: Json<TimeSeriesFieldConfig>[] = {json.dumps([p['fieldConfig']['defaults'].get('custom', {}) for p in panels], indent=1)};",
        f"export const targets: Json<PrometheusQuery>[] = {json.dumps([t for p in _panels(dash) for t in p.get('targets', [])], indent=1)};",
    ]
    return "\n".join(parts) + "\n"


@pytest.fixture(scope="module")
def tsc() -> Path:
    """The TypeScript compiler and @grafana/schema, installed under tests/k8s/node_modules (gitignored)."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm not installed")
    tsc = HERE / "node_modules" / "typescript" / "bin" / "tsc"
    schema = HERE / "node_modules" / "@grafana" / "schema" / "package.json"
    if not (tsc.exists() and schema.exists()):
        out = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--prefix", str(HERE)], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
    return tsc


def _type_check(tsc: Path, source: str, name: str) -> subprocess.CompletedProcess:
    work = HERE / ".tscheck"
    work.mkdir(exist_ok=True)
    path = work / f"{name}.ts"
    path.write_text(source)
    cmd = ["node", str(tsc), "--noEmit", "--strict", "--target", "es2022", "--module", "esnext", "--moduleResolution", "bundler", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE)


def test_dashboard_type_checks_against_grafana_schema(tsc):
    out = _type_check(tsc, _ts_module(_dashboard()), "dashboard")
    assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_type_check_rejects_an_unknown_panel_field(tsc):
    dash = _dashboard()
    dash["panels"][1]["lineColour"] = "red"
    dash["panels"][1]["options"]["legend"]["placement"] = "middle"
    out = _type_check(tsc, _ts_module(dash), "dashboard_bad")
    assert out.returncode != 0
    assert "lineColour" in out.stdout and "middle" in out.stdout
