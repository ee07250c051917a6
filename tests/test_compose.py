"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

There is no Docker engine here, so the stack cannot be started in tests. What can
be checked is what usually breaks a compose file silently: a command that is not
(or no longer) a fedvault subcommand or uses an option that does not exist, a
mounted file that is not in the repository, two services on one host port, a
literal password, a long-running service without a healthcheck, and the
operator's Control API reachable from the partners' network.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import typer.main
import yaml

from fedvault.cli.main import app

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
FEDVAULT_IMAGE = "fedvault:latest"
SECRET_WORDS = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|PRIVATE", re.IGNORECASE)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = compose["services"]
    assert isinstance(services, dict)
    return services


def _argv(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _resolve(argv: list[str]) -> tuple[click.Command, list[str], list[str]]:
    """Walk the typer app's click tree: (leaf command, its path, the remaining args)."""
    cmd: click.Command = typer.main.get_command(app)
    path: list[str] = []
    rest = list(argv)
    while isinstance(cmd, click.Group):
        assert rest, f"`fedvault {' '.join(path)}` needs a subcommand"
        ctx = click.Context(cmd)
        sub = cmd.get_command(ctx, rest[0])
        assert sub is not None, f"`fedvault {' '.join([*path, rest[0]])}` is not a command"
        path.append(rest.pop(0))
        cmd = sub
    return cmd, path, rest


def test_fedvault_services_run_real_subcommands(compose: dict[str, Any]) -> None:
    checked = 0
    for name, service in _services(compose).items():
        if service.get("image") != FEDVAULT_IMAGE:
            continue
        argv = _argv(service)
        cmd, path, rest = _resolve(argv)
        # Parsing with click checks every option exists, takes the right type and
        # that required ones are there, without running the command.
        try:
            cmd.make_context(" ".join(["fedvault", *path]), rest)
        except click.ClickException as exc:
            pytest.fail(f"service {name}: `fedvault {' '.join(argv)}`: {exc.format_message()}")
        checked += 1
    assert checked >= 7


def test_required_services_present(compose: dict[str, Any]) -> None:
    services = _services(compose)
    for name in (
        "superlink",
        "coordinator",
        "node-alpha",
        "node-beta",
        "node-gamma",
        "gateway",
        "postgres",
        "prometheus",
        "grafana",
    ):
        assert name in services, name
    commands = {name: " ".join(_argv(s)) for name, s in services.items()}
    assert commands["coordinator"].startswith("train ")
    assert commands["gateway"].startswith("gateway start ")
    kits = set()
    for partner in ("alpha", "beta", "gamma"):
        node = services[f"node-{partner}"]
        assert commands[f"node-{partner}"].startswith("node start --kit /kit ")
        volumes = {v.split(":")[1]: v.split(":")[0] for v in node["volumes"]}
        assert volumes["/kit"] == f"kit-{partner}"
        assert volumes["/data"] == f"data-{partner}"
        kits.add(volumes["/kit"])
    assert len(kits) == 3  # each partner its own kit


def test_referenced_files_exist(compose: dict[str, Any]) -> None:
    named_volumes = set(compose.get("volumes", {}))
    secrets = compose.get("secrets", {})
    for name, service in _services(compose).items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith((".", "/")):
                assert source.startswith("./"), f"{name}: host path {source} outside the repo"
                assert (ROOT / source).exists(), f"{name}: {source} is not in the repository"
            else:
                assert source in named_volumes, f"{name}: volume {source} is not declared"
        for secret in service.get("secrets", []):
            source = secret if isinstance(secret, str) else secret["source"]
            assert source in secrets, f"{name}: secret {source} is not declared"
        build = service.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            assert (ROOT / context / "Dockerfile").exists()
    for name, secret in secrets.items():
        assert set(secret) <= {"file", "environment"}, name
        if "file" in secret:
            assert (ROOT / secret["file"]).exists(), f"secret {name}: {secret['file']} missing"


def test_mounted_configs_reference_existing_files() -> None:
    prometheus = yaml.safe_load((ROOT / "deploy/compose/prometheus.yml").read_text())
    for rule_file in prometheus["rule_files"]:
        local = {
            "alerts.yml": ROOT / "deploy/prometheus/alerts.yml",
            "node-alerts.yml": ROOT / "deploy/compose/node-alerts.yml",
        }[rule_file]
        assert yaml.safe_load(local.read_text())["groups"]
    targets = {
        target
        for job in prometheus["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert {"gateway:8080", "node-alpha:9400", "node-beta:9400", "node-gamma:9400"} <= targets
    for job in prometheus["scrape_configs"]:
        assert job["scheme"] == "https", job["job_name"]
    datasource = yaml.safe_load(
        (ROOT / "deploy/grafana/compose/datasources/prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert list((ROOT / "deploy/grafana/dashboards").glob("*.json"))


def test_host_ports_do_not_collide(compose: dict[str, Any]) -> None:
    any_ip = "0.0.0.0"  # noqa: S104 - compose's default host address, compared only
    seen: dict[tuple[str, str], str] = {}
    for name, service in _services(compose).items():
        for port in service.get("ports", []):
            parts = str(port).split(":")
            host_ip, host_port = (parts[0], parts[1]) if len(parts) == 3 else (any_ip, parts[0])
            for (ip, other_port), other in seen.items():
                if other_port == host_port and (ip == host_ip or any_ip in (ip, host_ip)):
                    pytest.fail(f"{name} and {other} both publish host port {host_port}")
            seen[(host_ip, host_port)] = name
    assert seen


def test_no_literal_secrets(compose: dict[str, Any]) -> None:
    for name, service in _services(compose).items():
        env = service.get("environment", {})
        items = env.items() if isinstance(env, dict) else (e.split("=", 1) for e in env)
        for key, value in items:
            if SECRET_WORDS.search(key):
                assert key.endswith("_FILE"), f"{name}: {key} must point to a secret file"
                assert str(value).startswith("/run/secrets/"), f"{name}: {key}={value}"
        argv = _argv(service)
        for arg in argv:
            assert not re.search(r"--(password|secret|token)\b", arg), f"{name}: {arg}"
    for name, secret in compose.get("secrets", {}).items():
        assert "file" in secret or "environment" in secret, name
    text = COMPOSE.read_text()
    literal = re.compile(r"(?i)(password|passwd|token|secret)\w*[ \t]*[:=][ \t]*['\"]?[^\s'\"]{6,}")
    for line in text.splitlines():
        body = line.split("#", 1)[0].strip()
        if body.startswith(("secrets:", "- source:", "source:", "target:")):
            continue  # references to compose secrets, not values
        match = literal.search(body)
        assert match is None or "/run/secrets/" in line, f"literal secret? {body}"


def test_long_running_services_have_healthchecks(compose: dict[str, Any]) -> None:
    for name, service in _services(compose).items():
        if service.get("restart") == "no":
            continue  # one-shot jobs: init, demo data, a training submission
        check = service.get("healthcheck")
        assert check is not None, f"{name} has no healthcheck"
        assert not check.get("disable", False), name
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        if service.get("image") == FEDVAULT_IMAGE:
            env = service.get("environment", {})
            assert "FEDVAULT_HEALTH_URL" in env or "FEDVAULT_HEALTH_TCP" in env, name
            url = env.get("FEDVAULT_HEALTH_URL", "https://")
            assert url.startswith("https://"), f"{name}: health over TLS"


def test_control_api_stays_on_the_operator_side(compose: dict[str, Any]) -> None:
    services = _services(compose)
    superlink = _argv(services["superlink"])
    assert superlink[superlink.index("--host") + 1] == "127.0.0.1"
    assert "--fleet-host" in superlink
    fleet_port = superlink[superlink.index("--fleet-port") + 1]
    published = [str(p) for p in services["superlink"].get("ports", [])]
    assert published == [f"{fleet_port}:{fleet_port}"]
    assert services["coordinator"]["network_mode"] == "service:superlink"
    for partner in ("alpha", "beta", "gamma"):
        node = services[f"node-{partner}"]
        assert node["networks"] == ["partners"]
        argv = _argv(node)
        assert "--superlink" not in argv  # the address comes from the kit
    assert compose["networks"]["operator"].get("internal") is True
    for name in ("gateway", "postgres"):
        assert "partners" not in services[name].get("networks", []), name


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    assert "RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in lines
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "no USER"
    assert users[-1] not in ("root", "0", "0:0")
    assert any(line.startswith("HEALTHCHECK ") for line in lines)
    assert (ROOT / "deploy/healthcheck.py").exists()
    assert "COPY deploy/healthcheck.py" in text
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignore
    assert ".fedvault" in ignore


def test_audit_log_goes_to_postgres_over_verified_tls(compose: dict[str, Any]) -> None:
    from fedvault.settings import FedvaultSettings

    services = _services(compose)
    postgres_command = " ".join(services["postgres"]["command"])
    assert "ssl=on" in postgres_command
    for name in ("gateway", "coordinator"):
        env = services[name]["environment"]
        url = env["FEDVAULT_AUDIT_STORE"]
        assert url.startswith("postgresql://fedvault@postgres:")
        assert "sslmode=verify-full" in url
        # The settings object accepts it: no password in the URL.
        FedvaultSettings(audit_store=url)
        assert env["FEDVAULT_AUDIT_STORE_PASSWORD_FILE"].startswith("/run/secrets/")
    for name in ("gateway", "superlink"):  # the coordinator's ServerApp runs in superlink
        assert "postgres_password" in services[name]["secrets"]


# Which services keep which store in PostgreSQL: the coordinator (`train`, which
# also passes the store to the ServerApp), the SuperLink (the ServerApp's parent,
# and the federation metrics) and the gateway (registry with artifacts, keys).
_STORES = {
    "coordinator": ("FEDERATION",),
    "superlink": ("FEDERATION",),
    "gateway": ("FEDERATION", "GATEWAY"),
}


@pytest.mark.parametrize("service", sorted(_STORES))
def test_registry_and_keys_go_to_postgres_over_verified_tls(
    compose: dict[str, Any], service: str
) -> None:
    from fedvault.settings import FedvaultSettings

    services = _services(compose)
    env = services[service]["environment"]
    for store in _STORES[service]:
        url = env[f"FEDVAULT_{store}_STORE"]
        assert url.startswith("postgresql://fedvault@postgres:5432/")
        assert "sslmode=verify-full" in url
        assert "sslrootcert=/state/pki/ca.crt" in url
        FedvaultSettings(**{f"{store.lower()}_store": url})  # no password in the URL
        password_file = env[f"FEDVAULT_{store}_STORE_PASSWORD_FILE"]
        assert password_file == "/run/secrets/postgres_password"  # noqa: S105 - a path
    assert "postgres_password" in services[service]["secrets"]
    if service != "coordinator":  # network_mode: service:superlink waits via superlink
        assert services[service]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # One database for all: the same URL as the audit store where both are set.
    if "FEDVAULT_AUDIT_STORE" in env:
        assert env["FEDVAULT_AUDIT_STORE"] == env["FEDVAULT_FEDERATION_STORE"]


def test_federation_metrics_are_scraped_on_the_operator_network_only(
    compose: dict[str, Any],
) -> None:
    services = _services(compose)
    argv = _argv(services["superlink"])
    host = argv[argv.index("--metrics-host") + 1]
    port = argv[argv.index("--metrics-port") + 1]
    assert host in services["superlink"]["networks"]["operator"]["aliases"]
    prometheus = yaml.safe_load((ROOT / "deploy" / "compose" / "prometheus.yml").read_text())
    targets = [
        t
        for job in prometheus["scrape_configs"]
        if job["job_name"] == "fedvault-coordinator"
        for cfg in job["static_configs"]
        for t in cfg["targets"]
    ]
    assert targets == [f"{host}:{port}"]
