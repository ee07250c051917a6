"""Regenerate the gRPC stubs in ``server/gateway/pb`` from ``proto/`` (``make proto``).

Why a module and not a shell line: the test that guards against drift
(``tests/test_gateway_proto.py``) calls :func:`generate` into a temporary
directory and compares, so CI and the developer run the very same command.
The proto path is mapped (``-Iserver/gateway/pb=proto``) so that the generated
``*_pb2_grpc`` module imports its sibling by its package path.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
PACKAGE_DIR = Path("server/gateway/pb")
PROTOS = ("grpc_service.proto", "fedvault_extensions.proto")


def generate(out_root: Path) -> list[Path]:
    """Write the stubs under ``out_root / server/gateway/pb``; the files written."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    target = out_root / PACKAGE_DIR
    target.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE_DIR.as_posix()}={PROTO_DIR}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(PROTO_DIR / name) for name in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted(p for p in target.iterdir() if p.name != "__init__.py" and p.is_file())


def main() -> None:
    written = generate(ROOT)
    for path in written:
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
    sys.exit(0)
