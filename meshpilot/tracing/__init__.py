"""Traces on the control plane: the spans sidecars ship from their nodes, kept and searchable by the
management API, or passed on to a standard tracing backend."""
