"""Command-line plumbing shared by train.py, eval.py and scripts/: the --config flag, the flags of
multi-process runs and the user-error contract (one line on stderr naming the field or file and
the fix, exit code 2)."""

import errno
import os
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mhc_jax import config_rules, host_memory, storage
from mhc_jax.errors import UserError


def define_config_flag() -> flags.FlagHolder:
    """--config=configs/pretrain.py:<variant>,<scale>, for the scripts that take a config."""
    return config_flags.DEFINE_config_file(
        "config", None, "configs/pretrain.py:<variant>,<scale>, e.g. configs/pretrain.py:mhc,10m")


def define_process_flags() -> None:
    """--distributed, --coordinator_address, --num_processes, --process_id: how the processes of one
    run (a TPU pod, a GPU cluster, CPU processes on one machine) find each other (`start_processes`)."""
    flags.DEFINE_bool("distributed", False, "start JAX's multi-process runtime, detecting the cluster "
                      "(TPU pod, SLURM, ...) unless the three flags below say otherwise")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs)")
    flags.DEFINE_integer("num_processes", None, "how many processes run this command")
    flags.DEFINE_integer("process_id", None, "this process's index, 0 .. num_processes - 1")


def start_processes() -> None:
    """Joins the run's other processes when the flags of `define_process_flags` ask for it."""
    f = flags.FLAGS
    if not (f.distributed or (f.num_processes or 1) > 1):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over gloo
    try:
        jax.distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
    except ValueError as e:  # no cluster detected and not every flag given
        raise UserError(f"--distributed: no TPU pod or SLURM job found here ({str(e).rstrip('.')}); run it inside one, or give "
                        "--coordinator_address, --num_processes and --process_id") from None


def define_choices(name: str, default: list[str], choices, help: str) -> flags.FlagHolder:
    """A comma-separated list flag whose every item is one of `choices`, checked while the flags are
    parsed (so a bad item is one line naming --<name>, like every other flag error)."""
    holder = flags.DEFINE_list(name, default, f"{help}: any of {', '.join(choices)}")

    def check(values):
        unknown = [value for value in values or () if value not in choices]
        if unknown:
            raise flags.ValidationError(f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
        return True

    flags.register_validator(name, check)
    return holder


def fail(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")  # one write: lines of several processes on one terminal stay whole
    sys.stderr.flush()
    sys.exit(2)


def expect(argv: list[str], *required: tuple[flags.FlagHolder, str]) -> None:
    """No positional arguments, and every (flag, example value) in `required` given."""
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; see --help")
    for flag, example in required:
        if not flag.value:
            fail(f"--{flag.name}: required, e.g. --{flag.name}={example}")


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except UserError as e:
        fail(str(e))
    except OSError:  # config_flags reads the config file while applying --config.* overrides
        fail(config_file_error(argv).args[0])
    except OVERRIDE_ERRORS as e:
        fail(override_error_line(e, argv))


def config_file_error(argv: list[str]) -> UserError:
    given = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    return UserError(f"--config: cannot read the config file {given.split(':')[0]!r}; "
                     "expected e.g. --config=configs/pretrain.py:mhc,debug")


def check_creatable(folder: str, flag: str) -> None:
    """Raises the OSError that creating `folder` would, creating nothing: its nearest existing
    ancestor must be a folder (a bucket path: the UserError naming `flag` of an unreachable bucket).
    For commands that work a long time before they write."""
    if storage.is_remote(folder):
        storage.check_reachable(folder, flag)
        return
    ancestor = os.path.abspath(folder)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), ancestor)


def path_error_line(error: OSError) -> str:
    """One line for a file or folder that could not be created, read or written, naming the flag
    whose path holds it (or is it, or lies beside it)."""
    where, holders = os.path.abspath(error.filename), []
    for name in flags.FLAGS:
        value = flags.FLAGS[name].value
        if isinstance(value, str) and value and "://" not in value:
            path = os.path.abspath(value)
            related = (where == path or where.startswith(path + os.sep) or path.startswith(where + os.sep)
                       or os.path.dirname(where) == os.path.dirname(path))  # or a temporary name beside it
            if related:
                holders.append((len(path), f"--{name}"))
    flag = max(holders)[1] + ": " if holders else ""
    return f"{flag}cannot use {error.filename} ({error.strerror or type(error).__name__}); give a path that can be created and written"


OVERRIDE_ERRORS = (flags.Error, AttributeError, KeyError)  # ml_collections: a bad or unknown --config.a.b


def override_error_line(error: Exception, argv: list[str]) -> str:
    """One line for a bad --config.a.b=value in `argv`."""
    if isinstance(error, flags.Error):
        return _flag_error_line(error)
    name = str(error).strip("\"'")
    given = [a.split("=")[0] for a in argv if a.startswith("--config.") and name in a.split("=")[0]]
    return f"{given[0] if given else '--config.*'}: no config field {name!r} (see configs/pretrain.py for the fields)"


def _flag_error_line(error: flags.Error) -> str:
    """absl's message for a bad --config.a.b override, boiled down to one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    if lines and lines[0].startswith("Unknown command line flag"):
        name = lines[0].split("'")[1] if "'" in lines[0] else lines[0]
        return f"--{name}: no such flag or config field (see configs/pretrain.py for the fields)"
    return f"{lines[0]} {last}" if len(lines) > 1 and last not in lines[0] else last


def run(main) -> None:
    """absl's app.run, with flag and user errors reported as one line and exit code 2, in a process
    whose freed host memory is reused (host_memory.py)."""
    host_memory.reuse_freed_pages()

    def guarded(argv):
        if not flags.FLAGS["verbosity"].present:  # absl would log INFO; keep the console for the progress bar
            absl_logging.set_verbosity(absl_logging.WARNING)
        try:
            return main(argv)
        except UserError as e:
            fail(str(e))
        except OSError as e:
            if e.filename is None:
                raise
            fail(path_error_line(e))

    app.run(guarded, flags_parser=_parse_flags)


def config_spec(config_flag: flags.FlagHolder) -> str:
    """'<variant>,<scale>' of --config=configs/pretrain.py:<variant>,<scale>."""
    return config_flags.get_config_filename(flags.FLAGS[config_flag.name]).partition(":")[2]


def load_config(config_flag: flags.FlagHolder, runnable=lambda config: config):
    """The --config ConfigDict with overrides applied, every field validated
    (config_rules.FIELD_RULES); UserError if it cannot work. A config with placeholders (the stability study's
    train.steps = 0) passes `runnable`, which makes the train config it stands for, to be validated."""
    config = config_flag.value
    if config is None:
        raise UserError("--config: required, e.g. --config=configs/pretrain.py:mhc,debug")
    try:
        config.model
    except OSError:
        raise config_file_error(sys.argv) from None
    config_rules.validate(runnable(config))
    return config
