"""server/gateway/codec.py: large REST bodies decoded and encoded in worker processes.

With both thresholds at zero every call goes through a worker and the spool,
and must give exactly what the inline codecs give: same tensors, same bytes,
same errors. The spool is left empty, a cancelled call's files are removed
once its job ends, and a dead worker is a 503 followed by a working pool.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedvault.errors import InvalidRequestError, UnavailableError
from server.gateway.codec import CodecPool
from server.gateway.tensors import (
    InferRequest,
    InferResponse,
    RequestedOutput,
    Tensor,
    decode_rest_request,
    encode_rest_response,
)


@pytest.fixture(scope="module")
def pool() -> Iterator[CodecPool]:
    codec = CodecPool(2, offload_bytes=0, offload_elements=0)
    codec.start().result(timeout=60)
    yield codec
    codec.close()


def _spool_files(pool: CodecPool) -> list[str]:
    directory = pool._spool_dir()
    return sorted(os.listdir(directory))


def _bodies() -> dict[str, tuple[bytes, str | None]]:
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    raw = x.astype("<f4").tobytes()
    words = [b"alpha", b"", "b\u00e9ta".encode()]
    serialised = b"".join(struct.pack("<I", len(w)) + w for w in words)
    head = json.dumps(
        {
            "id": "r-1",
            "parameters": {"binary_data_output": True},
            "inputs": [
                {
                    "name": "x",
                    "shape": [3, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                },
                {
                    "name": "w",
                    "shape": [3],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(serialised)},
                },
                {"name": "n", "shape": [2], "datatype": "INT64", "data": [-1, 2**40]},
                {"name": "b", "shape": [0, 4], "datatype": "BOOL", "data": []},
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": False}}],
        }
    ).encode()
    json_only = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [3, 4], "datatype": "FP64", "data": x.tolist()},
                {"name": "c", "shape": [1, 3], "datatype": "BYTES", "data": [["a", "", "z"]]},
                {"name": "t", "shape": [2], "datatype": "BOOL", "data": [True, False]},
            ]
        }
    ).encode()
    return {
        "json": (json_only, None),
        "binary": (head + raw + serialised, str(len(head))),
    }


@pytest.mark.parametrize("case", ["json", "binary"])
def test_decode_in_a_worker_equals_inline(pool: CodecPool, case: str) -> None:
    body, header = _bodies()[case]
    chunks = [body[i : i + 7] for i in range(0, len(body), 7)]  # as it arrived
    got = asyncio.run(pool.decode("m", "2", chunks, header))
    want = decode_rest_request("m", "2", body, header)
    assert (got.model_name, got.model_version, got.id) == ("m", "2", want.id)
    assert got.parameters == want.parameters
    assert got.outputs == want.outputs
    assert len(got.inputs) == len(want.inputs)
    for g, w in zip(got.inputs, want.inputs, strict=True):
        assert (g.name, g.datatype, g.shape, dict(g.parameters)) == (
            w.name,
            w.datatype,
            w.shape,
            dict(w.parameters),
        )
        assert g.data.dtype == w.data.dtype
        assert g.data.shape == w.data.shape
        assert g.data.tolist() == w.data.tolist()
    assert _spool_files(pool) == []


def test_encode_in_a_worker_equals_inline(pool: CodecPool) -> None:
    request = InferRequest(
        "m",
        None,
        [],
        [RequestedOutput("logits", binary=True), RequestedOutput("class")],
        "r-9",
        {},
    )
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 3)).astype(np.float32)
    response = InferResponse(
        "m",
        "1",
        [
            Tensor("logits", "FP32", (50, 3), logits),
            Tensor("probabilities", "FP32", (50, 3), logits[:, ::-1]),  # not contiguous
            Tensor("class", "INT64", (50,), logits.argmax(axis=1).astype(np.int64)),
            Tensor("none", "FP32", (0, 3), np.empty((0, 3), np.float32)),
        ],
        "r-9",
        {"note": "x"},
    )
    assert asyncio.run(pool.encode(request, response)) == encode_rest_response(request, response)
    assert _spool_files(pool) == []


def test_malformed_body_is_the_same_invalid_request(pool: CodecPool) -> None:
    for body in (b"[" * 100_000, b'{"inputs": []} trailing', b"\xff\xfe"):
        with pytest.raises(InvalidRequestError) as inline:
            decode_rest_request("m", None, body, None)
        with pytest.raises(InvalidRequestError) as offloaded:
            asyncio.run(pool.decode("m", None, [body], None))
        assert str(offloaded.value) == str(inline.value)
    assert _spool_files(pool) == []


def test_a_cancelled_call_leaves_no_spool_file(pool: CodecPool) -> None:
    x = np.zeros((40_000, 30), dtype=np.float32)
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}]}
    ).encode()

    async def cancel_midway() -> None:
        task = asyncio.create_task(pool.decode("m", None, [body], None))
        await asyncio.sleep(0.05)  # submitted, the worker decoding
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    deadline = time.monotonic() + 30
    while _spool_files(pool) and time.monotonic() < deadline:
        time.sleep(0.05)  # the job runs to its end; its output is removed then
    assert _spool_files(pool) == []


def test_a_dead_worker_is_a_503_then_a_fresh_pool(tmp_path: Path) -> None:
    codec = CodecPool(1, offload_bytes=0)
    try:
        codec.start().result(timeout=60)
        body, header = _bodies()["json"]
        executor = codec._pool()
        (pid,) = list(executor._processes)  # the one worker
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)  # the pool notices its worker died
        with pytest.raises(UnavailableError, match="codec worker stopped"):
            asyncio.run(codec.decode("m", None, [body], header))
        assert asyncio.run(codec.decode("m", None, [body], header)).inputs[0].name == "x"
    finally:
        codec.close()


def test_a_spool_that_cannot_be_written_is_a_503(
    pool: CodecPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from server.gateway import codec

    def full(fd: int, chunks: object) -> None:
        os.close(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(codec, "_write_fd", full)
    body, header = _bodies()["json"]
    with pytest.raises(UnavailableError, match="No space left on device"):
        asyncio.run(pool.decode("m", None, [body], header))
    assert _spool_files(pool) == []


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (an exited, unreaped one is a zombie: not live)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_workers_end_when_the_gateway_is_killed(tmp_path: Path) -> None:
    """kill -9 of the gateway cannot shut its pool down: the workers notice and exit."""
    script = (
        "import os, signal\n"
        "from server.gateway.codec import CodecPool\n"
        "pool = CodecPool(2)\n"
        "pool.start().result(60)\n"
        "print(' '.join(map(str, pool._pool()._processes)), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("w") as stdout, err.open("w") as stderr:  # files: a worker may keep them open
        proc = subprocess.run(
            [sys.executable, "-c", script],
            stdout=stdout,
            stderr=stderr,
            cwd=Path(__file__).resolve().parents[1],
            timeout=120,
        )
    assert proc.returncode == -signal.SIGKILL, err.read_text()[-2000:]
    workers = [int(pid) for pid in out.read_text().split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 15
    while any(map(_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_running, workers))
