"""What a model kind declares, in one place: the services it serves and how the front end
handles them, the files its model folders hold and how the store recognises one, how a
model is converted and validated, the engine that runs it and that engine's config, and
its metrics. Every part of the plugin asks a kind rather than keeping a table per kind.

Nothing here imports OpenVINO: the front end imports the kinds before its handshake.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ovms_plugin.http.metrics import Exposition
    from ovms_plugin.service.runtime import LoadedModel, Runtime
    from ovms_plugin.settings import ModelSettings
    from ovms_plugin.store.store import ModelEntry


class ValidationError(Exception):
    """A staged model failed its kind's validation recipe (run in the pull's job child)."""


@dataclass
class StreamChunk:
    """One streamed event's JSON object; `final` marks the last."""

    data: dict[str, Any]
    final: bool = False


@dataclass
class BidiMessage:
    """One message of a bidirectional stream, either way (AOG's InvokeServiceBidi, a
    WebSocket): `message_type` is "text", "binary", "ping", "pong" or "close"."""

    message_type: str
    data: bytes = b""
    metadata: dict[str, str] = field(default_factory=dict)


Unary = Callable[["Runtime", str, Any], Awaitable[dict[str, Any]]]
Stream = Callable[["Runtime", str, Any], AsyncIterator[StreamChunk]]
# (runtime, service, the first message's metadata, the messages in, the first included)
Bidi = Callable[["Runtime", str, dict[str, str], AsyncIterator[BidiMessage]],
                AsyncIterator[BidiMessage]]


@dataclass(frozen=True)
class Service:
    """A service a kind serves: its front-end handlers (a JSON body in; a response object,
    or a stream of chunks, out) and what plugin.yaml declares for it to AOG."""

    name: str
    unary: Unary
    stream: Stream | None = None
    task_type: str = ""  # plugin.yaml's task_type
    timeout: int = 60  # plugin.yaml's timeout (-1: none)
    default_model: str = ""
    aog_streaming: bool | None = None  # plugin.yaml's support_streaming; None: stream given
    aog: dict[str, Any] = field(default_factory=dict)  # anything else for plugin.yaml
    # The stream reports usage only when asked (stream_options.include_usage), in a last
    # chunk of its own; AOG's adapters ask, and fold it into the finishing chunk.
    stream_usage: bool = False
    # A bidirectional stream (plugin.yaml: expose_protocol WEBSOCKET, support_bidirectional).
    bidi: Bidi | None = None


class Kind:
    """A model kind. Subclasses set the class attributes and override what differs."""

    name: str = ""  # also the engine's name in the worker, placement details and metrics
    task: str = ""  # the task the store records for its models
    services: tuple[Service, ...] = ()
    required_files: tuple[str, ...] = ("openvino_model.xml", "openvino_model.bin")
    export_task: str | None = None  # optimum's task for conversion (None: `task`)
    # Files or folders of a converted source kept beside the IR (TTS voices).
    carries: tuple[str, ...] = ()
    needs_tokenizer: bool = False  # the front end loads the model's tokenizer
    options_section: str = ""  # settings.yaml's section of engine options for it
    # The dataclass of that section's options (fields made with settings.option: type,
    # default, one-line doc); settings.yaml is checked against it on load.
    options_type: type | None = None
    device_preference: tuple[str, ...] = ("CPU",)  # device classes, best first
    devices_supported: frozenset[str] = frozenset({"CPU", "GPU", "NPU"})
    variant_of: str | None = None  # an engine variant of another kind (not in the store)

    # --- the store and the puller ------------------------------------------------------

    def recognise(self, files: set[str], config: dict[str, Any]) -> int | None:
        """How specifically a folder (or a Hub repo's file list) and its config.json say
        it is a model of this kind: a rank, lower is more specific; None: not this kind.
        The store picks the kind with the lowest rank."""
        return None

    def is_native(self, files: set[str]) -> bool:
        """The files are already what the engine loads (nothing to convert)."""
        return "openvino_model.xml" in files

    def default_weight_format(self, n_params: int) -> str:
        return "fp16"

    def export_task_for(self, src: Path) -> str:
        """optimum's task for converting the source folder (a kind may serve models that
        convert differently: VLMs beside LLMs)."""
        return self.export_task or self.task

    def conversion_model_kwargs(self, src: Path) -> dict[str, Any]:
        """Extra model arguments optimum's export needs for the source folder (SpeechT5's
        vocoder); raises ValidationError when the folder lacks them."""
        return {}

    def validate(self, folder: Path, model_type: str | None) -> dict[str, Any]:
        """Loads the model the way the engine will and runs the smallest real request
        (in the pull's child process); raises ValidationError. Returns manifest notes."""
        return {}

    # --- the engine ----------------------------------------------------------------------

    def engine_for(self, device: str, ms: ModelSettings) -> Kind:
        """The kind whose engine runs this model on `device` (an engine variant, or self)."""
        return self

    def make_engine(self, model_dir: Path, config: dict[str, Any]) -> Any:
        """The engine object (inside the worker process): info, add, abort, has_work,
        step, metrics; see engine/worker.py."""
        raise NotImplementedError(f"kind {self.name!r} has no engine")

    def engine_config(self, entry: ModelEntry, device: str, ms: ModelSettings,
                      budget_left: int) -> dict[str, Any]:
        """The kind's part of the engine config (beside device and properties)."""
        return {}

    def compile_properties(self, family: str, options: dict[str, Any],
                           model_bytes: int = 0) -> dict[str, Any]:
        """OpenVINO properties its engine needs on a device family (CPU, GPU, NPU), from
        the kind's settings section `options` and the size of the model's files."""
        return {}

    def capacity(self, config: dict[str, Any]) -> int:
        """How many requests the engine works on at once; beyond it and
        max_waiting_requests, requests are refused as busy."""
        return 1

    def memory_needed(self, entry: ModelEntry, config: dict[str, Any]) -> int:
        """What loading costs: the weights plus a third for compiled kernels and
        activations."""
        return int(entry.size * 1.33)

    async def on_loaded(self, lm: LoadedModel, config: dict[str, Any]) -> None:
        """Front-end state the loaded model needs (limits, detokenizer tables)."""

    # --- metrics -------------------------------------------------------------------------

    def export_metrics(self, out: Exposition, labels: dict[str, Any],
                       m: dict[str, Any]) -> None:
        """The engine's metrics (EngineClient.metrics()) in Prometheus families."""

    def __repr__(self) -> str:
        return f"<kind {self.name}>"
