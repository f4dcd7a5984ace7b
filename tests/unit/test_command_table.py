"""The `meshpilot` command table and the control plane's plugin list: every listed module ships with the
product, so one that cannot be imported is an error instead of a subcommand or a part quietly left out."""

from __future__ import annotations

import argparse
import importlib.util

import pytest

from meshpilot import cli, plugins
from meshpilot.controlplane import ControlPlane
from meshpilot.settings import Settings


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_comes_from_the_table_and_has_a_handler() -> None:
    commands = _subcommands(cli.build_parser())
    expected = {"serve", "bootstrap", "service", "instance", "proxies", "demo", "meshdns", "sidecar", "capture",
                "inject", "webhook", "perf", "policy"}
    assert expected <= set(commands), f"expected at least {sorted(expected)}, got {sorted(commands)}"
    no_handler = [name for name, p in commands.items() if name != "perf" and p.get_default("func") is None]
    assert not no_handler, f"expected every subcommand to name its handler, these do not: {no_handler}"
    benchmarks = _subcommands(commands["perf"])
    assert {"xds", "xds-abuse", "dns", "route", "registry"} <= set(benchmarks), f"got benchmarks {sorted(benchmarks)}"


def test_a_listed_command_module_that_is_missing_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_COMMAND_MODULES", (*cli._COMMAND_MODULES, "meshpilot.meshdns.plugin"))
    with pytest.raises(ModuleNotFoundError) as exc:
        cli.build_parser()
    assert exc.value.name == "meshpilot.meshdns.plugin", f"expected the missing module named, got {exc.value!r}"


def test_every_listed_plugin_exists_and_installs() -> None:
    missing = [name for name in plugins._PLUGINS if importlib.util.find_spec(name) is None]
    assert not missing, f"expected every listed plugin module to exist, missing: {missing}"
    no_install = [name for name in plugins._PLUGINS if not callable(getattr(importlib.import_module(name), "install", None))]
    assert not no_install, f"expected every listed plugin module to define install(cp), these do not: {no_install}"
    plugins.install_plugins(ControlPlane(Settings(store="memory:")))


def test_a_listed_plugin_that_is_missing_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugins, "_PLUGINS", ("meshpilot.meshdns.plugin",))
    with pytest.raises(ModuleNotFoundError) as exc:
        plugins.install_plugins(ControlPlane(Settings(store="memory:")))
    assert exc.value.name == "meshpilot.meshdns.plugin", f"expected the missing module named, got {exc.value!r}"
