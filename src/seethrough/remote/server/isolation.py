"""Wall a worker process off from the host with the operating system's own means (Linux).

:func:`isolate` runs once in each worker, after its model is loaded and
before the first request; every request process forked from it inherits
the walls.  The steps, each reported as done or not (with the reason):

* **environment**: ``os.environ`` cleared down to a few harmless variables
  (no API keys, tokens or paths of the operator's shell), and the process's
  original environment block, which ``/proc/self/environ`` shows, zeroed;
* **network**: a new network namespace (``unshare(CLONE_NEWNET)``) with no
  interface but a loopback that stays down: every ``connect`` fails;
* **file system**: a new mount namespace, detached from the host's
  (``MS_PRIVATE``), in which every mount is remounted read-only and
  ``nosuid``, and a private, size-capped ``tmpfs`` covers ``/tmp`` (the
  only writable place; ``TMPDIR`` and ``HOME`` point there);
* **user**: as root, the process drops to a uid and gid of its own
  (``1900000000 + pid``: no account needed, unique among running workers)
  with no supplementary groups and no capabilities; without root, a user
  namespace supplies the privileges the steps above need, and every
  capability is dropped afterwards;
* **limits**: ``RLIMIT_NPROC`` (processes and threads of that uid, so a
  body cannot fork-bomb) and ``RLIMIT_NOFILE`` (open files), plus
  ``PR_SET_NO_NEW_PRIVS`` (no set-uid program regains privileges).

Namespaces apply to the calling thread and what it forks; the worker runs
bodies in that thread or in processes forked from it.  ``required`` raises
:class:`IsolationError` at the first step the OS refuses; ``best-effort``
goes on and the :class:`IsolationReport` says what is and is not isolated
(the server prints it in one line at start-up); ``off`` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import resource
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import SeethroughError
from .settings import ISOLATION_LEVELS, SettingsError

__all__ = ["LEVELS", "IsolationError", "IsolationReport", "PRIVATE_TMP", "isolate", "worker_uid"]

LEVELS = ISOLATION_LEVELS  # the choices of --isolation
PRIVATE_TMP = "/tmp"  # covered by a private tmpfs in the worker's mount namespace
UID_BASE = 1_900_000_000  # worker uid = UID_BASE + its pid (pids stay below 2**22)
TMP_SIZE = "64m"
_KEPT_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "TZ")  # harmless and read by libraries (locale, time zone)

# <sched.h>, <sys/mount.h>, <linux/prctl.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38
_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}


class IsolationError(SeethroughError, RuntimeError):
    """The OS refused an isolation step that ``--isolation required`` asks for."""


@dataclass
class IsolationReport:
    """What :func:`isolate` did: each step's name with ``True`` or the reason it was not done."""

    level: str
    steps: dict[str, "bool | str"] = field(default_factory=dict)

    @property
    def missing(self) -> dict[str, str]:
        return {name: str(why) for name, why in self.steps.items() if why is not True}

    def summary(self) -> str:
        """One line: what is isolated and what is not (and why)."""
        if self.level == "off":
            return "worker isolation is off (--isolation off): workers share the host's network, files and environment"
        done = [name for name, why in self.steps.items() if why is True]
        text = f"worker isolation ({self.level}): isolated: {', '.join(done) or 'nothing'}"
        if self.missing:
            text += "; NOT isolated: " + "; ".join(f"{name} ({why})" for name, why in self.missing.items())
        return text


def worker_uid(pid: int | None = None) -> int:
    """The uid (and gid) a worker runs as when it starts as root."""
    return UID_BASE + (os.getpid() if pid is None else pid)


# -- libc -----------------------------------------------------------------------------------------

_libc_handle = None


