"""psss-ioc: EPICS soft IOC for the PSSS single-shot X-ray spectrometer at SwissFEL."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("psss-ioc")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
