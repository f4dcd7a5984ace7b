"""The console: a web UI on the management port over the same API and tokens, its assets shipped in
the package."""
