"""Experiments compose data, model adapter, capture, probes and metrics into one analysis each."""
