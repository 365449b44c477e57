"""The deployment files: Dockerfile (hadolint), docker-compose.yml (docker compose's own validation) and
the properties the README promises of both. Fast; no Docker engine needed.

The end-to-end proof on a real engine is `scripts/docker-smoke` (by hand, as root; see README.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"


# --------------------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------------------

def _hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def _compose_cmd() -> list[str] | None:
    """`docker compose` (v2 plugin) when it works, else `docker-compose` (e.g. Debian's 1.29)."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without the variables the compose file reads, so the defaults are what is checked."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LATENTSERVE_", "COMPOSE_", "TORCH_", "PIP_", "BASE_IMAGE", "DOCKER_"))}
    env.update(extra)
    return env


def _compose(*args: str, **env: str) -> subprocess.CompletedProcess:
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (Debian: apt-get install "
                    "docker-compose); the compose file's schema check needs one of them")
    return subprocess.run([*cmd, "-f", str(COMPOSE), "--project-directory", str(ROOT), *args],
                          capture_output=True, text=True, timeout=60, env=_clean_env(**env), cwd=ROOT)


def _compose_config(*args: str, **env: str) -> dict:
    yaml = pytest.importorskip("yaml")
    result = _compose(*args, "config", **env)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


# --------------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------------

def test_hadolint_finds_no_error():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (it comes with the dev extra: pip install -e '.[dev]')")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "error", "--format", "json",
                             str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    findings = json.loads(result.stdout or "[]")
    errors = [f for f in findings if f["level"] == "error"]
    assert result.returncode == 0 and not errors, findings
    # Warnings are not failures, but none are expected either: report them in the assertion message.
    assert not findings, f"hadolint warnings: {findings}"


def _stages() -> dict[str, str]:
    """stage name -> its instructions (comments dropped, continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    stages: dict[str, list[str]] = {"": []}
    current = ""
    for ln in lines:
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", ln, re.I)
        if m:
            current = m.group(1)
            stages[current] = []
        stages[current].append(ln)
    return {k: "\n".join(v) for k, v in stages.items()}


def test_dockerfile_base_image_is_a_build_argument():
    stages = _stages()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", stages[""], re.M)
    assert all(re.match(r"FROM (\$\{BASE_IMAGE\}|base) AS ", body) for name, body in stages.items() if name)


def test_runtime_stage_is_last_slim_non_root_and_health_checked():
    stages = _stages()
    assert list(stages)[-1] == "runtime", "the default target (last stage) must be the slim service image"
    runtime = stages["runtime"]
    # Only the service's venv comes in: nothing from the trainer, no pip install of torch / onnx here.
    assert "--from=trainer" not in runtime and "torch" not in runtime and "pip install" not in runtime
    assert "COPY --from=service-build /opt/venv /opt/venv" in runtime
    user = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    health = re.search(r"^HEALTHCHECK .*CMD (\[.*\])$", runtime, re.M)
    assert health, "the runtime stage needs a HEALTHCHECK"
    cmd = json.loads(health.group(1))
    assert cmd[:2] == ["python", "-c"] and "/ready" in cmd[2] and "urllib" in cmd[2]
    entry = re.search(r"^ENTRYPOINT (.*)$", runtime, re.M)
    assert entry and json.loads(entry.group(1)) == ["python", "-m", "service"], "exec form: the server is PID 1"
    assert "LATENTSERVE_HOST=0.0.0.0" in runtime


def test_trainer_stage_pins_torch_and_takes_its_index_as_argument():
    trainer = _stages()["trainer"]
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", trainer, re.M)
    assert "torch==2.13.0" in trainer
    assert re.search(r"build-defaults.*/models", trainer)


def test_service_build_installs_only_the_base_dependencies():
    build = _stages()["service-build"]
    assert "['project']['dependencies']" in build and "optional-dependencies" not in build
    assert "--no-deps ." in build


def test_the_runtime_image_ships_the_service_and_the_contract_but_no_training():
    copied = re.findall(r"^COPY (?!--from)(\S+)", _stages()["service-build"], re.M)
    assert {"model_repository/", "service/"} <= set(copied)
    assert not any(src.startswith("training") for src in copied), copied


def test_dockerignore_is_an_allow_list():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert {"pyproject.toml", "README.md", "model_repository", "training", "service", "models"} <= allowed
    assert not allowed & {".venv", ".git", "runs", "tests"}


# --------------------------------------------------------------------------------------------------
# docker-compose.yml
# --------------------------------------------------------------------------------------------------

def test_compose_file_is_valid():
    result = _compose("config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_compose_gpu_profile_is_valid_and_optional():
    services = _compose_config("--profile", "gpu")["services"]
    gpu = services["trainer-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    # CPU-only hosts: a plain `up` never starts it (profile), and nothing else waits for it.
    assert gpu["profiles"] == ["gpu"]
    assert all("profiles" not in s for name, s in services.items() if name != "trainer-gpu")
    assert all("trainer-gpu" not in s.get("depends_on", {}) for s in services.values())


def test_compose_api_contract():
    config = _compose_config()
    api, trainer = config["services"]["api"], config["services"]["trainer"]
    assert api["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert api["build"]["target"] == "runtime" and trainer["build"]["target"] == "trainer"
    assert api["build"]["args"]["BASE_IMAGE"] == "python:3.11-slim"
    # Shared state: only the models volume, read-only in the api, written by the trainer.
    api_mounts = [v for v in map(_volume, api["volumes"]) if v["target"] == "/models"]
    assert len(api_mounts) == 1 and api_mounts[0]["read_only"] and api_mounts[0]["source"] == "models"
    assert any(v["target"] == "/models" and not v["read_only"] for v in map(_volume, trainer["volumes"]))
    assert "models" in config["volumes"]
    assert api["read_only"] is True
    assert "ready" in " ".join(api["healthcheck"]["test"])
    assert api["restart"] in ("always", "unless-stopped", "on-failure")
    assert trainer.get("restart", "no") == "no"
    env = api["environment"]
    # The CPU limit is the ONNX Runtime threads: inference workers x intra-op threads.
    cpus = float(api["deploy"]["resources"]["limits"]["cpus"])
    assert cpus == int(env["LATENTSERVE_INFERENCE_WORKERS"]) * int(env["LATENTSERVE_INTRA_OP_THREADS"])


def test_compose_settings_follow_the_environment():
    config = _compose_config(LATENTSERVE_API_CPUS="4", BASE_IMAGE="debian-python:3.11",
                             LATENTSERVE_MODELS_VOLUME="./models", LATENTSERVE_API_KEY="k")
    api = config["services"]["api"]
    assert float(api["deploy"]["resources"]["limits"]["cpus"]) == 4
    assert api["environment"]["LATENTSERVE_INFERENCE_WORKERS"] == "4"
    assert api["environment"]["LATENTSERVE_API_KEY"] == "k"
    assert api["build"]["args"]["BASE_IMAGE"] == "debian-python:3.11"
    mount = next(v for v in map(_volume, api["volumes"]) if v["target"] == "/models")
    assert mount["source"] == str(ROOT / "models") and mount["read_only"]


def _volume(v) -> dict:
    """A service volume as {source, target, read_only}: docker compose v2 prints the long syntax,
    docker-compose 1.x the short one (SOURCE:TARGET[:MODE])."""
    if isinstance(v, dict):
        return {"source": v.get("source"), "target": v["target"], "read_only": bool(v.get("read_only"))}
    parts = v.split(":")
    return {"source": parts[0], "target": parts[1], "read_only": len(parts) > 2 and "ro" in parts[2].split(",")}


def _seconds(value) -> float:
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|us|h|m|s)", value))


# --------------------------------------------------------------------------------------------------
# Stop timeouts: the service's whole shutdown fits in the engine's grace period, everywhere
# --------------------------------------------------------------------------------------------------

DOCKER_STOP_DEFAULT_S = 10.0  # `docker stop` without -t: SIGKILL 10 s after the stop signal


def _shutdown_budget(env: dict) -> float:
    """Seconds from SIGTERM to exit at most: drain, graceful timeout, then the 503 answers to the unfinished."""
    from service.server import FINAL_ANSWER_S
    from service.settings import Settings

    settings = Settings(**{k[len("LATENTSERVE_"):].lower(): v for k, v in env.items()
                           if k in ("LATENTSERVE_DRAIN_S", "LATENTSERVE_TIMEOUT_GRACEFUL_SHUTDOWN")})
    return settings.drain_s + settings.timeout_graceful_shutdown + FINAL_ANSWER_S


def _dockerfile_env(stage: str) -> dict[str, str]:
    env = {}
    for m in re.finditer(r"^ENV\s+(.*)$", stage, re.M):
        env.update(dict(re.findall(r"(\w+)=(\S+)", m.group(1))))
    return env


def test_stop_timeouts_agree_across_dockerfile_compose_and_service():
    yaml = pytest.importorskip("yaml")
    runtime = _stages()["runtime"]
    # Dockerfile: SIGTERM, and the service's own budget (its defaults unless the image sets them) inside a plain
    # `docker stop`, which the image cannot lengthen.
    assert re.search(r"^STOPSIGNAL SIGTERM$", runtime, re.M)
    image_budget = _shutdown_budget(_dockerfile_env(runtime))
    assert image_budget < DOCKER_STOP_DEFAULT_S, image_budget
    # docker-compose.yml: SIGTERM, and the budget of the api's environment inside its stop_grace_period.
    api = yaml.safe_load(COMPOSE.read_text())["services"]["api"]
    assert api["stop_signal"] == "SIGTERM"
    env = {k: str(v) for k, v in api["environment"].items() if v is not None}
    grace = _seconds(api["stop_grace_period"])
    assert _shutdown_budget(env) < grace, (env, grace)
    # The uvicorn deadline is not left to uvicorn's own default by accident: the compose file names it.
    assert "LATENTSERVE_TIMEOUT_GRACEFUL_SHUTDOWN" in env


def test_shutdown_budget_reads_the_settings():
    """The check above can fail: a compose file with uvicorn's old 25 s in 30 s of grace, or a 30 s service
    default under `docker stop`, are over budget."""
    assert _shutdown_budget({"LATENTSERVE_TIMEOUT_GRACEFUL_SHUTDOWN": "25"}) > 25
    assert _shutdown_budget({"LATENTSERVE_TIMEOUT_GRACEFUL_SHUTDOWN": "30"}) > DOCKER_STOP_DEFAULT_S
    assert _shutdown_budget({"LATENTSERVE_DRAIN_S": "5", "LATENTSERVE_TIMEOUT_GRACEFUL_SHUTDOWN": "8"}) > 13


# --------------------------------------------------------------------------------------------------
# scripts/docker-smoke: the package mirror is the host's, none is written in the repository
# --------------------------------------------------------------------------------------------------

def _apt_mirror():
    import importlib.util

    spec = importlib.util.spec_from_file_location("apt_mirror", ROOT / "scripts" / "apt_mirror.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _apt_root(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "etc" / "apt" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_apt_mirror_reads_deb822_sources(tmp_path):
    root = _apt_root(tmp_path, {"sources.list.d/debian.sources": """Types: deb
# a comment
URIs: http://mirror-a.invalid/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror-a.invalid/debian-security
Suites: bookworm-security
Components: main
""", "sources.list.d/other.list.disabled": "deb http://mirror-x.invalid/debian bookworm main\n"})
    m = _apt_mirror()
    assert m.debian_mirror("bookworm", root) == "http://mirror-a.invalid/debian"
    assert m.debian_mirror("bookworm-security", root) == "http://mirror-a.invalid/debian-security"
    assert m.debian_mirror("trixie", root) is None


def test_apt_mirror_reads_one_line_sources_and_skips_what_apt_skips(tmp_path):
    root = _apt_root(tmp_path, {
        "sources.list": """# deb http://commented.invalid/debian bookworm main
deb-src http://source-only.invalid/debian bookworm main
deb http://contrib-only.invalid/debian bookworm contrib
deb [arch=amd64 signed-by=/k.gpg] http://mirror-b.invalid/debian bookworm main non-free
""",
        "sources.list.d/off.sources": "Enabled: no\nTypes: deb\nURIs: http://off.invalid/debian\nSuites: bookworm\n"
                                      "Components: main\n",
    })
    assert _apt_mirror().debian_mirror("bookworm", root) == "http://mirror-b.invalid/debian"


def test_apt_mirror_command_fails_clearly_without_a_source(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "apt_mirror.py"), "bookworm", "--root",
                             str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "no `deb` source for bookworm" in result.stderr


def test_docker_smoke_takes_the_mirror_from_the_host_and_names_none():
    script = (ROOT / "scripts" / "docker-smoke").read_text()
    assert "scripts/apt_mirror.py" in script
    result = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "docker-smoke")], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    # No Debian / Ubuntu archive host, nor any other package mirror, is written in a tracked file.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    mirror_host = re.compile(r"\b(deb|security|archive|ftp\.[a-z]{2})\.(debian|ubuntu)\.(org|com)\b|"
                             r"\bmirrors?\.[\w.-]+\.(org|com|net|cn|edu)\b", re.I)
    hits = []
    for name in tracked.stdout.splitlines():
        path = ROOT / name
        if path.suffix in (".onnx", ".png", ".npz", ".pt", ".gz") or not path.is_file():
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if mirror_host.search(line):
                hits.append(f"{name}:{i}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)

