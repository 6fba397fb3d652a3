"""Whether the OpenVINO runtime is usable, checked once in a thread (the import takes
about a second, and must never delay the handshake)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

_result: tuple[bool, str] | None = None
_lock = asyncio.Lock()


def _probe() -> tuple[bool, str]:
    try:
        import openvino as ov
        import openvino_genai as ov_genai
        devices = ov.Core().available_devices
    except Exception as e:  # ImportError, a broken wheel, a missing shared library
        return False, f"the OpenVINO runtime cannot be imported: {type(e).__name__}: {e}"
    return True, (f"OpenVINO {ov.get_version()} (openvino-genai {ov_genai.__version__}), "
                  f"devices: {', '.join(devices)}")


async def check() -> tuple[bool, str]:
    global _result
    if _result is None:
        async with _lock:
            if _result is None:
                _result = await asyncio.to_thread(_probe)
    return _result


def versions() -> dict[str, Any]:
    try:
        import openvino as ov
        import openvino_genai as ov_genai
        return {"openvino": ov.get_version(), "openvino_genai": ov_genai.__version__}
    except Exception as e:
        return {"openvino": f"unavailable ({type(e).__name__})"}


def default_device(service: str = "chat") -> str:
    """The device a model of `service` would run on unless its settings say otherwise:
    the first of its candidates on this machine."""
    from ovms_plugin import devices, settings
    try:
        wanted = settings.model_settings("").device
    except settings.SettingsError:
        wanted = os.environ.get("OVMS_PLUGIN_DEVICE", "AUTO")
    try:
        found = devices.discover()
    except Exception:  # OpenVINO missing: CheckEngine says so
        return "CPU"
    return (devices.candidates(service, found, wanted) or ["CPU"])[0]
