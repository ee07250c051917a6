"""Generated protobuf/gRPC stubs (``make proto``); do not edit by hand."""
