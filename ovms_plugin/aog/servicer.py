"""protocol.ProviderService for AOG: translates each RPC to the shared runtime and back.

Every RPC ends with gRPC status OK; the outcome is in `code`/`message` (0 = success), as
AOG expects. JSON goes in and out of the bytes fields.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc
import yaml

from ovms_plugin import __version__, engine_check, paths, settings
from ovms_plugin.aog.proto import provider_pb2 as pb
from ovms_plugin.aog.proto import provider_pb2_grpc as pb_grpc
from ovms_plugin.kinds import BidiMessage
from ovms_plugin.service import errors, invoke, jsonenc
from ovms_plugin.service.errors import ServiceError
from ovms_plugin.service.runtime import Runtime
from ovms_plugin.store import pull as pull_mod
from ovms_plugin.store.store import StoreError, shown

log = logging.getLogger(__name__)
SUCCESS = "success"


def _json(data: Any) -> bytes:
    return jsonenc.dumps(data).encode()


@functools.cache
def _request_limit() -> int:
    """max_request_size, read once (a changed setting takes effect at the next start)."""
    try:
        return settings.max_request_bytes()
    except settings.SettingsError as e:
        log.error("%s; using 64MB", e)
        return 64 * 2**20


def _body(raw: bytes, what: str) -> Any:
    limit = _request_limit()
    if len(raw) > limit:
        raise ServiceError(f"{what} is {len(raw) / 2**20:.1f} MiB, over this plugin's limit of "
                           f"{limit / 2**20:.0f} MiB; send less, or raise max_request_size in "
                           "the settings", errors.INVALID_REQUEST)
    return errors.parse_json(raw or b"{}", what)


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for m in rest:
        yield m


def sse(data: Any) -> bytes:
    """One server-sent event as AOG reads them: a single `data:` line, LF LF."""
    return b"data: " + (data if isinstance(data, bytes) else _json(data)) + b"\n\n"


def _error(cls: type, e: Exception) -> Any:
    code, message = _fail(e)
    return cls(code=code, message=message)


def _fail(e: Exception) -> tuple[int, str]:
    if isinstance(e, ServiceError):
        return e.code, e.message
    log.exception("internal error")
    return errors.INTERNAL, errors.public(f"internal error: {type(e).__name__}: {e}")


class ProviderServicer(pb_grpc.ProviderServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.operate_status = 1
        self.mode = ""

    # --- inference ----------------------------------------------------------------------

    async def InvokeService(self, request, context):
        try:
            svc = invoke.lookup(request.service_name)
            body = _body(request.request_data, "request_data")
            result = await svc.unary(self.rt, request.service_name, body)
            return pb.InvokeServiceResponse(code=0, message=SUCCESS, response_data=_json(result))
        except Exception as e:
            code, message = _fail(e)
            return pb.InvokeServiceResponse(code=code, message=message)

    async def InvokeServiceStream(self, request, context):
        try:
            svc = invoke.lookup(request.service_name, streaming=True)
            body = _body(request.request_data, "request_data")
            async for chunk in invoke.aog_stream(svc, self.rt, request.service_name, body):
                data = sse(chunk.data)
                if chunk.final:
                    data += sse(b"[DONE]")
                yield pb.InvokeServiceStreamResponse(code=0, message=SUCCESS, chunk_data=data,
                                                     is_final=chunk.final)
        except Exception as e:
            code, message = _fail(e)
            yield pb.InvokeServiceStreamResponse(code=code, message=message, is_final=True)

    async def InvokeServiceBidi(self, request_iterator, context):
        """A service's bidirectional stream (speech-to-text-ws): the first message names
        the service and carries AOG's metadata (ws_conn_id, model, language, format,
        sample_rate). A service without one serves each message as one InvokeService."""
        it = aiter(request_iterator)
        try:
            first = await anext(it)
        except StopAsyncIteration:
            return
        try:
            svc = invoke.lookup(first.service_name)
        except ServiceError as e:
            yield pb.InvokeServiceBidiResponse(code=e.code, message=e.message)
            return
        if svc.bidi is None:
            async for msg in _chain(first, it):
                resp = await self.InvokeService(pb.InvokeServiceRequest(
                    service_name=first.service_name, request_data=msg.data), context)
                yield pb.InvokeServiceBidiResponse(code=resp.code, message=resp.message,
                                                   data=resp.response_data,
                                                   message_type=msg.message_type)
            return

        async def messages() -> AsyncIterator[BidiMessage]:
            async for m in _chain(first, it):
                yield BidiMessage(m.message_type, m.data, dict(m.metadata))

        try:
            async with aclosing(svc.bidi(self.rt, first.service_name, dict(first.metadata),
                                         messages())) as out:
                async for m in out:
                    yield pb.InvokeServiceBidiResponse(code=0, message=SUCCESS, data=m.data,
                                                       message_type=m.message_type,
                                                       metadata=m.metadata)
        except Exception as e:
            code, message = _fail(e)
            yield pb.InvokeServiceBidiResponse(code=code, message=message)

    # --- lifecycle ----------------------------------------------------------------------

    async def GetManifest(self, request, context):
        try:
            manifest = yaml.safe_load(paths.manifest_path().read_text())
            return pb.GetManifestResponse(code=0, message=SUCCESS, manifest_json=_json(manifest))
        except (OSError, yaml.YAMLError) as e:
            return pb.GetManifestResponse(code=errors.INTERNAL,
                                          message=f"cannot read plugin.yaml: {e}")

    async def HealthCheck(self, request, context):
        ok, why = await engine_check.check()
        if not ok:
            return pb.HealthCheckResponse(code=errors.UNAVAILABLE, message=why)
        ok, why = self.rt.health()
        return pb.HealthCheckResponse(code=0 if ok else errors.UNAVAILABLE, message=why)

    async def GetOperateStatus(self, request, context):
        return pb.GetOperateStatusResponse(status=self.operate_status)

    async def SetOperateStatus(self, request, context):
        self.operate_status = request.status
        return pb.SetOperateStatusResponse()

    async def SetAuth(self, request, context):
        return pb.SetAuthResponse(code=0, message="local plugin: no authentication needed")

    async def ValidateAuth(self, request, context):
        return pb.ValidateAuthResponse(code=0, message="local plugin: no authentication needed")

    async def RefreshAuth(self, request, context):
        return pb.RefreshAuthResponse(code=0, message="local plugin: no authentication needed")

    async def StartEngine(self, request, context):
        # The engine is in-process (workers start per model on LoadModel): starting it means
        # checking that OpenVINO is there, which is cached after the first call.
        self.mode = request.mode or self.mode
        ok, why = await engine_check.check()
        code = 0 if ok else errors.FAILED_PRECONDITION
        return pb.StartEngineResponse(code=code, message=SUCCESS if ok else why)

    async def StopEngine(self, request, context):
        await self.rt.unload_all()
        return pb.StopEngineResponse(code=0, message=SUCCESS)

    async def GetConfig(self, request, context):
        store = self.rt.store.root
        device = await asyncio.to_thread(engine_check.default_device)
        config = {"host": "", "origin": "", "scheme": "", "recommend_model": "",
                  "download_url": "", "download_path": str(store),
                  "engine_path": str(paths.plugin_data_dir()),
                  "exec_path": str(paths.PACKAGE_DIR), "exec_file": "python -m ovms_plugin",
                  "device_type": device}
        return pb.GetConfigResponse(code=0, message=SUCCESS, config_json=_json(config))

    async def CheckEngine(self, request, context):
        ok, why = await engine_check.check()
        return pb.CheckEngineResponse(code=0, message=why, installed=ok)

    async def InstallEngine(self, request, context):
        ok, why = await engine_check.check()
        if ok:
            return pb.InstallEngineResponse(code=0, message=f"already installed: {why}")
        return pb.InstallEngineResponse(
            code=errors.FAILED_PRECONDITION,
            message=f"{why}. Install the runtime into the plugin's environment: "
                    "pip install -c constraints.txt . (see the README)")

    async def InitEnv(self, request, context):
        try:
            self.rt.store.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return pb.InitEnvResponse(code=errors.FAILED_PRECONDITION,
                                      message=f"cannot create the model store "
                                              f"{self.rt.store.root}: {e}; set "
                                              "OVMS_PLUGIN_MODELS to a writable folder")
        return pb.InitEnvResponse(code=0, message=SUCCESS)

    async def UpgradeEngine(self, request, context):
        return pb.UpgradeEngineResponse(code=0, message="up to date")

    async def GetVersion(self, request, context):
        versions = await asyncio.to_thread(engine_check.versions)
        return pb.GetVersionResponse(code=0, message=SUCCESS,
                                     response_json=_json({"version": __version__, **versions}))

    # --- models -------------------------------------------------------------------------

    async def _pull(self, raw: bytes) -> AsyncIterator[dict[str, Any]]:
        """The pull's progress messages, then success or `{"error"}`; leaving early (the
        caller went away) cancels the pull."""
        try:
            req = pull_mod.PullRequest.from_json(_body(raw, "request_json"))
        except (StoreError, ServiceError) as e:
            yield {"error": errors.public(str(e))}
            return
        async with aclosing(self.rt.pull(req)) as messages:
            async for msg in messages:
                yield msg

    async def PullModel(self, request, context):
        last: dict[str, Any] = {}
        async for msg in self._pull(request.request_json):
            last = msg
        if "error" in last:
            return pb.PullModelResponse(code=errors.PULL_FAILED, message=last["error"],
                                        response_json=_json(last))
        return pb.PullModelResponse(code=0, message=SUCCESS, response_json=_json(last))

    async def PullModelStream(self, request, context):
        async for msg in self._pull(request.request_json):
            if "error" in msg:
                yield pb.PullModelStreamResponse(code=errors.PULL_FAILED, message=msg["error"],
                                                 data=_json(msg))
            else:
                yield pb.PullModelStreamResponse(code=0, message=SUCCESS, data=_json(msg))

    def _model_arg(self, raw: bytes, key: str = "model") -> Any:
        body = _body(raw, "request_json")
        value = body.get(key) if isinstance(body, dict) else None
        if not value:
            raise ServiceError(f"request_json needs {key!r}", errors.INVALID_REQUEST)
        return value

    async def DeleteModel(self, request, context):
        try:
            await self.rt.delete(self._model_arg(request.request_json))
            return pb.DeleteModelResponse(code=0, message=SUCCESS)
        except Exception as e:
            return _error(pb.DeleteModelResponse, e)

    async def ListModels(self, request, context):
        try:
            models = []
            for entry in await asyncio.to_thread(self.rt.store.list):
                item = entry.to_aog()
                item["details"].update(self.rt.placement(entry.name))  # loaded: where, why
                models.append(item)
            return pb.ListModelsResponse(code=0, message=SUCCESS,
                                         response_json=_json({"models": models}))
        except Exception as e:
            return _error(pb.ListModelsResponse, e)

    async def LoadModel(self, request, context):
        try:
            await self.rt.load(self._model_arg(request.request_json))
            return pb.LoadModelResponse(code=0, message=SUCCESS)
        except Exception as e:
            return _error(pb.LoadModelResponse, e)

    async def UnloadModel(self, request, context):
        try:
            names = self._model_arg(request.request_json, "models")
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ServiceError("'models' must be a list of model names, like "
                                   f"{{\"models\": [\"name\"]}}; got {shown(names)}",
                                   errors.INVALID_REQUEST)
            for name in names:
                await self.rt.unload(name)
            return pb.UnloadModelResponse(code=0, message=SUCCESS)
        except Exception as e:
            return _error(pb.UnloadModelResponse, e)

    async def GetRunningModels(self, request, context):
        try:
            return pb.GetRunningModelsResponse(code=0, message=SUCCESS, response_json=_json(
                {"models": await self.rt.running()}))
        except Exception as e:
            return _error(pb.GetRunningModelsResponse, e)


def add_to_server(servicer: ProviderServicer, server: grpc.aio.Server) -> None:
    pb_grpc.add_ProviderServiceServicer_to_server(servicer, server)