def _libc() -> ctypes.CDLL:
    global _libc_handle
    if _libc_handle is None:
        _libc_handle = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc_handle.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                                       ctypes.c_void_p]
        _libc_handle.unshare.argtypes = [ctypes.c_int]
    return _libc_handle


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _unshare(flags: int, what: str) -> None:
    _check(_libc().unshare(flags), f"unshare({what})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = (lambda text: None if text is None else text.encode())
    _check(_libc().mount(encode(source), encode(target), encode(fstype), flags,
                         None if data is None else ctypes.c_char_p(data.encode())), f"mount {target}")


# -- the steps ----------------------------------------------------------------------------------------


def isolate(level: str, nproc_extra: int = 32, readable: tuple[str, ...] = ()) -> IsolationReport:
    """Isolate the calling process (see the module docs).

    ``nproc_extra``: threads the requests may add on top of today's (torch's
    pools, a request process); ``readable``: folders the worker must still be
    able to read after dropping root (besides Python's own, which are added)."""
    if level not in LEVELS:
        raise SettingsError(f"unknown isolation level {level!r}; use one of {', '.join(LEVELS)}")
    report = IsolationReport(level)
    if level == "off":
        return report
    if not sys.platform.startswith("linux"):
        for name in ("environment", "network", "file system", "user", "process limit", "open-file limit"):
            report.steps[name] = "needs Linux"
        report.steps["environment"] = _clear_environment()
        if level == "required":
            raise IsolationError(f"--isolation required: {report.summary()}")
        return report
    root = os.geteuid() == 0
    uid = worker_uid()
    needed = _needed_paths(readable)
    steps = [("environment", _clear_environment)]
    if root:
        steps += [("network", lambda: _step(_unshare, CLONE_NEWNET, "CLONE_NEWNET")),
                  ("file system", lambda: _private_file_system(uid, needed))]
    else:  # root inside a user namespace owns the files there as uid 0
        steps += [("network", _user_and_network_namespace), ("file system", lambda: _private_file_system(0, needed))]
    steps += [("open-file limit", _limit_open_files), ("no new privileges", _no_new_privileges)]
    if root:
        steps += [("process limit", lambda: _limit_processes(nproc_extra)), ("user", lambda: _drop_to(uid))]
    else:
        steps += [("user", _drop_capabilities),
                  ("process limit", lambda: "not applied without root: the count would include all of the "
                                            f"operator's processes (uid {os.getuid()})")]
    for name, step in steps:
        try:
            outcome = step()
        except OSError as error:
            outcome = _reason(error)
        report.steps[name] = outcome
        if outcome is not True and level == "required":
            raise IsolationError(
                f"--isolation required, but the OS refused to isolate the worker's {name}: {outcome}. Run the server "
                "as root (or where unprivileged user namespaces are allowed), or start it with --isolation "
                "best-effort to serve without this wall.")
    return report


def _reason(error: OSError) -> str:
    text = error.args[1] if len(error.args) > 1 else str(error)
    if error.errno in (errno.EPERM, errno.EACCES, errno.EINVAL):
        text += " (not permitted here: no root, or namespaces disabled by the OS or a seccomp policy)"
    return str(text)


def _step(function, *args) -> bool:
    function(*args)
    return True


def _clear_environment() -> bool:
    """Keep only a few harmless variables; zero the original block /proc/self/environ shows."""
    kept = {name: os.environ[name] for name in _KEPT_ENV if name in os.environ}
    os.environ.clear()  # unsetenv for each: the C library's environ loses them too
    _zero_initial_environment()
    os.environ.update({"PATH": "/usr/bin:/bin", "HOME": PRIVATE_TMP, "TMPDIR": PRIVATE_TMP,
                       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **kept})
    tempfile.tempdir = PRIVATE_TMP
    return True


def _zero_initial_environment() -> None:
    try:
        with open("/proc/self/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50 and 51)
    except (OSError, ValueError, IndexError):
        return
    if 0 < start < end and end - start < (1 << 24):
        ctypes.memset(start, 0, end - start)


def _user_and_network_namespace() -> bool:
    """Without root: a user namespace (mapping this uid to root inside) gives the
    privileges for the network and mount namespaces."""
    uid, gid = os.getuid(), os.getgid()
    _unshare(CLONE_NEWUSER | CLONE_NEWNET, "CLONE_NEWUSER|CLONE_NEWNET")
    with open("/proc/self/setgroups", "w", encoding="ascii") as handle:
        handle.write("deny")
    with open("/proc/self/uid_map", "w", encoding="ascii") as handle:
        handle.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w", encoding="ascii") as handle:
        handle.write(f"0 {gid} 1")
    return True


def _private_file_system(owner: int, needed: list[str]) -> bool:
    """Own mount namespace; everything read-only; a private tmpfs on /tmp; the
    folders in ``needed`` reachable by ``owner`` (see :func:`_expose`)."""
    _unshare(CLONE_NEWNS, "CLONE_NEWNS")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here reaches the host
    targets = _mount_points()
    failed = []
    # Parents first; a mount hidden under a later one is skipped by the kernel's own error.
    for target, options in targets:
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID
        for option in options:
            flags |= _MOUNT_FLAGS.get(option, 0)
        try:
            _mount(None, target, None, flags)
        except OSError as error:
            if error.errno not in (errno.ENOENT, errno.EINVAL):  # gone or hidden under another mount
                failed.append(f"{target}: {error.args[1] if len(error.args) > 1 else error}")
    _expose(owner, needed)
    # Entries of /tmp that needed paths go through (a virtualenv or a model folder
    # there) stay reachable, read-only, inside the private tmpfs.
    kept = sorted({Path(path).relative_to(PRIVATE_TMP).parts[0] for path in needed
                   if Path(path).is_relative_to(PRIVATE_TMP) and path != PRIVATE_TMP})
    _cover_keeping(PRIVATE_TMP, kept, f"size={TMP_SIZE},mode=0700,uid={owner},gid={owner}")
    if failed:
        raise OSError(errno.EPERM, f"mounts left writable: {', '.join(failed[:3])}")
    return True


def _needed_paths(extra: tuple[str, ...]) -> list[str]:
    """Python's own folders (the standard library, site-packages) and ``extra``: a lazy
    import after the drop to the worker's uid must still find its file."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
             *(entry for entry in sys.path if entry), *extra}
    found = set()
    for path in paths:
        for candidate in (os.path.abspath(path), os.path.realpath(path)):
            if os.path.isdir(candidate):
                found.add(candidate)
    return sorted(found)


def _traversable(path: str, uid: int) -> bool:
    info = os.stat(path)
    return bool(info.st_mode & 0o001) or (info.st_uid == uid and bool(info.st_mode & 0o100))


def _blocked_at(path: str, uid: int) -> tuple[str, str] | None:
    """The first folder on the way to ``path`` that ``uid`` cannot pass, and the next name."""
    current = "/"
    for part in Path(path).parts[1:]:
        if not _traversable(current, uid):
            return current, part
        current = os.path.join(current, part)
    return None


def _expose(uid: int, needed: list[str]) -> None:
    """Make ``needed`` reachable for ``uid`` in this mount namespace without touching the host's
    permissions: a folder that blocks the way (``/root``, mode 0700, when Python lives in
    ``/root/.pyenv``) is covered by a read-only tmpfs that holds only bind mounts of the
    entries on the way; everything else in it (say, ``/root/.ssh``) disappears."""
    for _ in range(8):  # one blocking folder per level at most
        blocked: dict[str, set[str]] = {}
        for path in needed:
            where = _blocked_at(path, uid)
            if where is not None:
                blocked.setdefault(where[0], set()).add(where[1])
        if not blocked:
            return
        for folder, names in sorted(blocked.items()):
            _cover_keeping(folder, sorted(names), "size=1m,mode=0755")
            _mount(None, folder, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    raise OSError(errno.EACCES, f"cannot make {', '.join(needed[:3])} reachable for the worker's uid")


def _cover_keeping(folder: str, names: list[str], options: str) -> None:
    """Cover ``folder`` with a tmpfs (``options``) that holds read-only bind mounts of
    its entries ``names`` and nothing else of what was there."""
    handles = {name: os.open(os.path.join(folder, name), os.O_PATH | os.O_CLOEXEC) for name in names}
    try:
        _mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, options)
        for name, handle in handles.items():
            target = os.path.join(folder, name)
            if os.path.isdir(f"/proc/self/fd/{handle}"):
                os.mkdir(target)
            else:
                open(target, "wb").close()
            _mount(f"/proc/self/fd/{handle}", target, None, MS_BIND | MS_REC)
            _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)
    finally:
        for handle in handles.values():
            os.close(handle)


def _mount_points() -> list[tuple[str, list[str]]]:
    """(mount point, per-mount options) of this namespace, in mount order."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) < 6:
                continue
            target = parts[4].encode().decode("unicode_escape")  # \040 for a space, and so on
            points.append((target, parts[5].split(",")))
    return points


def _limit_open_files() -> bool:
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 64
    limit = max(256, 2 * open_now + 64)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return True


def _limit_processes(extra: int) -> bool:
    """Processes and threads of the worker's own uid: today's threads, twice (the
    request process copies them), plus ``extra``.  Root ignores the limit, hence
    it counts only after the drop to the worker's uid."""
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        threads = 16
    limit = 2 * threads + extra
    resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
    return True


def _no_new_privileges() -> bool:
    _check(_libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    return True


def _drop_to(uid: int) -> bool:
    """Root -> a uid and gid of the worker's own, no groups, no capabilities."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    try:
        os.setuid(0)
    except PermissionError:
        return True
    raise OSError(errno.EPERM, "the process could become root again after dropping its uid")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities() -> bool:
    """Inside a user namespace the process holds every capability there: give them all up."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_libc().capset(ctypes.byref(header), data), "capset")
    return True


def network_is_isolated() -> bool:
    """Whether this process can reach nothing: no interface up but a down loopback."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.5)
            probe.connect(("127.0.0.1", 9))
    except OSError as error:
        return error.errno in (errno.ENETUNREACH, errno.EADDRNOTAVAIL)
    return False
