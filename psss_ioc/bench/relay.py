"""The transport floor of `bench e2e`: a bare pyzmq relay that does only what the IOC's
transport must do with each frame - receive it, and forward the same message (image included,
zero-copy) to an output consumer - and nothing else.

``python -m psss_ioc.bench.relay IN_ADDRESS [--receive-only]`` binds a PUSH socket on a free
loopback port, prints ``relay on tcp://127.0.0.1:PORT`` and relays until SIGTERM (with
``--receive-only`` it forwards only each message's small main header, as an IOC that does not
forward the image sends only small result messages). Each line written to its stdin is
answered with ``cpu USER SYSTEM``: its CPU seconds so far, all threads, to the microsecond
(``getrusage``; /proc counts 10 ms clock ticks, more than a short window of small frames
costs a relay). Its CPU time per frame is
the least CPU any process can spend per frame on this machine to receive and forward an image
over TCP (two kernel copies of it); the IOC's CPU per frame is compared with it.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import sys
import threading

import zmq


def _answer_cpu_queries() -> None:
    for _ in sys.stdin:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        print(f"cpu {usage.ru_utime} {usage.ru_stime}", flush=True)


def relay(in_address: str, forward: bool = True) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    context = zmq.Context()
    source = context.socket(zmq.PULL)
    source.setsockopt(zmq.RCVTIMEO, 200)
    source.setsockopt(zmq.LINGER, 0)
    source.connect(in_address)
    sink = context.socket(zmq.PUSH)
    sink.setsockopt(zmq.SNDHWM, 10)
    sink.setsockopt(zmq.LINGER, 0)
    port = sink.bind_to_random_port("tcp://127.0.0.1")
    print(f"relay on tcp://127.0.0.1:{port}", flush=True)
    threading.Thread(target=_answer_cpu_queries, daemon=True).start()
    try:
        while not stop.is_set():
            try:
                parts = source.recv_multipart(copy=False)
            except zmq.Again:
                continue
            if not forward:
                parts = parts[:1]
            with contextlib.suppress(zmq.Again):  # consumer not keeping up: dropped, like the IOC
                sink.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
    finally:
        source.close(0)
        sink.close(0)
        context.term()


if __name__ == "__main__":
    relay(sys.argv[1], forward="--receive-only" not in sys.argv[2:])
