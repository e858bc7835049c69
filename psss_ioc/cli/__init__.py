"""The command line: `psss-ioc`, `psss_processing`, the demo."""
