"""No consumer on the output stream is a state: a log line when it begins and when it ends,
the drops counted, never a warning every few seconds (issue "Field-ready", section 4)."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import zmq

from psss_ioc.streams.stream import Frame, ResultSender

CHANNEL = "TEST-CAM:FPICTURE"
IMAGE = np.arange(35, dtype=np.uint16).reshape(5, 7)


def stream_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records
            if r.name == "psss_ioc.streams.stream" and r.getMessage().startswith("output stream")]


def send(sender: ResultSender, pulse_id: int) -> bool:
    return sender.send(Frame(pulse_id, (0, 0), IMAGE), None, {})


@pytest.mark.parametrize("mode", ["PUB", "PUSH"])
def test_no_consumer_is_one_line_when_it_begins_and_one_when_it_ends(
        mode: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="psss_ioc.streams.stream")
    context = zmq.Context()
    consumer = context.socket(zmq.SUB if mode == "PUB" else zmq.PULL)
    consumer.setsockopt(zmq.LINGER, 0)
    consumer.setsockopt(zmq.RCVTIMEO, 50)
    if mode == "PUB":
        consumer.setsockopt(zmq.SUBSCRIBE, b"")
    sender = ResultSender(port=0, mode=mode, image_channel=CHANNEL, host="127.0.0.1")
    try:
        with sender:
            # nobody listening: 50 drops, counted, one line
            assert not any(send(sender, p) for p in range(50))
            assert sender.counters.dropped == 50
            [(level, began)] = stream_lines(caplog)
            assert level == logging.WARNING and "no consumer" in began

            # a consumer: dropped until it has joined, then delivered; one line with the count
            consumer.connect(f"tcp://127.0.0.1:{sender.port}")
            pulse = 50
            deadline = time.monotonic() + 10
            while not send(sender, pulse):
                pulse += 1
                assert time.monotonic() < deadline, "the consumer never joined"
                time.sleep(0.01)
            assert consumer.recv_multipart()  # what was sent arrives
            lines = stream_lines(caplog)
            assert len(lines) == 2, lines
            level, ended = lines[1]
            assert level == logging.INFO and "a consumer is connected" in ended
            assert f"{pulse} messages were dropped" in ended  # pulses 0 .. pulse-1
            assert sender.counters.dropped == pulse and sender.counters.sent == 1

            # it leaves: the state begins again, once
            consumer.close(0)
            deadline = time.monotonic() + 10
            while send(sender, pulse):
                pulse += 1
                assert time.monotonic() < deadline, "the sender never noticed"
                time.sleep(0.01)
            for p in range(pulse, pulse + 20):
                send(sender, p)
            lines = stream_lines(caplog)
            assert len(lines) == 3 and lines[2][0] == logging.WARNING, lines
        # closing ends the state with its count
        lines = stream_lines(caplog)
        assert len(lines) == 4 and "closed; 21 messages were dropped" in lines[3][1], lines
    finally:
        consumer.close(0)
        context.term()


def test_a_slow_consumer_is_still_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A consumer that does not read fills the queue: that is a problem, logged as before
    (rate-limited), and not reported as "no consumer"."""
    caplog.set_level(logging.INFO, logger="psss_ioc.streams.stream")
    image = np.zeros((512, 1024), np.uint16)  # 1 MB: socket buffers fill after a few
    context = zmq.Context()
    consumer = context.socket(zmq.PULL)
    consumer.set_hwm(1)
    consumer.setsockopt(zmq.LINGER, 0)
    try:
        with ResultSender(port=0, image_channel=CHANNEL, host="127.0.0.1",
                          queue_size=1) as sender:
            consumer.connect(f"tcp://127.0.0.1:{sender.port}")
            outcomes: list[bool] = []
            deadline = time.monotonic() + 20
            while not (any(outcomes) and not outcomes[-1]):
                outcomes.append(sender.send(Frame(len(outcomes), (0, 0), image), None, {}))
                assert time.monotonic() < deadline
                if not any(outcomes):
                    time.sleep(0.01)  # still connecting
            messages = [m for _, m in stream_lines(caplog)]
            assert any("queue full" in m for m in messages), messages
    finally:
        consumer.close(0)
        context.term()
