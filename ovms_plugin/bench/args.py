"""Command-line flags of `python -m ovms_plugin bench` (kept light: parsed at start-up)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="installed model (default: the built-in one)")
    p.add_argument("--service", choices=["chat", "generate", "embed", "text-to-image"])
    p.add_argument("--concurrency", default="1,4,16", help="comma list of levels")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (default: 4 x concurrency, at least 8)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ignore-eos", action="store_true",
                   help="always generate --max-tokens tokens (fixed-length workload)")
    p.add_argument("--target", default="plugin",
                   help="'plugin' (launch it as AOG does) or the URL of a running server")
    p.add_argument("--api-key", default=os.environ.get("OVMS_PLUGIN_API_KEY"))
    p.add_argument("--baselines", action="store_true",
                   help="also run the engine's offline ceiling and a naive one-at-a-time "
                        "LLMPipeline server on the same prompts")
    p.add_argument("--multi-turn", action="store_true",
                   help="two-turn chats: shows the second turn's TTFT with prefix caching "
                        "against the same run without it")
    p.add_argument("--peer", default=None, metavar="llama-server=PATH",
                   help="side by side with llama.cpp's server, started here on the same "
                        "GGUF (--peer-gguf; the built-in model's by default)")
    p.add_argument("--peer-url", default=None, metavar="URL",
                   help="side by side with an OpenAI-compatible server already running")
    p.add_argument("--peer-gguf", type=Path, default=None,
                   help="the GGUF the model was converted from, for --peer")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds of a side-by-side run (medians are reported)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot", type=Path, default=None,
                   help="write a PNG of throughput and TTFT against concurrency")
