"""Generates the Python protobuf/gRPC stubs from ovms_plugin/aog/proto/*.proto.

    python scripts/gen_protos.py          write the stubs next to the .proto files
    python scripts/gen_protos.py --check  exit 1 if the committed stubs are out of date

The stubs are generated with grpcio-tools at the version pinned in constraints.txt; the
test suite runs --check so that a .proto edit without regeneration fails CI.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "ovms_plugin" / "aog" / "proto"


def generate(out_root: Path) -> list[Path]:
    """Runs protoc on every .proto; returns the generated files relative to out_root."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    protos = sorted(p.relative_to(ROOT).as_posix() for p in PROTO_DIR.glob("*.proto"))
    # Paths relative to the repository root make the stubs import each other as
    # ovms_plugin.aog.proto.*, so they work inside the package.
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_root}",
            f"--grpc_python_out={out_root}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out_root) for p in out_root.rglob("*_pb2*.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    if not args.check:
        files = generate(ROOT)
        print("\n".join(str(f) for f in files))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        stale = [str(f) for f in files
                 if not (ROOT / f).exists() or not filecmp.cmp(Path(tmp) / f, ROOT / f, False)]
    committed = {p.relative_to(ROOT) for p in PROTO_DIR.glob("*_pb2*.py")}
    stale += [str(f) for f in committed - set(files)]
    if stale:
        print("stale generated stubs (run: python scripts/gen_protos.py): " + ", ".join(stale))
        return 1
    print("generated stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
