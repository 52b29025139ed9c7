"""Rotating secrets, as Secrets Manager does: four steps of a rotation function, on a schedule or at once.

A rotation of a secret, under a ClientRequestToken `token`:

1. Secrets Manager (here: `Rotation.start`) adds a version `token` with no value, labelled
   AWSPENDING, and a fresh RotationToken (its SHA-256 is kept with the secret);
2. it invokes the secret's rotation function with `{"Step", "SecretId" (the ARN),
   "ClientRequestToken", "RotationToken"}` for createSecret (the function puts the new value on the
   AWSPENDING version: PutSecretValue with that token), setSecret (it changes the credential where
   it is used), testSecret (it tries the new one), finishSecret (it moves AWSCURRENT to the new
   version: UpdateSecretVersionStage), each step after the last one succeeded;
3. on success the secret's LastRotatedDate is now and its next rotation is scheduled from now.
   A failed step stops the rotation and leaves AWSPENDING where it is: a later RotateSecret answers
   that a previous rotation isn't complete and tries that one again (AWS's behaviour); removing
   AWSPENDING from the version (UpdateSecretVersionStage) abandons it.

Steps run on this module's threads, never on the event loop; RotateSecret answers once the
rotation has started. One account's rotations take at most half of a node's rotation threads at
once (the rest wait their turn, in order), so that an account whose function hangs until its
timeout holds up its own rotations, not other accounts'. Each rotation is in the audit log as AWS
records it (RotationStarted, RotationSucceeded, RotationFailed with the step and the reason;
eventType AwsServiceEvent).

Scheduled rotation: the scheduler calls `run_due` on every node; each due secret is claimed by
moving its next rotation on in one conditional UPDATE, which succeeds on exactly one node.

The built-in functions (functions.py) follow AWS's rotation templates step by step, calling this
server's own operations as the secret's account, through Secrets Manager (kms:ViaService).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import json
import logging
import secrets as random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from ..audit.record import build_event, new_id
from ..errors import InvalidRequestException, KMSError, ResourceNotFoundException
from ..model import Caller, Principal, Secret, SecretVersion
from ..service import Context
from ..storage import Tx
from ..storage.store import before_commit
from . import functions, schedule
from .functions import RotationFunction, RotationFunctions, StepFailed

log = logging.getLogger("openkms.secrets.rotation")

CURRENT, PREVIOUS, PENDING = "AWSCURRENT", "AWSPREVIOUS", "AWSPENDING"
STEPS = ("createSecret", "setSecret", "testSecret", "finishSecret")
EVENT_SOURCE = "secretsmanager.amazonaws.com"
# What the record of a built-in function's call keeps of its parameters: what it acted on, never a value.
AUDITED_MEMBERS = frozenset({"SecretId", "VersionId", "VersionStage", "ClientRequestToken", "MoveToVersionId",
                             "RemoveFromVersionId", "VersionStages", "PasswordLength", "ExcludeCharacters"})
# What AWS's PostgreSQL templates leave out of passwords: characters that break connection strings.
PG_EXCLUDE = "/@\"'\\"
PG_CONNECT_TIMEOUT_S = 5


def token_digest(rotation_token: str) -> str:
    return hashlib.sha256(rotation_token.encode()).hexdigest()


def service_caller(account_id: str) -> Caller:
    """The account as Secrets Manager acts for it in a built-in rotation (its root, for IAM)."""
    principal = Principal(f"secretsmanager-rotation-{account_id}", account_id, "secretsmanager-rotation", True,
                          datetime(1970, 1, 1, tzinfo=UTC))
    return Caller(principal, "", EVENT_SOURCE)


class Rotation:
    """Runs rotations: RotateSecret's and the scheduler's. One per serving node."""

    def __init__(self, ctx: Context, registry: RotationFunctions, endpoint: str, ca_bundle: str = "",
                 allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (),
                 workers: int = 4) -> None:
        self.allowed_networks = allowed_networks  # for webhooks, besides public addresses
        self.ctx = ctx
        self.registry = registry
        self.endpoint = endpoint  # for commands: AWS_ENDPOINT_URL
        self.ca_bundle = ca_bundle
        # Set by the serving node: `audit_sink(event, intent)` appends a record (from any thread),
        # `write_intent(tx, event)` stores a state-changing call's intent in its transaction.
        self.audit_sink: Callable[[dict[str, Any], bool], None] | None = None
        self.write_intent: Callable[[Tx, dict[str, Any]], None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openkms-rotation")
        self._running: set[str] = set()  # secret ids rotating on this node
        self._lock = threading.Lock()
        self._per_account = max(1, workers // 2)  # the threads one account's rotations may take at once
        self._active: dict[str, int] = {}  # account id -> its rotations given to the pool
        self._waiting: dict[str, deque[Callable[[], None]]] = {}  # account id -> its rotations waiting

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- starting ---------------------------------------------------------------------------------
    def function_for(self, secret: Secret, arn: str) -> RotationFunction | None:
        fn = self.registry.by_arn(arn)
        return fn if fn is not None and fn.account_id == secret.account_id else None

    def start(self, secret: Secret, token: str, fn: RotationFunction) -> bool:
        """Begin a rotation of `secret` as version `token`: the AWSPENDING version without a value,
        then the four steps on a worker thread. False if one is in progress (on any node)."""
        with self._lock:
            if secret.secret_id in self._running:
                return False
            self._running.add(secret.secret_id)
        started = False
        try:
            # AWS's RotationTokenType: 36-256 characters of [a-zA-Z0-9-] (the SDKs check the length).
            rotation_token = random.token_hex(24)
            now = self.ctx.now()
            # A rotation whose node went away (no end after four full steps) may be taken over.
            stale_before = now - timedelta(seconds=len(STEPS) * fn.timeout_s + 60)
            with self.ctx.store.begin() as tx:
                if not tx.secrets.begin_rotation(secret.secret_id, token_digest(rotation_token), now, stale_before):
                    return False
                if tx.secrets.version(secret.secret_id, token) is None:
                    tx.secrets.add_version(SecretVersion(secret.secret_id, token, self.ctx.now(), None, None, None,
                                                         None, None))
                stages = tx.secrets.stages(secret.secret_id)
                if stages.get(PENDING) != token and stages.get(CURRENT) != token:
                    tx.secrets.set_stage(secret.secret_id, PENDING, token)
            self._event("RotationStarted", secret, token, fn)
            self._submit(secret.account_id, functools.partial(self._run, secret, token, fn, rotation_token))
            started = True
        finally:
            if not started:
                with self._lock:
                    self._running.discard(secret.secret_id)
        return True

    def _submit(self, account_id: str, job: Callable[[], None]) -> None:
        """Run `job` on the pool, or, while the account has `_per_account` rotations there, after
        one of them (in the order they were started)."""
        with self._lock:
            active = self._active.get(account_id, 0)
            if active >= self._per_account:
                self._waiting.setdefault(account_id, deque()).append(job)
                return
            self._active[account_id] = active + 1
        self._pool.submit(self._slot, account_id, job)

    def _slot(self, account_id: str, job: Callable[[], None]) -> None:
        try:
            job()
        finally:
            with self._lock:
                waiting = self._waiting.get(account_id)
                following = waiting.popleft() if waiting else None
                if waiting is not None and not waiting:
                    del self._waiting[account_id]
                if following is None:
                    left = self._active[account_id] - 1
                    if left:
                        self._active[account_id] = left
                    else:
                        del self._active[account_id]
            if following is not None:  # the account's next, behind what other accounts gave the pool meanwhile
                with contextlib.suppress(RuntimeError):  # the pool has shut down: the node is closing
                    self._pool.submit(self._slot, account_id, following)

    def run_due(self) -> list[str]:
        """The scheduler's work: start every rotation that is due and that this node claims."""
        now = self.ctx.now()
        with self.ctx.store.begin() as tx:
            due = [s for s in (tx.secrets.get(i) for i in tx.secrets.due_for_rotation(now)) if s is not None]
        started = []
        for secret in due:
            try:
                if self._start_due(secret, now):
                    started.append(secret.secret_id)
            except Exception:  # one secret's trouble must not keep the others from rotating
                log.exception("could not start the scheduled rotation of secret %s", secret.arn)
        return started

    def _start_due(self, secret: Secret, now: datetime) -> bool:
        rules = json.loads(secret.rotation_rules) if secret.rotation_rules else {}
        try:
            following = schedule.next_time(rules, now) if rules else None
        except KMSError:
            following = None
        with self.ctx.store.begin() as tx:
            claimed = tx.secrets.claim_rotation(secret.secret_id, now, following)
        if not claimed:
            return False  # another node has it
        fn = self.function_for(secret, secret.rotation_lambda_arn or "")
        if fn is None:
            self._event("RotationFailed", secret, "", None, "setup", "the rotation function does not exist")
            return False
        with self.ctx.store.begin() as tx:
            stages = tx.secrets.stages(secret.secret_id)
        pending = stages.get(PENDING)
        token = pending if pending is not None and pending != stages.get(CURRENT) else str(uuid.uuid4())
        return self.start(secret, token, fn)

    # -- running ------------------------------------------------------------------------------------
    def _run(self, secret: Secret, token: str, fn: RotationFunction, rotation_token: str) -> None:
        step = "setup"
        digest = token_digest(rotation_token)
        outcome: tuple[str, str | None, str | None] = ("RotationSucceeded", None, None)
        try:
            for step in STEPS:
                payload = {"Step": step, "SecretId": secret.arn, "ClientRequestToken": token,
                           "RotationToken": rotation_token}
                self._invoke(fn, payload)
            step = "finishSecret"
            now = self.ctx.now()
            with self.ctx.store.begin() as tx:
                if tx.secrets.stages(secret.secret_id).get(CURRENT) != token:
                    # The function said it was done, but did not move AWSCURRENT: not a rotation.
                    raise StepFailed("finishSecret did not move AWSCURRENT to the new version")
                fresh = tx.secrets.get(secret.secret_id)
                rules = json.loads(fresh.rotation_rules) if fresh is not None and fresh.rotation_rules else {}
                following = schedule.next_time(rules, now) if rules and fresh is not None and \
                    fresh.rotation_enabled else None
                tx.secrets.update(secret.secret_id, last_rotated=now, next_rotation=following, last_changed=now)
                tx.secrets.end_rotation(secret.secret_id, digest)
            log.info("rotated secret %s (version %s) with %s", secret.arn, token, fn.arn(self.ctx.region))
        except Exception as exc:
            reason = str(exc) if isinstance(exc, StepFailed) else \
                f"{exc.code}: {exc.message}" if isinstance(exc, KMSError) else "an internal error"
            log.warning("rotation of secret %s failed at %s: %s", secret.arn, step, reason,
                        exc_info=not isinstance(exc, StepFailed | KMSError))
            outcome = ("RotationFailed", step, reason)
            try:  # over: a RotateSecret may try it again (AWSPENDING stays where it is)
                with self.ctx.store.begin() as tx:
                    tx.secrets.end_rotation(secret.secret_id, digest)
            except Exception:
                log.exception("could not mark the failed rotation of secret %s as over", secret.arn)
        finally:
            with self._lock:
                self._running.discard(secret.secret_id)
        # Recorded once this node no longer counts the rotation as running: whoever reads the
        # record may start the next one at once.
        self._event(outcome[0], secret, token, fn, outcome[1], outcome[2])

    def _invoke(self, fn: RotationFunction, payload: dict[str, Any]) -> None:
        if fn.kind == "webhook":
            functions.call_webhook(fn, payload, self.ca_bundle, fn.arn(self.ctx.region), self.allowed_networks)
        elif fn.kind == "command":
            functions.run_command(fn, payload, self.endpoint, self.ctx.region)
        else:
            BuiltIn(self.ctx, fn, payload, self).run()

    def _event(self, name: str, secret: Secret, token: str, fn: RotationFunction | None, step: str | None = None,
               reason: str | None = None) -> None:
        sink = self.audit_sink
        if sink is None:
            return
        event = build_event(
            request_id=new_id(), event_id=new_id(), event_time=time.time(), event_name=name, region=self.ctx.region,
            source_ip=EVENT_SOURCE, user_agent=EVENT_SOURCE, principal=service_caller(secret.account_id).principal,
            access_key_id=None, request_parameters=None, response_elements=None,
            error_code="RotationFailed" if reason is not None else None, error_message=reason, resources=[],
            read_only=False, event_source=EVENT_SOURCE)
        event["eventType"] = "AwsServiceEvent"
        event["userIdentity"] = {"type": "AWSService", "invokedBy": EVENT_SOURCE, "accountId": secret.account_id}
        event["serviceEventDetails"] = {k: v for k, v in {
            "SecretId": secret.arn, "ClientRequestToken": token or None, "Step": step,
            "RotationLambdaARN": fn.arn(self.ctx.region) if fn is not None else secret.rotation_lambda_arn}.items()
            if v is not None}
        self.record(event, False)

    def api_event(self, account_id: str, name: str, params: dict[str, Any], read_only: bool) -> dict[str, Any]:
        """The record of a call a built-in function makes, as Secrets Manager itself (AWSService)."""
        event = build_event(
            request_id=new_id(), event_id=new_id(), event_time=time.time(), event_name=name, region=self.ctx.region,
            source_ip=EVENT_SOURCE, user_agent=EVENT_SOURCE, principal=service_caller(account_id).principal,
            access_key_id=None, request_parameters={k: v for k, v in params.items() if k in AUDITED_MEMBERS},
            response_elements=None, error_code=None, error_message=None, resources=[], read_only=read_only,
            event_source=EVENT_SOURCE)
        event["userIdentity"] = {"type": "AWSService", "invokedBy": EVENT_SOURCE, "accountId": account_id}
        return event

    def record(self, event: dict[str, Any], intent: bool) -> None:
        sink = self.audit_sink
        if sink is None:
            return
        try:
            sink(event, intent)
        except Exception:
            log.warning("could not record %s in the audit log", event.get("eventName"))


