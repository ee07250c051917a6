"""Scripts the gateway tests run in a child process.

Why a child process: tritonclient's stubs and ours both define the protobuf
package ``inference``; one process's descriptor pool cannot hold both.
"""

from __future__ import annotations

from typing import Any


def fields(desc: Any) -> dict[str, Any]:
    """Field numbers, types and message types of a message descriptor (nested too)."""
    out: dict[str, Any] = {}
    for f in desc.fields:
        out[f.name] = [f.number, f.type, f.message_type.name if f.message_type else None]
    for nested in desc.nested_types:
        out[nested.name] = fields(nested)
    return out
