"""Print tritonclient's field numbers of the OIP messages we define, as JSON."""

from __future__ import annotations

import json
import sys

from tritonclient.grpc import service_pb2

from tests.gateway_clients import fields

if __name__ == "__main__":
    names = json.loads(sys.argv[1])
    pool = service_pb2.DESCRIPTOR
    print(json.dumps({n: fields(pool.message_types_by_name[n]) for n in names}))
