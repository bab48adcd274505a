"""The sandbox bootstrap: runs first in the child interpreter, confines it, then runs the code.

This file is not imported by stageopt: :mod:`stageopt.sandbox._run` reads its source and runs it
with ``python -I -S -c``, so it may use the standard library only. The configuration arrives as
one JSON object on stdin; events (isolation achieved, test outcomes, violations, the end) are
written as JSON lines, each carrying the run's nonce, to an inherited file descriptor.

Order: read config -> unshare namespaces (network, pid, mount; plus user when not root) ->
hide paths and give /tmp, /var/tmp and /dev/shm throwaway tmpfs mounts -> chdir to the work
folder -> resource limits -> drop root to ``nobody`` -> fork: the child (pid 1 of the new pid
namespace) installs the audit hook and runs the code; the parent waits and reports how it ended.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import ctypes
import json
import os
import resource
import signal
import sys
import traceback
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
NOBODY = 65534

CONFIG: dict[str, Any] = {}
VIOLATIONS: list[str] = []


def report(**event: Any) -> None:
    line = json.dumps({"nonce": CONFIG["nonce"], **event}, default=repr) + "\n"
    with contextlib.suppress(OSError):
        os.write(CONFIG["result_fd"], line.encode("utf-8", "replace"))


# ---- confinement (runs before any untrusted code) ---------------------------------------------


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc


def _unshare(libc: Any, flags: int) -> bool:
    return libc.unshare(flags) == 0


def _mount(libc: Any, source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    enc = [None if v is None else v.encode() for v in (source, target, fstype, data)]
    if libc.mount(enc[0], enc[1], enc[2], flags, enc[3]) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {target}: {os.strerror(errno)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _private_mounts(libc: Any, keep: list[str], hide: list[str]) -> list[str]:
    """Cover ``hide`` with empty tmpfs mounts and give world-writable folders throwaway ones.

    Every folder in ``keep`` (the work folder, the standard library) that a mount covers is
    bound back at its own path, so it stays reachable while its surroundings disappear.
    """
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE, None)
    handles = {path: os.open(path, os.O_RDONLY | os.O_DIRECTORY) for path in keep if os.path.isdir(path)}
    done = []
    targets = [(path, "mode=0755") for path in hide] + [(p, "mode=1777") for p in ("/tmp", "/var/tmp", "/dev/shm")]
    for target, mode in targets:
        if not os.path.isdir(target) or any(_inside(target, k) for k in handles):
            continue  # never cover a kept folder (or the root) as a whole
        _mount(libc, "tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size=16m,{mode}")
        done.append(target)
        for path, handle in handles.items():
            if _inside(path, target) and not os.path.isdir(path):
                os.makedirs(path, mode=0o755, exist_ok=True)
                _mount(libc, f"/proc/self/fd/{handle}", path, None, MS_BIND | MS_REC, None)
    for handle in handles.values():
        os.close(handle)
    return done


def _traversable(path: str) -> bool:
    """Whether any user may reach ``path`` (every ancestor folder is world-searchable)."""
    while path not in ("/", ""):
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & 0o001:
            return False
    return True


def confine() -> dict[str, Any]:
    """Apply every layer that this machine permits; return which ones took effect."""
    root = os.geteuid() == 0
    info: dict[str, Any] = {"root": root, "net": False, "pid": False, "mount": False, "hidden": [], "user": None}
    workdir = CONFIG["workdir"]
    try:
        libc = _libc()
    except OSError:
        libc = None
    if libc is not None:
        uid, gid = os.getuid(), os.getgid()
        base = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS
        attempts = [base, CLONE_NEWNET | CLONE_NEWPID, CLONE_NEWNET] if root else []
        attempts += [CLONE_NEWUSER | base, CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID, CLONE_NEWUSER | CLONE_NEWNET]
        for flags in attempts:
            if _unshare(libc, flags):
                if flags & CLONE_NEWUSER:  # map our own ids so files we create keep a valid owner
                    _write("/proc/self/setgroups", "deny")
                    _write("/proc/self/uid_map", f"{uid} {uid} 1")
                    _write("/proc/self/gid_map", f"{gid} {gid} 1")
                info.update(net=True, pid=bool(flags & CLONE_NEWPID), mount=bool(flags & CLONE_NEWNS))
                break
        if info["mount"]:
            try:
                keep = [workdir, *(p for p in sys.path if p)]
                info["hidden"] = _private_mounts(libc, keep, CONFIG["hide_paths"])
            except OSError as exc:
                info["mount_error"] = str(exc)
    if root:
        os.chown(workdir, NOBODY, NOBODY)
    os.chdir(workdir)
    limits = CONFIG["limits"]
    mem = limits["memory_mb"] * 1024 * 1024
    fsize = limits["file_mb"] * 1024 * 1024
    for res, soft, hard in [
        (resource.RLIMIT_AS, mem, mem),
        (resource.RLIMIT_CPU, limits["cpu_s"], limits["cpu_s"] + 1),
        (resource.RLIMIT_FSIZE, fsize, fsize),
        (resource.RLIMIT_NOFILE, 64, 64),
        (resource.RLIMIT_NPROC, limits["processes"], limits["processes"]),
        (resource.RLIMIT_CORE, 0, 0),
    ]:
        resource.setrlimit(res, (soft, hard))
    stdlib = os.path.dirname(os.__file__)
    if root and _traversable(stdlib):  # root ignores RLIMIT_NPROC and file permissions: become nobody
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        info["user"] = "nobody"
    return info


# ---- the audit hook (defence in depth inside the child) ---------------------------------------

ALWAYS_BLOCKED = (
    "socket.",
    "subprocess.",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "os.kill",
    "os.killpg",
    "os.setsid",
    "pty.",
    "ctypes.",
    "os.putenv",
    "os.unsetenv",
    "sys.remote_exec",
    "winreg.",
    "webbrowser.",
    "urllib.Request",
    "ftplib.",
    "smtplib.",
    "http.client.",
    "mmap.",
)
PATH_EVENTS = {
    "os.remove": (0, True),
    "os.rmdir": (0, True),
    "os.rename": (1, True),
    "os.replace": (1, True),
    "os.mkdir": (0, True),
    "os.chmod": (0, True),
    "os.chown": (0, True),
    "os.truncate": (0, True),
    "os.utime": (0, True),
    "os.link": (1, True),
    "os.symlink": (1, True),
    "shutil.rmtree": (0, True),
    "shutil.move": (1, True),
    "shutil.copyfile": (1, True),
    "os.listdir": (0, False),
    "os.scandir": (0, False),
    "glob.glob": (0, False),
    "os.chdir": (0, False),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _abs(path: Any) -> str | None:
    if isinstance(path, int):
        return None
    if isinstance(path, bytes):
        path = path.decode("utf-8", "replace")
    return os.path.normpath(os.path.join(CONFIG["workdir"], os.fspath(path)))


def _readable(path: str) -> bool:
    roots = [CONFIG["workdir"], *CONFIG["read_roots"], "/dev/null", "/dev/urandom", "/dev/zero"]
    return any(_inside(path, r) for r in roots)


def _deny(what: str) -> None:
    VIOLATIONS.append(what)
    report(event="violation", what=what)
    raise PermissionError(f"sandbox: {what} is not allowed")


def audit(event: str, args: tuple[Any, ...]) -> None:
    if event.startswith(ALWAYS_BLOCKED):
        _deny(event)
    elif event == "open":
        path = _abs(args[0])
        if path is None:
            return
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        writes = any(c in str(mode or "") for c in "wax+") or bool((flags or 0) & WRITE_FLAGS)
        if writes and not (_inside(path, CONFIG["workdir"]) or path == "/dev/null"):
            _deny(f"writing {path}")
        if not writes and not _readable(path):
            _deny(f"reading {path}")
    elif event in PATH_EVENTS:
        index, writes = PATH_EVENTS[event]
        for arg in args[: index + 1]:
            path = _abs(arg) if isinstance(arg, str | bytes | os.PathLike) else None
            if path is None:
                continue
            if (writes and not _inside(path, CONFIG["workdir"])) or (not writes and not _readable(path)):
                _deny(f"{event} {path}")


# ---- running the code ---------------------------------------------------------------------------


def _summary(exc: BaseException, where: str) -> str:
    text = str(exc).strip().splitlines()
    detail = f": {text[0][:300]}" if text else ""
    return f"{where}: {type(exc).__name__}{detail}"


def _explain_assert(source: str, namespace: dict[str, Any]) -> str:
    """For ``assert a == b`` report what ``a`` evaluated to (the refinement needs it)."""
    try:
        tree = ast.parse(source)
        node = tree.body[-1]
        if not (isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare)):
            return ""
        if len(node.test.ops) != 1 or not isinstance(node.test.ops[0], ast.Eq):
            return ""
        value = eval(compile(ast.Expression(node.test.left), "<explain>", "eval"), namespace)
        return f"; got {value!r:.200}"
    except BaseException:
        return ""


def _exec(source: str, filename: str, namespace: dict[str, Any]) -> None:
    exec(compile(source, filename, "exec"), namespace)


def run_user() -> int:
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    code, setup, tests = CONFIG["code"], CONFIG["setup"], CONFIG["tests"]
    phase = "code"
    try:
        _exec(code, "<solution>", namespace)
        if setup:
            phase = "setup"
            _exec(setup, "<setup>", namespace)
    except SystemExit as exc:
        if tests or exc.code not in (None, 0):
            report(event="error", phase=phase, error=f"{phase}: exited with {exc.code!r} before the tests ran")
            return 1
        report(event="done")
        return 0
    except BaseException as exc:
        traceback.print_exc()
        kind = "memory" if isinstance(exc, MemoryError) else "error"
        report(event=kind, phase=phase, error=_summary(exc, phase))
        return 1
    failed = 0
    for index, test in enumerate(tests):
        label = test.strip().splitlines()[0][:200] if test.strip() else "<empty test>"
        try:
            _exec(test, f"<test {index}>", namespace)
        except AssertionError as exc:
            failed += 1
            message = str(exc).strip()
            error = f"{label} failed" + (f": {message[:200]}" if message else _explain_assert(test, namespace))
            report(event="test", index=index, ok=False, error=error)
        except BaseException as exc:
            failed += 1
            traceback.print_exc()
            if isinstance(exc, MemoryError):
                report(event="memory", phase=f"test {index}", error=_summary(exc, f"test {index}"))
            report(event="test", index=index, ok=False, error=_summary(exc, label))
        else:
            report(event="test", index=index, ok=True, error="")
    report(event="done")
    return 1 if failed else 0


def main() -> None:
    CONFIG.update(json.loads(sys.stdin.read()))
    CONFIG["read_roots"] = [*CONFIG["read_roots"], *(p for p in sys.path if p)]
    try:
        report(event="isolation", **confine())
    except BaseException as exc:
        report(event="setup_failed", error=f"{type(exc).__name__}: {exc}")
        os._exit(3)
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
            if CONFIG["audit"]:
                sys.addaudithook(audit)
            status = run_user()
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(status)
    _, wait_status, usage = os.wait4(pid, 0)
    cpu = usage.ru_utime + usage.ru_stime
    if os.WIFSIGNALED(wait_status):
        report(event="exit", signal=os.WTERMSIG(wait_status), cpu_s=cpu)
        os._exit(128 + os.WTERMSIG(wait_status))
    code = os.WEXITSTATUS(wait_status)
    report(event="exit", code=code, cpu_s=cpu)
    os._exit(code)


main()
