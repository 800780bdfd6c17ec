"""Every kvpress port is under the parity suite: each method config whose class declares ``kvpress`` (found by
``tests/discover.py``, no hand list) has a case (``tests/parity/cases.py``) that runs that class against that press
and asserts parity (``compare`` other than ``measured_only``), or is in ``NOT_COMPARED`` with the reason. Runs in
the main venv alone (it reads the cases, not the references)."""
from __future__ import annotations

from hydra.utils import get_class

from tests import discover
from tests.parity.cases import CASES, NOT_COMPARED


def case_class(case: dict) -> type:
    spec = case["avkv"]
    return discover.method_class(spec["method"]) if "method" in spec else get_class(spec["config"]["_target_"])


def uncovered(ports: dict[str, str], cases: list[dict], excluded: dict[str, str]) -> list[str]:
    """The ports with neither a compared case of their class and press nor a stated exclusion."""
    compared = {(case_class(c), c["press"]) for c in cases if c["compare"] != "measured_only"}
    return sorted(m for m, press in ports.items()
                  if m not in excluded and (discover.method_class(m), press) not in compared)


def test_every_kvpress_port_has_a_compared_parity_case_or_a_reason():
    ports = discover.kvpress_ports()
    assert not uncovered(ports, CASES, NOT_COMPARED)
    stale = sorted(set(NOT_COMPARED) - set(ports))
    assert not stale, f"NOT_COMPARED names configs that are no kvpress port: {stale}"


def test_a_port_without_a_compared_case_is_caught():
    ports = discover.kvpress_ports()
    measured = [c for c in CASES if c["press"] != "TOVAPress"] + \
        [{**c, "compare": "measured_only"} for c in CASES if c["press"] == "TOVAPress"]
    assert uncovered(ports, measured, NOT_COMPARED) == ["tova"]
    assert uncovered(ports, CASES, {}) == ["decoding"]
