"""Secrets: the AWS Secrets Manager API (`secretsmanager.<Operation>`) over the KMS service.

operations.py holds the operations and their table; names.py secret names, ARNs and lookups;
sealing.py the envelope encryption of values through openkms's own KMS (per version, under the
secret's KMS key or the account's aws/secretsmanager key). Values are stored only sealed.
"""

from .operations import OPERATIONS, purge_deleted_secrets

__all__ = ["OPERATIONS", "purge_deleted_secrets"]
