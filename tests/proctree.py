"""A relay's processes as /proc shows them, for the crash tests and the benchmark (standard library only).

The forwarder process is the relay's spawned child (``multiprocessing`` spawn: its command line
names ``spawn_main``); multiprocessing's resource tracker is a child too, and is not it.
"""

from __future__ import annotations

from pathlib import Path


def child_pids(pid: int, command_has: str = "") -> list[int]:
    """A process's children (with ``command_has`` in their command line, when given)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                if command_has in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(child))
            except FileNotFoundError:
                pass  # gone since
    return found


def forwarder_pids(relay_pid: int) -> list[int]:
    return child_pids(relay_pid, "spawn_main")
