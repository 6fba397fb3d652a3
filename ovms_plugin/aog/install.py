"""`install-aog`: lays out the AOG plugin folder <plugins dir>/ovms-plugin/ with plugin.yaml
and a launcher that runs this environment's Python on this package."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import yaml

from ovms_plugin import paths

LAUNCHER = """#!/bin/sh
# Written by 'python -m ovms_plugin install-aog'. AOG runs this with no arguments and the
# working directory <plugin>/bin; exec keeps the PID AOG kills the Python process's.
{env}exec {python} -m ovms_plugin "$@"
"""


def install(plugins_dir: Path | None = None, models_dir: Path | None = None) -> Path:
    plugins_dir = plugins_dir or paths.default_plugins_dir()
    manifest = yaml.safe_load(paths.manifest_path().read_text())
    name = manifest["provider"]["name"]
    root = plugins_dir / name
    exe = root / manifest["platforms"]["linux_amd64"]["executable"]
    exe.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(paths.manifest_path(), root / "plugin.yaml")
    # The package's parent goes on PYTHONPATH so an editable or copied checkout works too.
    env = f"PYTHONPATH={shlex.quote(str(paths.PACKAGE_DIR.parent))}" \
          "${PYTHONPATH:+:$PYTHONPATH}\nexport PYTHONPATH\n"
    if models_dir is not None:
        env += f"OVMS_PLUGIN_MODELS=${{OVMS_PLUGIN_MODELS:-{shlex.quote(str(models_dir))}}}\n" \
               "export OVMS_PLUGIN_MODELS\n"
    tmp = exe.with_suffix(".tmp")
    tmp.write_text(LAUNCHER.format(env=env, python=shlex.quote(sys.executable)))
    tmp.chmod(0o755)
    os.replace(tmp, exe)
    return root
