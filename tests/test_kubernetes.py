"""The Kubernetes and KServe manifests (deploy/kubernetes), offline: no cluster, no network.

- each kustomization renders (`kubectl kustomize` when kubectl is installed, else `render` below, which a test
  holds to kubectl's output);
- the built-in resources validate against the Kubernetes JSON schemas of pinned versions (kubernetes-validate,
  strict: unknown fields are errors), the KServe and Kubeflow ones against their CRD schemas kept in
  deploy/kubernetes/crds (made strict the same way);
- checkov's security scan and shellcheck find nothing;
- image, command, ports, probes, environment variable names, security context, the model volume and the stop
  deadline agree with the Dockerfile and the service's settings;
- the training script runs for real under torchrun (c10d rendezvous on 127.0.0.1) and publishes a model folder,
  and a server started with the api container's settings answers the probes and drains within the grace period.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
CRDS = K8S / "crds"
TRAIN_SCRIPT = K8S / "training" / "script" / "train.sh"

# What a user applies (training/script is the base that both distributed jobs include).
KUSTOMIZATIONS = {
    "api": K8S,
    "train-job": K8S / "training" / "job",
    "train-pytorchjob": K8S / "training" / "pytorchjob",
    "train-defaults": K8S / "training" / "defaults",
    "kserve": K8S / "kserve",
}
# The oldest Kubernetes the manifests need (1.27: the batch.kubernetes.io/job-name label the training job's
# rendezvous id and headless Service use) and the newest that kubernetes-validate ships schemas for.
KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")
CRD_SCHEMAS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "serving.kserve.io_inferenceservices.schema.json.gz",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "serving.kserve.io_servingruntimes.schema.json.gz",
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.schema.json.gz",
}
CPU_LIMIT = "limits.cpu"


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------

def _kubectl() -> str | None:
    here = Path(sys.executable).parent / "kubectl"
    return str(here) if here.exists() else shutil.which("kubectl")


def render(path: Path) -> list[dict]:
    """`kubectl kustomize path` for the features these kustomizations use; anything else is refused, not ignored."""
    k = yaml.safe_load((path / "kustomization.yaml").read_text())
    unknown = set(k) - {"apiVersion", "kind", "namespace", "resources", "images", "configMapGenerator",
                        "generatorOptions"}
    assert not unknown, f"{path}: render() does not implement {sorted(unknown)}"
    out: list[dict] = []
    for entry in k.get("resources", []):
        p = (path / entry).resolve()
        out += render(p) if p.is_dir() else [d for d in yaml.safe_load_all(p.read_text()) if d]
    generators = k.get("configMapGenerator", [])
    assert not generators or k.get("generatorOptions", {}).get("disableNameSuffixHash"), \
        "render() does not compute kustomize's name hashes"
    for g in generators:
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": g["name"]},
              "data": {Path(f).name: (path / f).read_text() for f in g["files"]}}
        if g.get("options", {}).get("labels"):
            cm["metadata"]["labels"] = dict(g["options"]["labels"])
        out.append(cm)
    if k.get("namespace"):
        for d in out:
            d["metadata"]["name" if d["kind"] == "Namespace" else "namespace"] = k["namespace"]
    for image in k.get("images", []):
        for c in _all_containers(out):
            if c["image"].split(":")[0] == image["name"]:
                c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return out


def _all_containers(node) -> list[dict]:
    """Every container (and init container) anywhere in a tree of resources."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found += value
            else:
                found += _all_containers(value)
    elif isinstance(node, list):
        for item in node:
            found += _all_containers(item)
    return found


