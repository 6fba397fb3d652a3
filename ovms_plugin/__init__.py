"""ovms-plugin: local OpenVINO inference as an AOG provider plugin and a standalone server."""

import sys

__version__ = "0.1.0"

# OpenVINO's usage telemetry stays off in every process of the plugin (each imports this
# package before OpenVINO). Importing openvino_genai loads OpenVINO's converter, whose
# telemetry counts uses in the home folder and sends events by forking a process from a
# thread pool: a fork that can deadlock, outlive the plugin and hold its stdout and stderr
# (AOG's shutdown then waits for ever), and a network call nobody asked a local server to
# make. Without the module the converter uses its own no-op stand-in.
if "openvino_telemetry" not in sys.modules:
    sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
