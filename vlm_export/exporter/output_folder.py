"""Where an export is written, and the guarantees around it: nothing a user owns is replaced, nothing half-written
is left behind, and leftovers of killed runs are swept.

An export is staged in a hidden folder beside the output (`.NAME.partial-PID-XXXX`) and moved into place only when
complete. `--overwrite` replaces only what an earlier export wrote: a folder with a vlm-export manifest and no
file the manifest does not account for, never the model folder, a folder that contains it or the current
directory. The staging folder carries the pid of the process that made it, so a later export removes the ones
whose process is gone (a SIGKILL cannot be cleaned up in-process; at real model sizes they hold gigabytes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlm_export.errors import ExportError
from vlm_export.verification.golden import REPORT_FILES

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
#: Files an export writes besides those its manifest names: the model's configs, copied verbatim (assets.py),
#: TensorRT's timing cache (engines.py) and the graphs' external weights (`<graph>.onnx.data`); the verify
#: commands' reports (`REPORT_FILES`) are an export's too.
EXPORT_SIDE_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "config.json",
    "timing.cache",
)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _existing_chain(path: Path) -> Iterator[Path]:
    """`path` (when it exists) and every ancestor, nearest first."""
    yield from (p for p in (path, *path.parents) if p.exists())


def _contains(outer: Path, inner: Path) -> bool:
    """True when `inner` is `outer` or lies inside it, compared by file identity (so case-insensitive file
    systems, symlinks and bind mounts cannot hide the overlap)."""
    target = _identity(outer)
    return target is not None and any(_identity(p) == target for p in _existing_chain(inner))


def check_output_location(output: Path, model_dir: Path | None) -> None:
    """Refuse an --output that overlaps what must survive the export: the model folder, the current directory."""
    if model_dir is not None and (_contains(output, model_dir) or _contains(model_dir, output)):
        relation = "is" if _identity(output) == _identity(model_dir) else "overlaps"
        raise ExportError(
            f"--output {output} {relation} the model folder {model_dir}; choose an output folder outside the model"
        )
    if _contains(output, Path.cwd()):
        raise ExportError(f"--output {output} contains the current directory; choose a folder beside or below it")


def _manifest_paths(value: Any) -> Iterator[str]:
    """Every string in a manifest (file names hide in several sections: graphs, files, engines, ...)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _manifest_paths(item)
    elif isinstance(value, list):
        for item in value:
            yield from _manifest_paths(item)


def foreign_files(folder: Path) -> list[str] | None:
    """Files in `folder` an export did not write, or None when `folder` holds no vlm-export manifest."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not {"schema_version", "family", "graphs"} <= manifest.keys():
        return None
    known = {MANIFEST_NAME, *EXPORT_SIDE_FILES, *REPORT_FILES}
    for text in _manifest_paths(manifest):
        known.update({text, f"{text}.data"})
    foreign = []
    for root, dirs, names in os.walk(folder):
        for name in [*names, *(d for d in dirs if Path(root, d).is_symlink())]:
            relative = Path(root, name).relative_to(folder).as_posix()
            if relative not in known:
                foreign.append(relative)
    return sorted(foreign)


def check_replaceable(output: Path) -> None:
    """--overwrite: refuse unless `output` is an earlier export holding nothing else."""
    if output.is_symlink() or not output.is_dir():
        kind = "a symbolic link" if output.is_symlink() else "a file"
        raise ExportError(f"--output {output} is {kind}; --overwrite replaces only a folder an earlier export wrote")
    foreign = foreign_files(output)
    if foreign is None:
        raise ExportError(
            f"--output {output} exists and is not a vlm-export output (no manifest.json); --overwrite replaces "
            "only earlier exports: choose another --output or remove the folder yourself"
        )
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ExportError(
            f"--output {output} holds files vlm-export did not write ({shown}); move them away or choose another "
            "--output (--overwrite would delete them)"
        )


STAGING_PATTERN = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def sweep_stale_staging(output: Path) -> None:
    """Remove the staging/trash folders of earlier exports to `output` whose process is gone."""
    parent = output.parent
    if not parent.is_dir():
        return
    prefixes = (f".{output.name}.partial-", f".{output.name}.old-")
    for entry in parent.iterdir():
        if not entry.name.startswith(prefixes) or not entry.is_dir() or entry.is_symlink():
            continue
        match = STAGING_PATTERN.match(entry.name)
        size = folder_bytes(entry)
        if match is None:  # made by a vlm-export before staging folders carried a pid
            logger.warning(
                "%s (%.1f GB) looks like the leftover of an interrupted export; remove it with: rm -rf '%s'",
                entry,
                size / 1e9,
                entry,
            )
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        logger.info("removed %s (%.1f GB), left by an export (pid %d) that was killed", entry, size / 1e9, pid)


def create_staging(output: Path) -> Path:
    """A new hidden folder beside `output` to write the export into, after sweeping those of killed runs."""
    sweep_stale_staging(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-{os.getpid()}-", dir=output.parent))
    except OSError as error:
        raise ExportError(
            f"cannot write to {output.parent} ({error.strerror or error}); choose an --output where you can write"
        ) from None


def check_output(output: Path, model_dir: Path | None, overwrite: bool) -> None:
    """Refuse an --output the export must not write or replace (before any work is done)."""
    check_output_location(output, model_dir)
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise ExportError(f"{output} already exists; choose another --output or pass --overwrite")
        check_replaceable(output)


def move_into_place(staging: Path, output: Path) -> None:
    """Replace `output` by the complete `staging` folder (the old export, if any, is removed after the swap)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp creates 0700
    if output.exists():
        check_replaceable(output)  # again: files may have been added while the export ran
        trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-{os.getpid()}-", dir=output.parent))
        os.replace(output, trash / output.name)
        os.replace(staging, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, output)
