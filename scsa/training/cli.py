"""Command-line glue: bad configuration and bad input end in one line and exit code 2.

Hydra reports a bad override with a multi-line message and exit code 1, so the overrides
are composed once up front and any error is reduced to its first line.
"""
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from omegaconf.errors import OmegaConfBaseException

from scsa.training.preemption import Preempted
from scsa.errors import EXIT_PREEMPTED, exit_on_user_error, fail

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


def check_overrides(config_name: str, argv: List[str]) -> None:
    """Compose the config the way Hydra will; exit 2 with one line if it does not compose."""
    args, _ = get_args_parser().parse_known_args(argv)
    if args.multirun or args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return  # Hydra handles these itself (a sweep's overrides only compose one point at a time)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=args.config_name or config_name, overrides=args.overrides,
                          return_hydra_config=True)
    except Exception as e:  # Hydra's composition errors have no common base class
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"cannot parse override '{e.override}': " if getattr(e, "override", None) else ""
        fail(f"{where}{first} (check the override against `python {Path(sys.argv[0]).name} --help`)")
    finally:
        GlobalHydra.instance().clear()
    check_run_dir(Path(cfg.hydra.run.dir))


def check_run_dir(run_dir: Path) -> None:
    """Hydra creates the run dir before the task starts: make sure it can."""
    existing = next(p for p in (run_dir.absolute(), *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        fail(f"run dir '{run_dir}' cannot be created ('{existing}' is not a writable folder): "
             f"pass hydra.run.dir=<a writable folder>")


@exit_on_user_error
def run_task(task: Callable[[], object]) -> None:
    """Run the body of a Hydra task, reducing user errors to one line and exit 2."""
    try:
        task()
    except Preempted as e:
        print(f"preempted: {e}; run the same command again to resume", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except OmegaConfBaseException as e:
        fail(f"{str(e).strip().splitlines()[0]}: set it on the command line, e.g. data.root=/path/to/data")


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


def hydra_entry_point(main: Callable[[], None], config_name: str, shorthands: Optional[Dict[str, str]] = None) -> None:
    """Compose the overrides up front (one-line errors), then run the Hydra app ``main``."""
    sys.argv[1:] = expand_shorthands(sys.argv[1:], shorthands or {})
    check_overrides(config_name, sys.argv[1:])
    main()
