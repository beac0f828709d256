"""What the CPU benchmarks that train (checkpoint_overhead.py, store_overhead.py, fault_recovery.py) share: seeded
random token shards, since what they measure does not depend on the text, the machine a figure was measured on,
and the results file with its table."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


def random_shards(url: Path, sizes: tuple[int, ...], seed: int = 0) -> str:
    """Shards of seeded random GPT-2 token ids, `sizes` tokens each (the first is the val shard)."""
    from common.shards import write_manifest, write_shard

    rng = np.random.default_rng(seed)
    records = [
        write_shard(str(url), i, rng.integers(0, 50257, n, dtype=np.uint16))
        for i, n in enumerate(sizes)
    ]
    write_manifest(str(url), records)
    return str(url)


def cpu_machine() -> dict:
    """CPU count and model, torch and Python versions, and the GPU where there is one."""
    import torch

    info = Path("/proc/cpuinfo")
    model = (
        next(
            (
                ln.split(":", 1)[1].strip()
                for ln in info.read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.processor(),
        )
        if info.exists()
        else platform.processor()
    )
    out = {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    # a run that trained on a GPU names it (CPU results keep their shape)
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def cell(value: float | None, spec: str) -> str:
    """A table cell: the value in `spec`, or "-" for a figure the variant does not have."""
    return "-" if value is None else format(value, spec)


def measured_on(res: dict) -> str:
    """The line every results table ends with: a figure always comes with its machine."""
    mc = res["machine"]
    gpu = f"{mc['gpu']} with " if mc.get("gpu") else ""
    versions = f"torch {mc['torch']}, Python {mc['python']}"
    return f"Measured on {gpu}{mc['cpus']} x {mc['cpu_model']}, {versions}; {res['time']}."


def report(
    settings: dict,
    rows: list[dict],
    summary: list[dict],
    table: Callable[[dict], str],
    out: str | None,
) -> int:
    """The results with the machine and time they were measured at: the table printed, the JSON written to
    `out` when given (`render` prints its table again)."""
    res = {
        "settings": settings,
        "machine": cpu_machine(),
        "time": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        "rows": rows,
        "summary": summary,
    }
    print(table(res))
    if out:
        Path(out).write_text(json.dumps(res, indent=1))
        print(f"results: {out}")
    return 0


def render(path: str, table: Callable[[dict], str]) -> int:
    """`--render FILE`: a results file's markdown table."""
    print(table(json.loads(Path(path).read_text())))
    return 0
