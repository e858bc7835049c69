"""The REST server's port and the limits it holds clients to: `server.py` applies them,
`openapi.py` describes them (both import them from here, neither imports the other)."""

from __future__ import annotations

DEFAULT_PORT = 12000
# A full 2016 x 2560 frame as JSON with 5-digit values is ~36 MB; the legacy service refused
# anything over 30 MB. 512 MB leaves room for larger cameras and float text.
MAX_BODY_BYTES = 512 * 1024 * 1024
# JSON bodies: parsing takes several times their size in memory (a 500 MB body took the IOC
# to 6 GB). A full frame of 5-digit values is ~36 MB of JSON; larger frames go up in binary.
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_PARAMETERS_BYTES = 1024 * 1024  # POST /parameters: 32 extra keys take ~40 kB at most
# A connection that sends no complete request, or no body data, for this long is closed.
IDLE_TIMEOUT = 10.0
# Connections served at once; more are answered 503 and closed. Each is a file descriptor:
# idle ones must not take those Channel Access clients and autosave need.
MAX_CONNECTIONS = 64
UINT16_MAX = 65535  # background pixel values
