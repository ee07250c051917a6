"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

There is no Docker engine here, so the stack cannot be started in tests. What can
be checked is what usually breaks a compose file silently: a command that is not
(or no longer) a fedvault subcommand or uses an option that does not exist, a
mounted file that is not in the repository, two services on one host port, a
literal password, a long-running service without a healthcheck, the
operator's Control API reachable from a partner's network, a hop without TLS,
a private key mounted where its consumer is not, and two partners on one
network. Where Debian's `promtool`/`prometheus` are installed, the Prometheus
configs are also checked by Prometheus itself, and Prometheus is started with
the compose web config and a certificate from `federation init --service`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import pytest
import typer.main
import yaml
from cryptography import x509
from typer.testing import CliRunner

from fedvault.cli.main import app
from fedvault.cli.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
FEDVAULT_IMAGE = "fedvault:latest"
PARTNERS = ("alpha", "beta", "gamma")
# The uid each third-party image runs its server as (what tls-init must chown to).
IMAGE_UIDS = {"prom/prometheus": 65534, "grafana/grafana": 472, "postgres": 999}
# The log shipper's docker_logs source: the only host path the stack mounts.
DOCKER_SOCKET_MOUNT = "/var/run/docker.sock:/var/run/docker.sock:ro"
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
        if service.get("image") != FEDVAULT_IMAGE or "entrypoint" in service:
            continue  # tls-init: a shell step in the image, checked below
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
            if volume == DOCKER_SOCKET_MOUNT and name == "vector":
                continue  # the one host path: the log shipper's socket (checked below)
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
    assert datasource["datasources"][0]["url"] == "https://prometheus-operator:9090"
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
    for partner in PARTNERS:
        node = services[f"node-{partner}"]
        assert node["networks"] == [f"partner-{partner}"]
        argv = _argv(node)
        assert "--superlink" not in argv  # the address comes from the kit
    assert compose["networks"]["operator"].get("internal") is True
    for name in ("gateway", "postgres", "grafana", "coordinator"):
        assert not set(_networks(services[name])) & set(_partner_networks(compose)), name


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
    assert "MALLOC_ARENA_MAX=2" in lines  # bench/soak.py: RSS growth without it
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


# ------------------------------------------------------------ helpers (networks, mounts)


def _networks(service: dict[str, Any]) -> list[str]:
    networks = service.get("networks", [])
    return list(networks) if isinstance(networks, (list, dict)) else []


