"""Tables of the openkms store. Times are seconds since the epoch (double precision, UTC).

Secrets are only ever stored sealed under the root key: `key_versions.sealed_material` and
`access_keys.sealed_secret`. The database alone reveals no key material and no secret.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

SCHEMA_VERSION = 10

# Statements that bring a store of an older schema version up to date, by target version. New
# tables need none: create_all adds them.
MIGRATIONS: dict[int, list[str]] = {
    2: ["ALTER TABLE kms_keys ADD COLUMN policy TEXT"],
    3: [],  # audit_pending: a new table, which create_all makes
    # Two levels of administration: before v4 every administrator managed every account. The
    # bootstrap administrator (the first administrator made) keeps that power as the operator; the
    # others become administrators of their own account only.
    4: ["ALTER TABLE principals ADD COLUMN is_operator BOOLEAN NOT NULL DEFAULT FALSE",
        "UPDATE principals SET is_operator = TRUE WHERE principal_id = "
        "(SELECT principal_id FROM principals WHERE is_admin ORDER BY created LIMIT 1)"],
    # Custom key stores: hsm_clusters and custom_key_stores are new tables (create_all makes them).
    5: ["ALTER TABLE kms_keys ADD COLUMN custom_key_store_id VARCHAR(64)"],
    # An HSM cluster belongs to one account. A cluster registered before v6 goes to the account of
    # its key store (the lowest account id, if several accounts made stores on it: the others'
    # stores can no longer connect); one without a store serves no account until registered again.
    6: ["ALTER TABLE hsm_clusters ADD COLUMN account_id VARCHAR(12)",
        "UPDATE hsm_clusters SET account_id = (SELECT MIN(s.account_id) FROM custom_key_stores s "
        "WHERE s.cluster_id = hsm_clusters.cluster_id)"],
    # External key stores: where a store's XKS proxy is (its credential's secret is sealed in
    # sealed_password), and each key's external key id.
    7: ["ALTER TABLE custom_key_stores ADD COLUMN xks_uri_endpoint VARCHAR(128)",
        "ALTER TABLE custom_key_stores ADD COLUMN xks_uri_path VARCHAR(128)",
        "ALTER TABLE custom_key_stores ADD COLUMN xks_connectivity VARCHAR(32)",
        "ALTER TABLE custom_key_stores ADD COLUMN xks_access_key_id VARCHAR(30)",
        "ALTER TABLE kms_keys ADD COLUMN xks_key_id VARCHAR(128)",
        # "EXTERNAL_KEY_STORE" is longer than the 16 characters origin had (SQLite ignores lengths).
        "postgresql: ALTER TABLE kms_keys ALTER COLUMN origin TYPE VARCHAR(32)"],
    # Secrets (new tables) and AWS managed keys (the default key of Secrets Manager).
    8: ["ALTER TABLE kms_keys ADD COLUMN key_manager VARCHAR(16)"],
    # Rotation of secrets: the token of the rotation in progress (rotation_functions is new).
    9: ["ALTER TABLE secrets ADD COLUMN rotation_token VARCHAR(64)",
        "ALTER TABLE secrets ADD COLUMN rotation_started FLOAT"],
    10: [],  # request_quotas: a new table, which create_all makes
}
# A statement "postgresql: <sql>" runs on PostgreSQL only.

metadata = MetaData()

meta = Table(
    "openkms_meta", metadata,
    Column("name", String(64), primary_key=True),
    Column("value", LargeBinary, nullable=False),
)

accounts = Table(
    "accounts", metadata,
    Column("account_id", String(12), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("created", Float, nullable=False),
)

principals = Table(
    "principals", metadata,
    Column("principal_id", String(32), primary_key=True),
    Column("account_id", String(12), ForeignKey("accounts.account_id"), nullable=False),
    Column("name", String(128), nullable=False),
    # is_admin: the account's administrator (acts as its root user, manages its users).
    # is_operator: also manages every account (the bootstrap administrator and those it names).
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("is_operator", Boolean, nullable=False, default=False),
    Column("created", Float, nullable=False),
    Index("ux_principals_account_name", "account_id", "name", unique=True),
)

access_keys = Table(
    "access_keys", metadata,
    Column("access_key_id", String(128), primary_key=True),
    Column("principal_id", String(32), ForeignKey("principals.principal_id"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("sealed_secret", LargeBinary, nullable=False),
    Column("created", Float, nullable=False),
)

keys = Table(
    "kms_keys", metadata,
    Column("key_id", String(36), primary_key=True),
    Column("account_id", String(12), ForeignKey("accounts.account_id"), nullable=False),
    Column("region", String(32), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("key_spec", String(32), nullable=False),
    Column("key_usage", String(32), nullable=False),
    Column("origin", String(32), nullable=False),
    Column("state", String(32), nullable=False),
    Column("created", Float, nullable=False),
    Column("deletion_date", Float, nullable=True),
    Column("pending_window_days", Integer, nullable=True),
    Column("current_version", Integer, nullable=False),
    # Automatic rotation: period in days (NULL: off) and when the next rotation is due.
    Column("rotation_period_days", Integer, nullable=True),
    Column("next_rotation", Float, nullable=True),
    # Imported material of the current version: its expiry, if any.
    Column("valid_to", Float, nullable=True),
    Column("expiration_model", String(32), nullable=True),
    # The key policy (JSON text); NULL means the default key policy of the key's account.
    Column("policy", Text, nullable=True),
    # The custom key store holding the material (NULL: the software store). Not a foreign key, so
    # that the v5 migration can add it with ALTER TABLE on SQLite; the service keeps it valid.
    Column("custom_key_store_id", String(64), nullable=True),
    Column("xks_key_id", String(128), nullable=True),  # the external key (external key stores)
    Column("key_manager", String(16), nullable=True),  # AWS for an AWS managed key; NULL: CUSTOMER
    Index("ix_kms_keys_account", "account_id", "key_id"),
    Index("ix_kms_keys_deletion", "state", "deletion_date"),
    Index("ix_kms_keys_rotation", "next_rotation"),
    Index("ix_kms_keys_valid_to", "valid_to"),
)

# -- custom key stores --------------------------------------------------------------------------------
# A PKCS#11 token an operator registered ("cluster", as AWS calls a CloudHSM cluster).
hsm_clusters = Table(
    "hsm_clusters", metadata,
    Column("cluster_id", String(24), primary_key=True),
    Column("module_path", Text, nullable=False),
    Column("token_label", String(32), nullable=False),
    Column("trust_anchor", Text, nullable=False),
    Column("created", Float, nullable=False),
    Column("account_id", String(12), nullable=True),  # the tenant it serves (NULL: none, see v6)
)

# A tenant's custom key store: on an HSM cluster (the token user's PIN sealed under the root key),
# or in front of an XKS proxy (the proxy credential's secret sealed the same way).
custom_key_stores = Table(
    "custom_key_stores", metadata,
    Column("custom_key_store_id", String(64), primary_key=True),
    Column("account_id", String(12), ForeignKey("accounts.account_id"), nullable=False),
    Column("name", String(256), nullable=False),
    Column("store_type", String(32), nullable=False),
    Column("cluster_id", String(24), ForeignKey("hsm_clusters.cluster_id"), nullable=True),
    Column("sealed_password", LargeBinary, nullable=True),
    Column("connection_state", String(16), nullable=False),
    Column("connection_error_code", String(64), nullable=True),
    Column("created", Float, nullable=False),
    Column("xks_uri_endpoint", String(128), nullable=True),
    Column("xks_uri_path", String(128), nullable=True),
    Column("xks_connectivity", String(32), nullable=True),
    Column("xks_access_key_id", String(30), nullable=True),
    Index("ux_custom_key_stores_name", "account_id", "name", unique=True),
)

key_versions = Table(
    "key_versions", metadata,
    Column("key_id", String(36), ForeignKey("kms_keys.key_id", ondelete="CASCADE"), primary_key=True),
    Column("version", Integer, primary_key=True),
    # Empty once imported material has expired or been deleted (the row stays: it remembers the
    # material's id so that only the same material can be imported again).
    Column("sealed_material", LargeBinary, nullable=False),
    Column("created", Float, nullable=False),
    Column("material_id", String(64), nullable=False),
    Column("rotation_type", String(16), nullable=True),  # AUTOMATIC | ON_DEMAND; NULL for the first
    Column("rotated", Float, nullable=True),              # when it became current by a rotation
    Column("import_state", String(16), nullable=True),   # IMPORTED | PENDING_IMPORT; NULL if generated
    Column("valid_to", Float, nullable=True),
    Column("expiration_model", String(32), nullable=True),
    Column("description", Text, nullable=True),
)

import_tokens = Table(
    "import_tokens", metadata,
    Column("token_id", String(64), primary_key=True),
    Column("key_id", String(36), ForeignKey("kms_keys.key_id", ondelete="CASCADE"), nullable=False),
    Column("wrapping_algorithm", String(32), nullable=False),
    Column("wrapping_key_spec", String(16), nullable=False),
    Column("sealed_private_key", LargeBinary, nullable=False),
    Column("valid_to", Float, nullable=False),
)

aliases = Table(
    "aliases", metadata,
    Column("account_id", String(12), primary_key=True),
    Column("name", String(256), primary_key=True),
    Column("target_key_id", String(36), ForeignKey("kms_keys.key_id", ondelete="CASCADE"), nullable=False),
    Column("created", Float, nullable=False),
    Column("updated", Float, nullable=False),
    Index("ix_aliases_target", "target_key_id"),
)

tags = Table(
    "key_tags", metadata,
    Column("key_id", String(36), ForeignKey("kms_keys.key_id", ondelete="CASCADE"), primary_key=True),
    Column("tag_key", String(128), primary_key=True),
    Column("tag_value", String(256), nullable=False),
)

# -- audit ------------------------------------------------------------------------------------------
# One hash chain per node. `record` is the canonical JSON that was hashed: it holds the sequence
# number, the previous record's hash and the CloudTrail-shaped event. Rows are only ever inserted
# (and, past the retention period, moved to archive files); there is no update path.
audit_events = Table(
    "audit_events", metadata,
    Column("node_id", String(36), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("event_time", Float, nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("event_name", String(64), nullable=False),
    Column("caller_account", String(12), nullable=True),
    Column("owner_account", String(12), nullable=True),
    Column("principal_arn", String(256), nullable=True),
    Column("key_id", String(36), nullable=True),
    Column("error_code", String(64), nullable=True),
    Column("record", Text, nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_time", "event_time"),
    Index("ix_audit_key", "key_id", "event_time"),
    Index("ix_audit_caller", "caller_account", "event_time"),
    Index("ix_audit_owner", "owner_account", "event_time"),
)

# Signed checkpoints of each chain: (node, seq, hash of that record), chained to the previous digest.
audit_digests = Table(
    "audit_digests", metadata,
    Column("node_id", String(36), primary_key=True),
    Column("digest_seq", Integer, primary_key=True, autoincrement=False),
    Column("record_seq", Integer, nullable=False),
    Column("created", Float, nullable=False),
    Column("body", Text, nullable=False),        # canonical JSON that was signed
    Column("signature", LargeBinary, nullable=False),
)

# The intent of an API call that changes state, written in the same transaction as the change
# (so the two commit together) and deleted in the transaction that writes the call's record. A
# row left behind means the change committed but its record did not: the node's audit writer
# turns it into a record at its next start (or once it is a minute old).
audit_pending = Table(
    "audit_pending", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("node_id", String(36), nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("created", Float, nullable=False),
    Column("event", Text, nullable=False),   # the CloudTrail-shaped event as known at the commit
    Index("ix_audit_pending_event", "node_id", "event_id"),
)

key_last_usage = Table(
    "key_last_usage", metadata,
    Column("key_id", String(36), primary_key=True),
    Column("operation", String(64), nullable=False),
    Column("used_at", Float, nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("request_id", String(36), nullable=False),
)

# -- access control ---------------------------------------------------------------------------------
# Identity policies attached to users (inline policies, by name).
principal_policies = Table(
    "principal_policies", metadata,
    Column("principal_id", String(32), ForeignKey("principals.principal_id", ondelete="CASCADE"),
           primary_key=True),
    Column("policy_name", String(128), primary_key=True),
    Column("document", Text, nullable=False),
)

grants = Table(
    "grants", metadata,
    Column("grant_id", String(64), primary_key=True),
    Column("key_id", String(36), ForeignKey("kms_keys.key_id", ondelete="CASCADE"), nullable=False),
    Column("name", String(256), nullable=True),
    Column("grantee_principal", String(256), nullable=False),
    Column("retiring_principal", String(256), nullable=True),
    Column("issuing_account", String(256), nullable=False),
    Column("operations", Text, nullable=False),    # JSON list
    Column("constraints", Text, nullable=True),    # JSON object
    Column("token_hash", String(64), nullable=False),
    Column("created", Float, nullable=False),
    Index("ix_grants_key", "key_id"),
    Index("ix_grants_token", "token_hash"),
)

# -- secrets (the Secrets Manager API) --------------------------------------------------------------
# A secret's values are in its versions, each sealed with AES-256-GCM under a data key of its own
# that only KMS can open (the KMS ciphertext of the data key is kept, never the data key).
secrets = Table(
    "secrets", metadata,
    Column("secret_id", String(36), primary_key=True),  # internal
    Column("account_id", String(12), ForeignKey("accounts.account_id"), nullable=False),
    Column("region", String(32), nullable=False),
    Column("name", String(512), nullable=False),
    Column("arn", String(700), nullable=False),  # ...:secret:<name>-<6 random characters>
    Column("description", Text, nullable=True),
    Column("kms_key_id", String(2048), nullable=True),  # as the caller gave it; NULL: aws/secretsmanager
    Column("created", Float, nullable=False),
    Column("last_changed", Float, nullable=False),
    Column("last_accessed", Float, nullable=True),
    Column("deletion_date", Float, nullable=True),  # marked for deletion: when it goes
    Column("rotation_lambda_arn", String(2048), nullable=True),
    Column("rotation_rules", Text, nullable=True),  # JSON (AutomaticallyAfterDays, Duration, ScheduleExpression)
    Column("rotation_enabled", Boolean, nullable=False, default=False),
    Column("last_rotated", Float, nullable=True),
    Column("next_rotation", Float, nullable=True),
    Column("policy", Text, nullable=True),  # the resource policy, if any
    # SHA-256 (hex) of the RotationToken of the rotation in progress: what a rotation function's
    # PutSecretValue must show, if it passes one.
    Column("rotation_token", String(64), nullable=True),
    Column("rotation_started", Float, nullable=True),  # when that rotation began (on whichever node)
    Index("ux_secrets_name", "account_id", "name", unique=True),
    Index("ux_secrets_arn", "arn", unique=True),
    Index("ix_secrets_deletion", "deletion_date"),
    Index("ix_secrets_rotation", "next_rotation"),
)

secret_versions = Table(
    "secret_versions", metadata,
    Column("secret_id", String(36), ForeignKey("secrets.secret_id", ondelete="CASCADE"), primary_key=True),
    Column("version_id", String(64), primary_key=True),
    Column("created", Float, nullable=False),
    Column("last_accessed", Float, nullable=True),
    Column("kind", String(8), nullable=True),  # string or binary; NULL: no value (a pending rotation)
    Column("key_arn", String(2048), nullable=True),  # the KMS key of the data key
    Column("encrypted_data_key", LargeBinary, nullable=True),
    Column("sealed_value", LargeBinary, nullable=True),  # nonce || AES-256-GCM ciphertext || tag
)

secret_stages = Table(
    "secret_stages", metadata,
    Column("secret_id", String(36), ForeignKey("secrets.secret_id", ondelete="CASCADE"), primary_key=True),
    Column("stage", String(256), primary_key=True),
    Column("version_id", String(64), nullable=False),
)

secret_tags = Table(
    "secret_tags", metadata,
    Column("secret_id", String(36), ForeignKey("secrets.secret_id", ondelete="CASCADE"), primary_key=True),
    Column("tag_key", String(128), primary_key=True),
    Column("tag_value", String(256), nullable=False),
)

# Rotation functions (secrets/functions.py): what a secret's RotationLambdaARN names. The signing
# secret of a webhook and the environment of a command are sealed under the root key.
rotation_functions = Table(
    "rotation_functions", metadata,
    Column("account_id", String(12), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("config", Text, nullable=False),  # JSON: url, command, timeout_s, password options (nothing secret)
    Column("sealed", LargeBinary, nullable=False),
    Column("created", Float, nullable=False),
)

# Request quotas an operator set (quotas.py): per account, or for every account ("*"); a quota
# with no row here runs at AWS's default rate.
request_quotas = Table(
    "request_quotas", metadata,
    Column("account_id", String(12), primary_key=True),  # an account id, or "*"
    Column("quota_name", String(64), primary_key=True),
    Column("rate", Float, nullable=False),  # requests per second, per node
    Column("updated", Float, nullable=False),
)
