"""The OS sandbox of an executor child: layers that hold even if a kernel misbehaves on hostile arguments.

The allow-list keeps code out of a job, but ATen kernels trust their callers ("models are programs"): a kernel that
reads past a view or divides INT64_MIN by -1 runs inside this process. So the child that runs jobs confines itself,
in layers, each independent of the others (SECURITY.md):

``netns``
    Its own, empty network namespace (``unshare(CLONE_NEWNET)``; a user namespace too when not root): no interface
    but a down loopback, so no connection can leave it. Applied first, before torch starts threads.
``uid``
    When the node runs as root, the child drops to an unprivileged uid and gid of its own (no supplementary
    groups) after torch is imported: it cannot read the operator's files (the key, the store) nor signal or
    trace the node or the other children.
``no_new_privs``
    ``PR_SET_NO_NEW_PRIVS`` and ``PR_SET_DUMPABLE`` 0: no set-uid gain, no ptrace attach, no core file.
``landlock``
    A Landlock ruleset: read and execute beneath the Python and torch install, the shared libraries and a few
    device files; nothing written or created anywhere. Files already open (its pipes) are unaffected.
``rlimits``
    ``RLIMIT_CORE`` 0 at start; after warm-up a hard ``RLIMIT_AS`` ceiling (CPU only),
    ``RLIMIT_NOFILE`` at what it holds plus a few, and ``RLIMIT_NPROC`` when it runs under its own uid.
    Each job lowers the soft ``RLIMIT_AS`` further **before** its meta dry run (``_child.py``).
``seccomp``
    A syscall allow-list, loaded last: every syscall not listed fails with ``EPERM`` (``socket``, ``connect``,
    ``execve``, ``fork``, ``ptrace``, ``kill`` of another process, ``setuid`` ...); ``clone`` only for threads.

Modes: ``auto`` applies what the kernel offers and reports the rest, ``required`` makes the child refuse to start
(a ``fatal`` message, one line) when any layer is missing, ``off`` applies none (tests of the sandbox itself, or
platforms without these features). :func:`probe` is the test-only entry point (``python -m
p2pcompute.compute._child --sandbox-probe``): it confines itself exactly as a serving child does, then tries what
each layer forbids and reports what happened. Jobs never reach it: the child reads job frames only after ``ready``.

This module imports no torch; it runs in the child only (Linux; elsewhere every layer is reported unavailable).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "LAYERS",
    "SANDBOX_UID_BASE",
    "LockDown",
    "SandboxMode",
    "SandboxSpec",
    "enter_early",
    "lock_down",
    "describe",
    "probe",
    "read_paths",
]

LAYERS = ("netns", "uid", "no_new_privs", "landlock", "rlimits", "seccomp")
"""Every layer, in the order they are reported (``netns`` is applied first and ``seccomp`` last)."""

SANDBOX_UID_BASE = 2_000_000_000
"""Executor children of a root node run as uid/gid ``SANDBOX_UID_BASE + slot``: ids no account on the host uses."""

EXTRA_FILES = 16  # RLIMIT_NOFILE: descriptors above what the child holds after warm-up
EXTRA_THREADS = 16  # RLIMIT_NPROC: threads above what the child runs after warm-up (own uid only)

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_CLONE_THREAD = 0x00010000
_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4
_PR_SET_NAME = 15
_PR_GET_NAME = 16
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_NO_NEW_PRIVS = 39

ACTIVE = "active"


class SandboxMode(StrEnum):
    OFF = "off"
    AUTO = "auto"
    REQUIRED = "required"


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """How one child confines itself (from the executor's arguments)."""

    mode: SandboxMode = SandboxMode.AUTO
    uid: int | None = None  # the uid/gid to drop to when running as root
    device: str = "cpu"
    address_space_bytes: int | None = None  # hard RLIMIT_AS above the warm baseline (CPU children)
    layers: frozenset[str] = frozenset(LAYERS)  # a subset only in the sandbox's own tests

    def wants(self, layer: str) -> bool:
        return self.mode is not SandboxMode.OFF and layer in self.layers


@dataclass(slots=True)
class LockDown:
    """What each layer came to: ``active``, ``off`` or ``unavailable: <why>``."""

    layers: dict[str, str] = field(default_factory=dict)

    def missing(self, spec: SandboxSpec) -> list[str]:
        """Layers the spec wanted that are not active."""
        return [name for name in LAYERS if spec.wants(name) and self.layers.get(name) != ACTIVE]

    def report(self) -> dict[str, str]:
        return {name: self.layers.get(name, "off") for name in LAYERS}


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _call(what: str, fn: Callable[..., int], *args: object) -> None:
    if fn(*args) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _try(lock: LockDown, name: str, spec: SandboxSpec, step: Callable[[], None]) -> None:
    if not spec.wants(name):
        lock.layers[name] = "off"
        return
    try:
        step()
    except (OSError, ImportError, AttributeError, ValueError, RuntimeError) as exc:
        lock.layers[name] = f"unavailable: {_one_line(exc)}"
    else:
        lock.layers.setdefault(name, ACTIVE)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def enter_early(spec: SandboxSpec) -> LockDown:
    """The layers applied before torch is imported (single-threaded): the network namespace, no core dumps."""
    lock = LockDown()
    if not sys.platform.startswith("linux"):
        for name in LAYERS:
            lock.layers[name] = "off" if not spec.wants(name) else "unavailable: not Linux"
        return lock
    _try(lock, "netns", spec, _unshare_network)
    if spec.wants("rlimits"):
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        except (OSError, ValueError) as exc:
            lock.layers["rlimits"] = f"unavailable: {_one_line(exc)}"
    return lock


def _unshare_network() -> None:
    libc = _libc()
    flags = _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWUSER | _CLONE_NEWNET
    _call("unshare", libc.unshare, ctypes.c_int(flags))


def read_paths(device: str) -> list[str]:
    """What a serving child may still read (and execute): the interpreter, its packages, shared libraries."""
    candidates = {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
        "/usr/lib",
        "/usr/lib64",
        "/lib",
        "/lib64",
        "/usr/local/lib",
        "/etc/ld.so.cache",
        "/dev/null",
        "/dev/urandom",
        "/sys/devices/system/cpu",
    }
    candidates.update(p for p in sys.path if p)
    if device == "cuda":
        candidates.update({"/proc/driver/nvidia", "/sys/bus/pci", "/sys/devices", "/usr/share/nvidia"})
    return sorted(p for p in candidates if os.path.exists(p))


def _cuda_device_files() -> list[str]:
    try:
        names = os.listdir("/dev")
    except OSError:
        return []
    return sorted(f"/dev/{n}" for n in names if n.startswith("nvidia"))


def lock_down(spec: SandboxSpec, lock: LockDown) -> LockDown:
    """The layers applied after torch is imported and warm: uid, no_new_privs, Landlock, rlimits, seccomp.

    What the limits are measured from (address space, open descriptors, threads) and the libraries the layers use
    are read first: once the uid changes and Landlock is on, ``/proc/self`` and ``ldconfig`` are out of reach.
    Returns ``lock`` completed.
    """
    if not sys.platform.startswith("linux"):
        return lock
    libraries: dict[str, object] = {}
    for name in ("landlock", "pyseccomp"):
        try:
            libraries[name] = __import__(name)
        except (ImportError, OSError) as exc:  # pyseccomp loads libseccomp.so.2 when imported
            libraries[name] = exc
    baseline = _Baseline(vsz=_virtual_size(), fds=_open_fds(), threads=_threads())
    _try(lock, "uid", spec, lambda: _drop_uid(spec.uid))
    _try(lock, "no_new_privs", spec, _no_new_privs)
    _try(lock, "landlock", spec, lambda: _landlock(_library(libraries, "landlock"), spec.device))
    if "rlimits" not in lock.layers:
        own_uid = lock.layers.get("uid") == ACTIVE
        _try(lock, "rlimits", spec, lambda: _late_rlimits(spec, baseline, own_uid=own_uid))
    _try(lock, "seccomp", spec, lambda: _seccomp(_library(libraries, "pyseccomp"), spec.device))
    return lock


@dataclass(frozen=True, slots=True)
class _Baseline:
    vsz: int
    fds: int
    threads: int


def _library(libraries: Mapping[str, object], name: str) -> Any:
    module = libraries[name]
    if isinstance(module, BaseException):
        raise ImportError(f"{name}: {_one_line(module)}")
    return module


def _drop_uid(uid: int | None) -> None:
    if os.geteuid() != 0:
        raise OSError(errno.EPERM, "the node does not run as root; the child keeps the node's uid")
    if uid is None or not 0 < uid < 2**32 - 1:
        raise ValueError(f"no sandbox uid given ({uid})")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid):
        raise OSError(errno.EPERM, "uid did not change")


