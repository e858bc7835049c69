"""The names and defaults of the bsread streams: the camera's image channel, the channels of
the output stream (as psss_processing's README names them, or as its 1.8.0 sent them), the
ports and the decoded-size cap. Imports nothing heavy (no ZeroMQ, no bsread): the IOC's
configuration and the command line take their defaults from here without loading a socket
library."""

from __future__ import annotations

from dataclasses import dataclass

# The PSSS camera: its image channel is <prefix>:FPICTURE, and the IOC serves its records
# under the same prefix unless told otherwise.
DEFAULT_PREFIX = "SARFE10-PSSS059"
IMAGE_CHANNEL_SUFFIX = ":FPICTURE"


def image_channel_for(prefix: str) -> str:
    """The camera's bsread image channel, `<prefix>:FPICTURE`."""
    return prefix + IMAGE_CHANNEL_SUFFIX


DEFAULT_IMAGE_CHANNEL = image_channel_for(DEFAULT_PREFIX)

DEFAULT_OUTPUT_PORT = 8889
# Channel names of the output stream: psss_processing 1.8's (named after the PVs, the image in
# its own stream on DEFAULT_IMAGE_PORT) or its README's (named after the image channel).
V18_NAMES = "v1.8"
DOCUMENT_NAMES = "document"
OUTPUT_NAMES = (V18_NAMES, DOCUMENT_NAMES)
DEFAULT_IMAGE_PORT = 8890
# The largest camera image accepted, decoded, in MB (10^6 bytes; the PSSS camera's is 10.3):
# a bigger one is refused before it is decompressed.
DEFAULT_MAX_IMAGE_MB = 64

# Output channels as psss_processing's README names them: after the input image channel
# (CONTRACT.md, "Output stream") ...
SPECTRUM_SUFFIX = ".spectrum"
CENTER_SUFFIX = ".center"
FWHM_SUFFIX = ".fwhm"
PARAMETERS_SUFFIX = ".processing_parameters"
SATURATED_SUFFIX = ".n_saturated"  # not in 1.8's names: those keep 1.8's channel set
# ... and as psss_processing 1.8.0 sent them: after the PVs, under the prefix (downstream
# consumers, e.g. the data store's channel configuration, use these).
V18_SPECTRUM = "SPECTRUM_Y"
V18_AXIS = "SPECTRUM_X"
V18_CENTER = "SPECTRUM_CENTER"
V18_FWHM = "SPECTRUM_FWHM"
V18_PARAMETERS = "processing_parameters"


@dataclass(frozen=True)
class OutputChannels:
    """The channel names of the output stream. `axis` (the energy axis per message) only in
    1.8's naming, `saturated` only in the document's."""

    image: str
    spectrum: str
    center: str
    fwhm: str
    parameters: str
    axis: str | None = None
    saturated: str | None = None  # the ROI's saturated pixels (int64)

    @classmethod
    def for_image(cls, image_channel: str) -> OutputChannels:
        """The README's names: ``<image channel>.spectrum``, ``.center``, ..."""
        return cls(
            image=image_channel,
            spectrum=image_channel + SPECTRUM_SUFFIX,
            center=image_channel + CENTER_SUFFIX,
            fwhm=image_channel + FWHM_SUFFIX,
            parameters=image_channel + PARAMETERS_SUFFIX,
            saturated=image_channel + SATURATED_SUFFIX,
        )

    @classmethod
    def for_v18(cls, prefix: str, image_channel: str) -> OutputChannels:
        """psss_processing 1.8.0's names: ``<prefix>:SPECTRUM_Y``, ``SPECTRUM_X``, ...; the
        image keeps its input channel's name."""
        return cls(
            image=image_channel,
            spectrum=f"{prefix}:{V18_SPECTRUM}",
            center=f"{prefix}:{V18_CENTER}",
            fwhm=f"{prefix}:{V18_FWHM}",
            parameters=f"{prefix}:{V18_PARAMETERS}",
            axis=f"{prefix}:{V18_AXIS}",
        )

    @classmethod
    def named(cls, naming: str, prefix: str, image_channel: str) -> OutputChannels:
        """The names of `naming` (one of `OUTPUT_NAMES`)."""
        if naming == V18_NAMES:
            return cls.for_v18(prefix, image_channel)
        if naming == DOCUMENT_NAMES:
            return cls.for_image(image_channel)
        raise ValueError(f"output names {naming!r} are not one of {', '.join(OUTPUT_NAMES)}")


def parse_address(address: str) -> tuple[str, int]:
    """``tcp://host:port`` (or ``host:port``) -> (host, port); ValueError if malformed."""
    rest = address.strip()
    if "://" in rest:
        scheme, rest = rest.split("://", 1)
        if scheme != "tcp":
            raise ValueError(f"stream address {address!r}: only tcp:// is supported")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"stream address {address!r} is not tcp://host:port")
    return host, int(port)
