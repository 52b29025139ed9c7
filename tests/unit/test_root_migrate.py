"""`openkms root migrate` where its steps fail (openkms.roots.migrate, the command around it), and
the atomic file writes a new root key file relies on (openkms.files).

In-process over a SQLite store in tmp_path; a step is made to fail by replacing it (the real token
cases are in tests/test_root_hsm.py). What must hold: nothing is recorded that the new source
cannot give back, no old key file is deleted before the store opens with the new source, and every
failure is one line that says whether the migration is committed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from openkms import files, roots
from openkms.cli.main import main
from openkms.config import Settings
from openkms.crypto import root as rootkey
from openkms.errors import ConfigurationError, DependencyTimeoutException
from openkms.model import SecretStr
from openkms.storage import Store

PASSPHRASE = "a long passphrase"


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data: Path) -> Iterator[Store]:
    """A store whose root key is the file <data>/root.key."""
    data.mkdir()
    store = Store.open(Settings(data_dir=data).database_url)
    roots.open_root(Settings(data_dir=data), store)
    yield store
    store.close()


def recorded(store: Store) -> dict[str, bytes | None]:
    with store.begin() as tx:
        return {name: tx.meta.get(name) for name in (roots.META_ROOT_SOURCE, roots.META_ROOT_CHECK,
                                                     roots.META_ROOT_SALT, roots.META_ROOT_WRAPPED)}


def to_passphrase(data: Path, store: Store) -> str:
    return roots.migrate(Settings(data_dir=data), store, "passphrase",
                         Settings(data_dir=data, root_passphrase=PASSPHRASE))


# -- the new source must give the root key back before anything is recorded -----------------------
def test_a_passphrase_that_does_not_unseal_what_it_sealed_changes_nothing(
        data: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # A key derivation that does not give the same key twice stands in for any such fault.
    monkeypatch.setattr(roots.rootkey, "from_passphrase",
                        lambda passphrase, salt: rootkey.RootKey(os.urandom(32), "passphrase"))
    before = recorded(store)
    with pytest.raises(ConfigurationError, match=r"new passphrase does not give the root key back.*nothing was"):
        to_passphrase(data, store)
    assert recorded(store) == before and (data / "root.key").exists()


def test_a_token_that_picks_its_own_gcm_iv_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # A token in FIPS mode ignores the IV given and appends its own 12 bytes to the output.
    monkeypatch.setattr(roots.Pkcs11Root, "_run", lambda self, call, create: bytes(32 + 16 + 12))
    hsm = roots.Pkcs11Root("/no/module.so", "root", "openkms-root", SecretStr("pin"))
    with pytest.raises(ConfigurationError, match=r"returned 60 bytes.*not 48.*its own GCM IV"):
        hsm.wrap(bytes(32))


# -- after the commit: the store must open again before root.key goes; failures say so ------------
def test_root_key_is_kept_when_the_store_does_not_open_with_the_new_source(
        data: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Settings] = []
    real_open = roots.open_root

    def open_root(settings: Settings, store: Store) -> rootkey.RootKey:
        opened.append(settings)
        if len(opened) > 1:
            raise ConfigurationError("the token went away")
        return real_open(settings, store)

    monkeypatch.setattr(roots, "open_root", open_root)
    with pytest.raises(ConfigurationError) as caught:
        to_passphrase(data, store)
    message = str(caught.value)
    assert message.startswith("the migration is committed") and "the token went away" in message
    assert "root.key is kept: delete it by hand" in message and "\n" not in message
    assert (data / "root.key").exists()
    # It was opened again with the new source alone, as `openkms serve` will be.
    assert opened[1].root_passphrase == PASSPHRASE and not opened[1].root_pkcs11_module


def test_after_a_migration_the_store_opens_with_the_new_source(data: Path, store: Store) -> None:
    old = roots.open_root(Settings(data_dir=data), store)
    done = to_passphrase(data, store)
    assert done.endswith("root.key is deleted") and not (data / "root.key").exists()
    new = roots.open_root(Settings(data_dir=data, root_passphrase=PASSPHRASE), store)
    assert new.reveal_for_migration() == old.reveal_for_migration()


def cli_migrate(data: Path, monkeypatch: pytest.MonkeyPatch, *args: str, **env: str) -> int:
    for name in list(os.environ):
        if name.startswith("OPENKMS_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return main(["root", "migrate", "--data-dir", str(data), *args])


def test_a_key_file_that_cannot_be_deleted_is_one_line_saying_what_is_left(
        data: Path, store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def cannot(path: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(roots, "_shred", cannot)
    code = cli_migrate(data, monkeypatch, "--to", "passphrase", OPENKMS_NEW_ROOT_PASSPHRASE=PASSPHRASE)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and PASSPHRASE not in err, err
    assert "the migration is committed" in err and "could not be deleted (Permission denied" in err, err
    assert "delete it by hand" in err
    assert roots.open_root(Settings(data_dir=data, root_passphrase=PASSPHRASE), store).source == "passphrase"


@pytest.mark.parametrize("failure", [DependencyTimeoutException("The key store is not available right now."),
                                     OSError(errno.EIO, "Input/output error", "openkms.db")])
def test_store_and_file_errors_are_one_line(data: Path, store: Store, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str], failure: Exception) -> None:
    def fails(*args: Any) -> str:
        raise failure

    monkeypatch.setattr(roots, "migrate", fails)
    code = cli_migrate(data, monkeypatch, "--to", "passphrase", OPENKMS_NEW_ROOT_PASSPHRASE=PASSPHRASE)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "committed" not in err, err
    assert ("DependencyTimeoutException" in err) if isinstance(failure, DependencyTimeoutException) \
        else "Input/output error: openkms.db" in err


def test_an_error_after_the_commit_says_the_migration_is_committed(
        data: Path, store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def close_fails(self: Store) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Store, "close", close_fails)
    code = cli_migrate(data, monkeypatch, "--to", "passphrase", OPENKMS_NEW_ROOT_PASSPHRASE=PASSPHRASE)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "the migration is committed (the root key is now wrapped under the new passphrase" in err
    assert "but then: Input/output error" in err


# -- files.replace_file: the rename itself reaches the disk ------------------------------------------
def test_replace_file_syncs_the_directory_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        synced.append("dir" if stat.S_ISDIR(mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "root.key"
    files.replace_file(target, b"k" * 32)
    assert synced == ["file", "dir"] and target.read_bytes() == b"k" * 32
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and not (tmp_path / "root.tmp").exists()
    synced.clear()
    files.replace_file(target, b"x", fsync=False)
    assert synced == []


@pytest.mark.parametrize("where", ["open", "fsync"])
def test_replace_file_where_directories_cannot_be_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        where: str) -> None:
    real_open, real_fsync = os.open, os.fsync

    def open_(path: Any, flags: int, *args: Any) -> int:
        if where == "open" and Path(path).is_dir():
            raise PermissionError(errno.EACCES, "Permission denied", str(path))  # as on Windows
        return real_open(path, flags, *args)

    def fsync(fd: int) -> None:
        if where == "fsync" and stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")  # file systems that cannot sync a directory
        real_fsync(fd)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    files.replace_file(tmp_path / "f", b"data")
    assert (tmp_path / "f").read_bytes() == b"data"


def test_replace_file_leaves_no_temporary_copy_when_the_rename_fails(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def replace(src: Any, dst: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        files.replace_file(tmp_path / "root.key", b"k" * 32)
    assert list(tmp_path.iterdir()) == []
