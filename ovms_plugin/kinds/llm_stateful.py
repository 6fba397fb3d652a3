"""The stateful LLM engine variant: LLMPipeline, one request at a time (engine/
llm_stateful.py), for devices ContinuousBatchingPipeline does not run on (the NPU) or models
set to `engine: stateful`. Same models, services and front-end processing as kinds/llm.py;
the LLM kind picks it per device (LLMKind.engine_for)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ovms_plugin.kinds.llm import LLMKind

if TYPE_CHECKING:
    from ovms_plugin.service.runtime import LoadedModel
    from ovms_plugin.settings import ModelSettings
    from ovms_plugin.store.store import ModelEntry


class StatefulLLMKind(LLMKind):
    name = "llm_stateful"
    variant_of = "llm"
    services = ()  # served as the LLM kind's

    def engine_for(self, device: str, ms: ModelSettings) -> LLMKind:
        return self

    def make_engine(self, model_dir: Path, config: dict[str, Any]) -> Any:
        from ovms_plugin.engine.llm_stateful import StatefulLLMEngine
        return StatefulLLMEngine(model_dir, config)

    def engine_config(self, entry: ModelEntry, device: str, ms: ModelSettings,
                      budget_left: int) -> dict[str, Any]:
        for key in ("prompt_lookup", "draft_model"):
            if ms.options.get("llm", {}).get(key):
                from ovms_plugin.settings import SettingsError
                raise SettingsError(f"model {entry.name!r}: llm.{key} is not available on "
                                    f"the stateful engine ({device}); leave it out for this "
                                    "model")
        return {}  # no scheduler, no KV cache of its own to size

    def capacity(self, config: dict[str, Any]) -> int:
        return 1

    async def on_loaded(self, lm: LoadedModel, config: dict[str, Any]) -> None:
        await super().on_loaded(lm, config)
        # The NPU pipeline's prompt limit: the front end refuses longer prompts.
        lm.max_prompt = int(config["properties"].get("MAX_PROMPT_LEN")
                            or lm.settings.options["llm"].get("max_prompt_len") or 0) or None


KIND = StatefulLLMKind()
