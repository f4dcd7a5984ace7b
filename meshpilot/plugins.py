"""Wires the optional parts of the product (HDS, Consul and Eureka APIs, policies, meshdns table)
into a ControlPlane. Each part exposes ``install(cp)`` in its package's ``plugin`` module."""

from __future__ import annotations

import logging

from meshpilot.cli import import_optional
from meshpilot.controlplane import ControlPlane

__all__ = ["install_plugins"]

_PLUGINS = (
    "meshpilot.xds.hds",
    "meshpilot.consul.plugin",
    "meshpilot.eureka.plugin",
    "meshpilot.policy.plugin",
    "meshpilot.proxyless.plugin",
    "meshpilot.meshdns.plugin",
)


def install_plugins(cp: ControlPlane) -> None:
    for name in _PLUGINS:
        module = import_optional(name)
        install = getattr(module, "install", None)
        if install is None:
            continue
        install(cp)
        logging.getLogger("meshpilot").debug("event=plugin_installed plugin=%s", name)
