"""What the protocol adapters (AOG gRPC, HTTP) share: request types, validation, the
loaded-model runtime and the response shapes."""