def _no_new_privs() -> None:
    libc = _libc()
    _call("prctl(PR_SET_NO_NEW_PRIVS)", libc.prctl, _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _call("prctl(PR_SET_DUMPABLE)", libc.prctl, _PR_SET_DUMPABLE, 0, 0, 0, 0)


def _landlock(landlock: Any, device: str) -> None:
    if landlock.landlock_abi_version() < 1:
        raise OSError(errno.EOPNOTSUPP, "the kernel has no Landlock")
    everything = landlock.FSAccess.all()
    read = landlock.FSAccess.READ_FILE | landlock.FSAccess.READ_DIR | landlock.FSAccess.EXECUTE
    ruleset = landlock.Ruleset(restrict_rules=everything)
    for path in read_paths(device):
        rules = read if os.path.isdir(path) else read & landlock.FSAccess.all_file()
        ruleset.allow(path, rules=rules)
    if device == "cuda":
        device_rules = landlock.FSAccess.READ_FILE | landlock.FSAccess.WRITE_FILE
        if landlock.landlock_abi_version() >= 5:
            device_rules |= landlock.FSAccess.IOCTL_DEV
        for path in _cuda_device_files():
            ruleset.allow(path, rules=device_rules)
    ruleset.apply()


def _late_rlimits(spec: SandboxSpec, baseline: _Baseline, *, own_uid: bool) -> None:
    if spec.address_space_bytes is not None and spec.device != "cuda":
        _lower(resource.RLIMIT_AS, baseline.vsz + spec.address_space_bytes)
    _lower(resource.RLIMIT_NOFILE, baseline.fds + EXTRA_FILES)
    if own_uid:
        _lower(resource.RLIMIT_NPROC, baseline.threads + EXTRA_THREADS)


def _lower(which: int, value: int) -> None:
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def _virtual_size() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


# --- seccomp ---------------------------------------------------------------------------------------------------------

SYSCALLS = (
    # memory
    "brk mmap munmap mremap mprotect madvise mbind get_mempolicy set_mempolicy membarrier "
    # threads and their synchronisation (clone is allowed for threads only, below)
    "futex futex_waitv set_robust_list get_robust_list rseq set_tid_address sched_yield sched_getaffinity "
    "sched_setaffinity sched_getparam sched_getscheduler sched_get_priority_max sched_get_priority_min "
    "exit exit_group restart_syscall "
    # signals (of this process only: tgkill below)
    "rt_sigaction rt_sigprocmask rt_sigreturn sigaltstack "
    # already-open descriptors and Landlock-confined files
    "read write readv writev pread64 pwrite64 preadv pwritev close close_range lseek fstat newfstatat statx "
    "openat open fcntl dup dup2 dup3 ioctl poll ppoll select pselect6 getdents64 readlink readlinkat access "
    "faccessat faccessat2 getcwd "
    # clocks, identity, limits, system facts
    "clock_gettime clock_getres clock_nanosleep nanosleep gettimeofday time getpid gettid getppid getuid geteuid "
    "getgid getegid getresuid getresgid getrandom uname sysinfo times getrusage getrlimit arch_prctl"
)
CUDA_SYSCALLS = "eventfd2 pipe2 epoll_create1 epoll_ctl epoll_wait epoll_pwait"
"""What the CUDA driver's helper threads use besides the above (unverified: no GPU was lent yet)."""


def _seccomp(seccomp: Any, device: str) -> None:
    deny = seccomp.ERRNO(errno.EPERM)
    f = seccomp.SyscallFilter(defaction=deny)
    names = SYSCALLS.split() + (CUDA_SYSCALLS.split() if device == "cuda" else [])
    for name in names:
        with contextlib.suppress(OSError, ValueError):  # not on this architecture (open, arch_prctl on aarch64)
            f.add_rule(seccomp.ALLOW, name)
    pid = os.getpid()
    # threads only: a clone without CLONE_THREAD (fork, a new process) is refused; clone3 looks absent to glibc,
    # which then falls back to clone (its flags are in a struct the filter cannot read)
    f.add_rule(seccomp.ALLOW, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, _CLONE_THREAD, _CLONE_THREAD))
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    f.add_rule(seccomp.ALLOW, "tgkill", seccomp.Arg(0, seccomp.EQ, pid))
    f.add_rule(seccomp.ALLOW, "prlimit64", seccomp.Arg(0, seccomp.EQ, 0))
    f.add_rule(seccomp.ALLOW, "setrlimit")  # lowering or restoring a soft limit under the hard one
    for option in (_PR_SET_NAME, _PR_GET_NAME, _PR_GET_NO_NEW_PRIVS, _PR_GET_DUMPABLE):
        f.add_rule(seccomp.ALLOW, "prctl", seccomp.Arg(0, seccomp.EQ, option))
    f.load()


