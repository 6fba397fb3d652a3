"""Where the plugin keeps its data: AOG's data dir, the model store, settings and caches."""

from __future__ import annotations

import os
from pathlib import Path

from ovms_plugin import osutil

PLUGIN_NAME = "ovms-plugin"
PACKAGE_DIR = Path(__file__).resolve().parent


def aog_data_dir() -> Path:
    """AOG's data directory. AOG does not pass it to plugins, so compute it as AOG does;
    the environment variable AOG_DATA_DIR overrides it."""
    if env := os.environ.get("AOG_DATA_DIR"):
        return Path(env).expanduser()
    return osutil.aog_data_dir()


def plugin_data_dir() -> Path:
    """This plugin's own folder under AOG's data dir (OVMS_PLUGIN_HOME overrides it)."""
    if env := os.environ.get("OVMS_PLUGIN_HOME"):
        return Path(env).expanduser()
    return aog_data_dir() / "engine" / PLUGIN_NAME


def models_dir() -> Path:
    """The model store (OVMS_PLUGIN_MODELS overrides it; so does --models-dir). On Windows
    under %LOCALAPPDATA%\\AOG (gigabytes must not roam with the profile), unless
    OVMS_PLUGIN_HOME or AOG_DATA_DIR moves the plugin's data."""
    if env := os.environ.get("OVMS_PLUGIN_MODELS"):
        return Path(env).expanduser()
    local = osutil.local_data_dir()
    if local is not None and not os.environ.get("OVMS_PLUGIN_HOME") \
            and not os.environ.get("AOG_DATA_DIR"):
        return local / "engine" / PLUGIN_NAME / "models"
    return plugin_data_dir() / "models"


def settings_file() -> Path:
    """The YAML settings file (OVMS_PLUGIN_SETTINGS overrides it)."""
    if env := os.environ.get("OVMS_PLUGIN_SETTINGS"):
        return Path(env).expanduser()
    return plugin_data_dir() / "settings.yaml"


def default_plugins_dir() -> Path:
    """Where AOG looks for plugins: <AOG data dir>/plugins."""
    return aog_data_dir() / "plugins"


def manifest_path() -> Path:
    """plugin.yaml shipped inside the package (the repository's top-level plugin.yaml links
    to it). Found from the package's location, never from the working directory, because
    AOG starts the plugin in <plugin>/bin."""
    return PACKAGE_DIR / "plugin.yaml"


def cache_dir() -> Path:
    """Downloads and models made for the demo and the tests, outside the model store:
    $XDG_CACHE_HOME/ovms-plugin or ~/.cache/ovms-plugin (Windows:
    %LOCALAPPDATA%\\ovms-plugin; macOS: ~/Library/Caches/ovms-plugin)."""
    return osutil.cache_base_dir() / PLUGIN_NAME
