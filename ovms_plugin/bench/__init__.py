"""`python -m ovms_plugin bench`: load generation against the plugin (launched as AOG does)
or a running HTTP server, the metrics `vllm bench serve` reports, and in-process baselines
(the engine's offline ceiling and a naive one-request-at-a-time server)."""
