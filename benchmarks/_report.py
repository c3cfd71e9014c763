"""What the benchmarks share: the machine's description and their sections of the docs."""

from __future__ import annotations

import platform
from pathlib import Path

from nodata_defense._io import atomic_write_text


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def write_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` between the ``<!-- name:start -->`` / ``<!-- name:end -->`` markers of the
    markdown file ``path`` (appended at its end when the markers are not there yet), atomically."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip(chr(10))}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Performance\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, text)


def reproducing_arguments(argv: list[str], *, valued: tuple[str, ...], flags: tuple[str, ...]) -> list[str]:
    """``argv`` without the options that only pace or quiet a run (``valued`` ones take a value,
    as ``--opt v`` or ``--opt=v``; ``flags`` take none), so a quoted command reproduces its results."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in valued:
            skip = True
        elif not (arg in flags or arg.split("=", 1)[0] in valued):
            kept.append(arg)
    return kept
