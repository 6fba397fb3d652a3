"""Per-request records -> the serving metrics `vllm bench serve` reports (same names)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Record:
    """One request as the client saw it; times are seconds from the request's start."""

    ok: bool = False
    error: str = ""
    start: float = 0.0  # absolute, for the run's duration
    ttft: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    e2e: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    text: str = ""  # kept for the second turn of multi-turn runs


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    k = (len(xs) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _percentiles(values: list[float], name: str) -> dict[str, float]:
    if not values:
        return {f"mean_{name}_ms": 0.0, f"median_{name}_ms": 0.0, f"p90_{name}_ms": 0.0,
                f"p99_{name}_ms": 0.0}
    return {f"mean_{name}_ms": round(statistics.mean(values) * 1000, 2),
            f"median_{name}_ms": round(percentile(values, 0.5) * 1000, 2),
            f"p90_{name}_ms": round(percentile(values, 0.9) * 1000, 2),
            f"p99_{name}_ms": round(percentile(values, 0.99) * 1000, 2)}


def summarize(records: list[Record], duration: float) -> dict[str, Any]:
    done = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done
             if r.ttft is not None and r.output_tokens > 1]
    itls = [b - a for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    result: dict[str, Any] = {
        "completed": len(done), "failed": len(records) - len(done),
        "duration_s": round(duration, 3),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": round(len(done) / duration, 3) if duration else 0.0,
        "output_throughput": round(out_tokens / duration, 2) if duration else 0.0,
        "total_token_throughput": round((in_tokens + out_tokens) / duration, 2)
        if duration else 0.0,
    }
    result.update(_percentiles([r.ttft for r in done if r.ttft is not None], "ttft"))
    result.update(_percentiles(tpots, "tpot"))
    result.update(_percentiles(itls, "itl"))
    result.update(_percentiles([r.e2e for r in done], "e2el"))
    errors = sorted({r.error for r in records if not r.ok})
    if errors:
        result["errors"] = errors[:5]
    return result
