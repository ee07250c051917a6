"""Decode and encode large REST infer bodies in worker processes, off the event loop.

Why: one valid 34 MB request (156,250 × 64 digits features) held the event
loop for seconds while ``json.loads``, ``np.asarray`` and, for the answer,
``tolist`` and the JSON encoder ran on it, so ``/v2/health/live`` and every
other request waited up to 4.6 s behind it. Why processes and not threads:
each of those is one C call that holds the GIL from start to end
(``json.loads`` 1.2 s, ``np.asarray`` 0.5 s on that body), so a worker
*thread* stalls the loop's thread just as long (measured: a 1 ms ticker
waited 2.3 s). A spawned process has its own interpreter and GIL.

Why a spool: what crosses to a worker through the pool's queues is pickled,
and pickling (or unpickling) tens of MB is one copy that holds the GIL too
(16 MB: 11-36 ms here; the body, the decoded arrays, the outputs and the
encoded answer are four such copies). So the bytes go through files in a
private tmpfs directory instead, written and read by helper threads
(``os.write`` and ``readinto`` release the GIL); only small descriptions and
BYTES tensors (Python objects) are pickled. As in
:mod:`secure.he.service`, which spools large HE payloads for the same reason.

Small bodies stay inline: a round trip to a worker costs about a
millisecond, more than decoding them, and they are the gateway's hot path.
Nothing here changes what happens around decoding — the caller has
authenticated, checked the grant and read the body (within the size limit)
before it calls :meth:`CodecPool.decode`, and the audit middleware still
records the answer before it is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

import anyio.to_thread
import numpy as np
from numpy.typing import NDArray

from fedvault.errors import UnavailableError
from fedvault.spool import make_spool
from server.gateway.tensors import (
    InferRequest,
    InferResponse,
    Tensor,
    decode_rest_request,
    encode_rest_response,
    wants_binary,
)

__all__ = ["OFFLOAD_BODY_BYTES", "OFFLOAD_JSON_ELEMENTS", "CodecPool"]

OFFLOAD_BODY_BYTES: Final = 128 * 1024
"""Bodies larger than this are decoded in a worker (inline: ≤ ~8 ms on a slow core)."""

OFFLOAD_JSON_ELEMENTS: Final = 32_768
"""Responses with more JSON-encoded output elements than this are encoded in a worker."""

PARENT_POLL_S: Final = 1.0
"""How often a worker checks that the gateway that started it is still there."""

SPOOL_MIN_FREE: Final = 1024**3
"""Free space ``/dev/shm`` needs to hold the spool (else the system temp directory)."""

T = TypeVar("T")


# ------------------------------------------------------------------ spool files
@dataclass(frozen=True, slots=True)
class Spooled:
    """Numeric arrays laid end to end in one spool file: (dtype, shape) of each, in order."""

    path: str
    arrays: tuple[tuple[str, tuple[int, ...]], ...]


def _new_file(directory: str) -> tuple[int, str]:
    """A new, empty spool file (0600): its descriptor and path."""
    return tempfile.mkstemp(dir=directory, suffix=".bin")


def _write_fd(fd: int, chunks: Sequence[bytes | memoryview]) -> None:
    """Write ``chunks`` in order to ``fd`` and close it (``os.write`` releases the GIL)."""
    try:
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            while view:
                view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _write_chunks(directory: str, chunks: Sequence[bytes | memoryview]) -> str:
    """A new spool file holding ``chunks`` (worker side: its caller owns the path)."""
    fd, path = _new_file(directory)
    try:
        _write_fd(fd, chunks)
    except BaseException:
        _unlink(path)
        raise
    return path


def _read_file(path: str) -> bytes:
    """A spool file's bytes, read into one new ``bytes`` (the read releases the GIL)."""
    with open(path, "rb", buffering=0) as f:
        return f.read()


def _write_arrays(fd: int, path: str, arrays: Sequence[NDArray[Any]]) -> Spooled:
    """Write ``arrays`` end to end to ``fd`` (then closed): their description."""
    contiguous = [np.ascontiguousarray(a) for a in arrays]
    _write_fd(fd, [a.data for a in contiguous if a.size])
    return Spooled(path, tuple((a.dtype.str, tuple(a.shape)) for a in contiguous))


def _read_arrays(spooled: Spooled) -> list[NDArray[Any]]:
    """The arrays of ``spooled``, read straight into new arrays (no intermediate copy)."""
    out: list[NDArray[Any]] = []
    with open(spooled.path, "rb", buffering=0) as f:
        for dtype, shape in spooled.arrays:
            array = np.empty(shape, dtype=np.dtype(dtype))
            view = array.data.cast("B") if array.size else memoryview(b"")
            while view:
                n = f.readinto(view)
                if not n:
                    raise OSError(f"spool file {spooled.path} ends early")
                view = view[n:]
            out.append(array)
    return out


def _unlink(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)


