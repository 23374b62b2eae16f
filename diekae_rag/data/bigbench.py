"""Build the SQuAD-Shifts files from the PyPI source archive ``bigbench==1.0.0`` (for users without ../shared)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

from ..atomic import atomic_write_bytes
from .squad import DEV_FILE, TRAIN_FILES, default_data_dir

_INNER = "bigbench/benchmark_tasks/squad_shifts/"


def fetch_squad_shifts(out: Optional[str | Path] = None) -> Path:
    """Download the sdist (about 358 MB) with pip and extract the five SQuAD files to ``out``."""
    out = Path(out) if out else default_data_dir()
    wanted = set(TRAIN_FILES) | {DEV_FILE}
    if all((out / f).exists() for f in wanted):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "-d", tmp, "bigbench==1.0.0"], check=True)
        archives = list(Path(tmp).glob("bigbench-1.0.0*.tar.gz"))
        if not archives:
            raise FileNotFoundError("pip did not download bigbench-1.0.0.tar.gz")
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = member.name.split(_INNER, 1)[-1] if _INNER in member.name else None
                if name in wanted:
                    data = tar.extractfile(member).read()  # canary fields are kept as they are
                    atomic_write_bytes(out / name, data)
    missing = [f for f in wanted if not (out / f).exists()]
    if missing:
        raise FileNotFoundError(f"The bigbench archive lacked {missing}.")
    return out