def _partner_networks(compose: dict[str, Any]) -> list[str]:
    return [n for n in compose["networks"] if n.startswith("partner")]


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (named volume or ./repo path)."""
    out: dict[str, str] = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def _mounted_from(service: dict[str, Any], path: str) -> str | None:
    """The source whose mount contains container path ``path`` (longest match)."""
    best: tuple[int, str] | None = None
    for target, source in _mounts(service).items():
        if path == target or path.startswith(target.rstrip("/") + "/"):
            if best is None or len(target) > best[0]:
                best = (len(target), source)
    return None if best is None else best[1]


def _repo_file(service: dict[str, Any], path: str) -> Path:
    """The repository file mounted at container path ``path``."""
    for target, source in _mounts(service).items():
        if source.startswith("./") and (path == target or path.startswith(target + "/")):
            return ROOT / source / path[len(target) :].lstrip("/")
    raise AssertionError(f"{path} is not mounted from the repository")


def _image_uid(service: dict[str, Any]) -> int:
    image = str(service["image"]).split(":")[0]
    return IMAGE_UIDS[image]


def _flag(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"{name}=")]
    assert len(values) == 1, f"{name} given {len(values)} times in {argv}"
    return values[0]


_INSTALL = re.compile(
    r"install -m (?P<mode>0[0-7]{3}) -o (?P<uid>\d+) -g (?P<gid>\d+) (?P<src>\S+) (?P<dst>\S+)"
)


def _tls_installs(compose: dict[str, Any]) -> list[dict[str, str]]:
    script = " ".join(str(c) for c in _services(compose)["tls-init"]["command"])
    installs = [m.groupdict() for m in _INSTALL.finditer(script)]
    assert installs, "tls-init installs nothing"
    return installs


# ------------------------------------------------------------------- TLS on every hop


def test_every_scrape_is_tls_verified_with_the_ca(compose: dict[str, Any]) -> None:
    prometheus = _services(compose)["prometheus"]
    config = yaml.safe_load(_repo_file(prometheus, "/etc/prometheus/prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        name = job["job_name"]
        assert job.get("scheme") == "https", name
        tls = job.get("tls_config", {})
        assert tls.get("insecure_skip_verify", False) is False, name
        # The CA file lies in a volume Prometheus really mounts, put there by tls-init.
        assert _mounted_from(prometheus, tls["ca_file"]) == "prometheus-tls", name
    tls_init_targets = {i["dst"] for i in _tls_installs(compose)}
    assert "/tls/prometheus/ca.crt" in tls_init_targets


def test_prometheus_serves_https_only(compose: dict[str, Any]) -> None:
    prometheus = _services(compose)["prometheus"]
    argv = [str(a) for a in prometheus["command"]]
    web = yaml.safe_load(_repo_file(prometheus, _flag(argv, "--web.config.file")).read_text())
    server = web["tls_server_config"]
    for key in ("cert_file", "key_file"):
        assert _mounted_from(prometheus, server[key]) == "prometheus-tls", key
    assert server.get("client_auth_type", "NoClientCert") in (
        "NoClientCert",
        "RequireAndVerifyClientCert",
    )
    # Its health check speaks HTTPS and verifies the certificate.
    test = [str(t) for t in prometheus["healthcheck"]["test"]]
    assert test[:4] == ["CMD", "promtool", "check", "healthy"]
    assert _flag(test, "--url").startswith("https://")
    http_config = yaml.safe_load(
        _repo_file(prometheus, _flag(test, "--http.config.file")).read_text()
    )
    assert _mounted_from(prometheus, http_config["tls_config"]["ca_file"]) == "prometheus-tls"
    assert not http_config["tls_config"].get("insecure_skip_verify", False)


def test_grafana_reads_prometheus_over_verified_https_and_serves_https(
    compose: dict[str, Any],
) -> None:
    services = _services(compose)
    grafana = services["grafana"]
    files = list((ROOT / "deploy/grafana/compose/datasources").glob("*.yml"))
    assert files
    for path in files:
        for source in yaml.safe_load(path.read_text())["datasources"]:
            assert source["url"].startswith("https://"), path
            assert source["jsonData"]["tlsAuthWithCACert"] is True
            assert not source["jsonData"].get("tlsSkipVerify", False)
            match = re.fullmatch(r"\$__file\{(.+)\}", source["secureJsonData"]["tlsCACert"])
            assert match, "tlsCACert must be read from the CA file"
            assert _mounted_from(grafana, match.group(1)) == "grafana-tls"
    # The URL's host is Prometheus' alias on the one network both share.
    prometheus = services["prometheus"]
    host = "prometheus-operator"
    assert host in prometheus["networks"]["operator"]["aliases"]
    assert set(_networks(grafana)) & set(_networks(prometheus)) == {"operator"}
    env = grafana["environment"]
    assert env["GF_SERVER_PROTOCOL"] == "https"
    for key in ("GF_SERVER_CERT_FILE", "GF_SERVER_CERT_KEY"):
        assert _mounted_from(grafana, env[key]) == "grafana-tls", key
    test = [str(t) for t in grafana["healthcheck"]["test"]]
    assert test[1] == "curl"
    assert "--cacert" in test
    assert "-k" not in test
    assert any(t.startswith("https://") for t in test)


def test_no_plain_http_url_in_the_compose_stack() -> None:
    files = [
        COMPOSE,
        *(ROOT / "deploy/compose").glob("*.yml"),
        *(ROOT / "deploy/grafana/compose").rglob("*.yml"),
    ]
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            body = line.split("#", 1)[0]
            assert "http://" not in body, f"{path.name}:{number}: {line.strip()}"
            assert "insecure_skip_verify: true" not in body, f"{path.name}:{number}"
            assert "sslmode=disable" not in body, f"{path.name}:{number}"


# ------------------------------------------------------------- keys: their consumer only


def test_private_keys_reach_only_their_consumer(compose: dict[str, Any]) -> None:
    services = _services(compose)
    # The operator's state (CA key, model keys, the SuperLink's key) only in
    # fedvault's own services, never in a third-party image.
    with_state = {n for n, s in services.items() if "operator-state" in _mounts(s).values()}
    assert with_state == {"init", "tls-init", "superlink", "coordinator", "gateway"}
    for name in with_state:
        assert services[name]["image"] == FEDVAULT_IMAGE, name
    # A partner's kit (its node key, its TLS key): init writes it, its node reads it.
    for partner in PARTNERS:
        users = {n for n, s in services.items() if f"kit-{partner}" in _mounts(s).values()}
        assert users == {"init", f"node-{partner}"}, partner
        assert _mounts(services[f"node-{partner}"])["/kit"] == f"kit-{partner}"
        assert f"kit-{partner}:/kit:ro" in services[f"node-{partner}"]["volumes"]
    # Each TLS volume: tls-init and exactly one consumer, owned by the
    # consumer's uid, key 0600, and the consumer's own key (not the SuperLink's).
    tls_init = services["tls-init"]
    assert tls_init.get("network_mode") == "none"
    assert "operator-state:/state:ro" in tls_init["volumes"]
    installs = _tls_installs(compose)
    keys = [i for i in installs if i["dst"].endswith(".key")]
    assert {k["dst"].split("/")[2] for k in keys} == {"prometheus", "grafana", "postgres"}
    for item in installs:
        volume = _mounted_from(tls_init, item["dst"])
        assert volume is not None, item
        assert volume.endswith("-tls"), item
        consumers = [
            n for n, s in services.items() if n != "tls-init" and volume in _mounts(s).values()
        ]
        assert len(consumers) == 1, (volume, consumers)
        consumer = services[consumers[0]]
        assert int(item["uid"]) == _image_uid(consumer), item
        assert f"{volume}:" in " ".join(consumer["volumes"])
        assert any(v.startswith(f"{volume}:") and v.endswith(":ro") for v in consumer["volumes"])
        if item["dst"].endswith(".key"):
            assert item["mode"] == "0600", item
            service_name = item["dst"].split("/")[2]
            assert item["src"] == f"/state/pki/services/{service_name}/server.key", item
        else:
            assert item["src"].endswith((".pem", ".crt")), item
    script = " ".join(str(c) for c in tls_init["command"])
    for volume_dir in ("/tls/prometheus", "/tls/grafana", "/tls/postgres"):
        assert f"chmod 0700 {volume_dir}" in script
    # The consumers' configs point at the installed files.
    postgres = " ".join(services["postgres"]["command"])
    for option in ("ssl_cert_file", "ssl_key_file"):
        path = re.search(rf"{option}=(\S+)", postgres)
        assert path, option
        assert _mounted_from(services["postgres"], path.group(1)) == "postgres-tls"


# ---------------------------------------------------------------- partners' isolation


def test_each_partner_node_has_a_network_of_its_own(compose: dict[str, Any]) -> None:
    services = _services(compose)
    partner_networks = _partner_networks(compose)
    assert sorted(partner_networks) == [f"partner-{p}" for p in PARTNERS]
    nodes = {p: set(_networks(services[f"node-{p}"])) for p in PARTNERS}
    for a in PARTNERS:
        for b in PARTNERS:
            if a < b:
                assert not nodes[a] & nodes[b], f"node-{a} and node-{b} share {nodes[a] & nodes[b]}"
    for network in partner_networks:
        members = {n for n, s in services.items() if network in _networks(s)}
        partner = network.removeprefix("partner-")
        # The partner's node, the Fleet proxy, Prometheus as a scraper: nobody else.
        assert members == {f"node-{partner}", "superlink", "prometheus"}, (network, members)
    # Nobody joins a partner network through another container's namespace.
    for name, service in services.items():
        mode = str(service.get("network_mode", ""))
        if mode.startswith("service:"):
            assert mode == "service:superlink", name
            assert name == "coordinator", name


def test_nothing_but_the_fleet_proxy_listens_on_a_partner_network(
    compose: dict[str, Any],
) -> None:
    services = _services(compose)
    superlink = services["superlink"]
    argv = _argv(superlink)
    # Control + Runtime APIs: loopback only, never published.
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    control_port = argv[argv.index("--port") + 1]
    for service in services.values():
        for port in service.get("ports", []):
            assert str(port).split(":")[-2] != control_port
    # Federation metrics: the operator-network alias only.
    metrics_host = argv[argv.index("--metrics-host") + 1]
    assert metrics_host in superlink["networks"]["operator"]["aliases"]
    # Prometheus holds every partner's ε: its web port is bound to its
    # operator-network alias, so on a partner network it refuses connections.
    prometheus = services["prometheus"]
    listen = _flag([str(a) for a in prometheus["command"]], "--web.listen-address")
    host = listen.rsplit(":", 1)[0]
    assert host in prometheus["networks"]["operator"]["aliases"]
    for network, config in prometheus["networks"].items():
        if network != "operator":
            assert not (config or {}).get("aliases"), network
    assert not prometheus.get("ports")  # not published on the host either


# ------------------------------------------------ the init command really issues these


@pytest.fixture(scope="module")
def compose_pki(tmp_path_factory: pytest.TempPathFactory, compose: dict[str, Any]) -> Path:
    """Run the compose `init` command, with /state and /kits in a temp dir."""
    root = tmp_path_factory.mktemp("compose-init")
    argv = [
        str(root / a[1:]) if a in ("/state", "/kits") else a
        for a in _argv(_services(compose)["init"])
    ]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    return root / "state"


def _sans(cert_path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    }


def test_init_issues_every_file_tls_init_installs(
    compose: dict[str, Any], compose_pki: Path
) -> None:
    for item in _tls_installs(compose):
        source = compose_pki / item["src"].removeprefix("/state/")
        assert source.is_file(), item["src"]
        if source.suffix == ".key":
            assert source.stat().st_mode & 0o777 == 0o600
    services = compose_pki / "pki" / "services"
    ca = x509.load_pem_x509_certificate((compose_pki / "pki" / "ca.crt").read_bytes())
    for name in ("prometheus", "grafana", "postgres"):
        cert = x509.load_pem_x509_certificate((services / name / "server.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
    # Each certificate names the host its clients use.
    assert "prometheus-operator" in _sans(services / "prometheus" / "server.pem")
    assert {"grafana", "localhost", "127.0.0.1"} <= _sans(services / "grafana" / "server.pem")
    assert _sans(services / "postgres" / "server.pem") == {"postgres"}
    # A service's key is its own: not the SuperLink's.
    superlink_key = (compose_pki / "pki" / "server.key").read_bytes()
    for name in ("prometheus", "grafana", "postgres"):
        assert (services / name / "server.key").read_bytes() != superlink_key


def test_init_keeps_service_certs_and_refuses_bad_specs(tmp_path: Path) -> None:
    runner = CliRunner()
    home = tmp_path / "fed"
    base = ["federation", "init", "--home", str(home), "--partners", ""]
    assert runner.invoke(app, [*base, "--service", "prometheus"]).exit_code == 0
    cert = home / "pki" / "services" / "prometheus" / "server.pem"
    first = cert.read_bytes()
    assert _sans(cert) == {"prometheus"}
    # Re-run (every `docker compose up`): kept; a new service is added to an existing CA.
    again = runner.invoke(app, [*base, "--service", "prometheus", "--service", "grafana=a,b"])
    assert again.exit_code == 0, again.output
    assert cert.read_bytes() == first
    assert _sans(home / "pki" / "services" / "grafana" / "server.pem") == {"a", "b"}
    for bad in ("../x", "Prom", "x=", "dup"):
        specs = ["--service", bad] + (["--service", "dup"] if bad == "dup" else [])
        result = runner.invoke(app, [*base, *specs])
        assert result.exit_code != 0, bad


# ------------------------------------ Prometheus' own checks (Debian's prometheus package)


def _localised_prometheus_configs(
    compose: dict[str, Any], pki: Path, out: Path
) -> tuple[Path, Path]:
    """Copies of the compose Prometheus configs with container paths mapped to ``out``."""
    prometheus = _services(compose)["prometheus"]
    tls_dir = out / "tls"
    tls_dir.mkdir()
    for item in _tls_installs(compose):
        if item["dst"].startswith("/tls/prometheus/"):
            target = tls_dir / Path(item["dst"]).name
            shutil.copyfile(pki / item["src"].removeprefix("/state/"), target)
            target.chmod(int(item["mode"], 8))
    token = out / "token"
    token.write_text("not-a-real-token\n")
    mapping = {
        "/etc/prometheus/tls/": f"{tls_dir}/",
        "/run/secrets/fedvault-auditor.token": str(token),
    }
    for target, source in _mounts(prometheus).items():
        if source.startswith("./") and target.endswith(".yml"):
            mapping[target] = str(out / Path(target).name)
    for target, source in _mounts(prometheus).items():
        if source.startswith("./") and target.endswith(".yml"):
            text = (ROOT / source).read_text()
            for container_path, local in mapping.items():
                text = text.replace(container_path, local)
            (out / Path(target).name).write_text(text)
    argv = [str(a) for a in prometheus["command"]]
    config = Path(mapping[_flag(argv, "--config.file")])
    web = Path(mapping[_flag(argv, "--web.config.file")])
    return config, web


def _require(tool: str) -> None:
    """Skip without Debian's ``prometheus`` package — fail instead in CI, which installs it."""
    if shutil.which(tool) is None:
        if os.environ.get("FEDVAULT_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(f"{tool} is missing, but FEDVAULT_REQUIRE_PROMETHEUS=1 requires this test")
        pytest.skip(f"{tool} not installed (Debian package prometheus)")


def test_promtool_accepts_the_compose_configs(
    compose: dict[str, Any], compose_pki: Path, tmp_path: Path
) -> None:
    _require("promtool")
    config, web = _localised_prometheus_configs(compose, compose_pki, tmp_path)
    for argv in (["check", "web-config", str(web)], ["check", "config", str(config)]):
        done = subprocess.run(
            ["promtool", *argv], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


def _get(port: int, ctx: ssl.SSLContext | None, host: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        conn: socket.socket = ctx.wrap_socket(raw, server_hostname=host) if ctx else raw
        conn.sendall(
            f"GET /-/healthy HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
        return data


@contextmanager
def _prometheus(tmp_path: Path, config: Path, port: int, *extra: str) -> Iterator[Any]:
    """A real Prometheus on 127.0.0.1:port until the block ends; its log in a file
    (not a pipe nobody reads: Prometheus logs as it runs, and a full pipe stalls it)."""
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                *extra,
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            yield proc
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def test_prometheus_serves_the_compose_web_config_over_verified_tls(
    compose: dict[str, Any], compose_pki: Path, tmp_path: Path
) -> None:
    _require("prometheus")
    config, web = _localised_prometheus_configs(compose, compose_pki, tmp_path)
    port = free_port()
    with _prometheus(tmp_path, config, port, f"--web.config.file={web}") as proc:
        ctx = ssl.create_default_context(cafile=str(compose_pki / "pki" / "ca.crt"))
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = _get(port, ctx, "prometheus-operator")
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
                assert time.monotonic() < deadline, "prometheus did not come up"
                time.sleep(0.3)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        # Plain HTTP is refused (Go answers 400 to plain HTTP on a TLS port).
        assert not _get(port, None, "prometheus-operator").startswith(b"HTTP/1.1 200")
        # A client trusting another CA does not get through.
        with pytest.raises(ssl.SSLError):
            _get(port, ssl.create_default_context(), "prometheus-operator")
        # Nor one that expects another name (the certificate names Prometheus only).
        with pytest.raises(ssl.SSLCertVerificationError):
            _get(port, ctx, "superlink")


# ------------------------------ the standalone sample (deploy/prometheus, outside compose)

STANDALONE = ROOT / "deploy/prometheus/prometheus.yml"
STANDALONE_CA = "/etc/prometheus/fedvault-ca.crt"
STANDALONE_TOKEN = "/etc/prometheus/fedvault-auditor.token"  # noqa: S105 - a path


def test_the_standalone_sample_scrapes_every_job_over_verified_https() -> None:
    text = STANDALONE.read_text()
    config = yaml.safe_load(text)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # The gateway and the federation metrics (`federation up --metrics-port`).
    assert set(jobs) == {"fedvault-gateway", "fedvault-coordinator"}
    for name, job in jobs.items():
        assert job.get("scheme") == "https", name
        tls = job.get("tls_config")
        assert isinstance(tls, dict), name
        assert tls.get("ca_file") == STANDALONE_CA, name
        assert tls.get("insecure_skip_verify", False) is False, name
        for static in job["static_configs"]:
            for target in static["targets"]:
                assert target.rsplit(":", 1)[0] == "127.0.0.1", (name, target)
    assert jobs["fedvault-gateway"]["authorization"]["credentials_file"] == STANDALONE_TOKEN
    assert "http://" not in text
    assert "server_name" in text  # the comment on names the certificate must hold
    assert config["rule_files"] == ["alerts.yml"]


@pytest.fixture(scope="module")
def loopback_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`federation init --host 127.0.0.1`, as the sample's comment says: its HOME."""
    home = tmp_path_factory.mktemp("standalone") / "op"
    argv = ["federation", "init", "acme", "--home", str(home), "--partners", ""]
    result = CliRunner().invoke(app, [*argv, "--host", "127.0.0.1"])
    assert result.exit_code == 0, result.output
    return home


def _localised_standalone(home: Path, out: Path, extra_jobs: list[dict[str, Any]]) -> Path:
    """The sample with its CA and token paths mapped to ``out``, 1 s scrapes, ``extra_jobs``."""
    token = out / "fedvault-auditor.token"
    token.write_text("not-a-real-token\n")
    token.chmod(0o600)
    text = STANDALONE.read_text()
    text = text.replace(STANDALONE_CA, str(home / "pki" / "ca.crt"))
    text = text.replace(STANDALONE_TOKEN, str(token))
    config = yaml.safe_load(text)
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"] += extra_jobs
    shutil.copyfile(ROOT / "deploy/prometheus/alerts.yml", out / "alerts.yml")
    path = out / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_promtool_accepts_the_standalone_sample(loopback_pki: Path, tmp_path: Path) -> None:
    _require("promtool")
    config = _localised_standalone(loopback_pki, tmp_path, [])
    done = subprocess.run(
        ["promtool", "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_scrapes_the_federation_metrics_with_the_samples_tls_config(
    loopback_pki: Path, tmp_path: Path
) -> None:
    """A real Prometheus, the sample's coordinator job, `federation up`'s TLS metrics server.

    Also what the comment on server names says: a target whose host the
    certificate does not name fails verification, and ``server_name`` set to a
    name it holds fixes that. (The gateway job has the same tls_config; it is
    checked statically and by promtool, not scraped here.)
    """
    _require("prometheus")
    import httpx

    from server.federation_metrics import serve_federation_metrics
    from server.store import FederationStore

    db = tmp_path / "federation.db"
    FederationStore(db).close()
    metrics_port = free_port()
    server, thread = serve_federation_metrics(
        db,
        "127.0.0.1",
        metrics_port,
        certfile=loopback_pki / "pki" / "server.pem",
        keyfile=loopback_pki / "pki" / "server.key",
    )
    sample = yaml.safe_load(STANDALONE.read_text())
    coordinator = next(
        j for j in sample["scrape_configs"] if j["job_name"] == "fedvault-coordinator"
    )
    assert coordinator["static_configs"] == [{"targets": ["127.0.0.1:9401"]}]

    def job(name: str, target: str, **tls: str) -> dict[str, Any]:
        return {
            **coordinator,
            "job_name": name,
            "tls_config": {**coordinator["tls_config"], **tls},
            "static_configs": [{"targets": [target]}],
        }

    config = _localised_standalone(loopback_pki, tmp_path, [])
    localised = yaml.safe_load(config.read_text())
    for scrape in localised["scrape_configs"]:  # the sample's own job, at the served port
        if scrape["job_name"] == "fedvault-coordinator":
            scrape["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    ca = str(loopback_pki / "pki" / "ca.crt")
    localised["scrape_configs"] += [
        job("wrong-name", f"localhost:{metrics_port}", ca_file=ca),
        job("server-name", f"localhost:{metrics_port}", ca_file=ca, server_name="127.0.0.1"),
    ]
    config.write_text(yaml.safe_dump(localised))
    port = free_port()
    try:
        with _prometheus(tmp_path, config, port) as proc:
            deadline = time.monotonic() + 60
            health: dict[str, tuple[str, str]] = {}
            while True:
                assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
                try:
                    answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5)
                    targets = answer.json()["data"]["activeTargets"]
                    health = {
                        t["labels"]["job"]: (t["health"], t["lastError"])
                        for t in targets
                        if t["labels"]["job"] != "fedvault-gateway"
                    }
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                if len(health) == 3 and "unknown" not in {h for h, _ in health.values()}:
                    break
                assert time.monotonic() < deadline, f"targets not scraped in time: {health}"
                time.sleep(0.5)
            assert health["fedvault-coordinator"] == ("up", ""), health
            assert health["server-name"] == ("up", ""), health
            state, error = health["wrong-name"]
            assert state == "down"
            assert "certificate" in error, error
    finally:
        server.shutdown()
        thread.join(timeout=10)


# ---------------------------------------------------------------- structured logs + Vector

VECTOR_CONFIGS = {
    "compose": ROOT / "deploy/compose/vector.yaml",
    "standalone": ROOT / "deploy/vector/vector.yaml",
}
VECTOR_CONFIG_MOUNT = "./deploy/compose/vector.yaml:/etc/vector/vector.yaml:ro"
# What a docker_logs event carries before the remap (the parts the remap reads).
DOCKER_LOGS_FIELDS = {"message", "timestamp", "label"}


def _vector(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict)
    return config


def _remap_source(config: dict[str, Any]) -> str:
    source = config["transforms"]["fedvault"]["source"]
    assert isinstance(source, str)
    return source


def _fedvault_log_lines() -> list[dict[str, Any]]:
    """Records as fedvault's JSON formatter writes them: an event, and plain text."""
    import json
    import logging

    from fedvault.logs import JsonFormatter

    event = logging.LogRecord(
        "fedvault.gateway",
        logging.WARNING,
        __file__,
        1,
        json.dumps({"event": "gateway_started", "http_port": 8080}),
        None,
        None,
    )
    event.request_id = "req-1"
    plain = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "Started", None, None)
    return [json.loads(JsonFormatter().format(r)) for r in (event, plain)]


def test_long_running_fedvault_services_log_json(compose: dict[str, Any]) -> None:
    checked = []
    for name, service in _services(compose).items():
        if service.get("image") != FEDVAULT_IMAGE or "entrypoint" in service:
            continue
        if service.get("restart") == "no":
            continue  # one-shot jobs (init, demo data, a training submission)
        assert service["environment"].get("FEDVAULT_LOG_FORMAT") == "json", name
        # The variable is honoured: the command's --log-format reads it.
        cmd, _, _ = _resolve(_argv(service))
        envvars = {p.name: p.envvar for p in cmd.params}
        assert envvars.get("log_format") == "FEDVAULT_LOG_FORMAT", f"{name}: {cmd.name}"
        checked.append(name)
    assert {"superlink", "gateway", "node-alpha", "node-beta", "node-gamma"} <= set(checked)


def test_vector_service_is_pinned_read_only_and_isolated(compose: dict[str, Any]) -> None:
    services = _services(compose)
    vector = services["vector"]
    assert re.fullmatch(r"timberio/vector:0\.\d+\.\d+-debian", vector["image"]), vector["image"]
    volumes = vector["volumes"]
    assert DOCKER_SOCKET_MOUNT in volumes
    assert VECTOR_CONFIG_MOUNT in volumes
    assert [v for v in volumes if "docker.sock" in v] == [DOCKER_SOCKET_MOUNT]
    argv = _argv(vector)
    assert argv[argv.index("--config") + 1] == "/etc/vector/vector.yaml"
    # Nobody else sees the socket; the shipper sees no key, kit or data volume.
    for name, service in services.items():
        if name != "vector":
            assert not any("docker.sock" in v for v in service.get("volumes", [])), name
    assert set(_mounts(vector).values()) == {
        "/var/run/docker.sock",
        "./deploy/compose/vector.yaml",
        "vector-data",
        "fedvault-logs",
    }
    for volume in ("vector-data", "fedvault-logs"):
        users = [n for n, s in services.items() if volume in _mounts(s).values()]
        assert users == ["vector"], (volume, users)
    assert "ports" not in vector
    assert vector["networks"] == ["operator"]
    assert vector["read_only"] is True
    assert vector["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in vector["security_opt"]
    assert "privileged" not in vector
    # The healthcheck asks the API where the config binds it: loopback only.
    config = _vector(VECTOR_CONFIGS["compose"])
    assert config["api"]["enabled"] is True
    host, port = config["api"]["address"].split(":")
    assert host == "127.0.0.1"
    probe = " ".join(vector["healthcheck"]["test"])
    assert f"/dev/tcp/{host}/{port}" in probe
    assert "GET /health " in probe
    # The source reads the containers labelled for it: every long-running
    # service (one-shot ones may be too), never the shipper itself.
    labels = config["sources"]["containers"]["include_labels"]
    assert labels == ["org.fedvault.logs=ship"]
    for name, service in compose["services"].items():
        shipped = (service.get("labels") or {}).get("org.fedvault.logs") == "ship"
        if name == "vector":
            assert not shipped
        elif "healthcheck" in service:
            assert shipped, name
    # The file sink writes inside the logs volume, which is mounted writable.
    path = config["sinks"]["files"]["path"]
    assert _mounted_from(vector, path) == "fedvault-logs"
    assert config["data_dir"] == "/var/lib/vector"
    assert _mounted_from(vector, config["data_dir"]) == "vector-data"


@pytest.mark.parametrize("flavour", sorted(VECTOR_CONFIGS))
def test_vector_config_components_wire_up(flavour: str) -> None:
    config = _vector(VECTOR_CONFIGS[flavour])
    sources = config["sources"]
    transforms = config["transforms"]
    sinks = config["sinks"]
    assert sources
    assert transforms
    assert sinks
    names = [*sources, *transforms, *sinks]
    assert len(names) == len(set(names)), "component ids must be unique"
    assert {s["type"] for s in sources.values()} == {"docker_logs"}
    consumed: set[str] = set()
    for name, component in {**transforms, **sinks}.items():
        inputs = component["inputs"]
        assert inputs, name
        for upstream in inputs:
            assert upstream in sources or upstream in transforms, f"{name}: input {upstream}?"
            assert upstream != name, name
        consumed |= set(inputs)
    assert consumed == set(sources) | set(transforms), "a source or transform feeds nothing"
    for name, sink in sinks.items():
        assert sink["inputs"] == ["fedvault"], name  # every sink gets the parsed records
        assert sink["encoding"]["codec"] == "json", name
    assert transforms["fedvault"]["type"] == "remap"
    # No plain-HTTP endpoint, no disabled verification, in what is configured.
    text = "\n".join(
        line.split("#", 1)[0] for line in VECTOR_CONFIGS[flavour].read_text().splitlines()
    )
    assert "http://" not in text
    assert "verify_certificate: false" not in text


def test_vector_samples_share_one_transform_reading_fields_fedvault_emits() -> None:
    compose_source = _remap_source(_vector(VECTOR_CONFIGS["compose"]))
    assert compose_source == _remap_source(_vector(VECTOR_CONFIGS["standalone"]))
    lines = _fedvault_log_lines()
    emitted = set.intersection(*(set(line) for line in lines))
    assert {"timestamp", "level", "component", "message"} <= emitted
    assert lines[0]["request_id"] == "req-1"
    # Fields the remap reads or writes: each is one fedvault writes, one the
    # remap sets itself (the service name), or the docker_logs event's own.
    fields = set(re.findall(r"(?<![\w\"%])\.([a-z_]+)", compose_source))  # not "%.f"
    assigned = set(re.findall(r"^\s*\.([a-z_]+)\s*=", compose_source, re.MULTILINE))
    assert fields - assigned <= emitted | DOCKER_LOGS_FIELDS, fields - assigned
    assert {"timestamp", "level", "component"} <= fields
    # The sinks' templates (file path, Loki labels) name only fields every record has.
    for path in VECTOR_CONFIGS.values():
        sinks = yaml.safe_dump(_vector(path)["sinks"])
        for used in re.findall(r"\{\{\s*(\w+)\s*\}\}", sinks):
            assert used in emitted | assigned, f"{path.name}: {{{{ {used} }}}}"
    # The timestamp format the remap parses (chrono's) is the one fedvault writes.
    chrono = re.search(r'parse_timestamp\(\.timestamp, "([^"]+)"\)', compose_source)
    assert chrono is not None
    from datetime import datetime

    python_format = chrono.group(1).replace("%.f", ".%f")
    for line in lines:
        datetime.strptime(line["timestamp"], python_format)


def test_vector_remap_parses_real_fedvault_lines() -> None:
    """Vector's own VRL (through pyvrl, when installed) on real lines, JSON and not."""
    import json

    pyvrl = pytest.importorskip("pyvrl")
    program = pyvrl.Transform(_remap_source(_vector(VECTOR_CONFIGS["compose"])) + "\n.")
    label = {"com.docker.compose.service": "gateway"}
    received = "2026-12-08T00:00:00.123Z"
    event, _plain = _fedvault_log_lines()
    out = program.remap({"message": json.dumps(event), "timestamp": received, "label": label})
    assert out["service"] == "gateway"
    assert out["component"] == "fedvault.gateway"
    assert out["level"] == "WARNING"
    assert out["message"] == "gateway_started"
    assert out["request_id"] == "req-1"
    assert out["http_port"] == 8080
    assert out["timestamp"].isoformat(timespec="milliseconds").startswith(event["timestamp"][:23])
    text = program.remap({"message": "INFO flwr: started", "timestamp": received, "label": label})
    assert text == {
        "timestamp": received,
        "level": "UNPARSED",
        "component": "gateway",
        "message": "INFO flwr: started",
        "service": "gateway",
    }
