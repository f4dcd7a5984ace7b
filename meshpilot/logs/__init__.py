"""Logs on the control plane: the access and app log lines sidecars ship from their nodes, kept and
searchable by the management API by service, instance, trace id and time."""
