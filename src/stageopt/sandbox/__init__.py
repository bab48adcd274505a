"""Run untrusted, model-written Python in a confined child process.

What a run gets, in layers (each applied where the machine permits; :class:`Isolation` in the
result says which took effect):

1. **A separate process** (``python -I -S``: isolated mode, no site-packages, standard library
   only) in its own session and process group, with an **empty environment** (no secrets), a
   fresh **temporary working folder**, and a **wall-clock timeout** after which the whole process
   group is killed.
2. **Resource limits** (``setrlimit``): address space (memory), CPU seconds, file size (also caps
   captured output), open files, processes (``RLIMIT_NPROC``), no core dumps.
3. **Namespaces** (``unshare``): a new **network** namespace (no interfaces but a down loopback:
   no network at all), a new **pid** namespace (the code is its pid 1, so every process it starts
   dies with it), and a **mount** namespace in which the repository, the current folder and the
   home folder are covered by empty tmpfs mounts and ``/tmp``, ``/var/tmp`` and ``/dev/shm`` are
   throwaway tmpfs mounts (the work folder is bound back in place). As root these need no user
   namespace; otherwise an unprivileged user namespace is tried.
4. **Dropping root**: when the parent runs as root, the child becomes ``nobody`` after setting
   up, so ``RLIMIT_NPROC`` is enforced (root ignores it) and file permissions apply.
5. **An audit hook** (:func:`sys.addaudithook`) installed before the code runs: it refuses
   sockets, starting processes (``subprocess``, ``os.system``, ``os.exec*``, ``os.fork``),
   signals, ``ctypes``, writes outside the work folder and reads outside it and the standard
   library. A refusal raises ``PermissionError`` and the run's status becomes ``blocked``.

What is guaranteed and what is not:

* Layers 1 and 2 are always in force: a run always ends within ``timeout_s`` (plus a few
  milliseconds), cannot see the parent's environment, and cannot exhaust memory or CPU.
* The audit hook is **defence in depth, not a security boundary**: code running in the same
  interpreter can defeat it (e.g. through objects reachable from the hook's frames). Containment
  of network, files and processes rests on layers 3 and 4; where namespaces are unavailable
  (non-root without unprivileged user namespaces) only the hook and the rlimits stop network
  access and writes to world-writable folders, and a read of a world-readable absolute path
  outside the hidden folders cannot be prevented by the operating system.
* The result reflects what the child reported: hostile code can forge its own test outcomes.
  The sandbox protects the machine, not the score against deliberate cheating.
* Linux only.
"""

from __future__ import annotations

from stageopt.sandbox._result import Isolation, SandboxResult, Status, TestOutcome
from stageopt.sandbox._run import CHILD_ENV, default_hidden_paths, run_python, run_tests

__all__ = [
    "CHILD_ENV",
    "Isolation",
    "SandboxResult",
    "Status",
    "TestOutcome",
    "default_hidden_paths",
    "run_python",
    "run_tests",
]
