"""Text embeddings: the dynamic batcher over the model's IR (engine/embed.py). The engine
tokenizes and counts itself, so the front end holds no tokenizer for these models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ovms_plugin.engine.requests import EmbedJob, EmbedResult
from ovms_plugin.kinds.base import Kind, Service, ValidationError
from ovms_plugin.service import embed
from ovms_plugin.settings import option

if TYPE_CHECKING:
    from ovms_plugin.http.metrics import Exposition
    from ovms_plugin.service.runtime import LoadedModel, Runtime
    from ovms_plugin.settings import ModelSettings
    from ovms_plugin.store.store import ModelEntry


@dataclass(frozen=True)
class EmbedOptions:
    """settings.yaml's `embed:` section (globally or in a model's); the model's own
    sentence-transformers files give pooling, normalize and max_length unless set here."""

    pooling: str | None = option(None, "cls, mean or last_token (default: the model's, "
                                       "else mean)", choices=("cls", "mean", "last_token"))
    normalize: bool | None = option(None, "scale vectors to length 1 (default: the "
                                          "model's, else true)")
    max_length: int | None = option(None, "tokens per text (default: the model's; 256 "
                                          "with static shapes)", minimum=1)
    truncate: bool = option(False, "cut over-long texts instead of refusing them (a "
                                   "request's own truncate wins)")
    query_instruction: str = option("", "a prefix for texts sent with input_type query")
    document_instruction: str = option("", "a prefix for texts sent with input_type "
                                           "document")
    max_batch_size: int = option(8, "texts per batch", minimum=1)
    max_wait_ms: float = option(2.0, "how long a batch may wait for more texts", minimum=0)
    parallel_batches: int | None = option(None, "batches run at once (default: OpenVINO's "
                                                "optimal number)", minimum=1)
    static_shapes: bool | None = option(None, "every batch max_batch_size texts of "
                                              "max_length tokens (default: on the NPU only)")


async def run(rt: Runtime, req: embed.EmbedRequest) -> dict[str, Any]:
    async with rt.lease(req.model, "embed") as lm:
        opts = lm.settings.options["embed"]
        prefix = opts.get(f"{req.input_type}_instruction") or ""
        texts = [prefix + t for t in req.texts] if prefix else req.texts
        truncate = opts.get("truncate", False) if req.truncate is None else req.truncate
        # The engine tokenizes anyway: it counts, and answers over-long inputs (without
        # truncate) with their counts alone, which check_lengths turns into the refusal.
        result: EmbedResult = await rt.run_once(lm, EmbedJob(texts, lm.context, truncate))
    embed.check_lengths(result.counts, lm.context, truncate, "input")
    return embed.embedding_response(req, result.vectors, sum(result.counts))


async def unary(rt: Runtime, service: str, body: Any) -> dict[str, Any]:
    return await run(rt, embed.parse_embed(body))


class EmbedKind(Kind):
    name = "embed"
    task = "feature-extraction"
    services = (Service("embed", unary, task_type="embed", timeout=60,
                        default_model="all-minilm-l6-v2"),)
    required_files = ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml")
    options_section = "embed"
    options_type = EmbedOptions
    device_preference = ("CPU", "NPU")

    def recognise(self, files: set[str], config: dict[str, Any]) -> int | None:
        if "modules.json" in files:  # sentence-transformers
            return 10
        archs = config.get("architectures") or []
        if "openvino_model.xml" in files or any(a.endswith(("Model", "ForMaskedLM"))
                                                 for a in archs):
            return 90  # an encoder nothing more specific claimed
        return None

    def validate(self, folder: Path, model_type: str | None) -> dict[str, Any]:
        import openvino_genai as ov_genai
        pipe = ov_genai.TextEmbeddingPipeline(str(folder), "CPU")
        if not len(pipe.embed_query("hello")):
            raise ValidationError("the embedding model returned an empty vector")
        return {}

    def make_engine(self, model_dir: Path, config: dict[str, Any]) -> Any:
        from ovms_plugin.engine.embed import EmbedEngine
        return EmbedEngine(model_dir, config)

    def engine_config(self, entry: ModelEntry, device: str, ms: ModelSettings,
                      budget_left: int) -> dict[str, Any]:
        config = {**embed.sentence_transformers_config(entry.path), **ms.options["embed"]}
        if device.startswith("NPU"):  # the NPU runs static shapes only
            config.setdefault("static_shapes", True)
        return {"embed": config}

    def capacity(self, config: dict[str, Any]) -> int:
        # The batcher groups by length better the more it can choose from.
        return max(128, 4 * int(config["embed"].get("max_batch_size", 8)))

    async def on_loaded(self, lm: LoadedModel, config: dict[str, Any]) -> None:
        lm.context = config["embed"].get("max_length") or lm.context

    def export_metrics(self, out: Exposition, labels: dict[str, Any],
                       m: dict[str, Any]) -> None:
        from ovms_plugin.http.metrics import batch_histogram
        out.counter("embed_batches_total", "Batches the embedding engine ran.", labels,
                    m.get("batches_total"))
        out.counter("embed_texts_total", "Texts embedded.", labels, m.get("texts_total"))
        out.gauge("embed_queued_texts", "Texts waiting for a batch.", labels,
                  m.get("queued_texts"))
        out.gauge("embed_requests_waiting", "Requests with texts not yet embedded.", labels,
                  m.get("requests_waiting"))
        if isinstance(m.get("batch_sizes"), dict):
            out.hist("embed_batch_size", "Texts per embedding batch.", labels,
                     batch_histogram(m["batch_sizes"]))


KIND = EmbedKind()
