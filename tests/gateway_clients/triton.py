"""Drive a gateway with stock tritonclient (HTTP and gRPC); print what it saw as JSON.

Usage: python -m tests.gateway_clients.triton HTTP_HOST:PORT GRPC_HOST:PORT TOKEN MODEL
Reads raw features (float32, row-major, n×d) from stdin's JSON list.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def main() -> None:
    http_url, grpc_url, token, model = sys.argv[1:5]
    x = np.asarray(json.loads(sys.stdin.read()), dtype=np.float32)
    auth = {"Authorization": f"Bearer {token}"}

    def headers() -> dict[str, str]:
        return dict(auth)  # tritonclient's HTTP infer adds its own entries to the dict given

    grpc_headers = {"authorization": f"Bearer {token}"}  # gRPC metadata keys are lower case

    out: dict[str, object] = {}

    h = httpclient.InferenceServerClient(http_url)
    out["http_live"] = h.is_server_live()
    out["http_meta"] = h.get_model_metadata(model, headers=headers())
    out["http_server"] = h.get_server_metadata(headers=headers())
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # binary_data=True by default
    res = h.infer(model, [inp], headers=headers())
    out["http_logits"] = res.as_numpy("logits").tolist()
    out["http_class"] = res.as_numpy("class").tolist()
    out["http_version"] = res.get_response()["model_version"]
    wanted = [httpclient.InferRequestedOutput("probabilities", binary_data=False)]
    res = h.infer(model, [inp], outputs=wanted, headers=headers(), model_version="1")
    out["http_probs_v1"] = res.as_numpy("probabilities").tolist()
    bad = httpclient.InferInput("features", [x.shape[0], x.shape[1] - 1], "FP32")
    bad.set_data_from_numpy(x[:, :-1])
    try:
        h.infer(model, [bad], headers=headers())
        out["http_bad"] = "accepted"
    except InferenceServerException as exc:
        out["http_bad"] = exc.status()
    try:
        h.get_model_metadata(model)
        out["http_nokey"] = "accepted"
    except InferenceServerException as exc:
        out["http_nokey"] = exc.status()

    g = grpcclient.InferenceServerClient(grpc_url)
    out["grpc_live"] = g.is_server_live()
    out["grpc_meta"] = g.get_model_metadata(model, headers=grpc_headers, as_json=True)
    gin = grpcclient.InferInput("features", list(x.shape), "FP32")
    gin.set_data_from_numpy(x)
    gres = g.infer(model, [gin], headers=grpc_headers)
    out["grpc_logits"] = gres.as_numpy("logits").tolist()
    out["grpc_class"] = gres.as_numpy("class").tolist()
    gbad = grpcclient.InferInput("features", [x.shape[0], x.shape[1] - 1], "FP32")
    gbad.set_data_from_numpy(x[:, :-1])
    try:
        g.infer(model, [gbad], headers=grpc_headers)
        out["grpc_bad"] = "accepted"
    except InferenceServerException as exc:
        out["grpc_bad"] = exc.status()
    try:
        g.get_model_metadata(model)
        out["grpc_nokey"] = "accepted"
    except InferenceServerException as exc:
        out["grpc_nokey"] = exc.status()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
