"""The decision server: gRPC transport, decision engine, model clients, composition root."""
