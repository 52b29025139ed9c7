"""The KMS operation table: AWS name -> the function that serves it, and what the API must know of it.

A new operation is one function in the module of its resource and one row here. The table is
checked against botocore's KMS model (tests/unit/service/test_operations.py): every row is an
operation of the model; operations of the model without a row answer UnsupportedOperationException.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..model import Caller
from . import aliases, encryption, grants, imports, keys, keystores, policies, rotation, signing, tags
from .context import Context, Params, Result

Handler = Callable[[Context, Caller, Params], Result]


@dataclass(frozen=True)
class Op:
    handler: Handler
    blocking: bool = False   # may take a second of CPU (RSA key generation): runs on a worker thread
    tracked: bool = False    # a use of the key, for GetKeyLastUsage
    read_only: bool = False  # changes nothing (the audit record's readOnly)


OPERATIONS: dict[str, Op] = {
    # keys
    "CreateKey": Op(keys.create_key, blocking=True),
    "DescribeKey": Op(keys.describe_key, read_only=True),
    "ListKeys": Op(keys.list_keys, read_only=True),
    "EnableKey": Op(keys.enable_key),
    "DisableKey": Op(keys.disable_key),
    "ScheduleKeyDeletion": Op(keys.schedule_key_deletion),
    "CancelKeyDeletion": Op(keys.cancel_key_deletion),
    "UpdateKeyDescription": Op(keys.update_key_description),
    "GetKeyLastUsage": Op(keys.get_key_last_usage, read_only=True),
    # tags
    "TagResource": Op(tags.tag_resource),
    "UntagResource": Op(tags.untag_resource),
    "ListResourceTags": Op(tags.list_resource_tags, read_only=True),
    # aliases
    "CreateAlias": Op(aliases.create_alias),
    "UpdateAlias": Op(aliases.update_alias),
    "DeleteAlias": Op(aliases.delete_alias),
    "ListAliases": Op(aliases.list_aliases, read_only=True),
    # encryption
    "Encrypt": Op(encryption.encrypt, tracked=True),
    "Decrypt": Op(encryption.decrypt, tracked=True),
    "ReEncrypt": Op(encryption.re_encrypt, tracked=True),
    "GenerateDataKey": Op(encryption.generate_data_key, tracked=True),
    "GenerateDataKeyWithoutPlaintext": Op(encryption.generate_data_key_without_plaintext, tracked=True),
    "GenerateDataKeyPair": Op(encryption.generate_data_key_pair, blocking=True, tracked=True),
    "GenerateDataKeyPairWithoutPlaintext": Op(encryption.generate_data_key_pair_without_plaintext, blocking=True,
                                              tracked=True),
    "GenerateRandom": Op(encryption.generate_random),
    # asymmetric and HMAC
    "GetPublicKey": Op(signing.get_public_key, read_only=True),
    "Sign": Op(signing.sign, tracked=True),
    "Verify": Op(signing.verify, tracked=True),
    "GenerateMac": Op(signing.generate_mac, tracked=True),
    "VerifyMac": Op(signing.verify_mac, tracked=True),
    "DeriveSharedSecret": Op(signing.derive_shared_secret, tracked=True),
    # rotation
    "EnableKeyRotation": Op(rotation.enable_key_rotation),
    "DisableKeyRotation": Op(rotation.disable_key_rotation),
    "GetKeyRotationStatus": Op(rotation.get_key_rotation_status, read_only=True),
    "RotateKeyOnDemand": Op(rotation.rotate_key_on_demand),
    "ListKeyRotations": Op(rotation.list_key_rotations, read_only=True),
    # BYOK
    "GetParametersForImport": Op(imports.get_parameters_for_import, blocking=True, read_only=True),
    "ImportKeyMaterial": Op(imports.import_key_material),
    "DeleteImportedKeyMaterial": Op(imports.delete_imported_key_material),
    # key policies
    "GetKeyPolicy": Op(policies.get_key_policy, read_only=True),
    "PutKeyPolicy": Op(policies.put_key_policy),
    "ListKeyPolicies": Op(policies.list_key_policies, read_only=True),
    # grants
    "CreateGrant": Op(grants.create_grant),
    "ListGrants": Op(grants.list_grants, read_only=True),
    "ListRetirableGrants": Op(grants.list_retirable_grants, read_only=True),
    "RetireGrant": Op(grants.retire_grant),
    "RevokeGrant": Op(grants.revoke_grant),
    # custom key stores (an HSM's token: every call may wait on it)
    "CreateCustomKeyStore": Op(keystores.create_custom_key_store, blocking=True),  # may ask a proxy
    "DescribeCustomKeyStores": Op(keystores.describe_custom_key_stores, read_only=True),
    "UpdateCustomKeyStore": Op(keystores.update_custom_key_store, blocking=True),  # may ask a proxy
    "ConnectCustomKeyStore": Op(keystores.connect_custom_key_store, blocking=True),
    "DisconnectCustomKeyStore": Op(keystores.disconnect_custom_key_store),
    "DeleteCustomKeyStore": Op(keystores.delete_custom_key_store),
}
