"""The HE SDK through a real ``fedvault gateway start``: API key auth, and a clean HE shutdown.

The gateway process is stopped with SIGTERM, as an orchestrator would; its
HE service must then have closed its evaluation pool and removed its
``/dev/shm/fedvault-he-*`` spool (contexts with Galois keys are spooled).
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import numpy as np
import pytest

from fedvault import errors
from secure.client import HEClient
from server.gateway.keys import GatewayStore
from tests.gateway_support import MODEL, make_home
from tests.he_support import dataset
from tests.test_gateway_cli import gateway

SHM = Path("/dev/shm")  # where HEService spools (checked here, never written)


def _spools() -> set[str]:
    return {p.name for p in SHM.glob("fedvault-he-*")} if SHM.is_dir() else set()


def test_sdk_predicts_through_gateway_with_api_key_and_gateway_cleans_up(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    make_home(home)
    store = GatewayStore(home / "gateway.db")
    analyst, _ = store.create_key("analyst", models=frozenset({MODEL}))
    partner, _ = store.create_key("partner", partner="alpha")
    store.close()
    x = dataset("breast-cancer")[2][:2]
    before = _spools()
    with gateway(home, he=True) as (http_port, _grpc_port, proc):
        url = f"http://127.0.0.1:{http_port}"
        with HEClient(url, api_key=analyst) as client:
            result = client.predict(MODEL, x, layout="vector")
        plain = httpx.post(
            f"{url}/v2/models/{MODEL}/infer",
            json={
                "inputs": [
                    {
                        "name": "features",
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "data": x.astype(np.float32).ravel().tolist(),
                    }
                ],
                "outputs": [{"name": "logits"}],
            },
            headers={"Authorization": f"Bearer {analyst}"},
        )
        assert plain.status_code == 200, plain.text
        logits = np.asarray(plain.json()["outputs"][0]["data"]).reshape(x.shape[0], -1)
        assert np.abs(result.logits - logits).max() < 1e-2
        with (
            HEClient(url, api_key=partner) as refused,
            pytest.raises(errors.PermissionDeniedError, match="403"),
        ):
            refused.metadata(MODEL)
        with (
            HEClient(url, api_key="fvk_nope_nope") as unknown,
            pytest.raises(errors.AuthenticationError, match="401"),
        ):
            unknown.metadata(MODEL)
        ours = _spools() - before
        assert ours, "the Galois-key context should have gone through a /dev/shm spool"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert not (ours & _spools()), f"spool left behind: {sorted(ours & _spools())}"


def test_client_needs_a_credential() -> None:
    with pytest.raises(errors.ConfigError):
        HEClient("http://127.0.0.1:1")
