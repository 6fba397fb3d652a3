"""/metrics in Prometheus' text exposition format (version 0.0.4), written by hand so the
runtime needs no client library: the server's own request counters and latency histogram,
and each loaded model's engine metrics as Runtime.running() reports them, labelled by
model.

Families (all prefixed `ovms_`):
- server: `http_requests_total{route,method,status}`, `http_request_duration_seconds{route}`
  (histogram), `http_requests_in_flight`;
- every loaded model: `model_loaded{model,engine,device}` (1), `model_alive{model}`,
  `model_requests_in_flight{model}` (running plus waiting, as the front end counts them);
- LLMs: `llm_requests_running`, `llm_requests_waiting`, `llm_requests_total`,
  `llm_requests_finished_total{reason}` (stop, length, aborted, error),
  `llm_prompt_tokens_total`, `llm_generated_tokens_total`, `llm_kv_cache_usage_percent`,
  `llm_kv_cache_bytes`, `llm_time_to_first_token_seconds` and
  `llm_time_per_output_token_seconds` (histograms);
- embeddings: `embed_batches_total`, `embed_texts_total`, `embed_batch_size` (histogram of
  the texts per engine batch), `embed_queued_texts`, `embed_requests_waiting`;
- rerank: `rerank_requests_total`, `rerank_queued_requests`;
- images: `image_images_total`, `image_steps_total`, `image_queued_requests`.

Counters restart from zero when a model is loaded again, which Prometheus' rate() handles.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from ovms_plugin.engine.stats import Histogram

PREFIX = "ovms_"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Exposition:
    """Families of samples, rendered grouped by family with their HELP and TYPE lines."""

    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str, list[str]]] = {}

    def _family(self, name: str, kind: str, help_: str) -> list[str]:
        name = PREFIX + name
        if name not in self.families:
            self.families[name] = (kind, help_, [])
        return self.families[name][2]

    @staticmethod
    def _sample(name: str, labels: dict[str, Any], value: float) -> str:
        if labels:
            inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            return f"{PREFIX}{name}{{{inner}}} {_number(value)}"
        return f"{PREFIX}{name} {_number(value)}"

    def gauge(self, name: str, help_: str, labels: dict[str, Any], value: Any) -> None:
        if isinstance(value, int | float):
            self._family(name, "gauge", help_).append(self._sample(name, labels, value))

    def counter(self, name: str, help_: str, labels: dict[str, Any], value: Any) -> None:
        """`name` ends with _total, as Prometheus names counters."""
        if isinstance(value, int | float):
            self._family(name, "counter", help_).append(self._sample(name, labels, value))

    def histogram(self, name: str, help_: str, labels: dict[str, Any],
                  buckets: list[float], cumulative: list[int], sum_: float,
                  count: int) -> None:
        """`cumulative` has one count per bucket plus the +Inf one (engine.stats' form)."""
        if len(cumulative) != len(buckets) + 1:
            return
        samples = self._family(name, "histogram", help_)
        for le, c in zip([*buckets, math.inf], cumulative, strict=True):
            samples.append(self._sample(f"{name}_bucket", {**labels, "le": _number(le)}, c))
        samples.append(self._sample(f"{name}_sum", labels, sum_))
        samples.append(self._sample(f"{name}_count", labels, count))

    def hist(self, name: str, help_: str, labels: dict[str, Any], snap: Any) -> None:
        """A histogram from engine.stats' snapshot (skipped when it is not one)."""
        if isinstance(snap, dict) and {"buckets", "cumulative", "sum", "count"} <= set(snap):
            self.histogram(name, help_, labels, snap["buckets"], snap["cumulative"],
                           snap["sum"], snap["count"])

    def render(self) -> str:
        lines = []
        for name, (kind, help_, samples) in self.families.items():
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(samples)
        return "\n".join(lines) + "\n"


class HttpMetrics:
    """The server's own counters: requests by route, method and status, and latency by
    route (route templates, so unknown paths do not add series)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.in_flight = 0

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests[(route, method, status)] += 1
        hist = self.latency.get(route)
        if hist is None:
            hist = self.latency[route] = Histogram()
        hist.observe(seconds)

    def export(self, out: Exposition) -> None:
        out.gauge("http_requests_in_flight", "HTTP requests being served.", {}, self.in_flight)
        for (route, method, status), n in sorted(self.requests.items()):
            out.counter("http_requests_total", "HTTP requests served, by route and status.",
                        {"route": route, "method": method, "status": status}, n)
        for route, hist in sorted(self.latency.items()):
            snap = hist.snapshot()
            out.histogram("http_request_duration_seconds",
                          "Time from request to the end of the response (whole stream).",
                          {"route": route}, snap["buckets"], snap["cumulative"], snap["sum"],
                          snap["count"])


def batch_histogram(sizes: dict[Any, Any]) -> dict[str, Any]:
    """The embedding batcher's {size: batches} as a histogram of batch sizes."""
    pairs = []
    for size, n in sizes.items():
        try:
            pairs.append((int(size), int(n)))
        except (TypeError, ValueError):
            continue
    cumulative = [sum(n for s, n in pairs if s <= le) for le in BATCH_BUCKETS]
    total = sum(n for _, n in pairs)
    return {"buckets": list(BATCH_BUCKETS), "cumulative": [*cumulative, total],
            "sum": sum(s * n for s, n in pairs), "count": total}
