"""A client-named base model folder, read only from inside the server's data roots.

The server checks a base model's files against its data roots when a job or an Infer request arrives, and
passes the roots to the engine in LORAFORGE_BASE_MODEL_ROOTS. diffusers opens the folder's files by name,
later, so a local user who can write inside a root could swap a file for a link leading out in between.
`pinned_model` closes that gap: it opens every file of the folder once, judges each by the real path of what
it opened (/proc/self/fd), and hands the loaders a private folder of links to those open files
(/proc/<pid>/fd/<n>): what they read is what was judged. Links that stay inside the roots are followed, as a
Hugging Face cache snapshot needs (its files link into the cache's blobs folder). Without the variable (no
data roots, or a model from the server's own models folder) the folder is read as it is.
"""

from __future__ import annotations

import atexit
import os
import shutil
import stat
import tempfile

from .data import DataError, opened_path

ROOTS_ENV = "LORAFORGE_BASE_MODEL_ROOTS"
MAX_ENTRIES = 10_000  # a diffusers folder has a few dozen; a walk past this is not a model folder


def roots_from_env() -> list[str]:
    """The data roots a base model must lie in (their real paths); empty: none set."""
    return [os.path.realpath(r) for r in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if r]


def inside(real: str, roots: list[str]) -> bool:
    """Whether real path `real` is one of `roots` or lies below one."""
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)


class PinnedModel:
    """A model folder's files, each opened and found inside the roots; `path` is the folder of links to them
    (named like the original). Held open until close(), or until the process exits."""

    def __init__(self, folder: str, roots: list[str]):
        self.folder = folder
        self.fds: list[int] = []
        self._tmp = tempfile.mkdtemp(prefix="loraforge-model-")
        self.path = os.path.join(self._tmp, os.path.basename(os.path.normpath(folder)) or "model")
        self._entries = 0
        try:
            top = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            self.close()
            raise DataError(f"base_model {folder!r} cannot be opened ({e.strerror})") from None
        try:
            self._walk(top, self.path, "", roots, set())
        except BaseException:
            self.close()
            raise
        finally:
            os.close(top)
        atexit.register(self.close)

    def _walk(self, dir_fd: int, dst: str, rel: str, roots: list[str], seen: set[tuple[int, int]]) -> None:
        st = os.fstat(dir_fd)
        if (st.st_dev, st.st_ino) in seen:  # a link back up the tree: its files are already in the view
            return
        seen.add((st.st_dev, st.st_ino))
        self._check(dir_fd, rel or ".", roots)
        os.mkdir(dst)
        for name in sorted(os.listdir(dir_fd)):
            if name.startswith("."):  # as the model hash: hidden entries are not part of the model
                continue
            self._entries += 1
            if self._entries > MAX_ENTRIES:
                raise DataError(f"base_model {self.folder!r} holds more than {MAX_ENTRIES} files and folders; "
                                "it is not a diffusers model folder")
            # Non-blocking, so that a FIFO planted in the folder cannot hang the open; follows links.
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError:
                continue  # a dangling link or an unreadable file: absent for the loaders too
            child_rel = f"{rel}{name}"
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                try:
                    self._walk(fd, os.path.join(dst, name), child_rel + "/", roots, seen)
                finally:
                    os.close(fd)
            elif stat.S_ISREG(mode):
                try:
                    self._check(fd, child_rel, roots)
                except BaseException:
                    os.close(fd)
                    raise
                self.fds.append(fd)
                os.symlink(f"/proc/{os.getpid()}/fd/{fd}", os.path.join(dst, name))
            else:
                os.close(fd)  # sockets, devices, FIFOs: no model reads them

    def _check(self, fd: int, rel: str, roots: list[str]) -> None:
        if not inside(opened_path(fd), roots):
            # Relative to the model folder: the message names no host path beyond what the client sent.
            raise DataError(f"base_model {self.folder!r}: {rel} leads outside the server's data roots through a "
                            "symbolic link")

    def close(self) -> None:
        """Close the files and remove the folder of links."""
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        shutil.rmtree(self._tmp, ignore_errors=True)


def pinned_model(folder: str) -> tuple[str, PinnedModel | None]:
    """The folder the loaders should read for base model `folder`: a pinned view when the worker set data roots
    (LORAFORGE_BASE_MODEL_ROOTS), else `folder` itself. Raises DataError when a file leads outside them."""
    roots = roots_from_env()
    if not roots:
        return folder, None
    pinned = PinnedModel(folder, roots)
    return pinned.path, pinned
