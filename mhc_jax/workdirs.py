"""Workdirs are local folders or bucket paths (gs://... on a TPU pod): every workdir path goes through
`path()`, an etils.epath.Path (the path type orbax uses), never through pathlib, which would turn
gs://bucket/run into the local folder gs:/bucket/run. A bucket needs its filesystem packages (gcsfs
and google-cloud-storage for gs://, which orbax uses too) and credentials; the data folder stays
local to each host.
"""

import tempfile
from pathlib import Path

from etils import epath

from mhc_jax.errors import UserError


def is_remote(workdir) -> bool:
    return "://" in str(workdir)


def path(workdir) -> epath.Path:
    """The workdir as orbax takes it: a bucket path as given, a local one made absolute."""
    return epath.Path(workdir) if is_remote(workdir) else epath.Path(workdir).absolute()


def check_reachable(workdir, flag: str) -> None:
    """UserError naming `flag` when the workdir's filesystem cannot be used (e.g. gs:// without gcsfs)."""
    try:
        path(workdir).exists()
    except (ImportError, OSError, ValueError, NotImplementedError) as e:
        raise UserError(f"{flag}: cannot reach {workdir} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        "gs:// paths need `pip install gcsfs google-cloud-storage` and credentials "
                        "(gcloud auth application-default login)") from None


def local_copy(file: epath.Path) -> Path:
    """A local copy of a workdir file, for libraries that open files by local name (tokenizers)."""
    copy = Path(tempfile.mkdtemp(prefix="mhc-jax-")) / file.name
    copy.write_bytes(file.read_bytes())
    return copy
