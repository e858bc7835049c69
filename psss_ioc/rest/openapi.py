"""OpenAPI 3 description of the legacy REST API (served at ``/openapi.json``)."""

from __future__ import annotations

from typing import Any

from psss_ioc.ioc.parameters import MAX_EXTRA_KEYS, MAX_KEY_LENGTH, MAX_STRING_LENGTH, SETTABLE
from psss_ioc.rest import limits

_STATUS = {"type": "string", "enum": ["processing", "stopped"]}


def _ok(extra: dict[str, Any] | None = None, required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["state", "status", *required],
        "properties": {"state": {"type": "string", "enum": ["ok"]}, "status": _STATUS,
                       **(extra or {})},
    }


_ERROR = {
    "type": "object",
    "required": ["state", "status"],
    "properties": {"state": {"type": "string", "enum": ["error"]},
                   "status": {"type": "string", "description": "why the request failed"}},
}

_PARAMETERS = {
    "type": "object",
    # keys the IOC does not know: kept, shown here and in processing_parameters (tags)
    "additionalProperties": {
        "oneOf": [{"type": "string", "maxLength": MAX_STRING_LENGTH}, {"type": "number"},
                  {"type": "boolean"}],
        "nullable": True,
        "description": f"an extra key (name up to {MAX_KEY_LENGTH} characters; at most "
                       f"{MAX_EXTRA_KEYS} are kept, autosaved): a number, true/false or a "
                       f"string up to {MAX_STRING_LENGTH} characters; null removes the key",
    },
    "properties": {
        "background": {"type": "string",
                       "description": "the background in force: the name it was uploaded "
                                      "under, or the path of a file loaded by name; '' = none. "
                                      "Setting a path loads that file; setting the value shown "
                                      "changes nothing."},
        "background_file": {"type": "string",
                            "description": "the path of the background file in force ('' = "
                                           "none); shown only (may be sent back unchanged)"},
        "roi": {"type": "array", "minItems": 2, "maxItems": 2,
                "items": {"type": "integer", "minimum": 0},
                "description": "[ymin, ymax): rows summed into the spectrum; [0, 0] = all rows"},
        "average_n": {"type": "integer", "minimum": 1, "maximum": 10000,
                      "description": "shots in the running average"},
        "fit_enabled": {"type": "boolean", "description": "Gaussian fit on/off"},
        "min_snr": {"type": "number", "minimum": 0, "maximum": 1e6,
                    "description": "least peak/noise ratio to fit"},
    },
}
# the settings POST /parameters takes, and background_file (shown only)
assert set(_PARAMETERS["properties"]) == {*SETTABLE, "background_file"}

_NULLABLE_NUMBER = {"type": "number", "nullable": True}
_NULLABLE_STRING = {"type": "string", "nullable": True}
_STATISTICS = {
    "type": "object",
    "required": ["processing_start_time", "last_sent_pulse_id", "last_sent_time",
                 "n_processed_images", "last_processing_duration_ms"],
    "properties": {
        "processing_start_time": {**_NULLABLE_STRING,
                                  "description": "local time processing started (legacy form)"},
        "last_sent_pulse_id": {"type": "integer", "nullable": True,
                               "description": "pulse id of the last message on the output "
                                              "stream (without one: of the last frame "
                                              "processed)"},
        "last_sent_time": {**_NULLABLE_STRING,
                           "description": "local time of that message (frame)"},
        "n_processed_images": {"type": "integer", "description": "frames processed since start"},
        "last_processing_duration_ms": {"type": "number"},
        "processing_start_timestamp": {**_NULLABLE_NUMBER, "description": "seconds since epoch"},
        "last_sent_timestamp": {**_NULLABLE_NUMBER, "description": "seconds since epoch"},
        "state": {"type": "string", "description": "the STATUS label, e.g. 'Processing', "
                                                   "'No image channel', 'Image not usable'"},
        "rate_hz": {"type": "number", "description": "frames processed per second"},
        "n_received": {"type": "integer"},
        "n_sent": {"type": "integer", "description": "messages really sent on the output stream"},
        "n_lost": {"type": "integer", "description": "pulse-id gaps and frames skipped"},
        "n_errors": {"type": "integer", "description": "malformed input and processing errors"},
        "n_out_dropped": {"type": "integer", "description": "output messages dropped"},
        "n_out_subscriber_overflows": {
            "type": "integer",
            "description": "PUB: times a subscriber fell behind and lost messages that the "
                           "others got (ZeroMQ does not say how many)"},
        "errors_by_kind": {"type": "object", "additionalProperties": {"type": "integer"}},
        "image_shape": {"type": "array", "items": {"type": "integer"}, "nullable": True},
        "message": {"type": "string", "description": "the IOC's last notice or error"},
        "image_channel": {"type": "string", "description": "the bsread image channel expected"},
        "channels_seen": {"type": "array", "items": {"type": "string"},
                          "description": "state 'No image channel': image-like channels the "
                                         "stream carries instead"},
        "background_acquiring": {"type": "boolean",
                                 "description": "a background acquisition is running"},
        "background_progress": {"type": "number", "minimum": 0, "maximum": 100,
                                "description": "of the last background acquisition, %"},
    },
}

