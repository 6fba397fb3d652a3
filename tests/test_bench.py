"""`python -m ovms_plugin bench` end to end on the tiny model: levels, the vLLM metric
names, the probes, the baselines and ratios, multi-turn, JSON and the plot. (Figures are
recorded by benchmarks, never asserted here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

METRICS = ["request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms",
           "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms",
           "mean_e2el_ms", "p90_e2el_ms", "p99_e2el_ms", "completed", "failed"]


def test_bench_chat_with_baselines_multi_turn_json_and_plot(plugin_home: Path, tmp_path: Path):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({"models": {"tiny-chat": {"scheduler": {
        "cache_size": 1}}}}))
    r = subprocess.run(
        [sys.executable, "-m", "ovms_plugin", "--models-dir", str(plugin_home / "models"),
         "bench", "--model", "tiny-chat", "--concurrency", "1,2", "--requests", "4",
         "--prompt-tokens", "16", "--max-tokens", "8", "--ignore-eos", "--baselines",
         "--multi-turn", "--json", str(out), "--plot", str(plot)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OVMS_PLUGIN_SETTINGS": str(settings)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "concurrency   2 [" in r.stderr  # progress
    assert "out tok/s" in r.stdout and "TTFT ms" in r.stdout  # the table
    result = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 2]
    for level in result["levels"]:
        assert all(k in level for k in METRICS)
        assert level["completed"] == 4 and level["failed"] == 0
        assert level["warmup_requests"] == level["concurrency"]
        assert level["total_output_tokens"] == 4 * 8  # ignore_eos: exactly max_tokens each
        assert level["p99_health_check_ms"] is not None
    base = result["baselines"]
    # The ceiling works on batches as large as the busiest level's: 2 prompts per call.
    assert base["ceiling_cb_generate"]["output_throughput"] > 0
    assert base["ceiling_cb_generate"]["prompts_per_call"] == 2
    assert base["cb_generate_all_at_once"]["prompts_per_call"] == 4
    assert base["naive_llmpipeline"]["mean_tpot_ms"] > 0
    assert set(result["ratios"]) == {"throughput_c2_vs_ceiling", "throughput_c2_vs_naive",
                                     "throughput_c2_vs_all_at_once",
                                     "ttft_c1_vs_llmpipeline", "tpot_c1_vs_llmpipeline"}
    turns = result["multi_turn"]
    assert turns["prefix_caching_on"]["turn2_mean_prompt_tokens"] > 16
    assert "turn2_ttft_gain" in turns
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_embed_service(tmp_path: Path, test_models: dict[str, Path]):
    from ovms_plugin import devmodels
    from ovms_plugin.store import pull
    from ovms_plugin.store.store import ModelStore
    store = ModelStore(tmp_path / "models")
    embed = devmodels.ensure_models(devmodels.default_cache_dir(), ["tiny-embed"])["tiny-embed"]
    pull.pull(store, pull.PullRequest(model=str(embed), name="e"), lambda m: None)
    out = tmp_path / "b.json"
    r = subprocess.run(
        [sys.executable, "-m", "ovms_plugin", "--models-dir", str(store.root), "bench",
         "--model", "e", "--concurrency", "4", "--requests", "16", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    [level] = json.loads(out.read_text())["levels"]
    assert level["completed"] == 16 and level["request_throughput"] > 0


def test_bench_side_by_side_with_a_running_peer(plugin_home: Path, tmp_path: Path):
    """--peer-url: the plugin (started by the bench with `serve`) against another
    OpenAI-compatible server (here a second plugin), interleaved rounds, medians, ratios."""
    from test_http import Server
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({"models": {"tiny-chat": {"scheduler": {
        "cache_size": 1}}}}))
    peer = Server(plugin_home, ["--port", "0", "--model", "tiny-chat", "--idle-unload", "0"],
                  env={"OVMS_PLUGIN_SETTINGS": str(settings)})
    out = tmp_path / "side.json"
    try:
        r = subprocess.run(
            [sys.executable, "-m", "ovms_plugin", "--models-dir", str(plugin_home / "models"),
             "bench", "--model", "tiny-chat", "--concurrency", "1,2", "--requests", "3",
             "--prompt-tokens", "16", "--max-tokens", "6", "--ignore-eos", "--rounds", "2",
             "--peer-url", peer.url, "--json", str(out)],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "OVMS_PLUGIN_SETTINGS": str(settings)})
    finally:
        peer.stop()
    assert r.returncode == 0, r.stderr[-3000:]
    assert "round 2/2, concurrency 2: peer" in r.stderr
    result = json.loads(out.read_text())
    assert result["peer"] == "peer" and result["rounds"] == 2
    # The plugin's engine worker's memory, read from its /metrics; a peer by URL: unknown.
    assert result["rss_bytes_after"]["plugin"] > 50 * 2**20
    assert result["rss_bytes_after"]["peer"] is None
    for row in result["levels"]:
        for system in ("plugin", "peer"):
            s = row[system]
            assert s["completed"] == 2 * 3 and s["failed"] == 0
            assert len(s["per_round"]["output_throughput"]) == 2
            assert s["output_throughput"] > 0 and s["mean_tpot_ms"] > 0
        assert row["ratio"]["output_throughput"] == round(
            row["plugin"]["output_throughput"] / row["peer"]["output_throughput"], 3)
    assert "ratio" in r.stdout  # the table


def test_llama_server_command_matches_the_plugin(tmp_path: Path):
    """The peer gets the plugin's thread count, one slot per concurrent request and a
    context per slot that holds prompt and answer; --peer is checked."""
    import argparse

    import pytest

    from ovms_plugin.bench import peer
    cmd = peer.llama_server_command(Path("/b/llama-server"), Path("/m/x.gguf"), 8123,
                                    slots=16, prompt_tokens=64, max_tokens=64)
    t = str(os.cpu_count())
    assert cmd[:2] == ["/b/llama-server", "-m"]
    args = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert args["-t"] == t and args["-tb"] == t and args["-np"] == "16"
    assert int(args["-c"]) // 16 >= 2 * 64 + 64 and args["--host"] == "127.0.0.1"
    assert peer.peer_body({"model": "m"}) == {"model": "m", "cache_prompt": False}
    with pytest.raises(argparse.ArgumentTypeError, match="llama-server=PATH"):
        peer.parse_peer("vllm=/x")


def test_side_by_side_flags_that_do_not_go_together_are_refused():
    import argparse

    import pytest

    from ovms_plugin.bench.args import add_arguments
    from ovms_plugin.bench.run import check_flags
    p = argparse.ArgumentParser()
    add_arguments(p)
    check_flags(p.parse_args(["--peer-url", "http://127.0.0.1:1", "--rounds", "5"]))
    for argv, why in (
            (["--peer", "llama-server=/x", "--peer-url", "http://127.0.0.1:1"], "not both"),
            (["--peer-url", "http://127.0.0.1:1", "--peer-gguf", "m.gguf"], "add --peer"),
            (["--rounds", "5"], "--rounds applies to a side-by-side run"),
            (["--peer-url", "http://127.0.0.1:1", "--baselines"], "takes no --baselines")):
        with pytest.raises(SystemExit, match=why):
            check_flags(p.parse_args(argv))
