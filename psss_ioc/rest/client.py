"""`PsssProcessingClient`: the legacy psss_processing REST client, for psss-ioc.

Same methods and return values as the legacy client, so scripts only change their import::

    from psss_ioc import PsssProcessingClient  # was: from psss_processing import ...

Improvements: every request has a timeout; an error reply (any HTTP code) raises
``ValueError(reason)`` as before, also when the reply is not JSON; large background arrays
are uploaded as a binary ``.npy`` body instead of a JSON list of lists.
"""

from __future__ import annotations

import io
from typing import Any
from urllib.parse import urljoin

import numpy as np
import requests

DEFAULT_ADDRESS = "http://sf-daqsync-02:12000/"
DEFAULT_TIMEOUT = 10.0
# Background uploads: the server parses and stores the image before it answers.
UPLOAD_TIMEOUT = 120.0
# Arrays with more elements than this go up as .npy (a 2016 x 2560 frame: 10 MB instead of
# ~36 MB of JSON that both sides would have to format and parse).
BINARY_THRESHOLD = 1_000_000
UINT16_MAX = 65535


class PsssProcessingClient:
    """Client of the psss-ioc REST API (port 12000), compatible with psss_processing's.

    Args:
        address: base URL of the REST API.
        timeout: seconds to wait for a reply (connect and each read).
        token: the IOC's REST token, if it has one (sent as ``Authorization: Bearer``).
        binary_threshold: arrays with more elements are uploaded as ``.npy``; None: never.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float = DEFAULT_TIMEOUT,
                 token: str | None = None, binary_threshold: int | None = BINARY_THRESHOLD,
                 upload_timeout: float = UPLOAD_TIMEOUT) -> None:
        self.address = address if address.endswith("/") else address + "/"
        self.timeout = timeout
        self.upload_timeout = max(upload_timeout, timeout)
        self.binary_threshold = binary_threshold
        self._session = requests.Session()
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    # ---------------------------------------------------------------- legacy API
    def get_address(self) -> str:
        return self.address

    def start(self) -> str:
        """Start processing; returns the status ("processing")."""
        return self._request("POST", "start")["status"]

    def stop(self) -> str:
        """Stop processing; returns the status ("stopped")."""
        return self._request("POST", "stop")["status"]

    def get_status(self) -> str:
        return self._request("GET", "status")["status"]

    def get_statistics(self) -> dict[str, Any]:
        return self._request("GET", "statistics")["statistics"]

    def get_parameters(self) -> dict[str, Any]:
        return self._request("GET", "parameters")["parameters"]

    def set_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        """Change some settings (e.g. ``{"roi": [100, 200]}``); returns all current ones."""
        return self._request("POST", "parameters", json=parameters)["parameters"]

    def set_background(self, filename: str = "", data: Any = None) -> str:
        """Upload `data` (2-D, whole numbers 0..65535) as the background, labelled `filename`;
        without data load the IOC-side file `filename`; with neither clear the background.
        Returns "ok"."""
        if data is None:
            return self._request("POST", "background", json={"filename": filename, "data": None},
                                 timeout=self.upload_timeout)["state"]
        array = np.asarray(data)
        if self.binary_threshold is not None and array.size > self.binary_threshold:
            return self._request("POST", "background", data=_npy_bytes(array),
                                 params={"filename": filename},
                                 headers={"Content-Type": "application/x-npy"},
                                 timeout=self.upload_timeout)["state"]
        return self._request("POST", "background",
                             json={"filename": filename, "data": array.tolist()},
                             timeout=self.upload_timeout)["state"]

    # ---------------------------------------------------------------- transport
    def _request(self, method: str, path: str, timeout: float | None = None,
                 **kwargs: Any) -> dict[str, Any]:
        url = urljoin(self.address, path)
        response = self._session.request(method, url, timeout=timeout or self.timeout, **kwargs)
        try:
            reply = response.json()
        except ValueError:
            text = response.text.strip().replace("\n", " ")[:200]
            raise ValueError(f"{method} {url}: HTTP {response.status_code}, not a JSON reply: "
                             f"{text}") from None
        if not isinstance(reply, dict) or reply.get("state") != "ok":
            status = reply.get("status") if isinstance(reply, dict) else None
            raise ValueError(status or f"{method} {url}: HTTP {response.status_code}: {reply}")
        return reply

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> PsssProcessingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _npy_bytes(array: np.ndarray) -> bytes:
    """The array as .npy; whole numbers in uint16 range go as uint16 (half an int32 frame)."""
    if (array.dtype.kind in "iu" and array.size
            and array.min() >= 0 and array.max() <= UINT16_MAX):
        array = array.astype(np.uint16)
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()
