"""The worker thread that turns frames into results; knows nothing of EPICS."""
