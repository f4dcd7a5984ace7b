"""The layering of meshpilot/ (pyproject.toml, [tool.importlinter]) holds: no import goes up a floor,
translate/ and the xDS serving side do not know each other, the control plane runs nothing of the
node side, and no two modules or packages of one package import each other in a circle.

The contracts run in-process through import-linter's own API, as ``lint-imports`` would run them.
"""

from __future__ import annotations

import contextlib
import io
from copy import deepcopy
from pathlib import Path
from typing import Any

import grimp
import pytest
from importlinter import api  # noqa: F401  (importing it configures import-linter)
from importlinter.application.use_cases import _register_built_in_contract_types, create_report, read_user_options
from importlinter.domain.contract import Contract, ContractCheck, registry
from importlinter.domain.helpers import MissingImport

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _rendered(contract: Contract, check: ContractCheck) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        contract.render_broken_contract(check)
    return out.getvalue().strip()


def _options() -> Any:
    _register_built_in_contract_types()
    return read_user_options(str(PYPROJECT))


def _broken_on(graph: grimp.ImportGraph) -> dict[str, str]:
    """Each contract of pyproject.toml checked against this graph: id -> what breaks it. An ignored
    import missing from the graph is left to test_the_import_contracts_hold to report."""
    options = _options()
    broken = {}
    for o in options.contracts_options:
        contract = registry.get_contract_class(o["type"])(
            name=o["name"], session_options=options.session_options, contract_options={**o, "unmatched_ignore_imports_alerting": "none"}
        )
        check = contract.check(deepcopy(graph), verbose=False)
        if not check.kept:
            broken[o["id"]] = _rendered(contract, check)
    return broken


def test_the_import_contracts_hold() -> None:
    try:
        report = create_report(_options(), cache_dir=None)
    except MissingImport as exc:
        pytest.fail(f"expected every ignored import in pyproject's [tool.importlinter] to exist; delete the lines of those gone:\n{exc}")
    assert not report.could_not_run, f"expected valid contracts, got {report.invalid_contract_options}"
    broken = {c.name: _rendered(c, check) for c, check in report.get_contracts_and_checks() if not check.kept}
    assert not broken, "expected every import contract kept, broken:\n\n" + "\n\n".join(
        f"{name}:\n{details}" for name, details in broken.items()
    )
    assert report.kept_count == len(_options().contracts_options) > 0, f"expected every contract checked, got {report.kept_count}"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    root = _options().session_options["root_packages"]
    return grimp.build_graph(*root, cache_dir=None)


@pytest.mark.parametrize(
    ("importer", "imported", "contracts"),
    [
        ("meshpilot.xds.cache", "meshpilot.translate.routes", {"floors", "no-circles"}),
        ("meshpilot.translate.clusters", "meshpilot.xds.cache", {"build-apart-from-serve"}),
        ("meshpilot.model", "meshpilot.registry", {"floors", "no-circles"}),
        ("meshpilot.api.app", "meshpilot.controlplane", {"floors", "no-circles"}),
        ("meshpilot.consul.agent", "meshpilot.hds.metadata", {"floors"}),
        ("meshpilot.publish.mesh", "meshpilot.meshdns.table", {"node-side"}),
    ],
)
def test_a_planted_import_breaks_the_contracts_that_forbid_it(
    graph: grimp.ImportGraph, importer: str, imported: str, contracts: set[str]
) -> None:
    planted = deepcopy(graph)
    planted.add_import(importer=importer, imported=imported, line_number=1, line_contents=f"import {imported}")
    broken = _broken_on(planted)
    assert set(broken) == contracts, f"expected {importer} -> {imported} to break {sorted(contracts)}, got {sorted(broken)}"
    for details in broken.values():
        assert importer.rsplit(".", 1)[0].removeprefix("meshpilot") in details, f"expected the report to name {importer}, got:\n{details}"


def test_a_new_package_must_be_given_a_floor(graph: grimp.ImportGraph) -> None:
    planted = deepcopy(graph)
    planted.add_module("meshpilot.annex")
    broken = _broken_on(planted)
    assert set(broken) == {"floors"} and "meshpilot.annex" in broken["floors"], f"expected the floors to miss meshpilot.annex, got {broken}"
