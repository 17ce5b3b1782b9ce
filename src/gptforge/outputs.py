"""Where a verb may write, and what a failure while writing leaves behind: the one policy every verb follows.

- An output path that is an existing file, or that is (or holds, or sits inside) one of the verb's inputs, is
  refused before any work.
- An existing non-empty folder is refused unless the user asked to replace it (`--overwrite`) AND it is an
  artifact of the same kind that gptforge wrote, recognised by its own files. Nothing else is ever deleted.
- Writes go to a hidden temporary sibling that is renamed into place at the end, so a crash or a full disk leaves
  the previous state. Any exception while writing (OSError, torch's RuntimeError, safetensors' SafetensorError)
  removes the temporary folder and becomes one line: what, where, the space it needed when known, the fix.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gptforge.errors import GptforgeError


def _is_checkpoint(p: Path) -> bool:
    return (p / "config.yaml").is_file() and ((p / "model.safetensors").is_file() or (p / "dcp").is_dir())


def _is_data(p: Path) -> bool:
    return (p / "meta.json").is_file() and (p / "tokenizer.json").is_file()


def _is_hf(p: Path) -> bool:
    return (p / "config.json").is_file() and (p / "tokenizer.json").is_file() and (
        (p / "model.safetensors").is_file() or (p / "pytorch_model.bin").is_file())


def _is_run(p: Path) -> bool:
    ckpts = p / "checkpoints"
    has_ckpts = ckpts.is_dir() and ((ckpts / "latest").is_file() or any(q.is_dir() for q in ckpts.glob("step-*")))
    return has_ckpts or ((p / "config.yaml").is_file() and (p / "metrics.jsonl").is_file())


def _is_report(p: Path) -> bool:
    return (p / "index.html").is_file() and any(p.glob("*.png"))


def _is_curated(p: Path) -> bool:
    return (p / "meta.json").is_file() and (p / "report.json").is_file()


def _is_demo(p: Path) -> bool:
    return _is_data(p / "data") or _is_run(p / "run")


# kind -> (how a message names it, the files that recognise it, the test)
KINDS: dict[str, tuple[str, str, Callable[[Path], bool]]] = {
    "checkpoint": ("a checkpoint folder", "model.safetensors (or dcp/) and config.yaml", _is_checkpoint),
    "data": ("a prepared-data folder", "meta.json and tokenizer.json", _is_data),
    "hf": ("a Hugging Face export", "config.json, model.safetensors and tokenizer.json", _is_hf),
    "run": ("a run directory", "checkpoints/step-N, or config.yaml and metrics.jsonl", _is_run),
    "report": ("a report folder", "index.html and PNG plots", _is_report),
    "demo": ("a demo folder", "data/meta.json or run/checkpoints", _is_demo),
    "curated": ("a curated-corpus folder", "meta.json and report.json", _is_curated),
}


def is_artifact(path: str | Path, kind: str) -> bool:
    """True if `path` is a folder gptforge wrote as `kind` (see KINDS)."""
    return Path(path).is_dir() and KINDS[kind][2](Path(path))


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_creatable(out: Path) -> None:
    """Raise unless a folder can be created at `out`: every existing ancestor is a folder and the nearest one
    takes a new entry (tried for real, with a probe this function creates and removes)."""
    base = _nearest_existing(out.parent)  # the output is written beside itself and renamed into place
    if not base.is_dir():
        raise GptforgeError(f"cannot write {out}: {base} is a file, not a folder; choose another --out")
    probe = base / f".gptforge-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise GptforgeError(f"cannot write to {base} ({e.strerror or e}); choose another --out") from None


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_not_input(out: Path, inputs: Iterable[str | Path | None], *, inside_input_ok: bool = False,
                    option: str = "--out") -> None:
    """Refuse an output that is one of the inputs, holds one, or (unless `inside_input_ok`) sits inside one."""
    resolved = Path(out).resolve()
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).resolve()
        if _related(resolved, src) and not (inside_input_ok and src in resolved.parents):
            how = "is" if resolved == src else ("holds" if resolved in src.parents else "is inside")
            raise GptforgeError(f"{option} {out} {how} the input {inp}; write to a separate folder")


def check_out(out: str | Path, kind: str, *, overwrite: bool = False, inputs: Iterable[str | Path] = (),
              inside_input_ok: bool = False, flag: str = "--overwrite", option: str = "--out") -> Path:
    """Refuse an output path that would lose anything, before any work is done; return it as a Path.

    `kind` names what the verb writes (KINDS); `inputs` are the paths it reads; `flag` is what the message
    offers for replacing an earlier output (train offers --resume auto). `inside_input_ok` lets an output sit
    inside an input (report's default RUN/report), never be it or hold it.
    """
    out = Path(out)
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise GptforgeError(f"{option} {out} is an existing file; give a folder path that does not exist yet")
    check_not_input(out, inputs, inside_input_ok=inside_input_ok, option=option)
    if out.is_dir() and any(out.iterdir()):
        name, files, test = KINDS[kind]
        if not overwrite:
            raise GptforgeError(f"{option} {out} already exists and is not empty; choose a new {option}, or add "
                                f"{flag} to replace {name} that gptforge wrote there")
        if not test(out):
            raise GptforgeError(f"{option} {out} is not {name} that gptforge wrote (no {files}), so {flag} will not "
                                f"replace it; choose a new {option}")
    check_creatable(out)
    return out


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (0 if it is gone)."""
    try:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def write_error(what: str, dest: Path, error: BaseException, *, written: int = 0, need: int | None = None,
                fix: str = "choose another --out", state: str = "nothing there was changed") -> GptforgeError:
    """One line for an exception raised while writing `what` to `dest`."""
    reason = (getattr(error, "strerror", None) or str(error) or type(error).__name__).splitlines()[0].strip()
    try:
        free = shutil.disk_usage(_nearest_existing(dest.parent)).free
    except OSError:
        free = None
    text = str(error).lower()
    # torch.save reports a full disk as "unexpected pos" and safetensors as StorageFull: also ask the disk
    full = (getattr(error, "errno", None) == errno.ENOSPC or any(w in text for w in ("no space", "storagefull", "disk full"))
            or (free is not None and free < max(written, 1 << 20)))
    space = ""
    if full:
        parts = []
        if need is not None:
            parts.append(f"it needs about {need / 1e6:.1f} MB")
        elif written:
            parts.append(f"{written / 1e6:.1f} MB written when it ran out")
        if free is not None:
            parts.append(f"{free / 1e6:.1f} MB free there")
        space = f" (the disk is full: {', '.join(parts)})" if parts else " (the disk is full)"
        fix = "free some space or " + fix
    return GptforgeError(f"could not write {what} to {dest}: {type(error).__name__}: {reason}{space}; {state}; {fix}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")) + [path]:
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
        else:
            fsync_dir(p)


