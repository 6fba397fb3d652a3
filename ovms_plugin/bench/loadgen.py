"""The load generator, run in its own process so that its CPU does not stall the server's
event loop: `python -m ovms_plugin.bench.loadgen < spec.json` (writes spec["out"]).

spec: {"target": "grpc" | "http", "address": "127.0.0.1:PORT" | "http://host:port",
       "service": "chat" | "generate" | "embed" | "text-to-image", "bodies": [{...}],
       "concurrency": N, "api_key"?: str, "probe": bool, "multi_turn"?: bool,
       "out": "result.json"}
Streams are timed per event; with "probe", HealthCheck and ListModels (gRPC) or /health
and /v1/models (HTTP) are timed every 50 ms while the load runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from dataclasses import asdict
from typing import Any, ClassVar

from ovms_plugin.bench.stats import Record

STREAMED = ("chat", "generate")


def _delta_text(service: str, event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    if service == "chat":
        return choices[0].get("delta", {}).get("content") or ""
    return choices[0].get("text") or ""


def _take_event(rec: Record, service: str, started: float, data: bytes) -> None:
    if data == b"[DONE]":
        return
    event = json.loads(data)
    now = time.perf_counter() - started
    if text := _delta_text(service, event):
        if rec.ttft is None:
            rec.ttft = now
        rec.chunk_times.append(now)
        rec.text += text
    if usage := event.get("usage"):
        rec.prompt_tokens = usage.get("prompt_tokens", 0)
        rec.output_tokens = usage.get("completion_tokens", 0)


class GrpcTarget:
    def __init__(self, address: str) -> None:
        import grpc

        from ovms_plugin.aog.proto import provider_pb2 as pb
        from ovms_plugin.aog.proto import provider_pb2_grpc as pb_grpc
        self.pb = pb
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.ProviderServiceStub(self.channel)

    async def run(self, service: str, body: dict[str, Any], rec: Record) -> None:
        started = time.perf_counter()
        request = self.pb.InvokeServiceRequest(service_name=service,
                                               request_data=json.dumps(body).encode())
        if service in STREAMED:
            buf = b""
            async for msg in self.stub.InvokeServiceStream(request, timeout=3600):
                if msg.code:
                    rec.error = f"{msg.code}: {msg.message}"
                    return
                buf += msg.chunk_data
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    _take_event(rec, service, started, event.removeprefix(b"data: "))
        else:
            r = await self.stub.InvokeService(request, timeout=3600)
            if r.code:
                rec.error = f"{r.code}: {r.message}"
                return
            rec.ttft = time.perf_counter() - started
        rec.e2e = time.perf_counter() - started
        rec.ok = True

    async def probes(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        await self.stub.HealthCheck(self.pb.HealthCheckRequest(), timeout=10)
        t1 = time.perf_counter()
        await self.stub.ListModels(self.pb.ListModelsRequest(), timeout=10)
        return t1 - t0, time.perf_counter() - t1

    async def close(self) -> None:
        await self.channel.close()


class HttpTarget:
    """The standalone server's OpenAI-compatible routes."""

    ROUTES: ClassVar[dict[str, str]] = {
        "chat": "/v1/chat/completions", "generate": "/v1/completions",
        "embed": "/v1/embeddings", "text-to-image": "/v1/images/generations"}

    def __init__(self, url: str, api_key: str | None) -> None:
        import aiohttp
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # A connection per request: llama-server closes idle keep-alive connections, and a
        # request sent on one fails ("Can not write request body"). Loopback connects cost
        # about 0.1 ms, the same for every server measured.
        self.session = aiohttp.ClientSession(
            headers=headers, connector=aiohttp.TCPConnector(limit=0, force_close=True))

    async def run(self, service: str, body: dict[str, Any], rec: Record) -> None:
        started = time.perf_counter()
        if service == "text-to-image":
            body = {**body, "response_format": "b64_json"}
        if service in STREAMED:
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with self.session.post(self.url + self.ROUTES[service], json=body) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            if service in STREAMED:
                async for line in resp.content:
                    line = line.strip()
                    if line.startswith(b"data: "):
                        _take_event(rec, service, started, line[len(b"data: "):])
            else:
                await resp.read()
                rec.ttft = time.perf_counter() - started
        rec.e2e = time.perf_counter() - started
        rec.ok = True

    async def probes(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        async with self.session.get(self.url + "/health") as r:
            await r.read()
        t1 = time.perf_counter()
        async with self.session.get(self.url + "/v1/models") as r:
            await r.read()
        return t1 - t0, time.perf_counter() - t1

    async def close(self) -> None:
        await self.session.close()


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    target = GrpcTarget(spec["address"]) if spec["target"] == "grpc" else \
        HttpTarget(spec["address"], spec.get("api_key"))
    bodies = list(spec["bodies"])
    records = [Record() for _ in bodies]
    # Multi-turn: each chat gets a second turn carrying the first turn's answer, so its
    # prompt starts with everything the engine has just seen (a prefix-cache hit).
    second = [Record() for _ in bodies] if spec.get("multi_turn") else []
    next_index = 0
    done = 0
    health: list[float] = []
    listing: list[float] = []
    stop = asyncio.Event()

    async def worker() -> None:
        nonlocal next_index, done
        while next_index < len(bodies):
            i = next_index
            next_index += 1
            records[i].start = time.perf_counter()
            try:
                await target.run(spec["service"], bodies[i], records[i])
                if second and records[i].ok:
                    follow = {**bodies[i], "messages": [
                        *bodies[i]["messages"],
                        {"role": "assistant", "content": records[i].text},
                        {"role": "user", "content": "Go on, in more detail."}]}
                    second[i].start = time.perf_counter()
                    await target.run(spec["service"], follow, second[i])
            except Exception as e:
                records[i].error = f"{type(e).__name__}: {e}"
            done += 1
            print(f"progress {done}/{len(bodies)}", file=sys.stderr, flush=True)

    async def probe() -> None:
        while not stop.is_set():
            try:
                h, lm = await target.probes()
                health.append(h)
                listing.append(lm)
            except Exception:
                pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)

    probe_task = asyncio.create_task(probe()) if spec.get("probe") else None
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(int(spec["concurrency"]))))
    duration = time.perf_counter() - started
    stop.set()
    if probe_task:
        await probe_task
    await target.close()
    return {"records": [asdict(r) for r in records], "duration": duration,
            "second_turn": [asdict(r) for r in second],
            "probe": {"health": health, "list_models": listing}}


def main() -> int:
    spec = json.load(sys.stdin)
    result = asyncio.run(run(spec))
    # To a file, not stdout: the parent reads our stderr (progress) until we exit, and a
    # large result would fill the stdout pipe and block us both.
    with open(spec["out"], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
