"""The lock of a run folder (`FolderLock`): one process at a time, on a local disk and on a cluster's file system.

Local file systems: ``flock(2)`` on ``<folder>/.lock``. The operating system drops it when the process ends,
however it ends, so a SIGKILL leaves nothing stale and the re-run simply takes it. An exclusive holder writes
its record (pid, host, start, command) into the file so that a refused process can name it; a release empties
it. The file is never deleted: deleting a lock file that another process may have open is how two processes
come to hold "the" lock at once.

Network and cluster file systems (NFS, CIFS/SMB, Lustre, BeeGFS, GPFS, CephFS, ...; `network_file_system`):
there ``flock`` may be local to each host (NFS mounted ``nolock`` or ``local_lock``, BeeGFS without global
locks), so two hosts would both "hold" the folder, and a lock the server keeps for a crashed node cannot be
broken. An exclusive hold is a lease instead: ``flufl.lock`` (NFS-safe: a claim file hard-linked to
``<folder>/.lease``), whose lifetime (`LEASE_S`) a thread of the holder renews while it lives. A lease whose
holder is gone from this host is taken over at once; one that expired (its holder died on another host, or
hangs) is reported as stale and taken over only with ``--break_stale_lock``; a live one is refused. The
holder's record is still written to ``.lock``. (A shared hold, the proxy study's shards, stays an ``flock``.)

Probing (`FolderLock.holder`: the sweep, the proxy study, a refusal) takes no lock: on Linux it reads
``/proc/locks`` (or the lease's files); only where that is missing does it take a shared lock for an instant,
and a starting run that finds the folder locked by nobody it can name retries for `PROBE_GRACE_S`.
"""

from __future__ import annotations

import _thread
import errno
import fcntl
import functools
import json
import logging
import os
import shlex
import socket
import stat
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

from search_lib.core.errors import FolderInUse, RunFailure, one_line
from search_lib.core.file_systems import network_file_system
from search_lib.core.utils import foreign_file, open_own

LOCK_FILE = ".lock"
LEASE_SUFFIX = ".lease"  # <folder>/.lease next to .lock (<name>.lease for a lock of another name)
LEASE_S = 60  # a lease's lifetime; its holder renews it every quarter of that
PROBE_GRACE_S = 1.0  # how long a starting run retries a lock held by nobody it can name (a probe, or a starter)
_RETRY_S = 0.02

log = logging.getLogger("metantknas")

# ---- who holds a folder ----------------------------------------------------------------------------------

def holder_record() -> dict:
    """What a lock holder writes into the lock file: pid, host, start time, command."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": shlex.join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])}


def describe_holder(record: dict | None) -> str:
    """``pid 123 on host box, started 2026-12-02 00:01:02 UTC, command: prune_metantknas.py ...`` (and, for a
    stale lease, when it expired)."""
    if not record or "pid" not in record:
        return "a process that has not written its name yet"
    host = f" on host {record['host']}" if record.get("host") else ""
    text = (f"pid {record['pid']}{host}, started {record.get('started', '?')}, command: "
            f"{one_line(str(record.get('command', '?')), 160)}")
    if record.get("stale"):
        text += f"; its lease expired at {record['stale']}: stale (that process died or hangs)"
    return text


def in_use_message(what: str, record: dict | None, overwrite: bool = False, fix: str = "choose another "
                   "--save_dir") -> str:
    """The one line of a refusal: the folder, its holder, and what to do."""
    refused = "; --overwrite is refused while it runs (nothing was deleted)" if overwrite else ""
    if record and record.get("stale"):
        return (f"{what} is held by a lease that nobody renews ({describe_holder(record)}){refused}; if that "
                f"process no longer runs, add --break_stale_lock to take the folder over, or {fix}")
    return (f"{what} is in use by another process ({describe_holder(record)}){refused}; wait for it to finish "
            f"(or stop it) and run the command again, or {fix}")


def _read_record(path: Path) -> dict | None:
    """The JSON record in a lock file (never through a link); None when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            record = json.loads(fh.read(65536).decode() or "null")
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _flocked_exclusively(st: os.stat_result, table: str = "/proc/locks") -> bool | None:
    """Whether some process holds an exclusive ``flock`` on the file of status ``st``, read from the kernel's lock
    table without taking a lock; None where the table cannot be read."""
    try:
        lines = Path(table).read_text().splitlines()
    except OSError:
        return None
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        if len(fields) > 1 and fields[1] == "->":  # a process waiting for the lock, not holding it
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "WRITE" and fields[5] == where:
            return True
    return False