# -- the built-in functions: AWS's templates --------------------------------------------------------------
class BuiltIn:
    """One step of a built-in function, through this server's own operations (operations.py)."""

    def __init__(self, ctx: Context, fn: RotationFunction, payload: dict[str, Any], rotation: Rotation) -> None:
        self.ctx, self.fn, self.rotation = ctx, fn, rotation
        self.arn, self.token, self.step = payload["SecretId"], payload["ClientRequestToken"], payload["Step"]
        self.rotation_token = payload.get("RotationToken")
        self.caller = service_caller(fn.account_id)

    def _op(self, name: str, **params: Any) -> dict[str, Any]:
        """One call, recorded in the audit log as any API call is (its intent in the transaction of
        what it changes), with the members that name what it acted on, never a value."""
        from .operations import OPERATIONS

        op = OPERATIONS[name]
        rotation = self.rotation
        event = rotation.api_event(self.fn.account_id, name, params, op.read_only)
        intents: list[bool] = []

        def write_intent(tx: Tx) -> None:
            if rotation.write_intent is not None:
                rotation.write_intent(tx, event)
                intents.append(True)

        hook = before_commit.set(write_intent)
        try:
            return op.handler(self.ctx, self.caller.for_operation(name, ()), params)
        except KMSError as exc:
            event["errorCode"], event["errorMessage"] = exc.code, exc.message
            raise
        finally:
            before_commit.reset(hook)
            rotation.record(event, bool(intents))

    def run(self) -> None:
        # The template's checks: rotation enabled, the token a version of the secret labelled AWSPENDING.
        metadata = self._op("DescribeSecret", SecretId=self.arn)
        if not metadata.get("RotationEnabled"):
            raise StepFailed("the secret is not enabled for rotation")
        versions = metadata.get("VersionIdsToStages") or {}
        if self.token not in versions:
            raise StepFailed("the secret has no version for this rotation")
        if CURRENT in versions[self.token]:
            return  # already done
        if PENDING not in versions[self.token]:
            raise StepFailed("the rotation's version is not labelled AWSPENDING")
        getattr(self, "_" + self.step.replace("Secret", "_secret"))()

    # -- values ---------------------------------------------------------------------------------------
    def _value(self, stage: str | None = None, version_id: str | None = None) -> dict[str, Any] | str:
        params: dict[str, Any] = {"SecretId": self.arn}
        if stage:
            params["VersionStage"] = stage
        if version_id:
            params["VersionId"] = version_id
        answer = self._op("GetSecretValue", **params)
        text = answer.get("SecretString")
        if text is None:
            raise StepFailed("the secret's value is binary; a built-in function rotates text values")
        try:
            value = json.loads(text)
        except ValueError:
            return str(text)
        return value if isinstance(value, dict) else str(text)

    def _password(self, exclude: str = "") -> str:
        answer = self._op("GetRandomPassword", PasswordLength=self.fn.password_length,
                          ExcludeCharacters=self.fn.exclude_characters + exclude)
        return str(answer["RandomPassword"])

    def _pending_exists(self) -> bool:
        try:
            self._value(PENDING, self.token)
        except ResourceNotFoundException:
            return False
        return True

    def _put_pending(self, value: dict[str, Any] | str) -> None:
        text = json.dumps(value) if isinstance(value, dict) else value
        params: dict[str, Any] = {"SecretId": self.arn, "ClientRequestToken": self.token, "SecretString": text,
                                  "VersionStages": [PENDING]}
        if self.rotation_token:
            params["RotationToken"] = self.rotation_token
        self._op("PutSecretValue", **params)

    # -- the steps ------------------------------------------------------------------------------------
    def _create_secret(self) -> None:
        current = self._value(CURRENT)
        if self._pending_exists():
            return
        if self.fn.kind == "random-password":
            new: dict[str, Any] | str = dict(current, password=self._password()) if isinstance(current, dict) \
                else self._password()
        else:
            if not isinstance(current, dict):
                raise StepFailed("the secret's value is not a JSON object with the database's connection details")
            _check_pg(current)
            new = dict(current, password=self._password(PG_EXCLUDE))
            if self.fn.kind == "postgresql-alternating-users":
                user = str(current["username"])
                new["username"] = user[:-len("_clone")] if user.endswith("_clone") else user + "_clone"
        self._put_pending(new)

    def _set_secret(self) -> None:
        if self.fn.kind == "random-password":
            return
        pending = self._value(PENDING, self.token)
        if not isinstance(pending, dict):
            raise StepFailed("the pending value is not a JSON object with the database's connection details")
        if _pg_login(self.fn, pending):
            return  # already set (a step run again)
        if self.fn.kind == "postgresql-single-user":
            login = self._first_login([CURRENT, PREVIOUS])
            if str(login["username"]) != str(pending["username"]):
                raise StepFailed("the pending value names another user than the current one")
        else:
            # The master is the function's (an operator named it), never one a secret's value names.
            master_arn = self.fn.master_secret_arn
            if pending.get("masterarn") not in (None, master_arn):
                raise StepFailed("the secret's masterarn is not the function's MasterSecretArn")
            current = self._value(CURRENT)
            user = str(current.get("username", "")) if isinstance(current, dict) else ""
            base = user[:-len("_clone")] if user.endswith("_clone") else user
            if str(pending["username"]) not in (base, base + "_clone"):
                raise StepFailed("the pending value names another user than the current one or its clone")
            master = self._op("GetSecretValue", SecretId=master_arn)
            try:
                login = json.loads(master["SecretString"])
            except (KeyError, TypeError, ValueError):
                raise StepFailed("the master secret's value is not a JSON object") from None
            if not isinstance(login, dict) or not _pg_login(self.fn, login):
                raise StepFailed("could not log in to the database with the master secret")
        _pg_set_password(self.fn, login, pending, alternating=self.fn.kind == "postgresql-alternating-users")

    def _first_login(self, stages: list[str]) -> dict[str, Any]:
        for stage in stages:
            try:
                value = self._value(stage)
            except ResourceNotFoundException:
                continue
            if isinstance(value, dict) and _pg_login(self.fn, value):
                return value
        raise StepFailed("could not log in to the database with the current or the previous value")

    def _test_secret(self) -> None:
        if self.fn.kind == "random-password":
            return
        pending = self._value(PENDING, self.token)
        if not isinstance(pending, dict) or not _pg_login(self.fn, pending):
            raise StepFailed("could not log in to the database with the pending value")

    def _finish_secret(self) -> None:
        metadata = self._op("DescribeSecret", SecretId=self.arn)
        current = next((v for v, stages in (metadata.get("VersionIdsToStages") or {}).items() if CURRENT in stages),
                       None)
        if current == self.token:
            return
        params: dict[str, Any] = {"SecretId": self.arn, "VersionStage": CURRENT, "MoveToVersionId": self.token}
        if current is not None:
            params["RemoveFromVersionId"] = current
        self._op("UpdateSecretVersionStage", **params)