# --- the test-only probe ---------------------------------------------------------------------------------------------


def _attempt(fn: Callable[[], object]) -> str:
    """``allowed`` when ``fn`` succeeded, else ``refused: <errno name or exception>``."""
    try:
        fn()
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        return f"refused: {name}"
    except Exception as exc:  # e.g. MemoryError past the address-space limit, an import the sandbox stopped
        return f"refused: {type(exc).__name__}"
    return "allowed"


def _connect_out(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect((host, port))


def _write_file(directory: str) -> None:
    path = os.path.join(directory, f"p2pcompute-sandbox-probe-{os.getpid()}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    os.unlink(path)


def _read_file(path: str) -> None:
    with open(path, "rb") as f:
        f.read(1)


def _fork() -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - only if the sandbox failed
        os._exit(0)
    os.waitpid(pid, 0)


def _exec_shell() -> None:
    pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", "exit 0"], {})
    os.waitpid(pid, 0)


def _ptrace_parent() -> None:
    libc = _libc()
    parent = ctypes.c_long(os.getppid())
    # PTRACE_SEIZE does not stop the tracee; detach at once should it succeed (the sandbox failed then)
    _call("ptrace(PTRACE_SEIZE)", libc.ptrace, ctypes.c_long(0x4206), parent, None, None)
    libc.ptrace(ctypes.c_long(17), parent, None, None)


def _kill_parent() -> None:
    os.kill(os.getppid(), 0)


def _become_root() -> None:
    os.setuid(0)
    if os.getuid() != 0:
        raise OSError(errno.EPERM, "setuid(0) had no effect")


def _raise_address_space() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY:
        raise RuntimeError("no hard address-space limit to raise")
    resource.setrlimit(resource.RLIMIT_AS, (hard + (1 << 30), hard + (1 << 30)))


def _open_many(count: int) -> None:
    fds = []
    try:
        for _ in range(count):
            fds.append(os.open(os.devnull, os.O_RDONLY))
    finally:
        for fd in fds:
            os.close(fd)


def _prctl_get(option: int) -> int:
    return int(_libc().prctl(option, 0, 0, 0, 0))


def _allocate(nbytes: int) -> None:
    block = bytearray(nbytes)
    block[-1] = 1


def probe(
    spec: SandboxSpec, lock: LockDown, *, connect_to: tuple[str, int] | None, secret: str | None, writable: str | None
) -> dict[str, object]:
    """Try what the layers forbid; the report maps each attempt to ``allowed`` or ``refused: <why>``."""
    attempts: dict[str, Callable[[], object]] = {
        "socket_inet": lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close(),
        "socket_unix": lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close(),
        "fork": _fork,
        "exec": _exec_shell,
        "ptrace_parent": _ptrace_parent,
        "kill_parent": _kill_parent,
        "setuid_root": _become_root,
        "raise_address_space": _raise_address_space,
        "allocate_past_limit": lambda: _allocate((spec.address_space_bytes or 0) + (2 << 30)),
        "open_files_past_limit": lambda: _open_many(EXTRA_FILES + 16),
    }
    if connect_to is not None:
        attempts["connect_loopback"] = lambda: _connect_out(*connect_to)
    if secret is not None:
        attempts["read_secret"] = lambda: _read_file(secret)
    if writable is not None:
        attempts["write_file"] = lambda: _write_file(writable)
    results: dict[str, object] = {name: _attempt(fn) for name, fn in attempts.items()}
    _soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    results["core_limit"] = hard
    results["uid"] = os.getuid()
    results["no_new_privs"] = _prctl_get(_PR_GET_NO_NEW_PRIVS)
    results["dumpable"] = _prctl_get(_PR_GET_DUMPABLE)
    results["layers"] = lock.report()
    return results


def describe(layers: Mapping[str, str]) -> str:
    """One line for operators: ``active: netns, uid, ...; unavailable: landlock (why)``."""
    active = [n for n in LAYERS if layers.get(n) == ACTIVE]
    off = [n for n in LAYERS if layers.get(n) == "off"]
    missing = [
        f"{n} ({layers[n].removeprefix('unavailable: ')})" for n in LAYERS if layers.get(n, "").startswith("unav")
    ]
    parts = [f"active: {', '.join(active) or 'none'}"]
    if missing:
        parts.append(f"unavailable: {', '.join(missing)}")
    if off:
        parts.append(f"off: {', '.join(off)}")
    return "; ".join(parts)
