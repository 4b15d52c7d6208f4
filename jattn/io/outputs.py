"""Output folders that never lose a user's file.

Every command writes into one folder (``--out-dir``): ``000.png, 001.png, …`` (one per
output image, in input order), ``grid.png`` where there are several, other named files,
and last ``result.json`` (the arguments, seeds, figures and the list of files written).

Rules (checked before any compute, so a mistake costs nothing):

* the folder must be empty or new; a non-empty folder is refused unless ``overwrite``;
* with ``overwrite``, only jattn's own outputs are replaced: the files that the folder's
  ``result.json`` lists (from an earlier run); any other file that a name of this run would
  replace is refused, and files of the earlier run that this run does not write again are
  removed at the end (no stale outputs mixed in);
* no output may have the path of an input (e.g. ``--image DIR/input.png --out-dir DIR``);
* every file is written to a temporary name and renamed when complete: an interrupted run
  leaves whole files or none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["OutputDir", "OutputDirError", "MANIFEST"]

MANIFEST = "result.json"
_TMP = ".jattn-tmp-"


class OutputDirError(ValueError):
    """The output folder cannot be used as asked (the message names it and the fix)."""


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return repr(x)


class OutputDir:
    """One command's output folder.

    Args:
      path: the folder (created with its parents at the first write, so a run that fails
        before writing leaves nothing behind).
      overwrite: allow a non-empty folder; replace only the files its ``result.json``
        lists.
      inputs: paths the command reads (never written over).
      arg: the option name used in messages.
    Raises:
      OutputDirError: the path is a file, cannot be created or written, is not empty
        (without ``overwrite``).
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike | None] = (), arg: str = "--out-dir"):
        self.arg = arg
        self.root = Path(path).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise OutputDirError(f"{arg} {str(path)!r} is a file, not a folder; choose a "
                                 "folder path (it is created if missing).")
        self._probe_writable(path)
        self.inputs = {Path(p).expanduser().resolve() for p in inputs if p}
        entries = sorted(p.name for p in self.root.iterdir()
                         if not p.name.startswith(_TMP)) if self.root.is_dir() else []
        self.previous: set[str] = self._previous_files()
        if entries and not overwrite:
            shown = ", ".join(entries[:4]) + (", …" if len(entries) > 4 else "")
            raise OutputDirError(
                f"{arg} {str(path)!r} is not empty (holds {shown}); choose an empty or new "
                f"folder, or pass --overwrite to replace jattn's own outputs there (the files "
                f"its {MANIFEST} lists; other files are kept).")
        self.written: list[str] = []
        self._reserved: set[str] = set()

    def _probe_writable(self, path) -> None:
        """Create (then remove) a probe file, and the folders that do not exist yet: a
        read-only location fails here, before any compute; a new folder is created for real
        only at the first write, so a run that fails early leaves nothing behind."""
        created = []
        d = self.root.absolute()
        while not d.exists():
            created.append(d)
            d = d.parent
        if not d.is_dir():
            raise OutputDirError(f"{self.arg} {str(path)!r}: {d} is a file, so the folder cannot "
                                 "be created there; choose another location.")
        try:
            for c in reversed(created):
                c.mkdir()
            probe = self.root / f"{_TMP}probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise OutputDirError(f"{self.arg} {str(path)!r}: cannot write there "
                                 f"({e.strerror or e}); choose a writable folder.") from None
        finally:
            for c in created:
                try:
                    c.rmdir()
                except OSError:
                    pass

    def _previous_files(self) -> set[str]:
        f = self.root / MANIFEST
        if not f.is_file():
            return set()
        try:
            files = json.loads(f.read_text()).get("files", [])
        except (OSError, ValueError, AttributeError):
            return set()  # not jattn's result.json: nothing counts as ours
        ok = {str(x) for x in files if isinstance(x, str) and ".." not in Path(x).parts
              and not Path(x).is_absolute()}
        return ok | {MANIFEST} if ok else set()

    def reserve(self, *names: str) -> None:
        """Check, before any compute, that ``names`` (relative paths) may be written.

        Raises:
          OutputDirError: a name is an input's path, or an existing file jattn did not
            write (not in the folder's earlier ``result.json``), or a folder.
        """
        for name in names:
            p = self.root / name
            if p.resolve() in self.inputs:
                raise OutputDirError(
                    f"{self.arg} {str(self.root)!r}: this command writes {name}, which is one "
                    f"of its inputs ({p}); choose another {self.arg}.")
            if p.is_dir():
                raise OutputDirError(f"{p} is a folder; this command writes a file of that "
                                     f"name: choose another {self.arg}.")
            if p.exists() and name not in self.previous:
                raise OutputDirError(
                    f"{p} exists and was not written by jattn (no {MANIFEST} there lists it); "
                    f"move it or choose another {self.arg} — jattn never replaces your files.")
            self._reserved.add(name)

    def path(self, name: str) -> Path:
        return self.root / name

    def write(self, name: str, writer: Callable[[IO[bytes]], Any]) -> Path:
        """Write ``name`` atomically: ``writer(binary file object)`` fills a temporary file
        that is renamed to ``name`` when complete."""
        if name not in self._reserved:
            self.reserve(name)
        final = self.root / name
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{_TMP}{final.name}"
        try:
            with open(tmp, "wb") as fh:
                writer(fh)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        if name not in self.written:
            self.written.append(name)
        return final

    def image(self, name: str, image: Any) -> Path:
        """A PIL image or uint8 ``(H, W, 3)`` array as PNG."""
        from PIL import Image

        img = image if isinstance(image, Image.Image) else Image.fromarray(
            np.asarray(image, np.uint8))
        return self.write(name, lambda fh: img.save(fh, format="PNG"))

    def images(self, images: Iterable[Any], start: int = 0) -> list[Path]:
        """``000.png, 001.png, …`` in order."""
        return [self.image(f"{start + i:03d}.png", im) for i, im in enumerate(images)]

    @staticmethod
    def image_names(n: int, start: int = 0) -> list[str]:
        return [f"{start + i:03d}.png" for i in range(n)]

    def finish(self, result: dict) -> Path:
        """Write ``result.json`` (``result`` + the list of files) and remove the earlier
        run's files that this run did not write again."""
        files = sorted(self.written) + [MANIFEST]
        body = dict(_jsonable(result), files=files)
        path = self.write(MANIFEST, lambda fh: fh.write(
            (json.dumps(body, indent=2, sort_keys=False) + "\n").encode()))
        for name in sorted(self.previous - set(files)):
            stale = self.root / name
            if stale.is_file() and stale.resolve() not in self.inputs:
                stale.unlink()
                parent = stale.parent
                while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()
                    parent = parent.parent
        return path
