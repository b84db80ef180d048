"""Which file system holds a folder: its type from the mount table, and whether it is a network or cluster file
system, where ``flock`` may not reach other hosts (`search_lib.core.folder_lock` takes a lease there)."""

from __future__ import annotations

import os
import re
from pathlib import Path

# File system types (as /proc/mounts names them) whose locks may not be shared between hosts.
NETWORK_FILE_SYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "afs", "9p", "lustre", "beegfs", "gpfs", "ceph", "glusterfs",
    "gfs2", "ocfs2", "panfs", "wekafs", "orangefs", "pvfs2", "fuse.sshfs", "fuse.glusterfs", "fuse.ceph-fuse",
    "fuse.juicefs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "fuse.mfs", "fuse.lizardfs"})


def _unescape(field: str) -> str:
    """A path field of /proc/mounts (spaces, tabs, newlines and backslashes are octal escapes)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def file_system_type(path: str | os.PathLike, mounts: str = "/proc/self/mounts") -> str | None:
    """The type of the file system that holds ``path`` (or its nearest existing parent), from the mount table;
    None where there is none (not Linux)."""
    target = Path(path).absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    real = os.path.realpath(target)
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape(fields[1])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):  # the innermost mount; a later one of the same point covers it
            best, kind = point, fields[2]
    return kind


def network_file_system(path: str | os.PathLike) -> str | None:
    """The file system's type when ``path`` is on a network or cluster file system, else None."""
    kind = file_system_type(path)
    return kind if kind in NETWORK_FILE_SYSTEMS else None
