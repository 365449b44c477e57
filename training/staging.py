"""Writing a folder that a running service may be reading: build it under a hidden name, then rename it into place.

The service polls its model repository (service/registry.py). A model folder written in place could be read
half-written: a card without its graphs, or new graphs under the old card. So `fit`, `export` and
`build-defaults` build the whole folder as `.NAME.staging-XXXXXXXX` beside it (a hidden name is never a model
folder) and move it into place in one step:

- no folder there yet: rename(2), atomic;
- a folder there already: renameat2(2) with RENAME_EXCHANGE swaps the two atomically (Linux 3.15+ with glibc
  2.28+, on ext4, xfs, btrfs, tmpfs, overlayfs): at every instant the name holds the old folder or the new
  one. Where the exchange is not available the old folder is renamed aside first, then the new one into
  place: the name is missing for an instant (which the registry does not take for a removal: it unloads a
  model only when its folder is gone at two polls in a row).

The old folder is removed afterwards. A block that fails removes its staging folder and leaves the target as
it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from model_repository.card import load_model_card, write_card

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 (musl, macOS): the fallback below
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` atomically (both must exist); False where the system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(staging: Path, target: Path, *, atomic_swap: bool = True) -> None:
    """Move the complete folder `staging` to `target`, replacing any folder there; the old one is removed."""
    for _ in range(10):  # another writer may publish the same target at the same time
        if not target.exists():
            try:
                os.rename(staging, target)
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                continue  # someone published it meanwhile: replace theirs
        if atomic_swap and exchange(staging, target):
            shutil.rmtree(staging, ignore_errors=True)  # the old folder, now under the staging name
            return
        aside = _sibling(target, "old")
        try:
            os.rename(target, aside)
        except FileNotFoundError:
            continue
        try:
            os.rename(staging, target)
        except OSError:
            with contextlib.suppress(OSError):
                os.rename(aside, target)  # put the old one back rather than leave nothing
            raise
        shutil.rmtree(aside, ignore_errors=True)
        return
    raise OSError(f"{target}: could not be replaced (other writers kept replacing it)")


@contextlib.contextmanager
def staged(target: str | Path, *, carry: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """A new hidden folder beside `target` to write into; it replaces `target` when the block ends without error.

    `carry(name)` picks files and folders of an existing `target` that the new folder keeps (hard links when
    possible, else copies): e.g. a run's checkpoint and plots when its exported graphs are replaced.
    On an error the staging folder is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "staging")
    os.mkdir(staging)  # mode 0777 & ~umask, as a plain mkdir (a temporary folder's 0700 would hide it from
    # a service running as another user)
    try:
        if carry is not None and target.is_dir():
            for entry in sorted(target.iterdir()):
                if carry(entry.name):
                    _link_copy(entry, staging / entry.name)
        yield staging
        publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _sibling(target: Path, what: str) -> Path:
    return target.with_name(f".{target.name}.{what}-{secrets.token_hex(4)}")


def _link_copy(src: Path, dst: Path) -> None:
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link, symlinks=True)
    else:
        link(src, dst)


def copy_model_dir(src: str | Path, dst: str | Path) -> None:
    """Copy a validated model folder (card + graphs) into the repository as `dst` (staged, then renamed in)."""
    card = load_model_card(src)
    dst = Path(dst)
    with staged(dst) as out:
        for fname in card.raw["files"]:
            shutil.copy2(Path(src) / fname, out / fname)
        fields = {k: v for k, v in card.raw.items() if k not in ("format_version", "input")}  # the writer's own
        write_card(out, fields | {"name": dst.name})
