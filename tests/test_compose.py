"""The container contract: docker-compose.yml, the Dockerfile and .dockerignore.

The structural checks need only PyYAML. `docker compose config` (or Debian's `docker-compose`)
validates the file against Compose's own schema where either is installed; no engine is needed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

OUR_SERVICES = ("api", "worker", "worker-cpu", "migrate")  # built from our Dockerfile
SUBCOMMANDS = {"api", "worker", "migrate"}
# Settings every service of ours needs (infra/settings.py, prefix ROBUSTNESS_).
REQUIRED_ENV = {"ROBUSTNESS_DATABASE_URL", "ROBUSTNESS_BROKER_URL", "ROBUSTNESS_DATA_DIR",
                "ROBUSTNESS_API_KEYS_REQUIRED", "ROBUSTNESS_WORKER_TOKEN"}
KNOWN_ENV = REQUIRED_ENV | {"ROBUSTNESS_HOST", "ROBUSTNESS_PORT", "ROBUSTNESS_WORKER_CONCURRENCY",
                            "ROBUSTNESS_GATEWAY_URL"}
WORKERS = ("worker", "worker-cpu")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...]
        env = dict(item.partition("=")[::2] for item in env)
    return {key: str(value) for key, value in env.items()}


def command(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", str(duration))
    assert parts, f"unreadable duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


# ---------------------------------------------------------------- docker-compose.yml


def test_services_and_volumes_are_declared(compose, services):
    assert "version" not in compose, "the Compose specification has no top-level `version`"
    assert {"api", "worker", "redis", "postgres", "flower", "migrate"} <= set(services)
    declared = set(compose.get("volumes") or {})
    assert {"blobs", "redis-data", "pg-data"} <= declared
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} mounts undeclared volume {source!r}"


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_our_services_build_from_the_dockerfile_and_run_a_subcommand(services, name):
    service = services[name]
    build = service.get("build")
    assert build, f"{name} must be built from this repository"
    build = {"context": build} if isinstance(build, str) else build
    context = (ROOT / build.get("context", ".")).resolve()
    dockerfile = context / build.get("dockerfile", "Dockerfile")
    assert dockerfile.is_file(), f"{name}: no {dockerfile}"
    assert "container_name" not in service, f"{name}: container_name prevents --scale"
    cmd = command(service)
    assert cmd and cmd[0] in SUBCOMMANDS, f"{name}: command {cmd} is not `robustness api|worker|migrate`"


def test_worker_reserves_one_nvidia_gpu_and_scales(services):
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and d.get("count") == 1 and "gpu" in d.get("capabilities", [])
               for d in devices), devices
    assert command(worker)[0] == "worker"
    assert not worker.get("ports"), "a fixed host port prevents --scale"
    assert "container_name" not in worker
    assert worker["build"]["args"]["ONNXRUNTIME"].startswith("onnxruntime-gpu")
    assert seconds(worker["stop_grace_period"]) >= 60
    assert depends_on(worker)["redis"] == depends_on(worker)["postgres"] == "service_healthy"


def test_several_gpus_get_one_service_each_or_one_supervisor(services):
    """One service per GPU pinned by device_ids, or one container with every GPU whose
    `robustness worker --gpus` starts a worker per GPU: both optional (profile multi-gpu), both
    the GPU image `worker` builds, neither sharing a GPU by accident."""
    pinned = []
    for name in ("worker-gpu0", "worker-gpu1"):
        service = services[name]
        assert service["profiles"] == ["multi-gpu"] and command(service) == ["worker"]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "count" not in device and "gpu" in device["capabilities"]
        pinned += device["device_ids"]
        assert service["image"] == services["worker"]["image"]
        assert service["build"]["args"] == services["worker"]["build"]["args"]
        assert environment(service)["ROBUSTNESS_GATEWAY_URL"] == "http://api:8000"
    assert pinned == ["0", "1"]
    supervisor = services["worker-all-gpus"]
    assert supervisor["profiles"] == ["multi-gpu"]
    assert command(supervisor) == ["worker", "--gpus", "0,1"]
    (device,) = supervisor["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == "all"
    from client.cli import build_parser

    assert build_parser().parse_args(command(supervisor)).gpus == "0,1"


def test_cpu_worker_is_optional_and_needs_no_gpu(services):
    cpu = services["worker-cpu"]
    assert cpu["profiles"] == ["cpu"], "only with --profile cpu"
    assert "deploy" not in cpu
    assert "build" not in cpu or "args" not in cpu["build"], "the CPU image: plain onnxruntime"


def test_api_waits_for_its_dependencies_and_checks_readiness(services):
    api = services["api"]
    assert depends_on(api) == {"redis": "service_healthy", "postgres": "service_healthy",
                               "migrate": "service_completed_successfully"}
    assert any(str(p).endswith(":8000") for p in api["ports"]), api["ports"]
    check = " ".join(api["healthcheck"]["test"])
    assert "/readyz" in check and "urllib" in check, "curl is not in the slim image"


def test_migrate_runs_once_after_postgres(services):
    migrate = services["migrate"]
    assert command(migrate) == ["migrate"]
    assert migrate["restart"] == "no"
    assert depends_on(migrate) == {"postgres": "service_healthy"}


def test_redis_is_a_broker_that_never_evicts(services):
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    args = command(redis)
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


def test_postgres_and_flower(services):
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:16"
    env = environment(postgres)
    assert env["POSTGRES_USER"] == env["POSTGRES_DB"] == "robustness" and env["POSTGRES_PASSWORD"]
    assert "pg_isready" in postgres["healthcheck"]["test"]
    flower = services["flower"]
    assert flower["image"].startswith("mher/flower")
    assert environment(flower)["CELERY_BROKER_URL"] == "redis://redis:6379/0"
    assert any(str(p).endswith("5555:5555") for p in flower["ports"])


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_our_services_share_settings_and_workers_share_no_volume(services, name):
    service = services[name]
    env = environment(service)
    assert not REQUIRED_ENV - set(env), f"{name} misses {REQUIRED_ENV - set(env)}"
    unknown = {key for key in env if key.startswith("ROBUSTNESS_")} - KNOWN_ENV
    assert not unknown, f"{name}: {unknown} are not settings this file is meant to set"
    assert env["ROBUSTNESS_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in env["ROBUSTNESS_DATABASE_URL"]
    assert env["ROBUSTNESS_BROKER_URL"] == "redis://redis:6379/0"
    assert env["ROBUSTNESS_API_KEYS_REQUIRED"] == "true"
    assert env["ROBUSTNESS_WORKER_TOKEN"].startswith("${WORKER_TOKEN:?")  # required, never a default
    if name == "api":
        assert f"blobs:{env['ROBUSTNESS_DATA_DIR']}" in service["volumes"]
    if name in WORKERS:  # workers on other machines: the gateway's blobs come over HTTP
        assert not service.get("volumes"), f"{name} mounts {service.get('volumes')}"
        assert env["ROBUSTNESS_GATEWAY_URL"] == "http://api:8000"
        assert service["depends_on"]["api"]["condition"] == "service_healthy"


def test_environment_names_are_fields_of_the_settings(services):
    try:
        from infra.settings import Settings
    except ImportError as exc:  # the service is optional for this file's structural tests
        pytest.skip(f"infra.settings not importable: {exc}")
    prefix = Settings.model_config.get("env_prefix", "")
    fields = {prefix + name.upper() for name in Settings.model_fields}
    used = {key for name in OUR_SERVICES for key in environment(services[name])
            if key.startswith("ROBUSTNESS_")}
    assert used <= fields, f"not settings: {used - fields}"


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_file_is_valid_for_compose():
    cmd = compose_command()
    if cmd is None:
        pytest.skip("docker-compose not installed; apt-get install docker-compose to validate "
                    "(or install the `docker compose` plugin)")
    for profile in ([], ["--profile", "cpu"]):
        run = subprocess.run([*cmd, "-f", str(COMPOSE), *profile, "config", "-q"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "WORKER_TOKEN": "a-secret-of-at-least-32-characters-long"})
        assert run.returncode == 0, run.stderr or run.stdout


# ---------------------------------------------------------------- Dockerfile, .dockerignore


def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def dockerignore_included():
    """A predicate for paths relative to the context, with Docker's rules: the last matching
    pattern wins, `!` re-includes, a pattern that matches a directory covers its contents."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip().strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
        rules.append((negate, re.compile(regex + r"\Z")))

    def included(path: str) -> bool:
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        keep = True
        for negate, regex in rules:
            if any(regex.match(prefix) for prefix in prefixes):
                keep = negate
        return keep

    return included