def _kustomize(path: Path) -> list[dict]:
    result = subprocess.run([_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@functools.cache
def _rendered(name: str) -> tuple[dict, ...]:
    path = KUSTOMIZATIONS[name]
    return tuple(_kustomize(path) if _kubectl() else render(path))


def rendered(name: str) -> list[dict]:
    return copy.deepcopy(list(_rendered(name)))


def one(name: str, kind: str) -> dict:
    (found,) = [r for r in rendered(name) if r["kind"] == kind]
    return found


def _key(r: dict) -> tuple:
    return r["apiVersion"], r["kind"], r["metadata"].get("namespace", ""), r["metadata"]["name"]


def test_fallback_renderer_agrees_with_kubectl_kustomize():
    if _kubectl() is None:
        pytest.skip("kubectl is not installed: the other tests use the fallback renderer, which cannot be compared")
    for name, path in KUSTOMIZATIONS.items():
        ours, theirs = sorted(render(path), key=_key), sorted(_kustomize(path), key=_key)
        assert [_key(r) for r in ours] == [_key(r) for r in theirs], name
        assert ours == theirs, name


# --------------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------------

def _is_custom(r: dict) -> bool:
    return (r["apiVersion"], r["kind"]) in CRD_SCHEMAS


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_resources_are_valid_for_pinned_kubernetes(version):
    kv = pytest.importorskip("kubernetes_validate")
    checked, errors = 0, []
    for name in KUSTOMIZATIONS:
        for r in rendered(name):
            if _is_custom(r):
                continue
            try:
                kv.validate(r, version, strict=True)
                checked += 1
            except kv.ValidationError as e:
                errors.append(f"{name}: {r['kind']}/{r['metadata']['name']}: {e.message} at {list(e.path)}")
    assert not errors, "\n".join(errors)
    assert checked >= 11
    # Strict: a misspelt field is an error, as kubectl apply's server-side field validation makes it.
    bad = one("api", "Deployment")
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/ready", "port": 1}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, version, strict=True)


def _closed(s):
    """A CRD schema with unknown fields refused (the API server's strict field validation), except where the schema
    keeps them (x-kubernetes-preserve-unknown-fields)."""
    if not isinstance(s, dict):
        return s
    s = dict(s)
    if "properties" in s:
        s["properties"] = {k: _closed(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(s.get(key), dict):
            s[key] = _closed(s[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [_closed(x) for x in s[key]]
    return s


@functools.cache
def _crd_validator(api_version: str, kind: str):
    jsonschema = pytest.importorskip("jsonschema")
    doc = json.loads(gzip.decompress((CRDS / CRD_SCHEMAS[api_version, kind]).read_bytes()))
    assert (f"{doc['group']}/{doc['version']}", doc["kind"]) == (api_version, kind)
    return jsonschema.Draft7Validator(_closed(doc["openAPIV3Schema"]))


def test_custom_resources_are_valid_against_their_crd_schemas():
    custom = [r for name in KUSTOMIZATIONS for r in rendered(name) if _is_custom(r)]
    assert sorted((r["apiVersion"], r["kind"]) for r in custom) == sorted(CRD_SCHEMAS)
    for r in custom:
        validator = _crd_validator(r["apiVersion"], r["kind"])
        errors = [f"{e.message} at {list(e.path)}" for e in validator.iter_errors(r)]
        assert not errors, f"{r['kind']}: " + "\n".join(errors)
        typo = copy.deepcopy(r)
        typo["spec"]["unknownField"] = 1
        assert not validator.is_valid(typo), f"{r['kind']}: the schema does not refuse unknown fields"
    sources = (CRDS / "README.md").read_text()
    assert all(f"`{file}`" in sources for file in CRD_SCHEMAS.values()), "each schema's source is noted"


# --------------------------------------------------------------------------------------------------
# Linters: checkov (security), shellcheck
# --------------------------------------------------------------------------------------------------

# Each check skipped, and why. Nothing else may fail.
CHECKOV_SKIPS = {
    # "Image should use digest": a digest exists only once the image is built and pushed; pin it when deploying
    # (`kustomize edit set image latentserve=REGISTRY/latentserve@sha256:...`, README.md). The manifests pin the
    # package's version tag.
    "CKV_K8S_43": "image digest",
    # "Image Pull Policy should be Always": the tags are release versions, never moved, and IfNotPresent lets
    # images loaded onto the nodes run (kind load, air-gapped clusters). Clusters that must re-check registry
    # credentials at every start enable the AlwaysPullImages admission plugin, which does it for every pod.
    "CKV_K8S_15": "imagePullPolicy Always",
    # "Prefer using secrets as files": the service reads its settings, the API key among them, from its environment
    # (pydantic-settings, LATENTSERVE_API_KEY), as with docker compose. The variable is the container's own; the
    # service holds it as a SecretStr and never logs it.
    "CKV_K8S_35": "secret as environment variable",
}


def _checkov() -> str | None:
    for candidate in (ROOT / ".venv-checkov" / "bin" / "checkov", Path(sys.executable).parent / "checkov"):
        if candidate.exists():
            return str(candidate)
    return shutil.which("checkov")


def test_checkov_finds_no_failed_check(tmp_path):
    checkov = _checkov()
    if checkov is None:
        pytest.skip("checkov is not installed (scripts/test installs it into .venv-checkov; it pins packages of its "
                    "own, so it does not share the project's venv)")
    for name in KUSTOMIZATIONS:
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(rendered(name), sort_keys=False))
    cmd = [checkov, "--directory", str(tmp_path), "--framework", "kubernetes", "--output", "json", "--quiet",
           "--compact", "--skip-download"]
    if CHECKOV_SKIPS:
        cmd += ["--skip-check", ",".join(CHECKOV_SKIPS)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip(), result.stderr[-3000:]
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [f"{c['check_id']} {c['check_name']}: {c['resource']}" for r in reports
              for c in r.get("results", {}).get("failed_checks", [])]
    passed = sum(r["summary"]["passed"] for r in reports)
    assert not failed, "\n".join(failed)
    assert passed > 100 and not any(r["summary"]["parsing_errors"] for r in reports), report


def _shellcheck() -> str | None:
    here = Path(sys.executable).parent / "shellcheck"
    return str(here) if here.exists() else shutil.which("shellcheck")


def test_train_script_passes_shellcheck():
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (it comes with the dev extra: pip install -e '.[dev]')")
    result = subprocess.run([shellcheck, "--shell", "sh", "--severity", "style", str(TRAIN_SCRIPT)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


# --------------------------------------------------------------------------------------------------
# Agreement with the Dockerfile, the compose file, the service and the training command line
# --------------------------------------------------------------------------------------------------

def _pods(name: str) -> list[tuple[dict, dict, dict]]:
    """(resource, pod spec, container) for every container of a kustomization. The KServe runtime's container gets
    the InferenceService predictor's pod-level fields as its pod spec (KServe merges the two into one pod)."""
    found = []
    for r in rendered(name):
        kind, spec = r["kind"], r.get("spec", {})
        if kind in ("Deployment", "Job"):
            pods = [spec["template"]["spec"]]
        elif kind == "PyTorchJob":
            pods = [replica["template"]["spec"] for replica in spec["pytorchReplicaSpecs"].values()]
        elif kind == "ServingRuntime":
            pods = [{**one(name, "InferenceService")["spec"]["predictor"], **spec}]
        else:
            continue
        found += [(r, pod, c) for pod in pods for c in pod["containers"]]
    return found


def _dockerfile_stages() -> dict[str, str]:
    from test_deploy import _stages

    return _stages()


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _environment(container: dict, api_key: str = "k") -> dict[str, str]:
    """The container's environment as the kubelet makes it (the CPU limit rounded up, the Secret's key given);
    fields of the running pod (its IP, labels) are left out."""
    env = {}
    for name, e in _env(container).items():
        source = e.get("valueFrom", {})
        if "value" in e:
            env[name] = e["value"]
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            assert ref["resource"] == CPU_LIMIT and str(ref.get("divisor", "1")) == "1", ref
            assert ref["containerName"] == container["name"], ref
            env[name] = str(math.ceil(_cpus(container["resources"]["limits"]["cpu"])))
        elif "secretKeyRef" in source:
            env[name] = api_key
    return env


def _settings_from(env: dict[str, str], monkeypatch):
    from service.settings import Settings

    for k in [k for k in os.environ if k.startswith("LATENTSERVE_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("LATENTSERVE_"):
            monkeypatch.setenv(k, v)
    return Settings()


def _project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _compose_image_names() -> tuple[str, str]:
    """The runtime and trainer image names docker-compose.yml gives by default."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    runtime = re.fullmatch(r"\$\{LATENTSERVE_IMAGE:-([\w.-]+)\}:.*", compose["api"]["image"]).group(1)
    trainer = re.fullmatch(r"\$\{LATENTSERVE_IMAGE:-([\w.-]+)\}(-trainer):.*", compose["trainer"]["image"])
    return runtime, trainer.group(1) + trainer.group(2)


SERVING = ("api", "kserve")
TRAINING = ("train-job", "train-pytorchjob", "train-defaults")


def test_images_and_commands_are_the_dockerfile_targets():
    stages, version = _dockerfile_stages(), _project_version()
    runtime_image, trainer_image = _compose_image_names()
    entry = {stage: json.loads(re.search(r"^ENTRYPOINT (.*)$", stages[stage], re.M).group(1))
             for stage in ("runtime", "trainer")}
    assert entry == {"runtime": ["python", "-m", "service"], "trainer": ["python", "-m", "training"]}
    for name in SERVING:
        for _, _, c in _pods(name):
            assert c["image"] == f"{runtime_image}:{version}", (name, c["image"])
            # The image's own entry point, or (KServe: $PORT) a shell that execs the same command.
            assert "command" not in c or re.search(r"\bexec python -m service\b", c["command"][-1]), c["command"]
    from training.cli import _base_parser

    for name in TRAINING:
        for _, _, c in _pods(name):
            assert c["image"] == f"{trainer_image}:{version}", (name, c["image"])
            if "command" in c:
                assert c["command"] == ["sh", "/etc/latentserve/train.sh"]
            else:  # the trainer's entry point with these arguments: a valid `python -m training` command line
                assert _base_parser().parse_args(c["args"]).command == "build-defaults"


def test_fit_arguments_are_valid_for_the_training_command_line():
    from training.cli import _base_parser, driver_for

    for name in ("train-job", "train-pytorchjob"):
        (_, _, c), = _pods(name)
        fit_args = _environment(c)["FIT_ARGS"].split()
        parser = _base_parser()
        driver_for(fit_args[fit_args.index("--model") + 1]).add_arguments(
            parser._subparsers._group_actions[0].choices["fit"])
        args = parser.parse_args(["fit", *fit_args, "--out", "run", "--no-export", "--quiet"])
        assert args.command == "fit" and args.model == "vae"


def _app_get_routes() -> set[str]:
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(models_dir=ROOT / "models"))
    return {r.path for r in app.routes if "GET" in getattr(r, "methods", ())}


def test_ports_and_probes_match_the_image_and_the_service():
    runtime = _dockerfile_stages()["runtime"]
    exposed = int(re.search(r"^EXPOSE (\d+)$", runtime, re.M).group(1))
    health_path = re.search(r"http://127\.0\.0\.1:%s(/\w+)", runtime).group(1)
    routes = _app_get_routes()
    assert health_path == "/ready" and {"/ready", "/health", "/metrics"} <= routes

    deployment = one("api", "Deployment")
    (_, pod, c), = _pods("api")
    (port,) = c["ports"]
    assert port["containerPort"] == exposed == int(_environment(c)["LATENTSERVE_PORT"])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == exposed and annotations["prometheus.io/path"] in routes
    service = one("api", "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port["name"]]
    probe_port = port["name"]

    (_, _, kc), = _pods("kserve")
    (kport,) = kc["ports"]
    default_port = int(re.search(r'--port "\$\{PORT:-(\d+)\}"', kc["command"][-1]).group(1))
    assert kport["containerPort"] == default_port

    for container, port_ref in ((c, probe_port), (kc, default_port)):
        # Ready (every model loaded and warm; 503 while draining) gates traffic and start-up, as in the image's
        # HEALTHCHECK; alive is /health, which answers while models load and while draining.
        assert container["startupProbe"]["httpGet"]["path"] == health_path
        assert container["readinessProbe"]["httpGet"]["path"] == health_path
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["port"] == port_ref, probe


def test_kserve_predictor_speaks_protocol_v2_that_the_service_serves():
    runtime, isvc = one("kserve", "ServingRuntime"), one("kserve", "InferenceService")
    assert runtime["spec"]["protocolVersions"] == ["v2"]
    assert isvc["spec"]["predictor"]["model"]["protocolVersion"] == "v2"
    from service.app import create_app
    from service.settings import Settings

    routes = {(m, r.path) for r in create_app(Settings(models_dir=ROOT / "models")).routes
              for m in getattr(r, "methods", ())}
    if not any(path.startswith("/v2") for _, path in routes):
        pytest.skip("the Open Inference Protocol (/v2, issue 15) is not in this service yet")
    assert {("GET", "/v2/health/live"), ("GET", "/v2/health/ready")} <= routes
    assert any(m == "POST" and re.fullmatch(r"/v2/models/\{\w+\}/infer", path) for m, path in routes), routes


def test_environment_variable_names_are_settings_and_their_values_valid(monkeypatch):
    from service.settings import Settings

    prefix = Settings.model_config["env_prefix"]
    for name in SERVING:
        for _, _, c in _pods(name):
            env = _environment(c)
            names = [k for k in env if k.startswith(prefix)]
            unknown = [k for k in names if k[len(prefix):].lower() not in Settings.model_fields]
            assert names and not unknown, (name, unknown)
            assert set(env) == set(names), f"{name}: variables the service does not read: {set(env) - set(names)}"
            settings = _settings_from(env, monkeypatch)
            # ONNX Runtime's threads are the CPUs of the limit, and the limit is what the pod is given.
            cpu = c["resources"]["limits"]["cpu"]
            assert c["resources"]["requests"] == c["resources"]["limits"], name
            assert settings.inference_workers * settings.intra_op_threads == _cpus(cpu), name
            assert settings.api_key is not None, f"{name}: the API key comes from the Secret"
            secret = _env(c)["LATENTSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
            assert secret == {"name": "latentserve-api-key", "key": "api-key"}


def _service_link_names(service: str, ports: list[dict]) -> set[str]:
    """The variables Kubernetes' service links define for a Service (docker-link style)."""
    base = service.upper().replace("-", "_")
    names = {f"{base}_SERVICE_HOST", f"{base}_SERVICE_PORT", f"{base}_PORT"}
    for p in ports:
        proto = p.get("protocol", "TCP")
        if p.get("name"):
            names.add(f"{base}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}")
        stem = f"{base}_PORT_{p['port']}_{proto}"
        names |= {stem, f"{stem}_PROTO", f"{stem}_PORT", f"{stem}_ADDR"}
    return names


def test_service_links_cannot_set_a_setting():
    from service.settings import Settings

    prefix = Settings.model_config["env_prefix"]

    def clashes(names: set[str]) -> set[str]:
        return {n for n in names if n.startswith(prefix) and n[len(prefix):].lower() in Settings.model_fields}

    assert clashes(_service_link_names("latentserve", [{"port": 8000}])) == {"LATENTSERVE_PORT"}  # the hazard
    services = [(s["metadata"]["name"], s["spec"]["ports"]) for name in KUSTOMIZATIONS for s in rendered(name)
                if s["kind"] == "Service"]
    isvc = one("kserve", "InferenceService")["metadata"]["name"]
    services.append((f"{isvc}-predictor", [{"name": "http", "port": 80}]))  # made by KServe
    for service, ports in services:
        assert not clashes(_service_link_names(service, ports)), service
    for name in KUSTOMIZATIONS:
        for _, pod, _ in _pods(name):
            assert pod.get("enableServiceLinks") is False, name


def test_termination_grace_covers_the_service_drain(monkeypatch):
    from service.server import FINAL_ANSWER_S

    for name in SERVING:
        (_, pod, c), = _pods(name)
        settings = _settings_from(_environment(c), monkeypatch)
        budget = settings.drain_s + settings.timeout_graceful_shutdown + FINAL_ANSWER_S
        assert budget < pod["terminationGracePeriodSeconds"], (name, budget)
        # The drain outlasts one readiness period, so that every prober sees the 503 before the port closes.
        assert settings.drain_s >= c["readinessProbe"]["periodSeconds"], name
        assert "lifecycle" not in c, "the service drains by itself on SIGTERM; a preStop hook would only add to it"


def test_every_pod_meets_the_restricted_security_standard():
    runtime = _dockerfile_stages()["runtime"]
    uid = int(re.findall(r"^USER\s+(\d+)", runtime, re.M)[-1])
    for name in KUSTOMIZATIONS:
        for r, pod, c in _pods(name):
            where = f"{name}: {r['kind']}/{c['name']}"
            pod_sc, sc = pod.get("securityContext", {}), c.get("securityContext", {})
            merged = {**pod_sc, **sc}
            assert merged.get("runAsNonRoot") is True and merged.get("runAsUser") == uid, where
            assert merged.get("seccompProfile") == {"type": "RuntimeDefault"}, where
            assert sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities") == {"drop": ["ALL"]}, where
            assert pod.get("automountServiceAccountToken") is False, where
            # A read-only root filesystem: anything written goes to a mounted volume.
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), where
    namespace = one("api", "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_model_repository_is_one_claim_read_only_where_served(monkeypatch):
    claim = one("api", "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    pvc = claim["metadata"]["name"]
    (_, pod, c), = _pods("api")
    models = _settings_from(_environment(c), monkeypatch).models_dir
    (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"] == {"claimName": pvc, "readOnly": True}
    assert [m for m in c["volumeMounts"] if m["name"] == volume["name"]] == [
        {"name": volume["name"], "mountPath": str(models), "readOnly": True}]
    # KServe mounts a pvc:// storage read-only at /mnt/models, which the runtime serves.
    (_, _, kc), = _pods("kserve")
    assert one("kserve", "InferenceService")["spec"]["predictor"]["model"]["storageUri"] == f"pvc://{pvc}"
    assert "--models-dir /mnt/models" in kc["command"][-1]
    for name in TRAINING:
        (_, pod, c), = _pods(name)
        (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert volume["persistentVolumeClaim"] == {"claimName": pvc}, name
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
        assert not mount.get("readOnly"), name
        target = _environment(c).get("MODELS_DIR") or c["args"][c["args"].index("--models-dir") + 1]
        assert mount["mountPath"] == target, name


def test_indexed_job_meets_at_a_rendezvous_on_pod_zero():
    job, service = one("train-job", "Job"), one("train-job", "Service")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = _environment(c)
    nnodes = int(env["NNODES"])
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nnodes >= 2
    assert spec["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    (port,) = c["ports"]
    name = job["metadata"]["name"]
    assert env["RDZV_ENDPOINT"] == f"{name}-0.{pod['subdomain']}:{port['containerPort']}"
    assert service["metadata"]["name"] == pod["subdomain"] and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(port["containerPort"], port["name"])]
    fields = {k: e["valueFrom"]["fieldRef"]["fieldPath"] for k, e in _env(c).items()
              if "fieldRef" in e.get("valueFrom", {})}
    assert fields == {"NODE_INDEX": "metadata.annotations['batch.kubernetes.io/job-completion-index']",
                      "RDZV_ID": "metadata.labels['batch.kubernetes.io/job-name']", "POD_IP": "status.podIP"}
    script = one("train-job", "ConfigMap")
    assert script["data"]["train.sh"] == TRAIN_SCRIPT.read_text()
    assert {"name": "script", "configMap": {"name": script["metadata"]["name"]}} in pod["volumes"]


def test_pytorchjob_runs_the_same_pods_as_the_indexed_job():
    job, ptj = one("train-job", "Job"), one("train-pytorchjob", "PyTorchJob")
    # Workers only, elastic with c10d: a Master replica brings the operator's init container, which the restricted
    # standard refuses.
    assert set(ptj["spec"]["pytorchReplicaSpecs"]) == {"Worker"}
    assert ptj["spec"]["elasticPolicy"] == {"rdzvBackend": "c10d"} and ptj["spec"]["nprocPerNode"] == "1"
    worker = ptj["spec"]["pytorchReplicaSpecs"]["Worker"]
    ours, theirs = copy.deepcopy(job["spec"]["template"]), copy.deepcopy(worker["template"])
    (jc,), (pc,) = ours["spec"].pop("containers"), theirs["spec"].pop("containers")
    assert worker["replicas"] == int(_environment(jc)["NNODES"]) and worker["restartPolicy"] == "Never"
    # The operator finds its container and the rendezvous port by these names.
    assert pc["name"] == "pytorch" and [p["name"] for p in pc["ports"]] == ["pytorchjob-port"]
    assert [p["containerPort"] for p in pc["ports"]] == [p["containerPort"] for p in jc["ports"]]
    # The pod spec is the same but for the indexed Job's own fields (the replica spec carries restartPolicy).
    assert ours["spec"].pop("subdomain") and ours["spec"].pop("restartPolicy") == "Never"
    assert ours == theirs
    je, pe = _environment(jc), _environment(pc)
    for k in ("MODEL_NAME", "FIT_ARGS", "MODELS_DIR", "RUN_DIR", "OMP_NUM_THREADS"):
        assert je[k] == pe[k], k
    # The operator sets PET_NNODES and PET_RDZV_ENDPOINT (worker 0), which train.sh falls back to.
    assert set(_env(pc)) == set(_env(jc)) - {"NNODES", "RDZV_ENDPOINT"}
    assert _env(pc)["NODE_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['training.kubeflow.org/replica-index']"
    for k in ("name", "ports", "env"):
        jc.pop(k), pc.pop(k)
    assert jc == pc


def test_api_scales_on_cpu_and_keeps_a_pod_through_disruptions():
    deployment, hpa, pdb = one("api", "Deployment"), one("api", "HorizontalPodAutoscaler"), one(
        "api", "PodDisruptionBudget")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count; a re-apply must not reset it"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["minReplicas"] - pdb["spec"]["maxUnavailable"] >= 1
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and 0 < metric["resource"]["target"]["averageUtilization"] < 100
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


# --------------------------------------------------------------------------------------------------
# The training script for real: torchrun, c10d rendezvous on 127.0.0.1, one node
# --------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_train_script(models: Path, run: Path, fit_args: str, name: str = "ppca-k8s") -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed (it comes with torch: the `train` extra)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LATENTSERVE_", "PET_", "RDZV_", "NNODES"))}
    env.update(PATH=f"{torchrun.parent}{os.pathsep}{env['PATH']}", MODEL_NAME=name, FIT_ARGS=fit_args,
               MODELS_DIR=str(models), RUN_DIR=str(run), NNODES="1", RDZV_ENDPOINT=f"127.0.0.1:{_free_port()}",
               RDZV_ID="test", NODE_INDEX="0", POD_IP="127.0.0.1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(["sh", str(TRAIN_SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """A repository where train.sh replaced an older ppca-k8s folder with the one it fitted."""
    models = tmp_path_factory.mktemp("models")
    (models / "ppca-k8s").mkdir()
    (models / "ppca-k8s" / "stale.txt").write_text("the folder a previous job published")
    result = _run_train_script(models, tmp_path_factory.mktemp("run"),
                               "--model ppca --method closed-form --dataset digits --latent-dim 3")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "published" in result.stdout
    return models


def test_train_script_publishes_the_model_folder_in_place(published):
    from service.repository import load_model_card

    assert sorted(p.name for p in published.iterdir()) == ["ppca-k8s"], "no staging or previous folder is left"
    card = load_model_card(published / "ppca-k8s")
    assert card.name == "ppca-k8s" and card.kind == "ppca" and card.latent_dim == 3
    assert not (published / "ppca-k8s" / "stale.txt").exists()


def test_train_script_failure_leaves_the_served_model_alone(published, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(published, models)
    before = (models / "ppca-k8s" / "card.json").read_bytes()
    # A fit that fails at once (an unknown model kind: refused before torch is imported), under the real torchrun.
    result = _run_train_script(models, tmp_path / "run", "--model no-such-kind --dataset digits")
    assert result.returncode != 0 and "invalid choice" in result.stderr
    assert sorted(p.name for p in models.iterdir()) == ["ppca-k8s"]
    assert (models / "ppca-k8s" / "card.json").read_bytes() == before


# --------------------------------------------------------------------------------------------------
# The api container's settings on a real server: probes, the key on /metrics, the drain
# --------------------------------------------------------------------------------------------------

def test_api_container_settings_serve_the_probes_and_drain_in_time(published, tmp_path):
    httpx = pytest.importorskip("httpx")
    (_, pod, c), = _pods("api")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTSERVE_")}
    # The manifest's settings, but for where the repository lies and the address (a free port on loopback here).
    env.update(_environment(c, api_key="scrape-key"), LATENTSERVE_MODELS_DIR=str(published),
               LATENTSERVE_HOST="127.0.0.1", LATENTSERVE_PORT=str(port))
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        startup = c["startupProbe"]
        deadline = time.monotonic() + startup["periodSeconds"] * startup["failureThreshold"]
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(url + c["startupProbe"]["httpGet"]["path"], timeout=4).status_code
                if ready == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert ready == 200, log.read_text()[-3000:]
        assert httpx.get(url + c["livenessProbe"]["httpGet"]["path"], timeout=5).status_code == 200
        # Prometheus: /metrics needs the key the Secret holds (README.md: the scrape job sends it).
        metrics_path = one("api", "Deployment")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
        assert httpx.get(url + metrics_path, timeout=10).status_code == 401
        scraped = httpx.get(url + metrics_path, headers={"Authorization": "Bearer scrape-key"}, timeout=10)
        assert scraped.status_code == 200 and "# TYPE" in scraped.text
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert httpx.get(url + c["readinessProbe"]["httpGet"]["path"], timeout=4).status_code == 503
        rc = proc.wait(pod["terminationGracePeriodSeconds"])
        took = time.monotonic() - sent
        assert rc in (0, -signal.SIGTERM), log.read_text()[-3000:]
        assert float(_environment(c)["LATENTSERVE_DRAIN_S"]) <= took < pod["terminationGracePeriodSeconds"], took
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
