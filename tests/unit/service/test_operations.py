"""The operation table (service/operations.py) against botocore's KMS model, and what the API layer
reads from it."""

from __future__ import annotations

import inspect

import botocore.loaders
import pytest

from openkms.api.dispatch import KmsApi
from openkms.errors import UnknownOperationException, UnsupportedOperationException
from openkms.service import OPERATIONS
from tests.unit.service.conftest import Service

MODEL = botocore.loaders.Loader().load_service_model("kms", "service-2")


def test_every_row_is_an_operation_of_the_model() -> None:
    assert set(OPERATIONS) <= set(MODEL["operations"])
    assert len(OPERATIONS) >= 46


def test_handlers_take_context_caller_params() -> None:
    for name, op in OPERATIONS.items():
        assert list(inspect.signature(op.handler).parameters) == ["ctx", "caller", "p"], name
        assert op.handler.__module__.startswith("openkms.service."), name


def test_the_facts_of_each_operation() -> None:
    # The calls that may take a second of CPU, or wait on an HSM or an XKS proxy, run on a worker
    # thread (others that name a custom key store's key do too: KmsApi.blocking).
    assert {n for n, op in OPERATIONS.items() if op.blocking} == {
        "CreateKey", "GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext", "GetParametersForImport",
        "ConnectCustomKeyStore", "CreateCustomKeyStore", "UpdateCustomKeyStore"}
    # The cryptographic uses of a key count for GetKeyLastUsage.
    assert {n for n, op in OPERATIONS.items() if op.tracked} == {
        "Decrypt", "DeriveSharedSecret", "Encrypt", "GenerateDataKey", "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext", "GenerateDataKeyWithoutPlaintext", "GenerateMac", "ReEncrypt",
        "Sign", "Verify", "VerifyMac"}
    # readOnly in the audit record: the operations that change nothing.
    assert {n for n, op in OPERATIONS.items() if op.read_only} == {
        n for n in OPERATIONS if n.startswith(("Describe", "List", "Get"))}


def test_model_operations_without_a_row_are_unsupported(svc: Service) -> None:
    api = KmsApi(svc.node.service)
    missing = sorted(set(MODEL["operations"]) - set(OPERATIONS))
    assert missing, "every operation of the model is served: this test needs another example"
    for name in missing:
        with pytest.raises(UnsupportedOperationException):
            api.call(svc.admin, name, {}, {})
    with pytest.raises(UnknownOperationException):
        api.call(svc.admin, "NoSuchOperation", {}, {})
