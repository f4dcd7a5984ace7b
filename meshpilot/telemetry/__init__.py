"""What the node side and the control plane both speak about telemetry: span and log records and
their line format on disk and on the wire."""