# ----------------------------------------------------------------- worker jobs
def _init_worker(parent: int) -> None:
    """Worker initialiser: outlive no gateway, and ignore Ctrl-C.

    Ctrl-C reaches the whole process group; only the gateway decides when to
    stop (it shuts the pool down), so a worker must not die first. But a
    gateway killed outright (``kill -9``, OOM) cannot shut the pool down, and
    a worker would wait on its queue forever (it holds the queue's write end
    itself, so it never sees end-of-file): a daemon thread ends the worker
    once ``parent`` is gone.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="codec-parent-watch", daemon=True).start()


def _ready() -> None:
    """Worker warm-up job: returning proves the worker started and imported the codecs."""


def _numeric(t: Tensor) -> bool:
    return bool(t.data.dtype != np.object_)


def _decode_job(
    body_path: str,
    directory: str,
    model_name: str,
    model_version: str | None,
    header_length: str | None,
) -> tuple[InferRequest, Spooled]:
    """Worker: decode the spooled body; numeric inputs go back spooled, the rest pickled."""
    request = decode_rest_request(model_name, model_version, _read_file(body_path), header_length)
    fd, path = _new_file(directory)
    try:
        spooled = _write_arrays(fd, path, [t.data for t in request.inputs if _numeric(t)])
    except BaseException:
        _unlink(path)
        raise
    empty = np.empty(0)
    inputs = [replace(t, data=empty) if _numeric(t) else t for t in request.inputs]
    return replace(request, inputs=inputs), spooled


def _encode_job(
    request: InferRequest, response: InferResponse, spooled: Spooled, directory: str
) -> tuple[str, int | None]:
    """Worker: encode the answer whose numeric outputs are spooled; the body goes back spooled."""
    arrays = iter(_read_arrays(spooled))
    outputs = [replace(t, data=next(arrays)) if _numeric(t) else t for t in response.outputs]
    payload, header_length = encode_rest_response(request, replace(response, outputs=outputs))
    return _write_chunks(directory, [payload]), header_length


def _json_elements(request: InferRequest, response: InferResponse) -> int:
    """Output elements the response writes as JSON numbers (binary ones are a memory copy)."""
    return sum(t.data.size for t in response.outputs if not wants_binary(request, t.name))


# ------------------------------------------------------------------------ pool
class CodecPool:
    """Where the REST infer codecs run: inline when small, else in a bounded process pool.

    The pool is spawned (never forked: the gateway runs threads, gRPC and
    SQLite connections), holds ``workers`` processes (default: one per core,
    at most 4), starts at :meth:`start` or the first large body, and is
    replaced if a worker dies. Its spool directory (mode 0700) lives in
    ``/dev/shm`` when that has room, and is removed by :meth:`close`; a spool
    that fails (full, say) makes the request a 503, never a 500.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        offload_bytes: int = OFFLOAD_BODY_BYTES,
        offload_elements: int = OFFLOAD_JSON_ELEMENTS,
    ) -> None:
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.offload_bytes = offload_bytes
        self.offload_elements = offload_elements
        self._executor: ProcessPoolExecutor | None = None
        self._spool: str | None = None
        self._lock = threading.Lock()

    async def decode(
        self,
        model_name: str,
        model_version: str | None,
        body: Sequence[bytes],
        header_length: str | None,
    ) -> InferRequest:
        """:func:`~server.gateway.tensors.decode_rest_request` of the body received as
        ``body`` (its chunks, in order), in a worker when large.

        Chunks, not one ``bytes``: joining tens of MB is a copy on the event
        loop; a large body goes to the spool chunk by chunk instead. A
        malformed body raises the same :class:`~fedvault.errors.InvalidRequestError`
        either way (it pickles across by its message).
        """
        if sum(map(len, body)) <= self.offload_bytes:
            joined = body[0] if len(body) == 1 else b"".join(body)
            return decode_rest_request(model_name, model_version, joined, header_length)
        try:
            return await self._decode_offloaded(model_name, model_version, body, header_length)
        except OSError as exc:
            raise _spool_failed(exc) from None

    async def encode(
        self, request: InferRequest, response: InferResponse
    ) -> tuple[bytes, int | None]:
        """:func:`~server.gateway.tensors.encode_rest_response`, in a worker when large."""
        if _json_elements(request, response) <= self.offload_elements:
            return encode_rest_response(request, response)
        try:
            return await self._encode_offloaded(request, response)
        except OSError as exc:
            raise _spool_failed(exc) from None

    async def _decode_offloaded(
        self,
        model_name: str,
        model_version: str | None,
        body: Sequence[bytes],
        header_length: str | None,
    ) -> InferRequest:
        directory = self._spool_dir()
        fd, body_path = _new_file(directory)  # made here, so removed here whatever happens
        try:
            await anyio.to_thread.run_sync(_write_fd, fd, body)
            request, spooled = await self._run(
                _decode_job, body_path, directory, model_name, model_version, header_length
            )
        finally:
            _unlink(body_path)
        try:
            arrays = iter(await anyio.to_thread.run_sync(_read_arrays, spooled))
        finally:
            _unlink(spooled.path)
        inputs = [replace(t, data=next(arrays)) if _numeric(t) else t for t in request.inputs]
        return replace(request, inputs=inputs)

    async def _encode_offloaded(
        self, request: InferRequest, response: InferResponse
    ) -> tuple[bytes, int | None]:
        directory = self._spool_dir()
        numeric = [t.data for t in response.outputs if _numeric(t)]
        empty = np.empty(0)
        # The worker needs the outputs' names and types and the request's output
        # choices; the arrays travel spooled and the inputs stay here.
        outputs = [replace(t, data=empty) if _numeric(t) else t for t in response.outputs]
        fd, arrays_path = _new_file(directory)
        try:
            spooled = await anyio.to_thread.run_sync(_write_arrays, fd, arrays_path, numeric)
            path, header_length = await self._run(
                _encode_job,
                replace(request, inputs=()),
                replace(response, outputs=outputs),
                spooled,
                directory,
            )
        finally:
            _unlink(arrays_path)
        try:
            return await anyio.to_thread.run_sync(_read_file, path), header_length
        finally:
            _unlink(path)

    def start(self) -> Future[None]:
        """Start every worker now, in the background; done when all answered.

        Why: a worker otherwise starts at the first large body, and that
        request waits for (and shares the machine's cores with) its start-up.
        The gateway calls this once it listens; never on the event loop's
        critical path (spawning happens on a helper thread).
        """
        done: Future[None] = Future()

        def warm() -> None:
            try:
                pool = self._pool()
                # One job per worker, all in flight at once: each submit finding
                # no idle worker spawns one, up to ``workers``.
                jobs = [pool.submit(_ready) for _ in range(self.workers)]
                for job in jobs:
                    job.result()
                done.set_result(None)
            except Exception as exc:  # reported through the future, never raised here
                done.set_exception(exc)

        threading.Thread(target=warm, name="codec-pool-start", daemon=True).start()
        return done

    def close(self) -> None:
        """Stop the workers and remove the spool (idempotent; both restart on next use)."""
        with self._lock:
            executor, self._executor = self._executor, None
            spool, self._spool = self._spool, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        if spool is not None:
            shutil.rmtree(spool, ignore_errors=True)

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    max_workers=self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker,
                    initargs=(os.getpid(),),
                )
            return self._executor

    def _spool_dir(self) -> str:
        with self._lock:
            if self._spool is None or not os.path.isdir(self._spool):  # tmp cleaners
                # Named by pid: a gateway killed -9 leaves its spool, the next removes it.
                self._spool = make_spool("fedvault-codec-", _spool_base())
                # Removed by close(), else when the pool is collected or at exit.
                weakref.finalize(self, shutil.rmtree, self._spool, True)
            return self._spool

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in the pool; a dead worker becomes a 503 and a new pool.

        Submitted from a thread: ``submit`` starts a worker process when none is
        idle (fork+exec of a large parent, tens to hundreds of ms), which must
        not happen on the loop either. Cancelled (the request's deadline
        passed): a job not yet started is dropped; one already running
        finishes, bounded by the body-size limit, and the spool file it then
        writes is removed when it does.
        """
        executor = self._pool()
        submitted: list[Future[T]] = []  # set on the thread, seen here even if cancelled
        try:
            await anyio.to_thread.run_sync(lambda: submitted.append(executor.submit(fn, *args)))
            return await asyncio.wrap_future(submitted[0])
        except BrokenProcessPool:
            with self._lock:
                if self._executor is executor:
                    self._executor = None
            executor.shutdown(wait=False, cancel_futures=True)
            raise UnavailableError("a request codec worker stopped; retry") from None
        except asyncio.CancelledError:
            for future in submitted:
                future.add_done_callback(_discard_output)
            raise


def _spool_base() -> str | None:
    """``/dev/shm`` when it is writable and roomy, else the system's temporary directory.

    Why the room check: a container's ``/dev/shm`` is 64 MB by default, less
    than one largest body and its arrays; there the spool goes to disk
    (through the page cache: still no GIL-holding copy).
    """
    shm = "/dev/shm"  # noqa: S108 (mkdtemp in it: unique name, mode 0700)
    try:
        if os.access(shm, os.W_OK):
            stat = os.statvfs(shm)
            if stat.f_bavail * stat.f_frsize >= SPOOL_MIN_FREE:
                return shm
    except OSError:
        pass
    return None


def _spool_failed(exc: OSError) -> UnavailableError:
    """A spool file could not be written or read (full, removed): 503, the caller may retry."""
    return UnavailableError(
        f"the server could not stage this request's data ({exc.strerror or type(exc).__name__})"
    )


def _discard_output(future: Future[Any]) -> None:
    """Remove the spool file(s) a job finished after its caller gave up wrote."""
    if future.cancelled() or future.exception() is not None:
        return
    result = future.result()
    if isinstance(result, tuple) and result:
        first = result[0]
        if isinstance(first, str):
            _unlink(first)  # _encode_job: the answer's path
        elif len(result) > 1 and isinstance(result[1], Spooled):
            _unlink(result[1].path)  # _decode_job: the decoded arrays
