"""Command-line glue: bad configuration and bad input end in one line and exit code 2.

Hydra composes each run's config once. ``RunGuard``, a Hydra callback named in the command's
YAML (``hydra.callbacks``), then checks it before the run dir is made or written: every value
against its schema (``scsa.training.schema``), that the run dir can be created, and (train.py)
that no other run holds it (``scsa.training.rundir``). Hydra's own errors (an override that does
not parse, an option that does not exist) are raised to ``hydra_entry_point`` (Hydra's
documented ``HYDRA_FULL_ERROR``) and reduced to one line there.
"""
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from hydra.errors import HydraException, MissingConfigException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from scsa.training.config import CONFIG_DIR
from scsa.training.preemption import Preempted
from scsa.training.rundir import RunDirLock, holds_lock
from scsa.training.schema import COMMANDS, fields_at, unknown_key
from scsa.training.schema import check_config
from scsa.errors import EXIT_PREEMPTED, UserError, exit_on_user_error, fail

__all__ = ["CONFIG_DIR", "RunGuard", "check_run_dir", "hydra_entry_point", "run_task"]


def check_run_dir(run_dir: Path) -> None:
    """Hydra creates the run dir before the task starts: make sure it can."""
    existing = next(p for p in (run_dir.absolute(), *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"run dir '{run_dir}' cannot be created ('{existing}' is not a writable folder): "
                        f"pass hydra.run.dir=<a writable folder>")


class RunGuard(Callback):
    """Checks a run's config and claims its run dir before Hydra writes anything there.

    Hydra turns a callback's exceptions into warnings, so a refusal ends the program here (``fail``).
    """

    def __init__(self, command: str, lock: bool = False):
        self.command, self.lock = command, lock
        self.held: Optional[RunDirLock] = None

    def _claim(self, config: DictConfig, run_dir_key: str) -> None:
        try:
            check_config(config, self.command)
            run_dir = Path(OmegaConf.select(config, run_dir_key))
            check_run_dir(run_dir)
            if self.lock and holds_lock() and (self.held is None or self.held.run_dir != run_dir):
                self.held = RunDirLock(run_dir)
        except UserError as e:
            fail(str(e))
        except OmegaConfBaseException as e:  # a value that does not resolve (e.g. attention.name=nope)
            fail(f"{str(e).strip().splitlines()[0]} (check the overrides against `python {self.command}.py --help`)")

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._claim(config, "hydra.run.dir")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:  # each job of a sweep, in its own dir
            self._claim(config, "hydra.runtime.output_dir")

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN and self.held is not None:
            self.held.release()
            self.held = None


@exit_on_user_error
def run_task(task: Callable[[], object]) -> None:
    """Run the body of a Hydra task, reducing user errors to one line and exit 2."""
    try:
        task()
    except Preempted as e:
        preempted(e)
    except OmegaConfBaseException as e:
        fail(f"{str(e).strip().splitlines()[0]}: set it on the command line, e.g. data.root=/path/to/data")


def preempted(e: Preempted) -> None:
    print(f"preempted: {e}; run the same command again to resume", file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)


def hydra_error(e: Exception, command: str) -> str:
    """One line for an error Hydra raised while composing: what is wrong, and the way on."""
    cause = e.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:  # key.that_is_not_there=value
        parent = cause.full_key.rpartition(".")[0]
        return str(unknown_key(cause.full_key, fields_at(COMMANDS[command], tuple(filter(None, parent.split(".")))),
                               command))
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, MissingConfigException) and e.options:
        return f"{first}: use one of {', '.join(sorted(e.options))}"
    where = f"cannot parse override '{e.override}': " if getattr(e, "override", None) else ""
    return f"{where}{first} (check the override against `python {command}.py --help`)"


def expand_shorthands(argv: List[str], shorthands: Dict[str, str]) -> List[str]:
    """Rewrite ``KEY=VALUE`` to ``shorthands[KEY]=VALUE`` (``compare=DIR`` -> ``compare.dir=DIR``).

    A Hydra key is either a value or a group of keys. ``compare`` and ``cam`` have settings of
    their own (``compare.throughput=false``), so they are groups, and the bare form that
    commands already use names the group's main key.
    """
    expanded = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        expanded.append(f"{shorthands[key]}={value}" if sep and key in shorthands else arg)
    return expanded


def hydra_entry_point(main: Callable[[], None], command: str, shorthands: Optional[Dict[str, str]] = None) -> None:
    """Run the Hydra app ``main``: its composition errors, and the RunGuard's, end in one line and exit 2."""
    sys.argv[1:] = expand_shorthands(sys.argv[1:], shorthands or {})
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises rather than prints: one line below, not a stack
    try:
        main()
    except UserError as e:
        fail(str(e))
    except Preempted as e:
        preempted(e)
    except (HydraException, OmegaConfBaseException) as e:
        fail(hydra_error(e, command))
