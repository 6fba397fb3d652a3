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


def _hist(out: Exposition, name: str, help_: str, labels: dict[str, Any], snap: Any) -> None:
    if isinstance(snap, dict) and {"buckets", "cumulative", "sum", "count"} <= set(snap):
        out.histogram(name, help_, labels, snap["buckets"], snap["cumulative"], snap["sum"],
                      snap["count"])


def _batch_histogram(sizes: dict[Any, Any]) -> dict[str, Any]:
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


def export_models(out: Exposition, running: list[dict[str, Any]]) -> None:
    """Runtime.running()'s loaded models and their engine metrics."""
    for item in running:
        d = item.get("details", {})
        model = {"model": item.get("name", "")}
        engine = d.get("engine", "")
        out.gauge("model_loaded", "1 for each loaded model.",
                  {**model, "engine": engine, "device": d.get("device", "")}, 1)
        out.gauge("model_alive", "1 while the model's engine worker runs.", model,
                  1 if d.get("alive") else 0)
        out.gauge("model_requests_in_flight", "Requests running or waiting in the engine.",
                  model, d.get("in_flight"))
        m = d.get("metrics") or {}
        if engine in ("llm", "llm_stateful"):  # same metrics; the stateful one has no KV stats
            _export_llm(out, model, m)
        elif engine == "embed":
            out.counter("embed_batches_total", "Batches the embedding engine ran.", model,
                        m.get("batches_total"))
            out.counter("embed_texts_total", "Texts embedded.", model, m.get("texts_total"))
            out.gauge("embed_queued_texts", "Texts waiting for a batch.", model,
                      m.get("queued_texts"))
            out.gauge("embed_requests_waiting", "Requests with texts not yet embedded.", model,
                      m.get("requests_waiting"))
            if isinstance(m.get("batch_sizes"), dict):
                _hist(out, "embed_batch_size", "Texts per embedding batch.", model,
                      _batch_histogram(m["batch_sizes"]))
        elif engine == "rerank":
            out.counter("rerank_requests_total", "Rerank requests served.", model,
                        m.get("requests_total"))
            out.gauge("rerank_queued_requests", "Rerank requests waiting.", model,
                      m.get("queued_requests"))
        elif engine == "image":
            out.counter("image_images_total", "Images generated.", model,
                        m.get("images_total"))
            out.counter("image_steps_total", "Denoising steps run.", model,
                        m.get("steps_total"))
            out.gauge("image_queued_requests", "Image requests waiting.", model,
                      m.get("queued_requests"))


def _export_llm(out: Exposition, model: dict[str, Any], m: dict[str, Any]) -> None:
    out.gauge("llm_requests_running", "Requests the LLM engine is generating for.", model,
              m.get("running"))
    out.gauge("llm_requests_waiting", "Requests added but not yet scheduled.", model,
              m.get("waiting"))
    out.counter("llm_requests_total", "Requests added to the LLM engine.", model,
                m.get("requests_total"))
    for reason, n in sorted((m.get("finished") or {}).items()):
        out.counter("llm_requests_finished_total", "Finished requests, by reason.",
                    {**model, "reason": reason}, n)
    out.counter("llm_prompt_tokens_total", "Prompt tokens prefilled.", model,
                m.get("tokens_in_total"))
    out.counter("llm_generated_tokens_total", "Tokens generated.", model,
                m.get("tokens_out_total"))
    out.gauge("llm_kv_cache_usage_percent", "KV cache in use at the last step, in percent.",
              model, m.get("cache_usage"))
    out.gauge("llm_kv_cache_bytes", "Size of the KV cache.", model, m.get("kv_cache_bytes"))
    _hist(out, "llm_time_to_first_token_seconds", "Time from request to its first token.",
          model, m.get("ttft_seconds"))
    _hist(out, "llm_time_per_output_token_seconds",
          "Mean time per generated token after the first, per request.", model,
          m.get("tpot_seconds"))
