"""Reranking: TextRerankPipeline, one request (query and documents) at a time
(engine/embed.py's RerankEngine). The front end counts tokens with the model's tokenizer to
refuse over-long pairs before they reach the engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ovms_plugin.engine.requests import RerankJob
from ovms_plugin.kinds.base import Kind, Service, ValidationError
from ovms_plugin.service import embed
from ovms_plugin.settings import option

if TYPE_CHECKING:
    from ovms_plugin.http.metrics import Exposition
    from ovms_plugin.service.runtime import Runtime
    from ovms_plugin.settings import ModelSettings
    from ovms_plugin.store.store import ModelEntry


@dataclass(frozen=True)
class RerankOptions:
    """settings.yaml's `rerank:` section (globally or in a model's)."""

    truncate: bool = option(True, "cut over-long query-document pairs instead of refusing "
                                  "them (a request's own truncate wins)")
    max_length: int | None = option(None, "tokens per query-document pair (default: the "
                                          "model's)", minimum=1)


async def run(rt: Runtime, req: embed.RerankRequest) -> dict[str, Any]:
    # One lease from the token count to the engine's answer: the model cannot be evicted
    # while this request waits for its count.
    async with rt.lease(req.model, "rerank") as lm:
        counts = await lm.counter.count([req.query, *req.documents])
        truncate = lm.settings.options["rerank"].get("truncate", True) \
            if req.truncate is None else req.truncate
        pair_counts = [counts[0] + n for n in counts[1:]]
        embed.check_lengths(pair_counts, lm.context, truncate, "query plus document")
        scores = await rt.run_once(lm, RerankJob(req.query, req.documents))
    return embed.rerank_response(req, scores, sum(pair_counts))


async def unary(rt: Runtime, service: str, body: Any) -> dict[str, Any]:
    return await run(rt, embed.parse_rerank(body))


class RerankKind(Kind):
    name = "rerank"
    task = "text-classification"
    services = (Service("rerank", unary, task_type="rerank", timeout=60,
                        default_model="bge-reranker-base"),)
    required_files = ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml")
    needs_tokenizer = True  # rerank token counts
    options_section = "rerank"
    options_type = RerankOptions
    device_preference = ("CPU", "NPU")

    def recognise(self, files: set[str], config: dict[str, Any]) -> int | None:
        archs = config.get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            return 20
        return None

    def validate(self, folder: Path, model_type: str | None) -> dict[str, Any]:
        import openvino_genai as ov_genai
        pipe = ov_genai.TextRerankPipeline(str(folder), "CPU")
        if len(pipe.rerank("query", ["a document", "another one"])) != 2:
            raise ValidationError("the reranker did not score every document")
        return {}

    def make_engine(self, model_dir: Path, config: dict[str, Any]) -> Any:
        from ovms_plugin.engine.embed import RerankEngine
        return RerankEngine(model_dir, config)

    def engine_config(self, entry: ModelEntry, device: str, ms: ModelSettings,
                      budget_left: int) -> dict[str, Any]:
        return {"rerank": ms.options["rerank"]}

    def export_metrics(self, out: Exposition, labels: dict[str, Any],
                       m: dict[str, Any]) -> None:
        out.counter("rerank_requests_total", "Rerank requests served.", labels,
                    m.get("requests_total"))
        out.gauge("rerank_queued_requests", "Rerank requests waiting.", labels,
                  m.get("queued_requests"))


KIND = RerankKind()
