"""The standalone HTTP server: OpenAI- and AOG-compatible routes over the same runtime the
AOG gRPC plugin uses (see server.py)."""
