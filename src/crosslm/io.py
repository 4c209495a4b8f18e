"""Crash-safe file writes: a file is either its old content or its complete new content, never half."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def child_path(root: Path, name: str) -> Path:
    """`root / name` for a single plain file name built from received data; raises ProtocolError when the
    name could leave `root` (a separator, '..', a NUL) or is too long for a file system."""
    from crosslm.errors import ProtocolError

    root = Path(root)
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or len(name.encode("utf-8")) > 200
    ):
        raise ProtocolError(f"file name {name[:80]!r} built from received data is not a plain, short name")
    path = root / name
    if path.resolve().parent != root.resolve():
        raise ProtocolError(f"file name {name[:80]!r} built from received data leaves '{root}'")
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_dir(path: Path, write: Callable[[Path], None]) -> None:
    """Write a whole directory (e.g. `save_pretrained`) into a temp dir, then swap it in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a saved model should be readable like any folder
    try:
        write(tmp)
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            import shutil

            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise


class JsonlWriter:
    """Appends one JSON object per line and flushes it, so a crash loses at most the line being written.

    `keep_lines` (a resumed run) first cuts the file back to that many complete lines, so the events a
    crashed server wrote after its last checkpoint are not left behind twice."""

    def __init__(self, path: Path, keep_lines: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_lines is not None and self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            complete = [ln for ln in lines if ln.endswith("\n")][:keep_lines]
            atomic_write_text(self.path, "".join(complete))
        self.lines = (
            sum(
                1
                for ln in self.path.read_text(encoding="utf-8").splitlines(keepends=True)
                if ln.endswith("\n")
            )
            if self.path.exists()
            else 0
        )
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - long-lived handle

    def write(self, obj: dict[str, Any]) -> None:
        self._f.write(json.dumps(obj, sort_keys=False, default=_jsonable) + "\n")
        self._f.flush()
        self.lines += 1

    def close(self) -> None:
        self._f.close()


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Reads complete lines only (a torn last line from a hard kill is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
