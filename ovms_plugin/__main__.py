"""Command line. With no arguments (as AOG runs it) this is the plugin; otherwise a
subcommand. Imports stay lazy: plugin mode must print its handshake line within a second."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovms_plugin",
                                description="Local OpenVINO inference: AOG plugin and tools.")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="model store folder (default: $OVMS_PLUGIN_MODELS or "
                        "<AOG data dir>/engine/ovms-plugin/models)")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("plugin", help="run as an AOG plugin (what AOG does, with its environment)")
    s = sub.add_parser("install-aog", help="lay out the AOG plugin folder")
    s.add_argument("--plugins-dir", type=Path, default=None,
                   help="AOG's plugins dir (default: <AOG data dir>/plugins)")
    s.add_argument("--platform", default=None,
                   help="AOG platform whose launcher to write: linux_amd64, linux_arm64, "
                        "darwin_amd64, darwin_arm64, windows_amd64 (default: this one)")
    s.add_argument("--python", default=None, metavar="PATH",
                   help="Python the launcher runs (default: this one; required for "
                        "another platform, as a path on that machine)")
    s.add_argument("--pythonpath", default=None, metavar="DIR",
                   help="folder holding ovms_plugin to put on PYTHONPATH (default: this "
                        "package's parent; none for another platform)")
    s = sub.add_parser("demo", help="install the built-in default model (SmolLM2-135M-Instruct), "
                                    "serve it over HTTP and "
                                    "show how to call it (--aog: launch the plugin as AOG "
                                    "does and stream one chat answer instead)")
    s.add_argument("prompt", nargs="?", default="Give me three tips for staying focused.")
    s.add_argument("--max-tokens", type=int, default=200)
    s.add_argument("--aog", action="store_true", help="drive the plugin as AOG does, then exit")
    s.add_argument("--port", type=int, default=8000)
    sub.add_parser("list", help="list installed models")
    sub.add_parser("gc", help="remove what killed or failed pulls left behind, and say "
                              "what was freed")
    s = sub.add_parser("verify", help="check a model's files against its manifest")
    s.add_argument("model")
    s.add_argument("--repair", action="store_true", help="pull a damaged model again")
    s = sub.add_parser("pull", help="install a model: a Hugging Face repo id "
                                    "(org/name[@revision]), a GGUF repo with its quant "
                                    "(org/name-GGUF:Q4_K_M or hf.co/org/name:Q4_K_M), a "
                                    "catalog name, a local folder or a local .gguf file")
    s.add_argument("model")
    s.add_argument("--name", default=None, help="name to install it under")
    s.add_argument("--type", dest="model_type", default=None,
                   help="service it is for: chat, generate, embed, rerank, text-to-image")
    s.add_argument("--weight-format", default=None, choices=["fp32", "fp16", "int8", "int4"],
                   help="weight compression when converting (default: by task and size)")
    s.add_argument("--convert", action="store_true",
                   help="convert from the weights even when the repo holds OpenVINO IR")
    s.add_argument("--trust-remote-code", action="store_true",
                   help="allow the repo's own Python code to run during conversion")
    sub.add_parser("catalog", help="list the curated models that can be pulled by short name")
    s = sub.add_parser("devices", help="list OpenVINO's devices and what each service would "
                                       "run on")
    s.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("serve", add_help=False,
                   help="standalone OpenAI- and AOG-compatible HTTP server (serve --help)")
    s = sub.add_parser("bench", help="benchmark the plugin (or a running server) with the "
                                     "serving metrics vLLM reports")
    from ovms_plugin.bench.args import add_arguments
    add_arguments(s)
    s = sub.add_parser("rm", help="delete an installed model")
    s.add_argument("model")
    s = sub.add_parser("show", help="show an installed model's manifest")
    s.add_argument("model")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the server parses its own flags
        from ovms_plugin.http.server import main as serve_main
        return serve_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command is None:  # how AOG runs us; without AOG's cookie this explains itself
        args.command = "plugin"
    # Engine workers are started with fork+exec; gRPC's fork handlers only add log noise.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    if args.command == "plugin":
        from ovms_plugin.aog.plugin import main as plugin_main
        return plugin_main(args.models_dir)
    from ovms_plugin import cli
    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
