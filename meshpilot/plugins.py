"""Wires the parts of the product beyond the registry and xDS (HDS, Consul and Eureka APIs, policies,
proxyless clients) into a ControlPlane. Each listed module exposes ``install(cp)``; a part a setting
switches off (a front door's port) decides that in its own ``install``. A listed module that cannot be
imported is an error: every one ships with the product."""

from __future__ import annotations

import importlib
import logging

from meshpilot.controlplane import ControlPlane

__all__ = ["install_plugins"]

_PLUGINS = (
    "meshpilot.xds.hds",
    "meshpilot.consul.plugin",
    "meshpilot.eureka.plugin",
    "meshpilot.policy.plugin",
    "meshpilot.proxyless.plugin",
)


def install_plugins(cp: ControlPlane) -> None:
    for name in _PLUGINS:
        importlib.import_module(name).install(cp)
        logging.getLogger("meshpilot").debug("event=plugin_installed plugin=%s", name)
