"""The ``process`` sandbox: bubblewrap namespaces, rlimits, a pids/memory cgroup, an unprivileged uid.

One call runs as this chain of ``exec``\\ s (no shell stays behind, no Python runs in the child)::

    sh -c 'join cgroups'  →  prlimit (rlimits)  →  bwrap (namespaces, mounts)  →  setpriv (uid)  →  program

* **Namespaces** (bwrap): new pid, ipc, uts, cgroup and — unless the profile allows network —
  net namespaces; a mount namespace whose root holds only read-only binds of what an
  interpreter needs (``/usr``, the ``/bin``-style links, ``/etc/ld.so.cache``,
  ``/etc/alternatives``, the base Python's prefix), a fresh ``/proc``, a minimal ``/dev``
  and, per the profile's filesystem grant, a private size-capped tmpfs at ``/tmp``.
  ``--die-with-parent`` and the pid namespace take every descendant down with the call;
  ``--new-session`` stops terminal injection.
* **No user namespace, a real unprivileged uid instead.** ``--unshare-all`` would imply
  ``--unshare-user-try``, which for a root caller creates a user namespace mapping only
  uid 0, so the program could not be dropped to another uid and would stay host uid 0
  (for which ``RLIMIT_NPROC`` is not enforced and root-owned files are "its own"). So the
  namespaces are listed one by one, bwrap keeps just ``CAP_SETUID``/``CAP_SETGID``/
  ``CAP_SETPCAP`` and ``setpriv`` switches to a per-call host uid from a pool (clearing the
  bounding set; bwrap already set no-new-privileges). The program ends with no
  capabilities, as a uid that owns nothing on the host and that no concurrent call shares.
* **Limits**: ``RLIMIT_AS`` (memory_mb), ``RLIMIT_CPU`` (soft cpu_seconds → SIGXCPU, hard
  one second later → SIGKILL), ``RLIMIT_FSIZE`` (max_file_mb), ``RLIMIT_NOFILE``,
  ``RLIMIT_CORE`` 0, set by ``prlimit`` rather than ``preexec_fn``: a ``preexec_fn`` runs
  Python between fork and exec of a threaded worker (documented as unsafe with threads)
  and disables the vfork fast path; an extra exec of a small binary costs ~1 ms.
  The process count and total memory: a per-call **cgroup** (v1 ``pids``/``memory``
  hierarchies or v2 with those controllers) with ``pids.max`` and a memory limit, joined
  by the ``sh`` at the head of the chain before anything else runs. When no cgroup is
  writable, ``RLIMIT_NPROC`` on the per-call uid instead (the uid is not root, so the
  kernel enforces it, and it is not shared, so it counts this call only).
  :meth:`ProcessSandbox.describe` says which mechanism is in use.
* **Environment**: exactly :attr:`SandboxRequest.env` (bwrap adds ``PWD``). **Secrets** in it
  reach the program only through bwrap's ``--args`` file descriptor (a memfd): never on a
  command line (``/proc/*/cmdline`` is world-readable), never on disk. Request files go the
  same way (``--file``/``--ro-bind-data`` from memfds), so nothing of a call touches the
  host's disks.

Network: an ``allowlist`` profile shares the host's network namespace — this backend
**cannot filter by host**, so an allowlist means "network allowed". Filtering by host is
the job of an egress proxy (not built yet); the docker backend has the same limitation.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentflow_core.exec_profile import ExecProfile
from agentflow_worker.sandbox.base import SandboxRequest, SandboxResult, SandboxUnavailable

log = logging.getLogger("agentflow.sandbox")

MIB = 1024 * 1024
#: the working directory inside the sandbox (request files are written here)
WORKDIR = "/tmp/work"
#: the program's own processes beyond which bwrap's two (launcher and pid-1 reaper) count
_BWRAP_PROCS = 2
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_READ_CHUNK = 65536
#: how long a killed call may take to finish draining before we stop waiting for it
_KILL_GRACE_S = 5.0

#: /etc entries an interpreter may need; more when the network is allowed (name resolution, TLS)
_ETC_BASE = ("/etc/ld.so.cache", "/etc/alternatives", "/etc/localtime")
_ETC_NET = ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/ssl", "/etc/ca-certificates",
            "/etc/host.conf", "/etc/services", "/etc/protocols")  # fmt: skip


def base_python() -> tuple[str, str]:
    """The base interpreter (not a venv's) and its prefix, both with symlinks resolved.

    A venv's ``bin/python`` is a symlink to the base interpreter; running that one inside
    the sandbox means binding only the base prefix — never the venv, its site-packages or
    the project tree it lives in."""
    prefix = os.path.realpath(sys.base_prefix)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for name in (f"python{version}", "python3", "python"):
        candidate = Path(sys.base_prefix) / "bin" / name
        if candidate.exists():
            return os.path.realpath(candidate), prefix
    raise SandboxUnavailable(f"no Python interpreter found under {sys.base_prefix}/bin")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# --- cgroups ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Hierarchy:
    version: int  # 1 or 2
    #: the directory under which per-call groups are created (the worker's own group)
    parent: Path


class _Cgroups:
    """Per-call cgroups under the worker's own group, in the v1 ``pids``/``memory``
    hierarchies or the v2 unified one. Children of the worker's own group, so whatever
    limits the worker runs under still cover its sandboxes."""

    PREFIX = "agentflow-sbx-"

    def __init__(self, root: Path = Path("/sys/fs/cgroup")) -> None:
        self.pids: _Hierarchy | None = None
        self.memory: _Hierarchy | None = None
        self.problem: str | None = None
        try:
            self._discover()
        except OSError as exc:
            self.problem = f"cgroups unusable: {exc}"
            self.pids = self.memory = None

    @property
    def mechanism(self) -> str | None:
        if self.pids is None:
            return None
        return f"cgroup-v{self.pids.version}"

    def _discover(self) -> None:
        own: dict[str, str] = {}  # controller -> path of this process's group
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                own[c] = path
        v1: dict[str, Path] = {}
        v2: Path | None = None
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(rfields) < 3:
                continue
            mount_root, mount_point, fstype, options = fields[3], fields[4], rfields[0], rfields[2].split(",")
            if fstype == "cgroup":
                for c in ("pids", "memory"):
                    if c in options and c in own:
                        v1[c] = self._under(mount_point, mount_root, own[c])
            elif fstype == "cgroup2" and "" in own:
                v2 = self._under(mount_point, mount_root, own[""])
        for c in ("pids", "memory"):
            if c in v1:
                setattr(self, c, _Hierarchy(1, v1[c]))
        if v2 is not None and (self.pids is None or self.memory is None):
            enabled = self._v2_enable(v2)
            for c in ("pids", "memory"):
                if getattr(self, c) is None and c in enabled:
                    setattr(self, c, _Hierarchy(2, v2))
        if self.pids is None:
            self.problem = "no writable cgroup with the pids controller"
            self.memory = None  # one mechanism or the other: a memory-only group is not worth its cost
            return
        self._probe()
        self._sweep()

    @staticmethod
    def _under(mount_point: str, mount_root: str, own: str) -> Path:
        rel = own[len(mount_root) :] if own.startswith(mount_root) and mount_root != "/" else own
        return Path(mount_point) / rel.lstrip("/")

    @staticmethod
    def _v2_enable(group: Path) -> set[str]:
        """Controllers usable by children of ``group``: those already in its
        ``subtree_control``, or enabled now (works for the root group, and for a group
        without processes of its own — v2's no-internal-processes rule)."""
        try:
            available = set((group / "cgroup.controllers").read_text().split())
            enabled = set((group / "cgroup.subtree_control").read_text().split())
            for c in ("pids", "memory"):
                if c in available and c not in enabled:
                    with contextlib.suppress(OSError):
                        (group / "cgroup.subtree_control").write_text(f"+{c}")
                        enabled.add(c)
            return enabled
        except OSError:
            return set()

    def _probe(self) -> None:
        """Create, limit and remove a group: proves we may, before any call relies on it."""
        assert self.pids is not None
        probe = self.create(f"probe-{os.getpid()}", max_pids=1, memory_bytes=64 * MIB)
        self.remove(probe)

    def _sweep(self) -> None:
        """Remove the empty groups of workers that died mid-call (their pid is gone)."""
        for h in {self.pids, self.memory}:
            if h is None:
                continue
            for entry in h.parent.glob(self.PREFIX + "*"):
                owner = entry.name[len(self.PREFIX) :].split("-", 1)[0]
                if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                    with contextlib.suppress(OSError):
                        entry.rmdir()

    def create(self, name: str, *, max_pids: int, memory_bytes: int) -> list[tuple[str, Path]]:
        """Make the groups of one call; returns (controller, path) pairs."""
        made: list[tuple[str, Path]] = []
        try:
            for controller, h in (("pids", self.pids), ("memory", self.memory)):
                if h is None:
                    continue
                if made and made[0][1].parent == h.parent:  # one v2 group serves both controllers
                    made.append((controller, made[0][1]))
                    group = made[0][1]
                else:
                    group = h.parent / (self.PREFIX + name)
                    group.mkdir()
                    made.append((controller, group))
                if controller == "pids":
                    (group / "pids.max").write_text(str(max_pids))
                elif h.version == 1:
                    (group / "memory.limit_in_bytes").write_text(str(memory_bytes))
                    # swap would let a program exceed the limit silently
                    with contextlib.suppress(OSError):
                        (group / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
                else:
                    (group / "memory.max").write_text(str(memory_bytes))
                    with contextlib.suppress(OSError):
                        (group / "memory.swap.max").write_text("0")
        except OSError:
            self.remove(made)
            raise
        return made

    @staticmethod
    def procs_files(groups: list[tuple[str, Path]]) -> list[str]:
        return sorted({str(path / "cgroup.procs") for _, path in groups})

    @staticmethod
    def _counter(path: Path, key: str) -> int:
        with contextlib.suppress(OSError, ValueError):
            for line in path.read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
        return 0

    def pids_hit(self, groups: list[tuple[str, Path]]) -> bool:
        return any(self._counter(p / "pids.events", "max") > 0 for c, p in groups if c == "pids")

    def oom_killed(self, groups: list[tuple[str, Path]]) -> bool:
        for controller, path in groups:
            if controller != "memory":
                continue
            if (path / "memory.oom_control").exists():  # v1
                if self._counter(path / "memory.oom_control", "oom_kill") > 0:
                    return True
            elif self._counter(path / "memory.events", "oom_kill") > 0:
                return True
        return False

    @staticmethod
    def kill(groups: list[tuple[str, Path]]) -> None:
        for _, path in groups:
            if (path / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    (path / "cgroup.kill").write_text("1")
                continue
            with contextlib.suppress(OSError):
                for pid in (path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)

    @staticmethod
    def empty(groups: list[tuple[str, Path]]) -> bool:
        for _, path in groups:
            with contextlib.suppress(FileNotFoundError):
                if (path / "cgroup.procs").read_text().strip():
                    return False
        return True

    @staticmethod
    def remove(groups: list[tuple[str, Path]]) -> None:
        for path in {p for _, p in groups}:
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove sandbox cgroup %s: %s", path, exc)


# --- the backend --------------------------------------------------------------------------


class _UidPool:
    """Host uids handed out one per call, cycling, skipping those still in use: a call's
    processes are then the only ones with its uid (RLIMIT_NPROC counts per uid), and no
    two concurrent calls can signal or ptrace each other."""

    def __init__(self, base: int, size: int) -> None:
        self.base, self.size = base, size
        self._next = itertools.cycle(range(size))
        self._busy: set[int] = set()

    def take(self) -> int:
        for _ in range(self.size):
            uid = self.base + next(self._next)
            if uid not in self._busy:
                self._busy.add(uid)
                return uid
        raise SandboxUnavailable(f"all {self.size} sandbox uids are in use")

    def give_back(self, uid: int) -> None:
        self._busy.discard(uid)


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)  # reaches the child only through pass_fds
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class ProcessSandbox:
    """Runs one program under bubblewrap with rlimits, a pids limit and an unprivileged uid.

    ``network == "allowlist"`` shares the host network *without* filtering by host (no
    egress proxy yet): treat an allowlist as "network allowed".
    """

    name = "process"
    #: request files reach the sandbox even with ``filesystem: none`` (as read-only mounts)
    files_without_filesystem = True

    def __init__(
        self,
        *,
        bwrap: str | None = None,
        use_cgroups: bool = True,
        uid_base: int = 1_700_000_000,
        uid_count: int = 10_000,
        python: str | None = None,
        python_prefix: str | None = None,
    ) -> None:
        self.bwrap = bwrap or shutil.which("bwrap") or "/usr/bin/bwrap"
        self.prlimit = shutil.which("prlimit") or "/usr/bin/prlimit"
        self.setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        self.sh = "/bin/sh"
        if python is None:
            python, prefix = base_python()
            python_prefix = python_prefix or prefix
        #: the interpreter as seen inside the sandbox (bound at the same path)
        self.python = python
        self.python_prefix = python_prefix or os.path.dirname(os.path.dirname(python))
        self._use_cgroups = use_cgroups
        self._cgroups: _Cgroups | None = None
        self._uids = _UidPool(uid_base, uid_count)
        self._calls = itertools.count(1)
        self._system_binds = self._system_args()

    # --- capability checks ----------------------------------------------------------

    def available(self) -> str | None:
        if not os.path.exists(self.bwrap):
            return "bwrap not installed: apt-get install bubblewrap"
        for tool, package in ((self.prlimit, "util-linux"), (self.setpriv, "util-linux")):
            if not os.path.exists(tool):
                return f"{os.path.basename(tool)} not installed: apt-get install {package}"
        if os.geteuid() != 0:
            # Dropping to a per-call uid and creating namespaces without a user namespace
            # need root; a rootless mode is not implemented.
            return "the process sandbox needs the worker to run as root (it drops each call to an unprivileged uid)"
        if not os.path.exists(self.python):
            return f"the sandbox interpreter {self.python} does not exist"
        return None

    @property
    def cgroups(self) -> _Cgroups | None:
        if self._cgroups is None and self._use_cgroups:
            self._cgroups = _Cgroups()
        if self._cgroups is not None and self._cgroups.mechanism is None:
            return None
        return self._cgroups

    def describe(self) -> dict[str, Any]:
        """How this machine's limits are enforced (logged at worker start, shown by tests)."""
        cg = self.cgroups
        problem = self._cgroups.problem if self._cgroups is not None else "cgroups disabled by configuration"
        return {
            "backend": self.name,
            "bwrap": self.bwrap,
            "python": self.python,
            "pids_limit": f"{cg.mechanism} pids.max" if cg else "RLIMIT_NPROC on a per-call uid",
            "memory_limit": (
                f"RLIMIT_AS + {cg.mechanism} memory limit" if cg and cg.memory else "RLIMIT_AS (per process)"
            ),
            "cgroup_problem": None if cg else problem,
            "uid": f"per-call host uid from {self._uids.base}..{self._uids.base + self._uids.size - 1}",
            "network_filtering": "none (an allowlist profile shares the host network)",
        }

    limits = describe

    # --- argv -----------------------------------------------------------------------

    def _system_args(self) -> list[str]:
        args = ["--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        for path in _ETC_BASE:
            args += ["--ro-bind-try", path, path]
        prefix = self.python_prefix
        if not (prefix == "/usr" or prefix.startswith("/usr/")):
            # bwrap creates the missing parents with the modes of the host's, e.g. /root's
            # 0700, which the unprivileged uid could not traverse: create them 0755 first.
            parents = list(Path(prefix).parents)[::-1][1:]
            for parent in parents:
                args += ["--perms", "0755", "--dir", str(parent)]
            args += ["--ro-bind", prefix, prefix]
        return args

    def _limits_args(self, profile: ExecProfile, *, nproc: bool) -> list[str]:
        cpu = max(1, math.ceil(profile.cpu_seconds))
        memory = profile.memory_mb * MIB
        args = [
            self.prlimit,
            f"--as={memory}:{memory}",
            # soft: SIGXCPU (reported as such); hard one second later: SIGKILL, for a
            # program that ignores SIGXCPU
            f"--cpu={cpu}:{cpu + 1}",
            f"--fsize={profile.max_file_mb * MIB}",
            f"--nofile={profile.max_open_files}",
            "--core=0",
        ]
        if nproc:
            args.append(f"--nproc={profile.max_processes}")
        return [*args, "--"]

    def _bwrap_options(self, profile: ExecProfile, env: dict[str, str], files: list[tuple[str, int]]) -> list[str]:
        """bwrap's options (the command follows them on the real command line: bwrap
        refuses a command given only through ``--args``)."""
        args = ["--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
        if profile.network != "allowlist":
            args.append("--unshare-net")
        args += ["--die-with-parent", "--new-session", "--cap-drop", "ALL"]
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
        args.append("--clearenv")
        for key, value in env.items():
            args += ["--setenv", key, value]
        args += self._system_binds
        made: set[str] = set()
        for path in profile.ro_binds:
            # parents 0755 first: bwrap would copy the host's modes (e.g. /root's 0700),
            # which the sandbox's unprivileged uid could not traverse
            for parent in list(Path(path).parents)[::-1][1:]:
                if str(parent) not in made:
                    made.add(str(parent))
                    args += ["--perms", "0755", "--dir", str(parent)]
            args += ["--ro-bind", path, path]
        if profile.network == "allowlist":
            for path in _ETC_NET:
                args += ["--ro-bind-try", path, path]
        args += ["--proc", "/proc", "--dev", "/dev"]
        if profile.filesystem == "none":
            # no writable place at all: the workdir is a root-owned directory of bwrap's
            # own root, files are read-only bind mounts
            args += ["--perms", "0755", "--dir", WORKDIR]
            for name, fd in files:
                args += [*self._parents(name), "--perms", "0444", "--ro-bind-data", str(fd), f"{WORKDIR}/{name}"]
        else:
            # tmpfs pages are memory: its size shares the memory budget
            args += ["--perms", "1777", "--size", str(profile.memory_mb * MIB), "--tmpfs", "/tmp"]
            args += ["--perms", "0777", "--dir", WORKDIR]
            mode = "0666" if profile.filesystem == "tmp" else "0444"
            for name, fd in files:
                args += [*self._parents(name), "--perms", mode, "--file", str(fd), f"{WORKDIR}/{name}"]
            if profile.filesystem == "read_only":
                args += ["--remount-ro", "/tmp"]
            else:  # POSIX shared memory (Python's multiprocessing locks) needs a writable /dev/shm
                args += ["--perms", "1777", "--size", str(profile.memory_mb * MIB), "--tmpfs", "/dev/shm"]
        args += ["--chdir", WORKDIR]
        return args

    def _inner(self, uid: int, argv: list[str]) -> list[str]:
        """The command bwrap starts: setpriv drops to ``uid`` and clears every capability set."""
        return [self.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--", *argv]  # fmt: skip

    @staticmethod
    def _parents(name: str) -> list[str]:
        out: list[str] = []
        parts = name.split("/")[:-1]
        for i in range(len(parts)):
            out += ["--perms", "0777", "--dir", f"{WORKDIR}/{'/'.join(parts[: i + 1])}"]
        return out

    def command(self, profile: ExecProfile, argv: list[str], env: dict[str, str]) -> list[str]:
        """argv of a long-lived child (stdio MCP server) confined like :meth:`run` minus the
        wall-clock timeout and output cap.

        The environment is *not* on the returned command line (that would show secrets to
        anyone running ``ps``): start the argv with ``env`` as its environment; bwrap passes
        it through. The process count is held by ``RLIMIT_NPROC`` on a uid of its own (the
        caller owns the child's lifetime, so no per-call cgroup is made for it)."""
        if not argv:
            raise ValueError("argv must name a program")
        uid = self._uids.take()
        self._uids.give_back(uid)  # the cycle makes reuse unlikely while the child lives
        options = self._bwrap_options(profile, {}, [])
        options.remove("--clearenv")
        return [*self._limits_args(profile, nproc=True), self.bwrap, *options, "--", *self._inner(uid, argv)]

    # --- running --------------------------------------------------------------------

    @staticmethod
    def _check(profile: ExecProfile, request: SandboxRequest) -> None:
        if not request.argv:
            raise ValueError("SandboxRequest.argv must name a program")
        for name, data in request.files.items():
            if not _FILE_NAME.match(name) or any(part in (".", "..") for part in name.split("/")):
                raise ValueError(f"sandbox file name '{name}' must be a relative path of letters, digits, '._-'")
            if len(data) > profile.max_file_mb * MIB:
                raise ValueError(
                    f"sandbox file '{name}' is larger than the file size limit of {profile.max_file_mb} MB"
                )
        for key, value in request.env.items():
            if not key or "=" in key or "\0" in key:
                raise ValueError(f"environment variable name {key!r} is not valid")
            if "\0" in value:
                raise ValueError(f"environment variable {key} contains a NUL character")

    async def run(self, profile: ExecProfile, request: SandboxRequest) -> SandboxResult:
        problem = self.available()
        if problem:
            raise SandboxUnavailable(problem)
        self._check(profile, request)
        cg = self.cgroups
        uid = self._uids.take()
        fds: list[int] = []
        groups: list[tuple[str, Path]] = []
        try:
            files = []
            for name, data in request.files.items():
                fd = _memfd("file", data)
                fds.append(fd)
                files.append((name, fd))
            options = self._bwrap_options(profile, request.env, files)
            args_fd = _memfd("args", b"".join(a.encode() + b"\0" for a in options))
            fds.append(args_fd)
            chain = [*self._limits_args(profile, nproc=cg is None), self.bwrap, "--args", str(args_fd), "--"]
            chain += self._inner(uid, request.argv)
            if cg is not None:
                name = f"{os.getpid()}-{next(self._calls)}"
                try:
                    groups = cg.create(
                        name, max_pids=profile.max_processes + _BWRAP_PROCS, memory_bytes=profile.memory_mb * MIB
                    )
                except OSError as exc:
                    raise SandboxUnavailable(f"could not create the sandbox's cgroup: {exc}") from exc
                # The shell joins the groups, then execs the rest: nothing runs outside them.
                join = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
                chain = [self.sh, "-c", join, "sh", *cg.procs_files(groups), "--", *chain]
            return await self._execute(profile, request, chain, fds, cg, groups)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if groups and cg is not None:
                await self._reap(cg, groups)
            self._uids.give_back(uid)

    async def _reap(self, cg: _Cgroups, groups: list[tuple[str, Path]]) -> None:
        deadline = time.monotonic() + _KILL_GRACE_S
        while not cg.empty(groups) and time.monotonic() < deadline:
            cg.kill(groups)
            await asyncio.sleep(0.01)
        cg.remove(groups)

    async def _execute(
        self,
        profile: ExecProfile,
        request: SandboxRequest,
        chain: list[str],
        fds: list[int],
        cg: _Cgroups | None,
        groups: list[tuple[str, Path]],
    ) -> SandboxResult:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *chain,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            pass_fds=fds,
            start_new_session=True,
            close_fds=True,
        )
        for fd in fds:  # the child has its copies; ours are closed as soon as possible
            with contextlib.suppress(OSError):
                os.close(fd)
        fds.clear()
        cap = profile.output_bytes
        reasons: list[str] = []
        killed = asyncio.Event()

        def kill(reason: str) -> None:
            if killed.is_set():
                return
            killed.set()
            reasons.append(reason)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if cg is not None:
                cg.kill(groups)

        async def feed() -> None:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                if request.stdin:
                    proc.stdin.write(request.stdin)
                    await proc.stdin.drain()
                proc.stdin.close()
                await proc.stdin.wait_closed()

        truncated = False

        async def drain(stream: asyncio.StreamReader | None) -> bytes:
            nonlocal truncated
            assert stream is not None
            buf = bytearray()
            while True:
                chunk = await stream.read(_READ_CHUNK)
                if not chunk:
                    return bytes(buf)
                if len(buf) + len(chunk) > cap:
                    buf += chunk[: cap - len(buf)]
                    truncated = True
                    kill(f"output limit of {cap} bytes exceeded")
                    # Keep reading (and discarding) until the killed writers' pipe closes.
                    while await stream.read(_READ_CHUNK):
                        pass
                    return bytes(buf)
                buf += chunk

        work = asyncio.gather(feed(), drain(proc.stdout), drain(proc.stderr), proc.wait())
        try:
            _, out, err, code = await asyncio.wait_for(asyncio.shield(work), profile.timeout_s)
        except TimeoutError:
            kill(f"timed out after {profile.timeout_s:g}s")
            try:
                _, out, err, code = await asyncio.wait_for(work, _KILL_GRACE_S)
            except TimeoutError:  # pragma: no cover - a pid namespace dies with its init
                log.error("sandbox call still running %ss after SIGKILL", _KILL_GRACE_S)
                raise
        except BaseException:
            kill("cancelled")
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(work, _KILL_GRACE_S)
            raise
        duration = time.monotonic() - started
        if code < 0:  # the launcher itself was killed (by us): the shell's 128+N convention, like bwrap's
            code = 128 - code
        if code == 125 and cg is not None and b"cgroup" in err:
            raise SandboxUnavailable(f"could not place the sandbox in its cgroup: {err.decode(errors='replace')}")
        reason = self._reason(profile, code, err, reasons, killed.is_set(), cg, groups, duration)
        return SandboxResult(code, out, err, duration, truncated=truncated, reason=reason)

    def _reason(
        self,
        profile: ExecProfile,
        code: int,
        err: bytes,
        ours: list[str],
        killed: bool,
        cg: _Cgroups | None,
        groups: list[tuple[str, Path]],
        duration: float,
    ) -> str | None:
        """Why the program stopped, in words; several containments can apply (a fork bomb
        hits the process limit, then the clock)."""
        found: list[str] = []
        if cg is not None:
            forks_failed = cg.pids_hit(groups)
        else:  # RLIMIT_NPROC leaves no counter: the programs' own words
            forks_failed = bool(
                re.search(rb"fork: retry: Resource temporarily unavailable|[Cc]annot fork", err)
                or (code != 0 and b"BlockingIOError: [Errno 11]" in err)
            )
        if forks_failed:
            found.append(f"process limit of {profile.max_processes} reached")
        # bwrap exits with 128+N when the program was killed by signal N
        sig = code - 128 if 128 < code < 128 + 65 else None
        memory = f"memory limit of {profile.memory_mb} MB exceeded"
        oom = cg is not None and cg.memory is not None and cg.oom_killed(groups)
        # RLIMIT_AS makes allocations fail: Python raises MemoryError, bash and C programs say so
        if oom or (code != 0 and re.search(rb"MemoryError|[Cc]annot allocate memory|xmalloc: .*cannot allocate", err)):
            found.append(memory)
        if sig == signal.SIGXCPU or (
            sig == signal.SIGKILL and not killed and memory not in found and duration >= profile.cpu_seconds
        ):
            found.append(f"CPU time limit of {profile.cpu_seconds:g}s exceeded")
        if sig == signal.SIGXFSZ or re.search(rb"File too large|File size limit exceeded", err):
            found.append(f"file size limit of {profile.max_file_mb} MB exceeded")
        found += [r for r in ours if r != "cancelled"]
        if not found and sig is not None and not killed:
            found.append(f"killed by signal {sig} ({_signal_name(sig)})")
        return "; ".join(found) or None
