"""Orchestrates a benchmark run: the model and prompts, the server (the plugin launched as
AOG launches it, or a running HTTP server), one load-generator process per concurrency
level, the in-process baselines, and the report (table, JSON, plot)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ovms_plugin import paths, settings
from ovms_plugin.bench.stats import Record, percentile, summarize
from ovms_plugin.store.store import ModelEntry, ModelStore
from ovms_plugin.sysinfo import machine_description

log = logging.getLogger(__name__)
WORDS = ("the local model answers questions about laptops graphics memory tokens cache "
         "batching engines drivers kernels images vectors search documents stories").split()


def _prompts(tok: Any, n: int, tokens: int) -> list[str]:
    """n distinct prompts of about `tokens` tokens each (distinct from their first
    words, so prefix caching cannot share them)."""
    out = []
    for i in range(n):
        words = [f"Request {i}:"] + [WORDS[(i * 7 + j * 5) % len(WORDS)] for j in range(tokens)]
        text = " ".join(words)
        ids = tok.encode(text, add_special_tokens=False).input_ids.data[0].tolist()[:tokens]
        out.append(tok.decode(ids))
    return out


def _body(service: str, model: str, prompt: str, args: argparse.Namespace) -> dict[str, Any]:
    if service == "chat":
        return {"model": model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": args.ignore_eos}
    if service == "generate":
        return {"model": model, "prompt": prompt, "max_tokens": args.max_tokens,
                "temperature": 0, "ignore_eos": args.ignore_eos}
    if service == "embed":
        return {"model": model, "input": prompt}
    return {"model": model, "prompt": prompt[:200], "size": "64x64", "num_inference_steps": 4}


def _loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one load-generator process; shows its progress on one redrawn line."""
    with tempfile.TemporaryDirectory(prefix="ovms-loadgen-") as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.Popen([sys.executable, "-m", "ovms_plugin.bench.loadgen"],
                                stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdin and proc.stderr
        proc.stdin.write(json.dumps({**spec, "out": str(out)}))
        proc.stdin.close()
        total = len(spec["bodies"])
        for line in proc.stderr:
            if line.startswith("progress "):
                done = int(line.split()[1].split("/")[0])
                bar = "#" * (30 * done // total) + "." * (30 - 30 * done // total)
                print(f"\r  concurrency {spec['concurrency']:>3} [{bar}] {done}/{total}",
                      end="", file=sys.stderr, flush=True)
            else:
                sys.stderr.write(line)
        print(file=sys.stderr)
        if proc.wait() != 0:
            raise SystemExit(f"the load generator failed (exit {proc.returncode})")
        return json.loads(out.read_text())


def _p99_ms(values: list[float]) -> float | None:
    return round(percentile(values, 0.99) * 1000, 2) if values else None


@dataclass
class Level:
    """One concurrency level and its prompts: a warm-up wave and the measured requests,
    all distinct (the same prompt twice would be a prefix-cache hit)."""
    concurrency: int
    warmup: list[Any]
    bodies: list[Any]


def _run_levels(address: str, target: str, service: str, plan: list[Level],
                args: argparse.Namespace, probe: bool = True) -> list[dict[str, Any]]:
    results = []
    for level in plan:
        c, bodies = level.concurrency, level.bodies
        spec = {"target": target, "address": address, "service": service,
                "bodies": bodies, "concurrency": c, "api_key": args.api_key, "probe": probe}
        # One untimed wave at this concurrency first, on prompts of its own: a pipeline's
        # first batches of a new size run up to a third slower (kernels for new shapes,
        # KV-cache blocks allocated), which is start-up cost, not serving throughput.
        _loadgen({**spec, "bodies": level.warmup, "probe": False})
        raw = _loadgen(spec)
        records = [Record(**r) for r in raw["records"]]
        summary = {"concurrency": c, "requests": len(bodies),
                   "warmup_requests": len(level.warmup), **summarize(records, raw["duration"])}
        summary["p99_health_check_ms"] = _p99_ms(raw["probe"]["health"])
        summary["p99_list_models_ms"] = _p99_ms(raw["probe"]["list_models"])
        results.append(summary)
    return results


def _multi_turn(store: ModelStore, model: str, bodies_for: Any, levels: list[int],
                args: argparse.Namespace) -> dict[str, Any]:
    """Two-turn chats at the lowest concurrency level, on the plugin as configured (prefix
    caching on by default) and again with prefix caching off: the second turn's TTFT
    shows what reusing the first turn's KV cache saves."""
    c = min(levels)
    n = args.requests or max(8, 4 * c)
    out: dict[str, Any] = {"concurrency": c, "requests": n}
    for label, override in (("prefix_caching_on", {"enable_prefix_caching": True}),
                            ("prefix_caching_off", {"enable_prefix_caching": False})):
        def level(address: str) -> dict[str, Any]:
            spec = {"target": "grpc", "address": address, "service": "chat",
                    "bodies": bodies_for(n), "concurrency": c, "multi_turn": True}
            return _loadgen(spec)

        raw = _with_plugin(store, model, level, {model: {"scheduler": override}})
        first = summarize([Record(**r) for r in raw["records"]], raw["duration"])
        second = summarize([Record(**r) for r in raw["second_turn"]], raw["duration"])
        out[label] = {"turn1_mean_ttft_ms": first["mean_ttft_ms"],
                      "turn2_mean_ttft_ms": second["mean_ttft_ms"],
                      "turn2_mean_prompt_tokens": round(
                          second["total_input_tokens"] / max(1, second["completed"]), 1)}
    on, off = out["prefix_caching_on"], out["prefix_caching_off"]
    if on["turn2_mean_ttft_ms"]:
        out["turn2_ttft_gain"] = round(off["turn2_mean_ttft_ms"] / on["turn2_mean_ttft_ms"], 2)
    return out


def _baselines(entry: ModelEntry, level: Level, args: argparse.Namespace) -> dict[str, Any]:
    """In this process, with the server stopped, on the busiest level's prompts: the
    engine's offline throughput (the ceiling) and one LLMPipeline serving them one after
    another (the naive server)."""
    import openvino_genai as ov_genai

    from ovms_plugin import devices
    ms = settings.model_settings(entry.name)
    device = devices.candidates("chat", devices.discover(), ms.device)[0]
    tok = ov_genai.Tokenizer(str(entry.path))

    def rendered(bodies: list[dict[str, Any]]) -> list[str]:
        if args.service_resolved == "chat":
            return [tok.apply_chat_template(b["messages"], add_generation_prompt=True)
                    for b in bodies]
        return [b["prompt"] for b in bodies]

    prompts, warmup = rendered(level.bodies), rendered(level.warmup)
    c = level.concurrency

    def config() -> Any:
        gc = ov_genai.GenerationConfig(max_new_tokens=args.max_tokens, do_sample=False,
                                       ignore_eos=args.ignore_eos)
        gc.apply_chat_template = False  # rendered already, exactly as the plugin renders
        return gc

    def generate(cb: Any, batch: list[str]) -> int:
        results = cb.generate(batch, [config()] * len(batch))
        # Each result's perf metrics describe the whole generate() call.
        return max(int(r.perf_metrics.get_num_generated_tokens()) for r in results)

    sc = ov_genai.SchedulerConfig()
    for key, value in settings.scheduler_config(device, ms, entry.size).items():
        setattr(sc, key, value)
    cb = ov_genai.ContinuousBatchingPipeline(str(entry.path), sc, device, ms.properties)
    generate(cb, warmup)  # the same untimed wave the plugin's level had
    # The ceiling works on batches of the size the plugin could have: `c` prompts per
    # generate() call. (max_num_seqs does not cap a batch under dynamic split-fuse: 64
    # prompts given at once ran in 64 steps, all of them in every step.)
    started = time.perf_counter()
    tokens = sum(generate(cb, prompts[i:i + c]) for i in range(0, len(prompts), c))
    seconds = time.perf_counter() - started
    ceiling = {"requests": len(prompts), "prompts_per_call": c, "seconds": round(seconds, 3),
               "output_throughput": round(tokens / seconds, 2)}
    # For reference: every prompt in one call, batches larger than any client sent.
    started = time.perf_counter()
    tokens = generate(cb, prompts)
    seconds = time.perf_counter() - started
    all_at_once = {"requests": len(prompts), "prompts_per_call": len(prompts),
                   "seconds": round(seconds, 3),
                   "output_throughput": round(tokens / seconds, 2)}
    del cb

    llm = ov_genai.LLMPipeline(str(entry.path), device, **ms.properties)
    llm.generate(warmup[0], config())
    ttfts, tpots, total_tokens = [], [], 0
    started = time.perf_counter()
    for prompt in prompts:
        res = llm.generate([prompt], config())
        pm = res.perf_metrics
        ttfts.append(pm.get_ttft().mean / 1000)
        tpots.append(pm.get_tpot().mean / 1000)
        total_tokens += int(pm.get_num_generated_tokens())
    seconds = time.perf_counter() - started
    naive = {"requests": len(prompts), "seconds": round(seconds, 3),
             "output_throughput": round(total_tokens / seconds, 2),
             "mean_ttft_ms": round(sum(ttfts) / len(ttfts) * 1000, 2),
             "mean_tpot_ms": round(sum(tpots) / len(tpots) * 1000, 2)}
    return {"ceiling_cb_generate": ceiling, "cb_generate_all_at_once": all_at_once,
            "naive_llmpipeline": naive}


def _table(levels: list[dict[str, Any]]) -> str:
    cols = [("concurrency", "conc"), ("completed", "ok"), ("failed", "err"),
            ("request_throughput", "req/s"), ("output_throughput", "out tok/s"),
            ("mean_ttft_ms", "TTFT ms"), ("p99_ttft_ms", "p99 TTFT"),
            ("mean_tpot_ms", "TPOT ms"), ("mean_itl_ms", "ITL ms"),
            ("mean_e2el_ms", "E2E ms"), ("p99_e2el_ms", "p99 E2E"),
            ("p99_health_check_ms", "p99 health"), ("p99_list_models_ms", "p99 list")]
    lines = ["  ".join(f"{title:>10}" for _, title in cols)]
    for row in levels:
        lines.append("  ".join(f"{row.get(key) if row.get(key) is not None else '-':>10}"
                               for key, _ in cols))
    return "\n".join(lines)


def _plot(levels: list[dict[str, Any]], out: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'ovms-plugin[bench]'") from None
    xs = [r["concurrency"] for r in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(xs, [r["output_throughput"] or r["request_throughput"] for r in levels], "o-")
    a.set_xlabel("concurrency")
    a.set_ylabel("output tokens/s (requests/s for non-LLM)")
    a.set_xscale("log", base=2)
    b.plot(xs, [r["mean_ttft_ms"] for r in levels], "o-", label="mean")
    b.plot(xs, [r["p99_ttft_ms"] for r in levels], "s--", label="p99")
    b.set_xlabel("concurrency")
    b.set_ylabel("TTFT (ms)")
    b.set_xscale("log", base=2)
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def check_flags(args: argparse.Namespace) -> None:
    """Flags that do not go together are refused, not ignored."""
    side = bool(args.peer or args.peer_url)
    if args.peer and args.peer_url:
        raise SystemExit("give --peer (start llama-server here) or --peer-url (a server "
                         "already running), not both")
    if args.peer_gguf and not args.peer:
        raise SystemExit("--peer-gguf names the GGUF for --peer llama-server=PATH; add "
                         "--peer, or leave --peer-gguf out")
    if args.rounds != 3 and not side:
        raise SystemExit("--rounds applies to a side-by-side run (--peer or --peer-url)")
    if side and (args.baselines or args.multi_turn or args.plot or args.target != "plugin"):
        raise SystemExit("a side-by-side run (--peer, --peer-url) takes no --baselines, "
                         "--multi-turn, --plot or --target; run those separately")


def run(args: argparse.Namespace) -> int:
    import openvino_genai as ov_genai

    check_flags(args)
    from ovms_plugin.builtin import DEFAULT_MODEL
    from ovms_plugin.store.pull import ensure_default_model
    store = ModelStore(args.models_dir or paths.models_dir())
    model = args.model or DEFAULT_MODEL
    if args.model is None:  # the CLI installed it already, with a progress bar
        ensure_default_model(store)
    entry = store.get(model)
    service = args.service or (entry.services or ("chat",))[0]
    args.service_resolved = service
    if service not in entry.services:
        raise SystemExit(f"model {model!r} serves {list(entry.services)}, not {service!r}")
    levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    tok = ov_genai.Tokenizer(str(entry.path)) if service != "text-to-image" else None
    sizes = [(c, args.requests or max(8, 4 * c)) for c in levels]
    total = sum(c + n for c, n in sizes)
    prompts = _prompts(tok, total, args.prompt_tokens) if tok else \
        [f"a picture number {i} of a red cat" for i in range(total)]
    bodies = [_body(service, model, p, args) for p in prompts]
    plan, start = [], 0
    for c, n in sizes:
        plan.append(Level(c, bodies[start:start + c], bodies[start + c:start + c + n]))
        start += c + n

    def bodies_for(n: int) -> list[dict[str, Any]]:
        return bodies[:n]

    if args.peer or args.peer_url:
        return _side_by_side(args, store, entry, service, levels, sizes, tok)
    result: dict[str, Any] = {
        "machine": machine_description(), "model": model, "service": service,
        "quantization": entry.manifest.get("quantization_level"),
        "command": "python -m ovms_plugin bench " + " ".join(sys.argv[2:]),
        "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
        "ignore_eos": args.ignore_eos, "target": args.target}
    print(f"benchmarking {model} ({service}) on {args.target}", file=sys.stderr)
    if args.target == "plugin":
        result["levels"] = _with_plugin(store, model, lambda address: _run_levels(
            address, "grpc", service, plan, args))
    else:
        result["levels"] = _run_levels(args.target, "http", service, plan, args)
    if args.baselines and service in ("chat", "generate"):
        print("baselines: offline ContinuousBatchingPipeline.generate and one-at-a-time "
              "LLMPipeline", file=sys.stderr)
        busiest = max(range(len(plan)), key=lambda i: plan[i].concurrency)
        result["baselines"] = _baselines(entry, plan[busiest], args)
        top = result["levels"][busiest]
        one = next((r for r in result["levels"] if r["concurrency"] == 1), None)
        base = result["baselines"]
        ratios = {
            f"throughput_c{top['concurrency']}_vs_ceiling": round(
                top["output_throughput"] / base["ceiling_cb_generate"]["output_throughput"], 3),
            f"throughput_c{top['concurrency']}_vs_all_at_once": round(
                top["output_throughput"]
                / base["cb_generate_all_at_once"]["output_throughput"], 3),
            f"throughput_c{top['concurrency']}_vs_naive": round(
                top["output_throughput"] / base["naive_llmpipeline"]["output_throughput"], 3)}
        if one:
            ratios["ttft_c1_vs_llmpipeline"] = round(
                one["mean_ttft_ms"] / base["naive_llmpipeline"]["mean_ttft_ms"], 3)
            ratios["tpot_c1_vs_llmpipeline"] = round(
                one["mean_tpot_ms"] / base["naive_llmpipeline"]["mean_tpot_ms"], 3)
        result["ratios"] = ratios
    if args.multi_turn and service == "chat":
        print("multi-turn: second-turn TTFT with and without prefix caching", file=sys.stderr)
        result["multi_turn"] = _multi_turn(store, model, bodies_for, levels, args)
    print(_table(result["levels"]))
    if "multi_turn" in result:
        print(json.dumps(result["multi_turn"]))
    if "ratios" in result:
        print(json.dumps(result["baselines"]))
        for key, value in result["ratios"].items():
            print(f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        _plot(result["levels"], args.plot, f"{model} ({service}), {machine_description()}")
    return 0


def _side_by_side(args: argparse.Namespace, store: ModelStore, entry: ModelEntry,
                  service: str, levels: list[int], sizes: list[tuple[int, int]],
                  tok: Any) -> int:
    """The plugin (`serve`) against a peer server on the same model, through the same
    OpenAI streaming client, in interleaved rounds (bench/peer.py)."""
    from ovms_plugin.bench import peer
    if service not in ("chat", "generate"):
        raise SystemExit("--peer and --peer-url compare chat or generate, not " + service)
    if args.rounds < 1:
        raise SystemExit("--rounds must be 1 or more")
    servers: dict[str, Any] = {
        "plugin": lambda: peer.plugin_server(store.root, entry.name, {})}
    if args.peer_url:
        name, url = "peer", args.peer_url.rstrip("/")
        servers[name] = lambda: contextlib.nullcontext(peer.Running(url))
        gguf = None
    else:
        name, binary = peer.parse_peer(args.peer)
        gguf = _peer_gguf(args, entry)
        servers[name] = lambda: peer.llama_server(
            binary, gguf, slots=max(levels), prompt_tokens=args.prompt_tokens,
            max_tokens=args.max_tokens)
    per_round = sum(c + n for c, n in sizes)
    prompts = _prompts(tok, per_round * args.rounds * 2, args.prompt_tokens)
    bodies = [_body(service, entry.name, p, args) for p in prompts]

    def bodies_for(r: int, c: int, system: str) -> Level:
        start = (2 * r + (system != "plugin")) * per_round
        for level_c, n in sizes:
            if level_c == c:
                mine = bodies[start:start + c + n]
                if system == "llama-server":
                    mine = [peer.peer_body(b) for b in mine]
                return Level(c, mine[:c], mine[c:])
            start += level_c + n
        raise AssertionError(c)

    def run_level(url: str, system: str, level: Level) -> dict[str, Any]:
        return _run_levels(url, "http", service, [level], args, probe=False)[0]

    print(f"benchmarking {entry.name} ({service}): the plugin against {name}, "
          f"{args.rounds} interleaved rounds", file=sys.stderr)
    compared = peer.side_by_side(levels, bodies_for, run_level, servers, args.rounds)
    result = {"machine": machine_description(), "model": entry.name, "service": service,
              "command": "python -m ovms_plugin bench " + " ".join(sys.argv[2:]),
              "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
              "ignore_eos": args.ignore_eos, "peer": name,
              "peer_command": peer.llama_server_command(
                  Path("llama-server"), Path(gguf.name), 0, slots=max(levels),
                  prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens)
              if gguf else args.peer_url, **compared}
    print(peer.table(compared, ("plugin", name)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _peer_gguf(args: argparse.Namespace, entry: ModelEntry) -> Path:
    """The GGUF the peer serves: --peer-gguf, or the built-in model's own file."""
    from ovms_plugin import builtin
    if args.peer_gguf:
        if not args.peer_gguf.is_file():
            raise SystemExit(f"--peer-gguf: {args.peer_gguf} is not a file")
        return args.peer_gguf
    if entry.name == builtin.DEFAULT_MODEL:
        return builtin.fetch_gguf()
    raise SystemExit(f"--peer needs --peer-gguf FILE: the GGUF model {entry.name!r} was "
                     "converted from, so both servers run the same weights")


def _with_plugin(store: ModelStore, model: str, body: Any,
                 settings_override: dict[str, Any] | None = None) -> Any:
    """Runs `body(address)` against the plugin, launched from a temporary install exactly
    as AOG launches it, on this store."""
    from ovms_plugin.aog.host import AogHost
    from ovms_plugin.aog.install import install
    with tempfile.TemporaryDirectory(prefix="ovms-bench-") as tmp:
        env = {"OVMS_PLUGIN_MODELS": str(store.root)}
        if settings_override:
            data = settings.load_file()
            for name, extra in settings_override.items():
                section = data.setdefault("models", {}).setdefault(name, {})
                for key, value in extra.items():
                    section[key] = {**(section.get(key) or {}), **value}
            path = Path(tmp) / "settings.yaml"
            path.write_text(yaml.safe_dump(data))
            env["OVMS_PLUGIN_SETTINGS"] = str(path)
        host = AogHost(install(Path(tmp) / "plugins"), env=env).start()
        try:
            r = host.json_call("LoadModel", {"model": model})
            if r.code:
                raise SystemExit(f"LoadModel failed: {r.message}")
            return body(host.address)
        finally:
            host.kill()
