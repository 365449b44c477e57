"""Folders written where a service may be reading (training/staging.py): a reader racing a writer never sees a
half-written folder, and with the atomic exchange never sees the name missing."""

from __future__ import annotations

import hashlib
import json
import os
import threading

import pytest

from training import staging


def _write_version(folder, version: int) -> None:
    files = {}
    for name in ("a.bin", "b.bin", "c.bin"):
        data = os.urandom(4096) + version.to_bytes(4, "little")
        (folder / name).write_bytes(data)
        files[name] = hashlib.sha256(data).hexdigest()
    (folder / "manifest.json").write_text(json.dumps({"version": version, "files": files}))


class _RemovedError(Exception):
    """The folder read was replaced, then removed, while it was being read."""


def _read_pinned(target) -> int:
    """The version of the folder now at `target`, read through a descriptor of that very folder; fails when the
    folder is incomplete or its files do not match its manifest. FileNotFoundError: nothing at `target`."""
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        def read(name):
            try:
                f = os.open(name, os.O_RDONLY, dir_fd=fd)
            except FileNotFoundError:
                try:
                    replaced = os.stat(target).st_ino != os.stat(fd).st_ino
                except FileNotFoundError:
                    replaced = True
                if replaced:
                    raise _RemovedError() from None
                raise AssertionError(f"{name} is missing") from None
            with os.fdopen(f, "rb") as fh:
                return fh.read()

        manifest = json.loads(read("manifest.json"))
        for name, digest in manifest["files"].items():
            assert hashlib.sha256(read(name)).hexdigest() == digest, f"{name} of version {manifest['version']}"
        return manifest["version"]
    finally:
        os.close(fd)


@pytest.mark.parametrize("atomic_swap", [True, False])
def test_a_reader_racing_a_writer_never_sees_a_half_written_folder(tmp_path, monkeypatch, atomic_swap):
    if atomic_swap and not staging.exchange(tmp_path, tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    if not atomic_swap:
        monkeypatch.setattr(staging, "exchange", lambda a, b: False)  # the rename-aside fallback
    target = tmp_path / "model"
    with staging.staged(target) as out:
        _write_version(out, 0)
    stop, seen, missing, faults = threading.Event(), set(), [0], []

    def reader():
        while not stop.is_set():
            try:
                seen.add(_read_pinned(target))
            except FileNotFoundError:
                missing[0] += 1  # the name was missing (only in the fallback's instant)
            except _RemovedError:
                pass  # an old version, replaced and being removed: read the new one
            except AssertionError as e:
                faults.append(str(e))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for version in range(1, 41):
        with staging.staged(target) as out:
            _write_version(out, version)
    stop.set()
    for t in threads:
        t.join()
    assert not faults, faults[:3]
    assert len(seen) > 1 and _read_pinned(target) == 40
    if atomic_swap:
        assert missing[0] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging or old folder left behind


def test_a_failed_write_leaves_the_folder_as_it_was(tmp_path):
    target = tmp_path / "model"
    with staging.staged(target) as out:
        _write_version(out, 1)
    with pytest.raises(RuntimeError, match="export failed"), staging.staged(target) as out:
        (out / "manifest.json").write_text("half")
        raise RuntimeError("export failed")
    assert _read_pinned(target) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_carried_files_and_the_folder_mode(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "checkpoint.pt").write_bytes(b"weights")
    (target / "card.json").write_text("{}")
    (target / "plots").mkdir()
    (target / "plots" / "elbo.png").write_bytes(b"png")
    umask = os.umask(0o022)
    try:
        with staging.staged(target, carry=lambda name: name != "card.json") as out:
            (out / "card.json").write_text('{"new": true}')
    finally:
        os.umask(umask)
    assert (target / "checkpoint.pt").read_bytes() == b"weights" and (target / "plots" / "elbo.png").is_file()
    assert json.loads((target / "card.json").read_text()) == {"new": True}
    # A plain mkdir's mode, not a temporary folder's 0700 (a service running as another user must read it).
    assert target.stat().st_mode & 0o777 == 0o755