# -- PostgreSQL ---------------------------------------------------------------------------------------------
def _check_pg(value: dict[str, Any]) -> None:
    engine = str(value.get("engine", "postgres")).lower()
    if engine not in ("postgres", "postgresql"):
        raise StepFailed("the secret's engine is not postgres")
    missing = [k for k in ("host", "username", "password") if not value.get(k)]
    if missing:
        raise StepFailed(f"the secret's value lacks {', '.join(missing)}")


def _pg_address(fn: RotationFunction, value: dict[str, Any]) -> tuple[str, int]:
    """The database the value names, if the function may reach it: a host:port among its
    AllowedHosts (an operator's list), never a socket path or a list of hosts."""
    _check_pg(value)
    host = str(value["host"])
    try:
        port = int(value.get("port") or 5432)
    except (TypeError, ValueError):
        raise StepFailed("the secret's port is not a number") from None
    if host.startswith(("/", "@")) or "," in host or not fn.allows_host(host, port):
        raise StepFailed("the secret names a database this function may not reach (not among its AllowedHosts)")
    return host, port


def _pg_connect(fn: RotationFunction, value: dict[str, Any]) -> Any:
    import psycopg

    host, port = _pg_address(fn, value)
    timeout_ms = max(1000, fn.timeout_s * 1000 // 2)
    return psycopg.connect(host=host, port=port, dbname=str(value.get("dbname") or "postgres"),
                           user=str(value["username"]), password=str(value["password"]),
                           connect_timeout=PG_CONNECT_TIMEOUT_S, autocommit=True,
                           options=f"-c statement_timeout={timeout_ms}")


def _pg_login(fn: RotationFunction, value: dict[str, Any]) -> bool:
    """Whether these credentials log in (and can run a query). A database the function may not
    reach is StepFailed, not a failed login."""
    import psycopg

    _pg_address(fn, value)
    try:
        with _pg_connect(fn, value) as conn:
            conn.execute("SELECT 1")
        return True
    except (psycopg.Error, ValueError, KeyError):
        return False


def _pg_set_password(fn: RotationFunction, login: dict[str, Any], pending: dict[str, Any], alternating: bool) -> None:
    """Give the pending user its new password, logged in as `login`; in the alternating strategy,
    make the clone user first if it does not exist, a member of the original user's role (so it
    has the same rights), as AWS's template does."""
    import psycopg
    from psycopg import sql

    user = str(pending["username"])
    try:
        with _pg_connect(fn, login) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)).fetchone() is not None
            if alternating and not exists:
                base = user[:-len("_clone")] if user.endswith("_clone") else user
                conn.execute(sql.SQL("CREATE ROLE {} WITH LOGIN PASSWORD {}").format(
                    sql.Identifier(user), sql.Literal(str(pending["password"]))))
                conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(base), sql.Identifier(user)))
            else:
                conn.execute(sql.SQL("ALTER ROLE {} WITH PASSWORD {}").format(
                    sql.Identifier(user), sql.Literal(str(pending["password"]))))
    except psycopg.Error as exc:
        raise StepFailed(f"the database refused the new password: {type(exc).__name__}") from None


def check_can_start(ctx: Context, secret: Secret) -> str | None:
    """The AWSPENDING version of a rotation that did not finish, if there is one."""
    with ctx.store.begin() as tx:
        stages = tx.secrets.stages(secret.secret_id)
    pending = stages.get(PENDING)
    return pending if pending is not None and pending != stages.get(CURRENT) else None


def previous_rotation_error() -> InvalidRequestException:
    return InvalidRequestException("A previous rotation isn't complete. That rotation will be reattempted.")
