"""ovms-plugin: local OpenVINO inference as an AOG provider plugin and a standalone server."""

__version__ = "0.1.0"