_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _flock_holder(path: Path) -> dict | None:
    """The record of an exclusive ``flock`` holder of ``path`` ({} when unnamed); None when there is none."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    held = _flocked_exclusively(st)
    if held is None:  # no lock table (not Linux): a shared lock for an instant (starting runs retry briefly)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            held = False
        except OSError as exc:
            held = exc.errno in _BUSY
        finally:
            os.close(fd)
    return (_read_record(path) or {}) if held else None


# ---- leases (network file systems) -------------------------------------------------------------------------

def flufl_lock():
    """The flufl.lock package (imported only where a folder needs a lease); RunFailure when it is missing."""
    try:
        import flufl.lock
    except ImportError:
        raise RunFailure("this run folder is on a network file system, where it is locked with a lease of the "
                         "flufl.lock package, which is not installed; pip install flufl.lock (see "
                         "requirements.txt)") from None
    return flufl.lock


@functools.cache
def _lease_class():
    """flufl.lock's Lock with a take-over of a stale lease."""
    class Lease(flufl_lock().Lock):
        def take_over(self) -> None:
            """Break the expired or orphaned lease (the library's own breaking: its lock file and the claim file
            it names), then try once to take it."""
            self._break()
            self.lock(timeout=ONE_TRY)

    return Lease


# The separator of the claim files' names (``.lease^<host>^<pid>^<random>``): flufl.lock's ``|`` is not allowed in a
# file name on CIFS/SMB shares.
SEPARATOR = "^"
# A timeout already past: ``Lock.lock`` tries once and raises TimeOutError, and never reaches the library's own
# breaking of an expired lease (which it does only after a failed try that has not timed out).
ONE_TRY = timedelta(seconds=-1)
CLOCK_SLOP = timedelta(seconds=10)  # as flufl.lock: a lease counts as expired this long after its time


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # not a process (kill(0) would ask about this process's group)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def lease_holder(lease, record_path: Path) -> dict | None:
    """The holder of a lease (a flufl.lock Lock): its record, ``gone`` when it held the lease from this host and
    no longer runs, ``stale`` (the expiry time) when its lease expired; None when nobody holds it."""
    try:
        host, pid, _ = lease.details
        expires = lease.expiration
    except (flufl_lock().NotLockedError, OSError):
        return None
    record = _read_record(record_path) or {}
    if record.get("pid") != pid or record.get("host") not in (host, host.split(".")[0]):
        record = {"pid": pid, "host": host}
    if host == lease.hostname and not _pid_alive(pid):
        record["gone"] = True
    if expires + CLOCK_SLOP < datetime.now():
        record["stale"] = expires.strftime("%Y-%m-%d %H:%M:%S")
    return record


class _Renewer(threading.Thread):
    """Renews a held lease every quarter of its lifetime; if another process broke it, stops the run."""

    def __init__(self, lease, folder: Path):
        super().__init__(name="metantknas-lease", daemon=True)
        self.lease, self.folder, self.done = lease, folder, threading.Event()

    def run(self) -> None:
        while not self.done.wait(LEASE_S / 4):
            try:
                self.lease.refresh()
            except flufl_lock().NotLockedError:
                log.error("the lease on %s was taken over by another process (--break_stale_lock?); this run stops "
                          "so that only one process writes the folder", self.folder)
                _thread.interrupt_main()
                return
            except OSError as exc:  # a file server's hiccup: the next renewal tries again
                log.warning("could not renew the lease on %s (%s); retrying", self.folder, exc.strerror)


# ---- the lock ------------------------------------------------------------------------------------------------

