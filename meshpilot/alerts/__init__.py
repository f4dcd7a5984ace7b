"""Alert rules: a threshold over a window on a log or metric query, evaluated by the control plane,
their state visible in the management API."""
