"""The PKCS#11 store's process rules and refusals, with a real SoftHSM2 module where one is needed:
a forked child opens its modules afresh (PKCS#11 forbids it the parent's sessions), a token that
replaces the GCM IV it is given is refused, and a store never hands out a ciphertext it cannot open.

The fork scenarios run in a subprocess of their own, so that finalising the module there leaves
this test process's module untouched."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from openkms.errors import KeyStoreUnavailable
from openkms.keystore import pkcs11 as p11store
from openkms.keystore.pkcs11 import ConnectError, Pkcs11KeyStore, _check_gcm
from openkms.model import Key, KeyState, KeyUsage, Origin
from openkms.storage import Store

PIN = "process-pin"

FORK_SCRIPT = """
import os, sys
from openkms.keystore.pkcs11 import Module, TokenSession
from openkms.model import SecretStr

module_path, label, pin, finalize = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "finalize"
session = TokenSession(module_path, label, SecretStr(pin))
assert len(bytes(session.run(lambda s: s.generate_random(128)))) == 16   # the parent is logged in
parent_module = Module.load(module_path)
generation = parent_module.generation
if finalize:
    Module.finalize_all()          # what `openkms serve` does before its worker is forked
    assert Module._loaded == {}
pid = os.fork()
if pid == 0:
    try:
        child = TokenSession(module_path, label, SecretStr(pin))
        module = child.module
        if not finalize and not (module is parent_module and module.generation > generation
                                 and not module.sessions):
            os._exit(3)            # the child kept its parent's sessions
        ok = len(bytes(child.run(lambda s: s.generate_random(128)))) == 16
        os._exit(0 if ok else 1)
    except BaseException:
        os._exit(2)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize("mode", ["finalize", "inherit"])
def test_a_forked_child_opens_its_modules_afresh(mode: str, softhsm: Any) -> None:
    """`finalize`: the parent finalises before forking (the server's way); `inherit`: a child that
    still finds an initialised module re-initialises it and drops the inherited sessions."""
    label = softhsm.init_token(pin=PIN)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(FORK_SCRIPT), softhsm.module, label, PIN, mode],
                          env={**os.environ, **softhsm.env()}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"child exit {done.returncode}: {done.stderr[-2000:]}"


# -- tokens that replace the IV: fakes of a session and a key object (no SoftHSM does this) -------

class _IvReplacingKey:
    """Encrypts like an HSM in FIPS mode: with an IV of its own, appended to its output."""

    def encrypt(self, data: bytes, mechanism: Any = None, mechanism_param: Any = None) -> bytes:
        return os.urandom(12) + os.urandom(len(data) + 16)

    def decrypt(self, data: bytes, mechanism: Any = None, mechanism_param: Any = None) -> bytes:
        raise AssertionError("not reached: the length is checked first")


class _Session:
    def __init__(self, key: Any) -> None:
        self.key = key

    def generate_key(self, *args: Any, **kwargs: Any) -> Any:
        return self.key

    def get_key(self, *args: Any, **kwargs: Any) -> Any:
        return self.key


class _TokenSession:
    def __init__(self, session: Any) -> None:
        self.session = session

    def run(self, call: Any) -> Any:
        return call(self.session)

    def reset(self) -> None:
        pass


def test_connect_refuses_a_token_that_replaces_the_iv() -> None:
    with pytest.raises(ConnectError) as e:
        _check_gcm(_Session(_IvReplacingKey()))
    assert e.value.code == "INTERNAL_ERROR" and "IV" in e.value.message


def test_connect_refuses_a_token_without_aes_gcm() -> None:
    import pkcs11

    class NoGcm(_IvReplacingKey):
        def encrypt(self, data: bytes, mechanism: Any = None, mechanism_param: Any = None) -> bytes:
            raise pkcs11.exceptions.MechanismInvalid()

    with pytest.raises(ConnectError) as e:
        _check_gcm(_Session(NoGcm()))
    assert e.value.code == "INTERNAL_ERROR" and "AES-GCM" in e.value.message


def test_encrypt_never_returns_what_it_cannot_open(tmp_path: Path) -> None:
    key = Key(key_id=str(uuid.uuid4()), account_id="111122223333", region="us-east-1", description="",
              key_spec="SYMMETRIC_DEFAULT", key_usage=KeyUsage.ENCRYPT_DECRYPT, origin=Origin.AWS_CLOUDHSM,
              state=KeyState.ENABLED, created=datetime.now(UTC), custom_key_store_id="cks-0")
    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        hsm = Pkcs11KeyStore(store, _TokenSession(_Session(_IvReplacingKey())), "cks-0")  # type: ignore[arg-type]
        with pytest.raises(KeyStoreUnavailable, match="IV"):
            hsm.encrypt(key, b"secret", None)
    finally:
        store.close()


def test_a_hung_module_makes_its_callers_fail_not_wait_forever(monkeypatch: pytest.MonkeyPatch,
                                                                softhsm: Any) -> None:
    import threading

    module = p11store.Module.load(softhsm.module)
    monkeypatch.setattr(p11store, "LOCK_TIMEOUT", 0.2)
    held, release = threading.Event(), threading.Event()

    def hog() -> None:
        with module.lock:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hog)
    thread.start()
    try:
        assert held.wait(5)
        with pytest.raises(KeyStoreUnavailable, match="not answering"), module.locked():
            pass
    finally:
        release.set()
        thread.join()


def test_the_requests_of_a_token_run_on_its_own_lane(softhsm: Any) -> None:
    """Before its module is loaded a store has no lane (its first call runs on the shared pool and
    loads it); then every store on one token shares the token's lane, and the store's calls work
    from its thread."""
    import asyncio

    from openkms.model import SecretStr

    label = softhsm.init_token(pin=PIN)
    first = p11store.TokenSession(softhsm.module, label, SecretStr(PIN))
    second = p11store.TokenSession(softhsm.module, label, SecretStr(PIN))
    assert first.lane is None
    first.run(lambda session: session.generate_random(64))
    lane = first.lane
    assert lane is not None
    second.module  # noqa: B018 -- loads (finds) the module
    assert second.lane is lane
    assert len(asyncio.run(lane.call(lambda: bytes(first.run(lambda s: s.generate_random(128)))))) == 16
    other = softhsm.init_token(pin=PIN)
    assert p11store.TokenSession(softhsm.module, other, SecretStr(PIN)).module.lane(other) is not lane
