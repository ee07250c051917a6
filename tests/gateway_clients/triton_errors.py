"""Provoke gateway errors through stock tritonclient (HTTP); print what it reports as JSON.

Usage: python -m tests.gateway_clients.triton_errors HTTP_HOST:PORT TOKEN MODEL
Prints ``{case: {"status": ..., "message": ...}}``: the status tritonclient
parsed and the message it shows a user (``InferenceServerException.message()``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def main() -> None:
    http_url, token, model = sys.argv[1:4]
    client = httpclient.InferenceServerClient(http_url)

    def headers() -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}  # tritonclient adds to the dict given

    x = np.zeros((2, 30), dtype=np.float32)
    good = httpclient.InferInput("features", list(x.shape), "FP32")
    good.set_data_from_numpy(x)
    misnamed = httpclient.InferInput("pixels", list(x.shape), "FP32")
    misnamed.set_data_from_numpy(x)
    cases: dict[str, Callable[[], object]] = {
        "unknown_model_metadata": lambda: client.get_model_metadata(
            "no-such-model", headers=headers()
        ),
        "unknown_model_infer": lambda: client.infer("no-such-model", [good], headers=headers()),
        "unknown_version": lambda: client.infer(
            model, [good], model_version="9", headers=headers()
        ),
        "bad_input_name": lambda: client.infer(model, [misnamed], headers=headers()),
        "no_key": lambda: client.get_model_metadata(model),
    }
    out: dict[str, dict[str, str | None]] = {}
    for name, call in cases.items():
        try:
            call()
            out[name] = {"status": "accepted", "message": None}
        except InferenceServerException as exc:
            out[name] = {"status": exc.status(), "message": exc.message()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
