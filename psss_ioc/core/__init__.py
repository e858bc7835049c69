"""The pure core: the spectrum of one frame, the Gaussian fit, background files.

No EPICS, no sockets, no HTTP: tested on arrays and plain values.
"""
