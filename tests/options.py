"""What the tests parametrise over, read from the registries and conf/: no hand-written lists."""
from pathlib import Path
from typing import List

from scsa.attention import attention_spec, list_attentions

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


def config_options(group: str) -> List[str]:
    """The options of a config group (``conf/<group>/*.yaml``)."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def packaged_attentions() -> List[str]:
    """The registered attentions that ship with the package (each a ``conf/attention`` option)."""
    return [a for a in list_attentions() if attention_spec(a).cls.__module__.startswith("scsa.")]


def attention_options() -> List[str]:
    """``attention=`` options that name a registered module (``custom`` names a class instead)."""
    return [a for a in config_options("attention") if a != "custom"]


def modules() -> List[str]:
    """Every registered attention module (not ``none``), the test-only one included."""
    return [a for a in list_attentions() if a != "none"]