def temp_path(dest: Path) -> Path:
    """The hidden sibling a write to `dest` goes to first."""
    return dest.parent / f".tmp-{dest.name}"


def publish(tmp: Path, dest: Path) -> None:
    """Move a finished temporary folder into place. An existing `dest` (one check_out allowed replacing, or a
    checkpoint re-saved at the same step) is moved aside first and dropped only once the new one is in."""
    if dest.exists():
        old = dest.parent / f".old-{dest.name}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old)
    else:
        os.rename(tmp, dest)
    fsync_dir(dest.parent)


@contextmanager
def staged(dest: str | Path, what: str, *, need: int | None = None, fix: str = "choose another --out") -> Iterator[Path]:
    """Write `what` into the yielded temporary folder; on success it replaces `dest`. Any exception inside
    removes the temporary folder (and parent folders this created) and is raised as one GptforgeError line;
    a GptforgeError or Ctrl-C from inside passes through unchanged after the cleanup."""
    dest = Path(dest)
    tmp = temp_path(dest)
    created = _nearest_existing(dest.parent)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a process killed mid-write: ours by its name
            shutil.rmtree(tmp)
        tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        publish(tmp, dest)
    except BaseException as e:
        written = tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty_parents(dest.parent, created)
        if isinstance(e, (GptforgeError, KeyboardInterrupt, SystemExit)):
            raise
        raise write_error(what, dest, e, written=written, need=need, fix=fix) from None


def _remove_empty_parents(p: Path, keep: Path) -> None:
    """Remove the empty folders from `p` up to (not including) `keep`: the ones a failed write created."""
    while p != keep and keep in p.parents:
        try:
            p.rmdir()
        except OSError:
            return
        p = p.parent


# --- single-file outputs (export-gguf): the same policy for a verb that writes one file -----------------------

def check_out_file(out: str | Path, what: str, ours: Callable[[Path], bool], *, overwrite: bool = False,
                   inputs: Iterable[str | Path] = (), flag: str = "--overwrite", option: str = "--out") -> Path:
    """check_out for a verb whose output is one file: a folder, or one of the inputs, is refused; an existing file
    only with `overwrite` and only when `ours(path)` says gptforge wrote it as `what`."""
    out = Path(out)
    if out.is_dir():
        raise GptforgeError(f"{option} {out} is a folder; give the path of the {what} to write")
    check_not_input(out, inputs, option=option)
    if out.exists():
        if not overwrite:
            raise GptforgeError(f"{option} {out} already exists; choose a new {option}, or add {flag} to replace "
                                f"{what} that gptforge wrote there")
        if not ours(out):
            raise GptforgeError(f"{option} {out} is not {what} that gptforge wrote, so {flag} will not replace it; "
                                f"choose a new {option}")
    check_creatable(out)
    return out


@contextmanager
def staged_file(dest: str | Path, what: str, *, need: int | None = None,
                fix: str = "choose another --out") -> Iterator[Path]:
    """staged() for one file: write `what` to the yielded hidden sibling path; on success it is fsynced and renamed
    over `dest` (os.replace: a reader sees the old file or the new one, never a part). Any exception inside removes
    the partial file and becomes one GptforgeError line, as in staged()."""
    dest = Path(dest)
    tmp = temp_path(dest)
    created = _nearest_existing(dest.parent)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # left by a process killed mid-write: ours by its name
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException as e:
        written = tmp.stat().st_size if tmp.is_file() else 0
        tmp.unlink(missing_ok=True)
        _remove_empty_parents(dest.parent, created)
        if isinstance(e, (GptforgeError, KeyboardInterrupt, SystemExit)):
            raise
        raise write_error(what, dest, e, written=written, need=need, fix=fix) from None
