"""Messages between the front end and an engine worker: length-prefixed pickles over a
Unix socket pair. Both ends are our own code, so pickle is safe here.

Front end -> worker:  ("add", req_id, payload) | ("abort", req_id) | ("metrics", token)
                      | ("shutdown",)
Worker -> front end:  ("ready", info) | ("fatal", message)
                      | ("out", [StepOutput.wire(), ...])   one per engine step
                      | ("metrics", token, data)
`payload` is the kind's request dataclass (kinds.llm.LLMRequest, ...); step outputs
(engine.protocol.StepOutput: result, finish, typed failure) travel as tuples, the cheapest
thing to pickle, since one message per engine step carries one per running request.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from typing import Any

_HEADER = struct.Struct("!I")


def encode(msg: Any) -> bytes:
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def send(sock: socket.socket, msg: Any) -> None:
    sock.sendall(encode(msg))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("peer closed the engine socket")
        buf += chunk
    return bytes(buf)


def recv(sock: socket.socket) -> Any:
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    return pickle.loads(_recv_exact(sock, n))


async def read(reader: asyncio.StreamReader) -> Any:
    """Next message; raises asyncio.IncompleteReadError at EOF."""
    (n,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return pickle.loads(await reader.readexactly(n))
