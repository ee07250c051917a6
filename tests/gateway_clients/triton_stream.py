"""Drive ModelStreamInfer with stock tritonclient (``start_stream``); print what it saw as JSON.

Usage: python -m tests.gateway_clients.triton_stream GRPC_HOST:PORT MODEL
Reads ``{"x": [[...]], "tokens": {"analyst": ..., "auditor": ...}}`` from
stdin (keys on stdin, not argv: argv is world-readable).

Scenarios, each its own stream: ``ok`` (5 messages, the middle one with a
wrong shape), ``auditor`` (a role without the infer grant, 2 messages),
``nokey`` and ``badkey`` (refused at stream start).
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def run_stream(
    url: str, model: str, token: str | None, inputs: list[Any], ids: list[str]
) -> list[dict[str, Any]]:
    """One stream: send every input, stop (waits for the answers), return them in order."""
    seen: list[dict[str, Any]] = []
    lock = threading.Lock()

    def callback(result: Any, error: InferenceServerException | None) -> None:
        with lock:
            if error is not None:
                seen.append({"error": error.message(), "status": error.status()})
            else:
                seen.append(
                    {
                        "id": result.get_response().id,
                        "version": result.get_response().model_version,
                        "logits": result.as_numpy("logits").tolist(),
                        "class": result.as_numpy("class").tolist(),
                    }
                )

    client = grpcclient.InferenceServerClient(url)
    headers = {"authorization": f"Bearer {token}"} if token else None
    client.start_stream(callback=callback, headers=headers)
    try:
        for inp, request_id in zip(inputs, ids, strict=True):
            try:
                client.async_stream_infer(model, [inp], request_id=request_id)
            except InferenceServerException:
                # The server ended the stream (refused at its start): the
                # callback already has the status; tritonclient refuses to send.
                break
    finally:
        client.stop_stream()
        client.close()
    return seen


def main() -> None:
    url, model = sys.argv[1:3]
    doc = json.loads(sys.stdin.read())
    x = np.asarray(doc["x"], dtype=np.float32)
    tokens: dict[str, str] = doc["tokens"]

    good = grpcclient.InferInput("features", list(x.shape), "FP32")
    good.set_data_from_numpy(x)
    bad = grpcclient.InferInput("features", [x.shape[0], x.shape[1] - 1], "FP32")
    bad.set_data_from_numpy(np.ascontiguousarray(x[:, :-1]))

    out = {
        "ok": run_stream(
            url,
            model,
            tokens["analyst"],
            [good, good, bad, good, good],
            [f"m{i}" for i in range(5)],
        ),
        "auditor": run_stream(url, model, tokens["auditor"], [good, good], ["a0", "a1"]),
        "nokey": run_stream(url, model, None, [good], ["n0"]),
        "badkey": run_stream(url, model, "fvk_000000000000_" + "x" * 43, [good], ["b0"]),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