def test_dockerfile_installs_the_package_without_test_dependencies():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    text = " ".join(args for _, args in instructions)
    assert "torch" not in text and "[test]" not in text and ".[test" not in text
    assert ("EXPOSE", "8000") in instructions
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"


def test_entrypoint_is_the_console_script():
    entrypoints = [args for op, args in dockerfile_instructions() if op == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT"
    entrypoint = json.loads(entrypoints[-1])
    assert entrypoint[0] in PYPROJECT["project"]["scripts"], entrypoint


def test_copy_sources_exist_in_the_context_and_cover_every_package():
    included = dockerignore_included()
    sources = []
    for op, args in dockerfile_instructions():
        if op in ("COPY", "ADD"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            sources += words[:-1]
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY source {source} does not exist"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        assert files and all(included(str(f.relative_to(ROOT))) for f in files), \
            f".dockerignore keeps {source} (or part of it) out of the build context"
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {Path(s).parts[0] for s in sources}
    assert packages <= copied, f"packages not copied into the image: {packages - copied}"
    assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied


def test_dockerignore_keeps_development_files_out():
    included = dockerignore_included()
    for path in (".venv/bin/python", ".git/HEAD", "tests/test_compose.py", "robustness-data/metadata.db",
                 ".env", "result.json", "bench/attacks.py", "examples/digits-cnn.onnx",
                 "service/__pycache__/app.cpython-311.pyc", "docker-compose.yml"):
        assert not included(path), f"{path} would be sent to the Docker build"
    for path in ("pyproject.toml", "README.md", "infra/settings.py", "workers/onnxgrad/__init__.py"):
        assert included(path), path
