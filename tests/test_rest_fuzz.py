"""Property-based fuzzing of the REST shim from its own OpenAPI description (schemathesis).

Valid and invalid requests for every operation against a live IOC without a camera: never a
5xx, always JSON, replies as described (status codes, content types, response schemas).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from iochelpers import EPICS_ENV, IocProcess, wait_until
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi import checks

from psss_ioc.processes import free_port
from psss_ioc.rest.openapi import OPENAPI

PREFIX = "TST-PSSS-RESTFZ"


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir: Path = tmp_path_factory.mktemp("rest-fuzz")
    port = free_port()
    proc = IocProcess(PREFIX, ["--output-port", "0", "--rest-port", str(port),
                               "--background-dir", str(workdir / "bg")],
                      EPICS_ENV, workdir / "ioc.log")
    address = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(address), 30, what="REST up")
        yield address
    finally:
        code = proc.stop()
        assert code == 0, (workdir / "ioc.log").read_text()[-5000:]


def _up(address: str) -> bool:
    try:
        return requests.get(address + "/status", timeout=2).status_code == 200
    except requests.RequestException:
        return False


# Built from the OpenAPI dict in the package; the test checks the served copy is the same.
SCHEMA = schemathesis.openapi.from_dict(OPENAPI)
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
# positive_data_acceptance is left out on purpose: the schema cannot say "ymin < ymax" or
# "the file exists", so some schema-valid requests are rightly refused with 400.
CHECKS = [checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.negative_data_rejection]


def test_served_description_is_the_packaged_one(address: str) -> None:
    assert requests.get(address + "/openapi.json", timeout=10).json() == OPENAPI


def _has_input(operation: Any) -> bool:
    spec = OPENAPI["paths"][operation.path][operation.method.lower()]
    return "requestBody" in spec or "parameters" in spec


# negative (schema-violating) requests only where there is something to violate
RUNS = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    (op, GenerationMode.NEGATIVE) for op in OPERATIONS if _has_input(op)]


@pytest.mark.parametrize(("operation", "mode"), RUNS,
                         ids=[f"{op.label}-{mode.value}" for op, mode in RUNS])
def test_no_server_errors_and_replies_as_described(address: str, operation: Any,
                                                   mode: GenerationMode) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=15, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case: Any) -> None:
        response = case.call(base_url=address, timeout=30)
        assert response.status_code < 500, (case.method, case.path, response.text[:300])
        assert response.headers.get("content-type", [""])[0].startswith("application/json")
        case.validate_response(response, checks=CHECKS)

    fuzz()
