"""psss-ioc: EPICS soft IOC for the PSSS single-shot X-ray spectrometer at SwissFEL."""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("psss-ioc")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["PsssProcessingClient", "__version__"]


def __getattr__(name: str) -> Any:
    # lazy: `import psss_ioc` (the IOC, the CLI) does not pull in requests
    if name == "PsssProcessingClient":
        from psss_ioc.rest.client import PsssProcessingClient

        return PsssProcessingClient
    raise AttributeError(f"module 'psss_ioc' has no attribute {name!r}")
