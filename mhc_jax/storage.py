"""Local folders or buckets (gs://... on a TPU pod): workdirs, prepared data folders and their sources.

Every such path goes through `path()`, an etils.epath.Path (the path type orbax uses), never
through pathlib, which would turn gs://bucket/run into the local folder gs:/bucket/run. A bucket
needs its filesystem packages (gcsfs and google-cloud-storage, in requirements.txt) and
credentials (gcloud auth application-default login). Who talks to the bucket:
  gcsfs (through epath)       every file of ours: configs, metrics, manifests, tokenizers, sources
  TensorStore (through orbax) the checkpoints' arrays
  ArrayRecord's own reader    the token shards, read in place while training
For a storage server other than Google's (an emulator), gcsfs reads STORAGE_EMULATOR_HOST,
TensorStore TENSORSTORE_GCS_HTTP_URL and ArrayRecord CLOUD_STORAGE_EMULATOR_ENDPOINT.

A bucket has no rename and no append: a file is written whole (`write_whole`), a folder is
finished by copying (mhc_jax/data/prepare.py).
"""

import logging
import os
import shutil
import tempfile
from pathlib import Path

from etils import epath

from mhc_jax.errors import UserError

COPY_CHUNK = 8 << 20  # bytes per read when a file is copied into a bucket


def is_remote(location) -> bool:
    return "://" in str(location)


def path(location) -> epath.Path:
    """A bucket path as given, a local one made absolute."""
    return epath.Path(location) if is_remote(location) else epath.Path(location).absolute()


def check_reachable(location, flag: str) -> None:
    """UserError naming `flag` when `location`'s filesystem or bucket cannot be used."""
    try:
        with quiet_client_logs():
            path(location).exists()
            if is_remote(location):
                scheme, rest = str(location).split("://", 1)
                if not epath.Path(f"{scheme}://{rest.split('/')[0]}").exists():
                    raise FileNotFoundError(f"no bucket {rest.split('/')[0]}, or no permission to see it")
    except (ImportError, OSError, ValueError, NotImplementedError) as e:
        raise UserError(f"{flag}: cannot reach {location} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); gs:// paths need an existing bucket, "
                        "`pip install gcsfs google-cloud-storage` and credentials "
                        "(gcloud auth application-default login)") from None


class quiet_client_logs:
    """While a bucket is probed: gcsfs's tracebacks of its retries stay out of the log (the caller
    reports the failure in one line)."""

    def __enter__(self):
        self.logger = logging.getLogger("gcsfs")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def write_whole(file: epath.Path, text: str) -> None:
    """A reader sees the old file or the new one, never half of one: locally through a temporary
    file renamed into place; a bucket's object is replaced whole by its upload."""
    if is_remote(file):
        file.write_text(text)
        return
    temporary = file.with_name(f".{file.name}.{os.getpid()}.partial")
    temporary.write_text(text)
    os.replace(temporary, file)


def copy_file(source, destination: epath.Path) -> None:
    """A file into a folder or bucket, streamed (a bucket to itself: copied by the server)."""
    source = epath.Path(source)
    if is_remote(source) and is_remote(destination):
        source.copy(destination, overwrite=True)
        return
    with source.open("rb") as read, destination.open("wb") as write:
        shutil.copyfileobj(read, write, COPY_CHUNK)


def remove(location: epath.Path) -> None:
    """A file or a folder and everything in it; nothing if it is not there."""
    if location.is_dir():
        location.rmtree()
    elif location.exists():
        location.unlink()


def stamp(file) -> list:
    """What tells a changed file: its size and modification time."""
    if is_remote(file):
        status = epath.Path(file).stat()
        return [status.length, status.mtime]
    status = os.stat(file)
    return [status.st_size, status.st_mtime_ns]


def local_copy(file: epath.Path, companions: tuple[str, ...] = ()) -> Path:
    """A local copy of a file (with the named files beside it that exist), for libraries that open
    files by local name (tokenizers); a local file is its own copy."""
    if not is_remote(file):
        return Path(file)
    folder = Path(tempfile.mkdtemp(prefix="mhc-jax-"))
    for name in (file.name, *companions):
        if (file.parent / name).exists():
            (folder / name).write_bytes((file.parent / name).read_bytes())
    return folder / file.name
