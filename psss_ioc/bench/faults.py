"""Faults injected into a soak run (`psss-ioc bench soak --faults`).

Every fault period (a minute by default) the IOC meets, a quarter period apart: a burst of
Channel Access puts to its settings (ROI limits in both orders, averaging, fit threshold), a
background upload through the REST API (the legacy client, a full frame), and at the end of
the period a camera restart (the simulated camera stops; a malformed message comes from the
same address meanwhile; a new camera goes on with the next pulse ids). A good frame must
never be lost over any of it, and the IOC's memory must stay flat.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import zmq

from psss_ioc.ioc import pvs

GARBAGE = b"\x00\xff not a bsread message"


class FaultInjector:
    """The faults, done from this (the benchmark's) process against the IOC `prefix`."""

    def __init__(self, prefix: str, rest_port: int, shape: tuple[int, int]) -> None:
        import epics  # this process is a plain CA client of the IOC subprocess

        from psss_ioc.rest.client import PsssProcessingClient

        self._pv = {pv.name: epics.PV(pvs.full_name(prefix, pv))
                    for pv in (pvs.SPC_ROI_YMIN, pvs.SPC_ROI_YMAX, pvs.AVG_N, pvs.FIT_MIN_SNR)}
        for pv in self._pv.values():
            pv.wait_for_connection(timeout=30)
        self._client = PsssProcessingClient(f"http://127.0.0.1:{rest_port}/", timeout=60)
        self._dark = np.full(shape, 100, dtype=np.uint16)
        self._height = shape[0]
        self.counts = {"ca_bursts": 0, "ca_puts": 0, "rest_uploads": 0, "rest_failures": 0,
                       "camera_restarts": 0, "malformed_sent": 0}

    def ca_burst(self, puts: int = 200) -> None:
        """`puts` puts in about a second; the settings end where they were."""
        low, high = self._height // 4, 3 * self._height // 4
        steps = [(pvs.SPC_ROI_YMIN, low), (pvs.SPC_ROI_YMAX, high),  # down from the top...
                 (pvs.SPC_ROI_YMAX, 0), (pvs.SPC_ROI_YMIN, high),  # ...and YMIN first up
                 (pvs.AVG_N, 7), (pvs.FIT_MIN_SNR, 2.5), (pvs.AVG_N, 10), (pvs.FIT_MIN_SNR, 3.0)]
        for i in range(puts):
            pv, value = steps[i % len(steps)]
            self._pv[pv.name].put(value, wait=False)
            if i % 20 == 19:
                time.sleep(0.1)
        for pv, value in ((pvs.SPC_ROI_YMIN, 0), (pvs.SPC_ROI_YMAX, 0), (pvs.AVG_N, 10),
                          (pvs.FIT_MIN_SNR, 3.0)):
            self._pv[pv.name].put(value, wait=True, timeout=10)
        self.counts["ca_bursts"] += 1
        self.counts["ca_puts"] += puts + 4

    def rest_upload(self) -> None:
        try:
            self._client.set_background("soak-dark.npy", self._dark)
            self.counts["rest_uploads"] += 1
        except Exception:
            self.counts["rest_failures"] += 1

    def malformed_from(self, port: int, timeout: float = 5.0) -> None:
        """While the camera is away: one malformed message from its address."""
        context = zmq.Context()
        sock = context.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDTIMEO, round(timeout * 1000))
        sock.setsockopt(zmq.LINGER, 1000)
        try:
            sock.bind(f"tcp://127.0.0.1:{port}")
            sock.send(GARBAGE)
            self.counts["malformed_sent"] += 1
        except zmq.ZMQError:
            pass  # the IOC did not reconnect in time: no fault this period
        finally:
            sock.close()
            context.term()

    def figures(self) -> dict[str, Any]:
        return dict(self.counts)

    def close(self) -> None:
        self._client.close()
        for pv in self._pv.values():
            pv.disconnect()
