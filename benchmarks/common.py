"""Helpers shared by the benchmarks: random full-size checkpoints and timing."""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def random_checkpoint(arch: str, folder: Path) -> Path:
    """A random-weight checkpoint in OpenAI's fp16 layout (compute cost does not depend on values)."""
    import torch

    from clipcli.models.families.openai import ARCHITECTURES, import_clip

    path = folder / f"random-{arch.replace('/', '-')}.pt"
    if not path.exists():
        torch.manual_seed(0)
        model = ARCHITECTURES[arch].build()
        import_clip().model.convert_weights(model)
        torch.save(model.state_dict(), path)
    return path


def time_command(cmd: list[str], repeat: int, **kwargs: object) -> list[float]:
    """Wall-clock seconds of ``repeat`` runs of a whole process."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, **kwargs)  # type: ignore[call-overload]
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> str:
    return f"median {statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f}, n={len(times)})"


def python() -> str:
    return sys.executable


def clipcli() -> list[str]:
    """The installed console script of this interpreter's environment (or the module, if none)."""
    import os
    import shutil

    script = shutil.which("clipcli", path=os.path.dirname(sys.executable)) or shutil.which("clipcli")
    return [script] if script else [sys.executable, "-m", "clipcli"]


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
