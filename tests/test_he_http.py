"""HE over real HTTP: uvicorn on a loopback port, the SDK, the README recipes, the CLI.

No mocks: a registry with sealed models, the FastAPI router served by
uvicorn, httpx on the client side, and ``fedvault he serve``/``predict`` as
real processes for the end-to-end CLI test.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fedvault import errors
from fedvault.errors import problem_type
from fedvault.modelspec import ModelSpec, init_parameters
from fedvault.schema import builtin_schema
from fedvault.stats import Scaler
from secure.client import HEClient, HEKeys, params_from_metadata
from secure.he.plan import compile_plan
from secure.he.service import HEService
from server.he_api import RegistryCatalog, create_app, registry_model_source
from tests.he_support import dataset, free_port, live_server, make_registry, register, trained

README = Path(__file__).resolve().parents[1] / "README.md"
H = {"X-Fedvault-Caller": "clinic-7"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    home = tmp_path_factory.mktemp("he-home")
    store, registry = make_registry(home)
    ids = {"bc": register(registry, "bc-logreg", "breast-cancer", "logreg")}
    relu = ModelSpec(kind="mlp", n_features=30, n_classes=2, hidden=4, activation="relu")
    ids["relu"] = registry.register(
        name="bc-relu",
        run_id="run-he",
        spec=relu,
        params=init_parameters(relu, 0),
        scaler=Scaler(np.zeros(30), np.ones(30)),
        lineage={"run_id": "run-he", "dataset": "breast-cancer", "private": False},
    )
    store.close()

    def open_registry() -> tuple[Any, Any]:
        return make_registry(home, create_run=False)

    service = HEService(registry_model_source(open_registry))
    try:
        with live_server(create_app(service, RegistryCatalog(open_registry))) as url:
            yield url, ids
    finally:
        service.close()


def _reference(rows: np.ndarray) -> np.ndarray:
    spec, params, scaler = trained("breast-cancer", "logreg")
    return compile_plan(spec, params, scaler).forward(rows)


@pytest.mark.parametrize("layout", ["vector", "batch"])
def test_sdk_predicts_like_plaintext(served: tuple[str, dict[str, str]], layout: str) -> None:
    url, ids = served
    x = dataset("breast-cancer")[2][:3]
    with HEClient(url, caller="clinic-7") as client:
        result = client.predict(ids["bc"], x, layout=layout)  # type: ignore[arg-type]
    ref = _reference(x)
    assert np.abs(result.logits - ref).max() < 1e-3
    names = builtin_schema("breast-cancer").classes
    assert result.classes == [names[i] for i in ref.argmax(axis=1)]


def _recipe(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- he-recipe:{name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"README lost its {name} recipe"
    code = match.group(1)
    assert len(code.strip().splitlines()) <= 10
    return code


@pytest.mark.parametrize("layout", ["vector", "batch"])
def test_readme_recipe_runs_verbatim(served: tuple[str, dict[str, str]], layout: str) -> None:
    url, ids = served
    x = dataset("breast-cancer")[2][:5]
    scope: dict[str, Any] = {"URL": url, "MODEL": ids["bc"], "H": H, "features": list(x[0]), "X": x}
    exec(compile(_recipe(layout), f"README:{layout}", "exec"), scope)  # noqa: S102
    ref = _reference(x)
    if layout == "vector":
        assert len(scope["logits"]) == ref.shape[1]  # the recipe keeps the k logit slots
        got = np.array(scope["logits"])
        assert np.abs(got - ref[0]).max() < 1e-3
    else:
        got = np.array(scope["logits"]).T
        assert np.abs(got - ref).max() < 1e-3


@pytest.mark.parametrize("layout", ["vector", "batch"])
def test_readme_recipe_raises_an_http_error_on_a_4xx(
    served: tuple[str, dict[str, str]], layout: str
) -> None:
    """A refused call stops the recipe with the HTTP status, not a KeyError on the body."""
    url, ids = served
    x = dataset("breast-cancer")[2][:2]
    for model, headers, code in (("no-such-model", H, 404), (ids["bc"], {}, 401)):
        scope: dict[str, Any] = {
            "URL": url,
            "MODEL": model,
            "H": headers,
            "features": list(x[0]),
            "X": x,
        }
        with pytest.raises(httpx.HTTPStatusError, match=f"{code}") as raised:
            exec(compile(_recipe(layout), f"README:{layout}", "exec"), scope)  # noqa: S102
        assert raised.value.response.status_code == code


def test_errors_are_problem_json(served: tuple[str, dict[str, str]]) -> None:
    url, ids = served
    bc = ids["bc"]

    def status(response: httpx.Response, code: int, name: str) -> dict[str, Any]:
        assert response.status_code == code, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        body: dict[str, Any] = response.json()
        # The shared handler (server.problem): stable type URIs, as the gateway answers.
        assert body["type"] == problem_type(getattr(errors, name))
        assert body["status"] == code
        assert "Traceback" not in body["detail"]
        return body

    with httpx.Client(base_url=url, timeout=60) as http:
        status(http.get(f"/v2/models/{bc}/he"), 401, "AuthenticationError")
        status(http.get("/v2/models/nope/he", headers=H), 404, "NotFoundError")
        body = status(
            http.get(f"/v2/models/{ids['relu']}/he", headers=H), 422, "UnsupportedModelError"
        )
        assert "relu" in body["detail"]
        meta = http.get(f"/v2/models/{bc}/he", headers=H).json()
        keys = HEKeys.create(params_from_metadata(meta), galois=False, relin=False)
        status(
            http.post(
                f"/v2/models/{bc}/he/contexts",
                headers=H,
                content=keys.context.serialize(save_secret_key=True),
            ),
            403,
            "PermissionDeniedError",
        )
        too_big = meta["limits"]["context_bytes"] + 1
        status(
            http.post(f"/v2/models/{bc}/he/contexts", headers=H, content=b"\0" * too_big),
            413,
            "PayloadTooLargeError",
        )
        cid = http.post(
            f"/v2/models/{bc}/he/contexts", headers=H, content=keys.public_bytes()
        ).json()["context_id"]
        infer = f"/v2/models/{bc}/he/infer"
        req = {"context_id": cid, "layout": "batch", "inputs": ["not base64!"]}
        status(http.post(infer, headers=H, json=req), 400, "InvalidRequestError")
        body = status(http.post(infer, headers=H, content=b"{"), 400, "InvalidRequestError")
        assert body["detail"].startswith("infer request body is not JSON")
        req = {"context_id": "unknown", "layout": "batch", "inputs": ["AAAA"]}
        status(http.post(infer, headers=H, json=req), 404, "NotFoundError")
        other = {"X-Fedvault-Caller": "someone-else"}
        req = {"context_id": cid, "layout": "batch", "inputs": ["AAAA"]}
        status(http.post(infer, headers=other, json=req), 403, "PermissionDeniedError")
        assert http.delete(f"/v2/he/contexts/{cid}", headers=H).status_code == 204
        status(http.post(infer, headers=H, json=req), 404, "NotFoundError")
    # The SDK maps the type URI back to the class.
    with HEClient(url, caller="clinic") as client, pytest.raises(errors.NotFoundError, match="404"):
        client.metadata("nope")


def _wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/docs", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("fedvault he serve did not come up")


def test_cli_predict_end_to_end(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store, registry = make_registry(home)
    model_id = register(registry, "bc-logreg", "breast-cancer", "logreg")
    store.close()
    x = dataset("breast-cancer")[2][:4]
    schema = builtin_schema("breast-cancer")
    rows = tmp_path / "rows.csv"
    with rows.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*schema.feature_names, schema.label])
        for sample in x:
            writer.writerow([*map(repr, sample.tolist()), schema.classes[0]])
    fedvault = str(Path(sys.executable).parent / "fedvault")
    port = free_port()
    env = {**os.environ, "FEDVAULT_HOME": str(home)}
    log = tmp_path / "serve.log"  # a file, not a pipe: orphaned workers would hold a pipe open
    with log.open("wb") as sink:  # the child keeps its own descriptor
        server = subprocess.Popen(
            [fedvault, "he", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url)
        key_file = tmp_path / "keys" / "he.ctx"
        done = subprocess.run(
            [fedvault, "he", "predict", "--model", model_id, "--csv", str(rows), "--url", url,
             "--layout", "batch", "--key-file", str(key_file), "--json"],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        ref = _reference(x)
        got = np.array([p["logits"] for p in out["predictions"]])
        assert np.abs(got - ref).max() < 1e-3
        assert [p["class"] for p in out["predictions"]] == [
            schema.classes[i] for i in ref.argmax(axis=1)
        ]
        assert key_file.stat().st_mode & 0o777 == 0o600
        bad = subprocess.run(
            [fedvault, "he", "predict", "--model", "missing", "--csv", str(rows), "--url", url],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert bad.returncode == 7, bad.stderr  # NotFoundError's exit code
        assert "Traceback" not in bad.stderr
        workers = _descendants(server.pid)
        assert workers, "the encrypted infer ran in the evaluation pool's processes"
        server.terminate()  # what systemd, docker stop and Ctrl-C-in-a-pipeline send
        assert server.wait(timeout=30) == 0, log.read_text(errors="replace")
        deadline = time.monotonic() + 10
        while (alive := [pid for pid in workers if Path(f"/proc/{pid}").exists()]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert not alive, f"pool workers outlived `he serve`: {alive}"
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=10)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; no psutil in the dependencies)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split()
        for child in map(int, children):
            found += [child, *_descendants(child)]
    return found
