"""Command-line plumbing shared by train.py, eval.py and scripts/: the --config flag and the
user-error contract (one line on stderr naming the field or file and the fix, exit code 2)."""

import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mhc_jax import host_memory, model
from mhc_jax.errors import UserError


def define_config_flag() -> flags.FlagHolder:
    """--config=configs/pretrain.py:<variant>,<scale>, for the scripts that take a config."""
    return config_flags.DEFINE_config_file(
        "config", None, "configs/pretrain.py:<variant>,<scale>, e.g. configs/pretrain.py:mhc,10m")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
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
    except OVERRIDE_ERRORS as e:
        fail(override_error_line(e, argv))


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

    app.run(guarded, flags_parser=_parse_flags)


def config_spec(config_flag: flags.FlagHolder) -> str:
    """'<variant>,<scale>' of --config=configs/pretrain.py:<variant>,<scale>."""
    return config_flags.get_config_filename(flags.FLAGS[config_flag.name]).partition(":")[2]


def load_config(config_flag: flags.FlagHolder):
    """The --config ConfigDict with overrides applied, checked; UserError if it cannot work."""
    config = config_flag.value
    if config is None:
        raise UserError("--config: required, e.g. --config=configs/pretrain.py:mhc,debug")
    try:
        model_config = config.model
    except OSError:  # config_flags reports an unreadable file on first access
        path = config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]
        raise UserError(f"--config: cannot read the config file {path!r}; "
                        "expected e.g. --config=configs/pretrain.py:mhc,debug") from None
    model.check_config(model_config)
    return config
