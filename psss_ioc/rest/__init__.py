"""The legacy REST API of psss_processing: the server over the control layer, and its client."""