class FolderLock:
    """The lock of a folder (see the module's text), taken without waiting and held until `release` or the
    process's end. ``break_stale``: take over a lease that expired (``--break_stale_lock``).

    An exclusive holder writes `holder_record` into ``.lock`` (emptied again on release). A shared hold (the
    shards of a proxy study) writes nothing; it only keeps an exclusive taker (``--overwrite``) out.
    """

    def __init__(self, folder: str | os.PathLike, name: str = LOCK_FILE, break_stale: bool = False):
        self.path = Path(folder) / name
        self.lease_path = Path(folder) / (LEASE_SUFFIX if name == LOCK_FILE else name + LEASE_SUFFIX)
        self.break_stale = break_stale
        self.shared = False
        self._fd: int | None = None
        self._lease = None  # flufl.lock Lock while an exclusive lease is held
        self._renewer: _Renewer | None = None
        self._network: str | None | bool = False  # False: not looked up yet

    @property
    def held(self) -> bool:
        return self._fd is not None

    @property
    def network(self) -> str | None:
        """The network file system type of the folder (None: local), looked up once."""
        if self._network is False:
            self._network = network_file_system(self.path.parent)
        return self._network

    def exists(self) -> bool:
        return os.path.lexists(self.path) or os.path.lexists(self.lease_path)

    def acquire(self, shared: bool = False, wait: bool = False) -> dict | None:
        """Take (or convert) the lock; None when this process holds it now, else the holder's record ({} when it
        wrote none). ``wait``: block until it is free (for short sections only). A file system without locks
        gives a warning and no lock."""
        if self._fd is not None and self.shared == shared:
            return None
        lease = not shared and self.network is not None
        fd = self._fd if self._fd is not None else self._open()
        record = self._take_lease(wait) if lease else self._flock(fd, shared, wait)
        if record is not None:
            if self._fd is None:
                os.close(fd)
            return record
        if lease and self.shared:  # a shared flock becomes the exclusive lease
            fcntl.flock(fd, fcntl.LOCK_UN)
        if not lease and self._lease is not None:  # the exclusive lease becomes a shared flock
            self._drop_lease()
        self._fd, self.shared = fd, shared
        try:
            os.ftruncate(fd, 0)  # a shared hold names nobody; an exclusive one names this process
            if not shared:
                os.pwrite(fd, (json.dumps(holder_record(), sort_keys=True) + "\n").encode(), 0)
        except OSError:  # a lock file this user may only read: held all the same, just unnamed
            pass
        return None

    def _open(self) -> int:
        try:
            return open_own(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EROFS) and os.path.lexists(self.path):
                try:  # flock works on a descriptor open for reading too
                    return open_own(self.path, os.O_RDONLY)
                except OSError:
                    pass
            raise RunFailure(f"cannot create the lock file {self.path}: {exc.strerror}; choose a writable "
                             f"folder") from None

    def _flock(self, fd: int, shared: bool, wait: bool) -> dict | None:
        """``flock`` the descriptor: None when taken, else the holder's record. A holder that names nobody (a
        probe, or a run in the instant before it writes its name) is retried for `PROBE_GRACE_S`."""
        deadline = time.monotonic() + PROBE_GRACE_S
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
                return None
            except OSError as exc:
                if exc.errno in _UNSUPPORTED:
                    log.warning("cannot lock %s (%s): running without a lock; make sure no other process uses this "
                                "folder", self.path, exc.strerror)
                    return None
                if exc.errno not in _BUSY:
                    raise RunFailure(f"cannot lock {self.path}: {exc.strerror}") from None
            record = _read_record(self.path)
            if record or time.monotonic() >= deadline:
                return record or {}
            time.sleep(_RETRY_S)

    def _take_lease(self, wait: bool) -> dict | None:
        """Take the folder's lease (network file systems): None when taken, else the holder's record."""
        TimeOutError = flufl_lock().TimeOutError  # noqa: N806 (the library's name)

        try:
            st = os.lstat(self.lease_path)
            if not stat.S_ISREG(st.st_mode):
                raise foreign_file(self.lease_path, "a symbolic link" if stat.S_ISLNK(st.st_mode) else
                                   "not a regular file")
        except FileNotFoundError:
            pass
        lease = _lease_class()(str(self.lease_path), lifetime=timedelta(seconds=LEASE_S), separator=SEPARATOR)
        deadline = time.monotonic() + PROBE_GRACE_S
        while True:
            try:
                lease.lock(timeout=ONE_TRY)
                break
            except TimeOutError:
                pass
            holder = lease_holder(lease, self.path)
            if holder is None:  # released in between (or not yet named): try again, briefly
                if time.monotonic() >= deadline:
                    return {}
                time.sleep(_RETRY_S)
                continue
            if holder.get("gone") or (holder.get("stale") and self.break_stale):
                log.warning("taking over the lease on %s from %s", self.path.parent, describe_holder(holder))
                try:
                    lease.take_over()
                    break
                except TimeOutError:  # someone else was quicker
                    holder = lease_holder(lease, self.path) or holder
            if not wait or holder.get("stale"):
                return holder
            time.sleep(_RETRY_S * 10)
        self._lease, self._renewer = lease, _Renewer(lease, self.path.parent)
        self._renewer.start()
        return None

    def _drop_lease(self) -> None:
        renewer, lease, self._renewer, self._lease = self._renewer, self._lease, None, None
        renewer.done.set()
        renewer.join(timeout=5)
        try:
            lease.unlock(unconditionally=True)
        except OSError as exc:  # the folder vanished or became read-only: the lease expires by itself
            log.warning("could not release the lease on %s (%s)", self.path.parent, exc.strerror)

    def hold(self, what: str, fix: str = "choose another --save_dir") -> FolderLock:
        """`acquire` exclusively, or FolderInUse (exit 2) naming the holder; ``with lock.hold(...):`` releases."""
        record = self.acquire()
        if record is not None:
            raise FolderInUse(in_use_message(what, record, fix=fix))
        return self

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if not self.shared:
                os.ftruncate(fd, 0)
        except OSError:  # the folder became read-only or vanished: the lock goes with the descriptor anyway
            pass
        finally:
            os.close(fd)  # closing the last descriptor of the file releases the flock
            if self._lease is not None:
                self._drop_lease()

    def holder(self) -> dict | None:
        """The record of another process holding the lock exclusively ({} when unnamed); None when it is free
        or only shared (or there is no lock file). A probe: it takes no lock (see the module's text)."""
        if self.network is not None and os.path.lexists(self.lease_path):
            record = lease_holder(_lease_class()(str(self.lease_path), separator=SEPARATOR), self.path)
            return None if record is None or record.get("gone") else record  # a gone holder's run is over
        return _flock_holder(self.path)