_ERRORS = {
    "400": "bad JSON, wrong shape or values, invalid setting (the previous one stays in force)",
    "401": "write request without the IOC's token (only when the IOC has one)",
    "403": "write request from a host the access security file does not let write",
    "408": f"request body not sent in time (nothing for {limits.IDLE_TIMEOUT:g} s)",
    "409": "cannot start (no input stream); POST /parameters: the ROI was changed by another "
           "write before the reply (the parameters in force are in the reply)",
    "413": f"request body larger than {limits.MAX_PARAMETERS_BYTES} bytes (POST /parameters), "
           f"{limits.MAX_JSON_BYTES} bytes (JSON background) or {limits.MAX_BODY_BYTES} bytes "
           "(binary)",
    "415": "a content type other than application/json (/background: or binary): browsers "
           "send text/plain and forms cross-site without asking",
    "500": "internal error (a bug)",
    "503": f"more than {limits.MAX_CONNECTIONS} connections at once",
    "504": "the IOC did not finish the change in time",
}


def _responses(ok: dict[str, Any], codes: tuple[str, ...] = ("400", "500")) -> dict[str, Any]:
    out: dict[str, Any] = {"200": {"description": "done",
                                   "content": {"application/json": {"schema": ok}}}}
    for code in (*codes, "503"):
        out[code] = {"description": _ERRORS[code],
                     "content": {"application/json": {"schema": _ERROR}}}
    return out


_WRITE = ("400", "401", "403", "408", "413", "415", "500", "504")

_BACKGROUND_JSON = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "filename": {"type": "string",
                     "description": "with data: a label kept in the stored name; without data: "
                                    "a file on the IOC host to load; '' and no data: clear"},
        "data": {"type": "array", "nullable": True,
                 "items": {"type": "array",
                           "items": {"type": "integer", "minimum": 0,
                                     "maximum": limits.UINT16_MAX}},
                 "description": "rows of the image (same shape as the camera image)"},
    },
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "psss-ioc legacy REST API (psss_processing compatible)",
        "version": "1.0.0",
        "description": (
            "Every reply is JSON with state ('ok' or 'error') and status ('processing' or "
            "'stopped'; on error the reason). Every change goes through the IOC's records, "
            "so it is validated as a Channel Access put. POST bodies are application/json (up "
            f"to {limits.MAX_JSON_BYTES} bytes) or, for a background, binary (up to "
            f"{limits.MAX_BODY_BYTES} bytes). With a REST token configured, POST requests need "
            "'Authorization: Bearer <token>'."
        ),
    },
    "servers": [{"url": f"http://localhost:{limits.DEFAULT_PORT}"}],
    "paths": {
        "/start": {"post": {"summary": "Start processing (harmless when running)",
                            "responses": _responses(_ok(), ("401", "403", "409", "415", "500",
                                                            "504"))}},
        "/stop": {"post": {"summary": "Stop processing (harmless when stopped)",
                           "responses": _responses(_ok(), ("401", "403", "415", "500",
                                                           "504"))}},
        "/status": {"get": {"summary": "Processing status",
                            "responses": _responses(_ok(), ("500",))}},
        "/background": {"post": {
            "summary": "Upload, load or clear the background",
            "description": "JSON {filename, data}: data is stored as HDF5 /image in the IOC's "
                           "background directory under a new name and loaded; filename alone "
                           "loads that file; both empty clears. A .npy or HDF5 (/image) body "
                           "uploads a large frame in binary (name in ?filename=).",
            "parameters": [{"name": "filename", "in": "query", "required": False,
                            "schema": {"type": "string"},
                            "description": "binary bodies: label kept in the stored name"}],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": _BACKGROUND_JSON},
                "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
                "application/x-hdf5": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            }},
            "responses": _responses(_ok(), _WRITE)}},
        "/background/acquire": {"post": {
            "summary": "Average the next frames from the camera into a background",
            "description": "Averages the next BACKGROUND_N frames (or n), stores them as "
                           "HDF5 /image in the background directory and loads the file; "
                           "progress in GET /statistics (background_progress). 409 while one "
                           "runs or processing is stopped.",
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False,
                "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 10000}}}}}},
            "responses": _responses(_ok(), (*_WRITE, "409"))}},
        "/background/cancel": {"post": {
            "summary": "End a background acquisition (the background in force stays)",
            "responses": _responses(_ok(), _WRITE)}},
        "/parameters": {
            "get": {"summary": "Current settings",
                    "responses": _responses(_ok({"parameters": _PARAMETERS}, ("parameters",)),
                                            ("500",))},
            "post": {"summary": "Change some settings (all checked before any is applied)",
                     "requestBody": {"required": True,
                                     "content": {"application/json": {"schema": _PARAMETERS}}},
                     "responses": _responses(_ok({"parameters": _PARAMETERS}, ("parameters",)),
                                             (*_WRITE, "409"))},
        },
        "/statistics": {"get": {"summary": "Processing statistics",
                                "responses": _responses(
                                    _ok({"statistics": _STATISTICS}, ("statistics",)),
                                    ("500",))}},
        "/openapi.json": {"get": {"summary": "This description",
                                  "responses": {"200": {"description": "OpenAPI 3 document",
                                                        "content": {"application/json": {
                                                            "schema": {"type": "object"}}}}}}},
    },
}
