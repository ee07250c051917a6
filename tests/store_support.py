"""Schema comparison for the store tests: what a database holds, per dialect and per file."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy as sa


def _pg(location: str) -> bool:
    return location.startswith("postgresql")


def reflected_schema(location: str) -> dict[str, Any]:
    """What a store's database holds, in terms both dialects share.

    Per table: its columns (name, Python type, whether NULL is allowed outside
    the primary key — SQLite's ``TEXT PRIMARY KEY`` admits NULL, PostgreSQL's
    never does), primary key, unique constraints, foreign keys, checks and
    indexes; and which tables triggers keep append-only. Defaults are left out:
    SQLite files default their timestamps, PostgreSQL tables never did.
    """
    pg = _pg(location)
    engine = sa.create_engine(location if pg else f"sqlite:///{location}")
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            tables: dict[str, Any] = {}
            for name in sorted(inspector.get_table_names()):
                pk = inspector.get_pk_constraint(name)["constrained_columns"]
                tables[name] = {
                    "columns": [
                        (c["name"], c["type"].python_type, c["nullable"] and c["name"] not in pk)
                        for c in inspector.get_columns(name)
                    ],
                    "primary_key": pk,
                    "unique": sorted(
                        u["column_names"] for u in inspector.get_unique_constraints(name)
                    ),
                    "foreign_keys": sorted(
                        (f["constrained_columns"], f["referred_table"], f["referred_columns"])
                        for f in inspector.get_foreign_keys(name)
                    ),
                    "checks": sorted(c["sqltext"] for c in inspector.get_check_constraints(name)),
                    "indexes": sorted(
                        (i["column_names"], i["unique"])
                        for i in inspector.get_indexes(name)
                        if "duplicates_constraint" not in i  # a UNIQUE constraint's own index
                    ),
                }
            triggered = (
                "SELECT DISTINCT tgrelid::regclass::text FROM pg_trigger WHERE NOT tgisinternal"
                if pg
                else "SELECT DISTINCT tbl_name FROM sqlite_master WHERE type = 'trigger'"
            )
            append_only = sorted(conn.exec_driver_sql(triggered).scalars())
    finally:
        engine.dispose()
    return {"tables": tables, "append_only": append_only}


def sqlite_file_details(path: Path | str) -> dict[str, Any]:
    """What :func:`reflected_schema` leaves out of a SQLite file: defaults and AUTOINCREMENT.

    Defaults are compared as text without quotes (a file made by the old DDL
    says ``0`` where a new one says ``'0'``: in an INTEGER column both store
    the integer 0). ``sqlite_sequence`` exists only where a table has
    ``AUTOINCREMENT`` (the ledger's ``seq``, never reused after a delete).
    """
    conn = sqlite3.connect(path)
    try:
        tables = [
            str(r[0])
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        defaults = {
            f"{table}.{row[1]}": None if row[4] is None else str(row[4]).strip("'")
            for table in tables
            for row in conn.execute(f'PRAGMA table_info("{table}")')
        }
        autoincrement = sorted(
            str(r[0])
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND sql LIKE '%AUTOINCREMENT%'"
            )
        )
    finally:
        conn.close()
    return {"defaults": defaults, "autoincrement": autoincrement}
