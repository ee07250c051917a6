"""Multi-host federation on one machine: network namespaces joined by veth pairs.

Topology (one /24 per partner link, no routing between partners)::

    fv-op (operator)                       fv-pN (partner N)
    SuperLink 127.0.0.1:CTRL (all APIs)
    Fleet proxy 0.0.0.0:9092 ── veth ──── node (fedvault node start --kit)
      10.77.N.1                             10.77.N.2, health :9400 (TLS)

Checked: a DP training job (2 rounds) finishes across three partner
namespaces, each node started from its own kit; a revoked kit, a kit of
another federation (TLS trust) and another federation's key with our CA (node
authentication) are refused; a running node whose kit is revoked is cut off;
from a partner namespace the SuperLink's own port (Control/Runtime APIs) is
unreachable and the proxy answers 404 to Control and Runtime paths, while the
Fleet API works (the training). Needs root (``ip netns add``): skipped where
namespaces cannot be created, except under ``FEDVAULT_REQUIRE_NETNS=1`` (CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedvault.cli.processes import ManagedProcess, ProcessGroup, child_env
from fedvault.datasets import split_dataset

pytestmark = pytest.mark.integration

FLEET_PORT = 9092
HEALTH_PORT = 9400
CONTROL_PORT = 9093
PARTNERS = ["alpha", "beta", "gamma"]
ANY = "0.0.0.0"  # noqa: S104 - inside a test namespace: the veth address


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)


def _require_netns() -> None:
    probe = f"fvprobe{uuid.uuid4().hex[:6]}"
    result = _ip("netns", "add", probe)
    if result.returncode == 0:
        _ip("netns", "del", probe)
        return
    reason = f"cannot create network namespaces: {result.stderr.strip() or 'ip missing'}"
    if os.environ.get("FEDVAULT_REQUIRE_NETNS") == "1":
        pytest.fail(f"{reason}, but FEDVAULT_REQUIRE_NETNS=1 requires this test")
    pytest.skip(reason)


@dataclass
class Net:
    op: str
    partners: list[str]  # namespace per partner index

    def op_ip(self, i: int) -> str:
        return f"10.77.{i + 1}.1"

    def partner_ip(self, i: int) -> str:
        return f"10.77.{i + 1}.2"


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    if shutil.which("ip") is None:
        if os.environ.get("FEDVAULT_REQUIRE_NETNS") == "1":
            pytest.fail("`ip` (iproute2) is missing but FEDVAULT_REQUIRE_NETNS=1")
        pytest.skip("`ip` (iproute2) is not installed")
    _require_netns()
    tag = uuid.uuid4().hex[:5]
    n = Net(op=f"fv-op-{tag}", partners=[f"fv-p{i}-{tag}" for i in range(len(PARTNERS))])
    created: list[str] = []
    try:
        for ns in [n.op, *n.partners]:
            assert _ip("netns", "add", ns).returncode == 0
            created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for i, ns in enumerate(n.partners):
            a, b = f"fvo{i}{tag}", f"fvp{i}{tag}"
            for cmd in (
                ["link", "add", a, "type", "veth", "peer", "name", b],
                ["link", "set", a, "netns", n.op],
                ["link", "set", b, "netns", ns],
                ["-n", n.op, "addr", "add", f"{n.op_ip(i)}/24", "dev", a],
                ["-n", ns, "addr", "add", f"{n.partner_ip(i)}/24", "dev", b],
                ["-n", n.op, "link", "set", a, "up"],
                ["-n", ns, "link", "set", b, "up"],
            ):
                result = _ip(*cmd)
                assert result.returncode == 0, (cmd, result.stderr)
        yield n
    finally:
        for ns in created:  # deleting a namespace deletes its veth ends
            _ip("netns", "del", ns)


def _fedvault(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "fedvault", *args]


def _run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=child_env(), check=False
    )


def _wait_log(proc: ManagedProcess, needle: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if needle in proc.log_path.read_text(errors="replace"):
            return
        proc.check_alive()
        time.sleep(0.3)
    raise AssertionError(f"{proc.name}: no {needle!r} after {timeout_s} s:\n{proc.log_tail(30)}")


def _wait_exit(proc: ManagedProcess, timeout_s: float) -> int:
    try:
        return proc.popen.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{proc.name} still running:\n{proc.log_tail(20)}") from None


def _curl(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return _run(["ip", "netns", "exec", ns, "curl", "-sS", "--max-time", "5", *args], timeout=30)


def test_federation_across_namespaces(net: Net, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        if os.environ.get("FEDVAULT_REQUIRE_NETNS") == "1":
            pytest.fail("curl is missing but FEDVAULT_REQUIRE_NETNS=1 requires this test")
        pytest.skip("curl is not installed")
    home, foreign_home = tmp_path / "operator", tmp_path / "other-federation"
    op_hosts = [net.op_ip(i) for i in range(len(PARTNERS))]
    host_args = [a for h in ["127.0.0.1", *op_hosts] for a in ("--host", h)]
    for name, where in (("itest", home), ("other", foreign_home)):
        result = _run(
            _fedvault(net.op, "federation", "init", name, "--home", str(where), "--partners", "")
            + host_args
        )
        assert result.returncode == 0, result.stderr
    split_dataset("digits", tmp_path / "data", partners=len(PARTNERS), alpha=1.0, seed=0)

    def add(h: Path, partner: str, i: int, out: Path) -> Path:
        result = _run(
            _fedvault(
                net.op,
                "partner",
                "add",
                partner,
                "--home",
                str(h),
                "--out",
                str(out),
                "--superlink",
                f"{net.op_ip(i)}:{FLEET_PORT}",
                "--epsilon-cap",
                "20",
                "--metrics-host",
                net.partner_ip(i),
            )
        )
        assert result.returncode == 0, result.stderr
        (out / "data").mkdir()
        for split in ("train.csv", "test.csv"):
            shutil.copy(tmp_path / "data" / f"partner-{min(i, 2)}" / split, out / "data" / split)
        return out

    kits = {p: add(home, p, i, tmp_path / "kits" / p) for i, p in enumerate(PARTNERS)}
    revoked_kit = add(home, "delta", 2, tmp_path / "kits" / "delta")
    foreign_kit = add(foreign_home, "alpha", 2, tmp_path / "foreign" / "alpha")
    # Another federation's key, but trusting our CA: only node authentication can refuse it.
    impostor_kit = tmp_path / "impostor"
    shutil.copytree(foreign_kit, impostor_kit)
    shutil.copy(home / "pki" / "ca.crt", impostor_kit / "ca.crt")
    shutil.rmtree(impostor_kit / "tls")

    with ProcessGroup() as group:
        up = group.start(
            "operator",
            _fedvault(
                net.op,
                "federation",
                "up",
                "--home",
                str(home),
                "--host",
                "127.0.0.1",
                "--port",
                str(CONTROL_PORT),
                "--fleet-host",
                ANY,
                "--fleet-port",
                str(FLEET_PORT),
            ),
            tmp_path / "logs" / "operator.log",
            child_env(),
        )
        _wait_log(up, "Fleet API for partners", 90)
        assert "registered nodes: alpha, beta, delta, gamma" in up.log_path.read_text()

        result = _run(_fedvault(net.op, "partner", "revoke", "delta", "--home", str(home)))
        assert result.returncode == 0, result.stderr
        assert "unregistered from the SuperLink" in result.stdout

        nodes = {}
        for i, partner in enumerate(PARTNERS):
            nodes[partner] = group.start(
                f"node-{partner}",
                _fedvault(
                    net.partners[i],
                    "node",
                    "start",
                    "--kit",
                    str(kits[partner]),
                    "--health-host",
                    ANY,
                    "--health-port",
                    str(HEALTH_PORT),
                ),
                tmp_path / "logs" / f"node-{partner}.log",
                child_env(),
            )

        # Partner side: the SuperLink's own port (Control + Runtime APIs) is not there,
        # and the proxy serves only Fleet paths.
        p0, link = net.partners[0], net.op_ip(0)
        refused = _curl(
            p0, "--cacert", str(kits["alpha"] / "ca.crt"), f"https://{link}:{CONTROL_PORT}/"
        )
        assert refused.returncode == 7, refused  # curl 7: failed to connect
        for path in ("/v1/control/list-nodes", "/v1/control/start-run", "/v1/runtime/get-nodes"):
            answer = _curl(
                p0,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                "--cacert",
                str(kits["alpha"] / "ca.crt"),
                f"https://{link}:{FLEET_PORT}{path}",
            )
            assert answer.stdout == "404", (path, answer)
        # ... and the operator does reach it on loopback in its own namespace.
        inside = _curl(
            net.op,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "--cacert",
            str(home / "pki" / "ca.crt"),
            f"https://127.0.0.1:{CONTROL_PORT}/v1/control/list-nodes",
        )
        assert inside.stdout not in ("404", "000"), inside

        # Refused nodes, each from a partner namespace.
        refusals = {
            "revoked": (revoked_kit, "did not accept this node"),
            "foreign": (foreign_kit, "not issued by this kit's federation CA"),
            "impostor": (impostor_kit, "did not accept this node"),
        }
        started = {
            what: group.start(
                f"refused-{what}",
                _fedvault(
                    net.partners[2], "node", "start", "--kit", str(kit), "--health-port", "0"
                ),
                tmp_path / "logs" / f"refused-{what}.log",
                child_env(),
            )
            for what, (kit, _) in refusals.items()
        }
        for partner in PARTNERS:
            _wait_log(nodes[partner], "accepted by the SuperLink", 90)
        for what, proc in started.items():
            assert _wait_exit(proc, 120) == 5, (what, proc.log_tail(20))
            assert refusals[what][1] in proc.log_path.read_text(), (what, proc.log_tail(20))

        # A DP training job across the three partner namespaces, over the Fleet proxy.
        result = _run(
            _fedvault(net.op, "train", "--home", str(home), "--rounds", "2", "--json"), timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads(result.stdout)
        assert summary["status"] == "finished"
        assert summary["rounds_completed"] == 2
        assert sorted(summary["epsilon_by_partner"]) == PARTNERS
        assert all(0 < eps <= 3.0 + 1e-6 for eps in summary["epsilon_by_partner"].values())

        # Node health and metrics, scraped over TLS from the operator's namespace.
        ca = str(home / "pki" / "ca.crt")
        metrics = _curl(
            net.op, "--cacert", ca, f"https://{net.partner_ip(0)}:{HEALTH_PORT}/metrics"
        )
        assert metrics.returncode == 0, metrics
        assert 'fedvault_node_rounds_done{dataset="digits",partner="alpha"} 2.0' in metrics.stdout
        health = _curl(net.op, "--cacert", ca, f"https://{net.partner_ip(1)}:{HEALTH_PORT}/healthz")
        assert json.loads(health.stdout)["status"] == "ok"

        # Revoking a running partner cuts its node off.
        result = _run(_fedvault(net.op, "partner", "revoke", "gamma", "--home", str(home)))
        assert result.returncode == 0, result.stderr
        assert _wait_exit(nodes["gamma"], 60) == 5
        assert "ended this node's session" in nodes["gamma"].log_path.read_text()
