"""One table between domain errors and gRPC codes, read the same way by server and client."""

from __future__ import annotations

import grpc
import pytest

from gateway.status import STATUS, error_for, status_for
from models import errors


@pytest.mark.parametrize("code", sorted(set(STATUS.values()), key=lambda c: c.name))
def test_every_code_survives_the_round_trip(code):
    error = error_for(code, "boom")
    assert status_for(error) == code and error.status == code and str(error) == "boom"


@pytest.mark.parametrize("cls", [c for c in STATUS if list(STATUS.values()).count(STATUS[c]) == 1])
def test_a_class_with_its_own_code_comes_back_as_itself(cls):
    assert type(error_for(status_for(cls("boom")), "boom")) is cls


def test_subclasses_take_their_parents_code_and_unknown_errors_are_internal():
    assert status_for(errors.WorkerCrashedError("x")) == grpc.StatusCode.INTERNAL
    assert status_for(errors.HegateError("x")) == grpc.StatusCode.INTERNAL
    unknown = error_for(grpc.StatusCode.ABORTED, "why")
    assert type(unknown) is errors.HegateError and "ABORTED: why" in str(unknown)
