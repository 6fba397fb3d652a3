"""`install-aog`: lays out the AOG plugin folder <plugins dir>/ovms-plugin/ with plugin.yaml
and a launcher, at the path plugin.yaml names for the platform, that runs a Python on this
package.

Linux and macOS get a `#!/bin/sh` launcher. Windows gets a real .exe, because AOG execs the
executable directly: distlib's prebuilt launcher (the one pip's console scripts use)
followed by a shebang line naming python.exe and a zip whose __main__.py starts the plugin.
A layout for another platform than the running one (built here, copied there) needs the
target's python path (`python`), since this one's means nothing there."""

from __future__ import annotations

import io
import os
import shlex
import shutil
import sys
import zipfile
from importlib import resources
from pathlib import Path

import yaml

from ovms_plugin import paths
from ovms_plugin.osutil import aog_platform

SH_LAUNCHER = """#!/bin/sh
# Written by 'python -m ovms_plugin install-aog'. AOG runs this with no arguments and the
# working directory <plugin>/bin; exec keeps the PID AOG kills the Python process's.
{env}exec {python} -m ovms_plugin "$@"
"""

# __main__.py of the zip appended to the Windows launcher. The launcher runs
# `"<python.exe>" "<this .exe>"`, and Python runs the zip's __main__.py; it does what the
# sh launcher does: the package's parent on PYTHONPATH (for this process and the workers it
# starts), the models dir unless the environment sets one, then `python -m ovms_plugin`.
WINDOWS_MAIN = '''\
# Written by 'python -m ovms_plugin install-aog' for AOG on Windows.
import os
import sys

PYTHONPATH = {pythonpath!r}
MODELS = {models!r}

if PYTHONPATH:
    sys.path.insert(0, PYTHONPATH)

if __name__ == "__main__":
    if PYTHONPATH:
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (PYTHONPATH, os.environ.get("PYTHONPATH")) if p)
    if MODELS and not os.environ.get("OVMS_PLUGIN_MODELS"):
        os.environ["OVMS_PLUGIN_MODELS"] = MODELS
    from ovms_plugin.__main__ import main

    sys.exit(main())
'''

# distlib's console launcher (t64.exe), not the GUI one (w64.exe). Both hand their own
# standard handles to the child (run_child in distlib's launcher source duplicates
# GetStdHandle's handles and sets STARTF_USESTDHANDLES in both builds), so go-plugin's
# stdout pipe would reach Python either way. But w64 reports its own failures (python.exe
# missing, ...) in a modal MessageBox, which under AOG nobody sees and which blocks it
# forever, where t64 writes them to stderr, which AOG logs; and w64 creates its child
# python.exe, a console program, with no console and no CREATE_NO_WINDOW, so Windows would
# open a console window for it anyway (only pythonw.exe avoids that, and pythonw has no
# console for the engine workers to inherit). t64 shares AOG's console, if it has one.
WINDOWS_LAUNCHER = "t64.exe"

SUPPORTED = ("linux_amd64", "linux_arm64", "darwin_amd64", "darwin_arm64", "windows_amd64")


class InstallError(ValueError):
    """A layout that cannot be written: unknown platform, missing or unusable paths."""


def running_platform() -> str:
    """AOG's <goos>_<goarch> name for this machine, e.g. linux_amd64, windows_amd64."""
    return aog_platform()


def install(plugins_dir: Path | None = None, models_dir: Path | str | None = None,
            platform: str | None = None, python: str | None = None,
            pythonpath: str | None = None) -> Path:
    """Writes <plugins dir>/ovms-plugin/{plugin.yaml, the platform's launcher} and returns
    the plugin folder.

    platform: AOG's <goos>_<goarch> (default: the running one). python: the interpreter the
    launcher runs (default: this one; required for another platform). pythonpath: put on
    PYTHONPATH (default: this package's parent on the running platform, so an editable or
    copied checkout works; none for another platform: there the package must be installed
    in that python's environment, or give its parent folder). models_dir is written as
    given, so for another platform give a path valid there."""
    here = running_platform()
    platform = platform or here
    if platform not in SUPPORTED:
        raise InstallError(f"unsupported platform {platform!r}; supported: "
                           f"{', '.join(SUPPORTED)}")
    if python is None:
        if platform != here:
            raise InstallError(f"building the {platform} layout on {here} needs --python: "
                               "the path of the Python interpreter on the target machine "
                               "(e.g. C:\\Users\\me\\venv\\Scripts\\python.exe)")
        python = sys.executable
    if pythonpath is None and platform == here:
        pythonpath = str(paths.PACKAGE_DIR.parent)
    models = None if models_dir is None else str(models_dir)

    plugins_dir = plugins_dir or paths.default_plugins_dir()
    manifest = yaml.safe_load(paths.manifest_path().read_text())
    entry = manifest["platforms"].get(platform)
    if entry is None:  # SUPPORTED and plugin.yaml disagree: a packaging bug
        raise InstallError(f"plugin.yaml declares no executable for {platform}")
    root = plugins_dir / manifest["provider"]["name"]
    exe = root / entry["executable"]
    exe.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(paths.manifest_path(), root / "plugin.yaml")
    if platform.startswith("windows_"):
        data = windows_launcher(python, pythonpath, models)
    else:
        data = sh_launcher(python, pythonpath, models).encode()
    tmp = exe.with_name(exe.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    os.replace(tmp, exe)
    return root


def sh_launcher(python: str, pythonpath: str | None, models: str | None) -> str:
    env = ""
    if pythonpath:
        env += f"PYTHONPATH={shlex.quote(pythonpath)}${{PYTHONPATH:+:$PYTHONPATH}}\n" \
               "export PYTHONPATH\n"
    if models is not None:
        env += f"OVMS_PLUGIN_MODELS=${{OVMS_PLUGIN_MODELS:-{shlex.quote(models)}}}\n" \
               "export OVMS_PLUGIN_MODELS\n"
    return SH_LAUNCHER.format(env=env, python=shlex.quote(python))


def windows_launcher(python: str, pythonpath: str | None, models: str | None) -> bytes:
    """distlib's launcher + `#!"<python.exe>"` + a zip holding __main__.py: the format
    distlib's ScriptMaker writes for pip's console scripts. The launcher finds the zip at
    the end of its own file, reads the shebang line just before it and runs that python on
    itself, passing the environment and standard handles through and exiting with the
    child's exit code (the child dies with it: a kill-on-close job object)."""
    if '"' in python or "\n" in python or "\r" in python:
        raise InstallError(f"the python path cannot contain quotes or newlines: {python!r}")
    try:
        launcher = (resources.files("distlib") / WINDOWS_LAUNCHER).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise InstallError("the Windows launcher comes from the distlib package: "
                           "pip install 'distlib>=0.3.9'") from e
    # Always quoted: python.exe paths often hold spaces (C:\Program Files\...).
    shebang = f'#!"{python}"\n'.encode()
    body = io.BytesIO()
    with zipfile.ZipFile(body, "w") as zf:
        # A fixed date: the same inputs give the same bytes.
        info = zipfile.ZipInfo("__main__.py", date_time=(1980, 1, 1, 0, 0, 0))
        zf.writestr(info, WINDOWS_MAIN.format(pythonpath=pythonpath, models=models))
    return launcher + shebang + body.getvalue()
