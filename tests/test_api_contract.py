"""Contract tests: schemathesis drives the live API from its own /openapi.json.

The API runs with real Redis and a real embedded ClickHouse holding seeded traffic, an anomaly,
a recommendation and a policy. For every operation schemathesis generates a bounded number of
requests (valid and invalid) and checks that each answer's status code, content type and body
are the ones the document declares, and that nothing answers 5xx unless documented.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from apigw.redis_server import RedisServer
from tests.test_api import TOKENS, served_api

EXAMPLES = int(os.environ.get("APIGW_CONTRACT_EXAMPLES", "8"))  # more: a deeper run
DERANDOMIZE = "APIGW_CONTRACT_EXAMPLES" not in os.environ  # CI: the same cases every run
OPERATOR = TOKENS["ops"]


@pytest.fixture(scope="module")
def contract_url(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[str]:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    data = tmp_path_factory.mktemp("contract")
    with served_api(redis_server.url, f"chdb://{data / 'clickhouse'}", data,
                    api_tokens=f"ops:operator:{OPERATOR}") as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(contract_url: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{contract_url}/openapi.json")


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


# Parameters whose valid values depend on each other (from < to, a range of at most 31 days,
# minutes or from): OpenAPI cannot say so, and a schema-valid mix may rightly get a 400.
CROSS_FIELD = {"from", "to", "minutes"}


# ...and a body `id` must equal the path's.
CROSS_FIELD_OPERATIONS = {"PUT /api/v1/policies/{id}"}


# The API under test runs standalone (no scheduler): these answer the documented 503.
NO_SCHEDULER = {"GET /api/v1/analytics/last-run", "POST /api/v1/analytics/run"}


def _excluded(operation: Any) -> list[Any]:
    names = {p.name for p in operation.query}
    excluded = []
    if names & CROSS_FIELD or operation.label in CROSS_FIELD_OPERATIONS:
        excluded.append(positive_data_acceptance)
    if operation.label in NO_SCHEDULER:
        excluded.append(not_a_server_error)
    return excluded


def _check(operation: Any, mode: GenerationMode, url: str, session: requests.Session) -> None:
    excluded = _excluded(operation)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=DERANDOMIZE, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=url, session=session,
                               headers={"Authorization": f"Bearer {OPERATOR}"},
                               excluded_checks=excluded, timeout=30)

    check()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_answers_match_the_document(api_schema: schemathesis.BaseSchema, contract_url: str,
                                    session: requests.Session, mode: GenerationMode) -> None:
    """Every operation, valid and invalid input: statuses, content types, bodies as declared.

    (schemathesis's pytest plugin loader does not work with pytest 9, so the operations are
    driven here, one Hypothesis run each, and every failure is reported at the end.)"""
    failures: list[str] = []
    operations = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        operations += 1
        try:
            _check(operation, mode, contract_url, session)
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE, operation.label  # nothing to get wrong
        except (Exception, ExceptionGroup) as exc:
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert operations >= 30
    assert not failures, "\n\n".join(failures)


def test_document_paths_are_all_served(contract_url: str) -> None:
    document = requests.get(f"{contract_url}/openapi.json", timeout=10).json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation["responses"], (method, path)
            assert "200" in operation["responses"], (method, path)
