"""bsread streams over ZeroMQ: the wire format, the camera source, the output stream and the
simulated camera."""
