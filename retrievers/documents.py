"""Documents: read a folder of .txt / .md (and .pdf when pypdf is installed)."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")


@dataclass
class Document:
    doc_id: str                      # path relative to the folder, with "/" separators
    text: str
    metadata: dict = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


class SkippedFilesWarning(UserWarning):
    """Some files in a documents folder could not be read as text; the warning lists them."""


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader
    except ImportError as exc:
        raise ValueError("pypdf is not installed (pip install pypdf)") from exc
    return "\n".join(page.extract_text() or "" for page in PdfReader(str(path)).pages)


def load_documents(folder: str | Path, follow_symlinks: bool = False) -> list[Document]:
    """Read every text document under ``folder``.

    Binary, non-UTF-8 and unreadable files are skipped with one warning that lists them.
    Symlinks that point outside ``folder`` are skipped unless ``follow_symlinks=True``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"Documents folder {root} does not exist or is not a folder.")
    root_real = root.resolve()
    docs, skipped = [], []
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(root).as_posix()
        if path.is_symlink() or any(p.is_symlink() for p in path.relative_to(root).parents if str(p) != "."):
            target = path.resolve()
            if not follow_symlinks and root_real not in target.parents:
                skipped.append(f"{rel} (symlink leaving the folder; pass follow_symlinks=True to read it)")
                continue
        suffix = path.suffix.lower()
        if suffix not in TEXT_SUFFIXES + (".pdf",):
            skipped.append(f"{rel} (unsupported type {suffix or 'none'})")
            continue
        try:
            if suffix == ".pdf":
                text = _read_pdf(path)
            else:
                raw = path.read_bytes()
                if b"\x00" in raw[:8192]:
                    raise ValueError("binary content")
                text = raw.decode("utf-8")
        except (UnicodeDecodeError, ValueError, OSError) as exc:
            reason = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)
            skipped.append(f"{rel} ({reason})")
            continue
        if not text.strip():
            skipped.append(f"{rel} (empty)")
            continue
        docs.append(Document(rel, text, {"source": rel, "path": str(path)}))
    if skipped:
        warnings.warn(f"Skipped {len(skipped)} file(s) in {root}: " + "; ".join(skipped), SkippedFilesWarning,
                      stacklevel=2)
    return docs
