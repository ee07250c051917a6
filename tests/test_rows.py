"""clients.rows: tables larger than a node's memory budget spill to disk, and every
use of the table (loading, DP sums, evaluation, DP-SGD batches) gives the same
result as the in-memory table."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from clients.data import CsvFormat, count_valid_rows, load_partner_csv, load_partner_data
from clients.fused_dp import FusedPlan, run_steps
from clients.rows import MemoryRows, RowSink, SpilledRows, Storage
from clients.training import StandardisedRows, model_input
from fedvault.datasets import split_dataset
from fedvault.encoding import encoding_for
from fedvault.errors import DataError
from fedvault.modelspec import ModelSpec, init_parameters
from fedvault.schema import builtin_schema
from fedvault.stats import Scaler, clipped_sums, clipped_sums_of


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _spilled(table: np.ndarray, tmp_path: Path, block: int = 1000) -> SpilledRows:
    sink = RowSink(table.shape[1], memory_bytes=4096, spill_dir=tmp_path)
    for start in range(0, len(table), block):
        sink.commit(table[start : start + block])
    rows = sink.finish()
    assert isinstance(rows, SpilledRows)
    return rows


def test_a_spilled_table_reads_back_exactly_and_leaves_no_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    table = rng.normal(size=(40_000, 7)).astype(np.float32)
    before = _open_fds()
    rows = _spilled(table, tmp_path)
    assert list(tmp_path.iterdir()) == []  # unlinked at once: nothing to leave behind
    assert stat.S_IMODE(os.fstat(rows._fd).st_mode) == 0o600
    assert (rows.n_rows, rows.width) == table.shape
    np.testing.assert_array_equal(np.concatenate(list(rows.blocks(3000))), table)
    np.testing.assert_array_equal(rows.array(), table)
    # Batches of every density: sparse rows, dense chunks, unsorted, the last row.
    for idx in (
        rng.choice(40_000, size=50, replace=False),
        rng.permutation(40_000)[:20_000],
        np.sort(rng.choice(40_000, size=5_000, replace=False)),
        np.array([39_999, 0, 16_384, 16_383]),
        np.array([], dtype=np.intp),
    ):
        np.testing.assert_array_equal(rows.take(idx), table[idx])
    with pytest.raises(IndexError):
        rows.take(np.array([40_000]))
    rows.close()
    assert _open_fds() == before


def test_within_budget_a_table_stays_in_memory(tmp_path: Path) -> None:
    table = np.arange(60, dtype=np.float32).reshape(20, 3)
    sink = RowSink(3, memory_bytes=1 << 20, spill_dir=tmp_path, expected_rows=20)
    buf = sink.buffer(20)
    buf[:] = table
    sink.commit(buf)
    rows = sink.finish()
    assert isinstance(rows, MemoryRows)
    np.testing.assert_array_equal(rows.array(), table)
    assert not rows.array().flags.writeable


@pytest.mark.parametrize("name", ["flchain", "diamonds"])
def test_a_node_budget_spills_and_every_use_agrees(tmp_path: Path, name: str) -> None:
    split_dataset(name, tmp_path / "data", partners=2, seed=1)
    schema = builtin_schema(name)
    path = tmp_path / "data" / "partner-0" / "train.csv"
    spill = tmp_path / "spill"
    spill.mkdir()
    whole = load_partner_csv(path, schema)
    small = load_partner_csv(path, schema, storage=Storage(memory_bytes=16_384, spill_dir=spill))
    assert isinstance(whole.rows, MemoryRows)
    assert isinstance(small.rows, SpilledRows)
    assert list(spill.iterdir()) == []
    np.testing.assert_array_equal(small.features, whole.features)  # NaN where imputed, too
    np.testing.assert_array_equal(small.labels, whole.labels)
    enc = encoding_for(schema)
    one, blocks = clipped_sums(whole.features, enc), clipped_sums_of(small.rows.blocks(977), enc)
    np.testing.assert_allclose(blocks.sum, one.sum, rtol=1e-9)
    np.testing.assert_allclose(blocks.sum_sq, one.sum_sq, rtol=1e-9)
    assert blocks.count == one.count == whole.n_rows

    # DP-SGD on the spilled table, batch by batch, follows the in-memory run.
    scaler = Scaler(mean=np.nanmean(whole.features, axis=0), std=np.ones(enc.width))
    task = {"task": "regression", "loss": "huber"} if schema.is_regression else {}
    spec = ModelSpec.model_validate(
        {"kind": "logreg", "n_features": enc.width, "n_classes": schema.n_outputs, **task}
    )
    source = model_input(small.rows, scaler)
    assert isinstance(source, StandardisedRows)
    y = enc.encode_target(whole.labels)
    plan = FusedPlan(
        learning_rate=0.1,
        momentum=0.9,
        batch_size=64,
        steps=6,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        private=True,
        secure_mode=False,
        sample_rate=64 / whole.n_rows,
    )
    draws = [np.random.default_rng(s).random(whole.n_rows) for s in range(6)]
    batches = [np.flatnonzero(u < 0.03) for u in draws]
    start = init_parameters(spec, seed=0)
    in_memory, loss_a = run_steps(
        spec, start, model_input(whole.rows, scaler), y, batches, plan, np.random.default_rng(5)
    )
    spilled, loss_b = run_steps(spec, start, source, y, batches, plan, np.random.default_rng(5))
    for a, b in zip(in_memory, spilled, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)


def test_an_invalid_file_keeps_nothing_it_spilled(tmp_path: Path) -> None:
    schema = builtin_schema("diamonds")
    split_dataset("diamonds", tmp_path / "data", partners=1, seed=0)
    path = tmp_path / "data" / "partner-0" / "train.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    # A bad carat near the end, after many spilled blocks; quoted so the
    # exact path (which streams blocks into the sink) reads it.
    header = lines[0].split(",")
    carat = header.index("carat")
    cells = lines[-3].split(",")
    cells[carat] = '"heavy"'
    lines[-3] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spill = tmp_path / "spill"
    spill.mkdir()
    before = _open_fds()
    with pytest.raises(DataError) as info:
        load_partner_data(path, schema, storage=Storage(memory_bytes=4096, spill_dir=spill))
    assert info.value.line == len(lines) - 2
    assert info.value.column == "carat"
    assert list(spill.iterdir()) == []
    assert _open_fds() == before


def test_validating_only_counts_rows(tmp_path: Path) -> None:
    split_dataset("flchain", tmp_path / "data", partners=1, seed=0)
    path = tmp_path / "data" / "partner-0" / "train.csv"
    schema = builtin_schema("flchain")
    assert count_valid_rows(path, schema) == load_partner_csv(path, schema).n_rows > 1000


def test_a_spill_directory_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    sink = RowSink(2, memory_bytes=8, spill_dir=tmp_path / "absent")
    with pytest.raises(DataError, match=r"cannot be spilled to .*absent"):
        sink.commit(np.zeros((4, 2), dtype=np.float32))


def test_large_files_are_parsed_in_chunks_of_whole_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunked fast path (files past WHOLE_FILE_BYTES) agrees with the exact
    path; a file without newlines (bare CR line ends) goes to the exact path
    instead of being buffered whole."""
    from clients import arrow_csv
    from clients.data import load_exact

    monkeypatch.setattr(arrow_csv, "WHOLE_FILE_BYTES", 1024)
    monkeypatch.setattr(arrow_csv, "_CHUNK_BYTES", 700)
    monkeypatch.setattr(arrow_csv, "_LINE_LIMIT", 4 * 700)
    schema = builtin_schema("diamonds")
    split_dataset("diamonds", tmp_path / "data", partners=1, seed=0)
    text = (tmp_path / "data" / "partner-0" / "train.csv").read_text(encoding="utf-8")
    lines = text.splitlines()[:400]
    exact = load_exact(_write(tmp_path / "exact.csv", "\n".join(lines) + "\n"), schema, CsvFormat())
    for name, body in (
        ("lf.csv", "\n".join(lines) + "\n"),
        ("crlf.csv", "\r\n".join(lines) + "\r\n"),
        ("no-final-newline.csv", "\n".join(lines)),
        ("blank-lines.csv", "\n\n" + "\n".join(lines) + "\n\n"),
    ):
        path = _write(tmp_path / name, body)
        fast = arrow_csv.load_with_arrow(path, schema, "utf-8", None)
        assert fast is not None, name
        np.testing.assert_array_equal(fast[0].finish().array(), exact.features)
        np.testing.assert_array_equal(np.concatenate(fast[1]), exact.labels)
    # A last line of only blanks, unterminated: the chunked path steps aside, as
    # the whole-file path does, and the exact path decides.
    blanks = _write(tmp_path / "blank-last.csv", "\n".join(lines) + "\n   ")
    assert arrow_csv.load_with_arrow(blanks, schema, "utf-8", None) is None
    # A header line ended by LF, then rows ended by bare CR: no newline to cut at.
    bare_cr = _write(tmp_path / "cr.csv", lines[0] + "\n" + "\r".join(lines[1:]) + "\r")
    assert arrow_csv.load_with_arrow(bare_cr, schema, "utf-8", None) is None
    np.testing.assert_array_equal(load_partner_csv(bare_cr, schema).features, exact.features)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_the_chunk_reader_thread_stops_when_the_fast_path_steps_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from clients import arrow_csv

    monkeypatch.setattr(arrow_csv, "WHOLE_FILE_BYTES", 1024)
    monkeypatch.setattr(arrow_csv, "_CHUNK_BYTES", 700)
    schema = builtin_schema("diamonds")
    split_dataset("diamonds", tmp_path / "data", partners=1, seed=0)
    lines = (tmp_path / "data" / "partner-0" / "train.csv").read_text().splitlines()[:400]
    cells = lines[50].split(",")
    cells[lines[0].split(",").index("carat")] = "heavy"  # a doubt early in a long file
    lines[50] = ",".join(cells)
    path = _write(tmp_path / "doubt.csv", "\n".join(lines) + "\n")
    assert arrow_csv.load_with_arrow(path, schema, "utf-8", None) is None
    alive = [t for t in threading.enumerate() if t.name == "fedvault-csv-chunks"]
    for thread in alive:
        thread.join(timeout=2)
    assert not any(t.is_alive() for t in alive)
