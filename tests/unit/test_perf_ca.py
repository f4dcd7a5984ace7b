"""`meshpilot perf ca`'s own parts: the in-process signing loop, the rate arithmetic, the percentile,
refused flags and the subcommand's registration (the gRPC measurement starts a control plane: it is
run by hand, see docs/perf.md)."""

from __future__ import annotations

import argparse

import pytest

from meshpilot import pki
from meshpilot.perf import ca, command


def test_sign_rate_signs_for_the_duration() -> None:
    spiffe = pki.spiffe_id("mesh.local", "default", "bench")
    got = ca.sign_rate(0.05, [pki.build_csr(pki.new_key(), spiffe, "n")])
    assert got["signed"] >= 1 and got["seconds"] >= 0.05, f"expected at least one CSR signed over 0.05 s, got {got}"
    assert abs(got["csrs_per_s"] * got["seconds"] - got["signed"]) <= 0.02 * got["signed"], f"rate and count disagree: {got}"
    assert got["cpu_us_per_csr"] > 0, f"expected CPU time per CSR, got {got}"


def test_sign_rate_refuses_a_bad_csr() -> None:
    with pytest.raises(ValueError, match="PEM certificate signing request"):
        ca.sign_rate(0.01, [b"not a csr"])


def test_rate_and_percentile_arithmetic() -> None:
    assert ca._rate(500, 2.0, 0.25) == {"signed": 500, "seconds": 2.0, "csrs_per_s": 250.0, "cpu_us_per_csr": 500.0}
    assert ca._rate(0, 1.0, 0.0)["cpu_us_per_csr"] is None, "expected no CPU per CSR when none was signed"
    values = [float(v) for v in range(1, 101)]
    assert ca._percentile(values, 0.99) == 100.0 and ca._percentile(values, 0.5) == 51.0


def test_bad_flags_are_refused() -> None:
    parser = argparse.ArgumentParser()
    ca.add_arguments(parser)
    assert ca.main(parser.parse_args(["--duration", "0"])) == 2, "expected a zero duration to be refused"
    assert ca.main(parser.parse_args(["--concurrency", "0", "--skip-grpc"])) == 2, "expected zero calls in flight to be refused"


def test_perf_ca_is_a_subcommand() -> None:
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["perf", "ca", "--skip-grpc", "--duration", "1"])
    # the benchmark's main, wrapped to keep its result when --report is given (perf/command.py)
    assert args.func.__wrapped__ is ca.main and args.skip_grpc is True and args.duration == 1.0, f"unexpected {args}"
