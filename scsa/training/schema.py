"""Every value of a command's config checked before anything runs: known keys, types, ranges.

One pydantic model per config group (``conf/<group>/``) and one per command (``Train``,
``Evaluate``). A new key is one line in its group's model, e.g. in ``Data``:
``shards: Optional[str] = None``. Open-ended groups check their keys against the code that takes
them: attention ``kwargs`` against the module's ``__init__`` (``scsa.attention``), optimiser
options against timm's optimiser class, schedule options against ``create_scheduler_v2``.
A failure is one ``UserError`` naming the key, the value and, for an unknown key, the closest
valid one.
"""
import difflib
import inspect
from typing import Annotated, Any, Callable, Dict, Iterable, List, Literal, Optional, Tuple, Type

from omegaconf import MISSING, DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from timm.optim import create_optimizer_v2, get_optimizer_info
from timm.scheduler import create_scheduler_v2

from scsa.attention import KERNEL_KWARG, attention_spec, list_attentions
from scsa.errors import UserError
from scsa.models import list_backbones
from scsa.models.factory import import_class

PositiveInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
Amp = Literal["auto", "bf16", "fp16", "none"]


class Group(BaseModel):
    """A config group: a key it does not define is an error."""
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class Model(Group):
    name: str
    drop_rate: Optional[Probability] = None

    @field_validator("name")
    @classmethod
    def known_backbone(cls, name: str) -> str:
        if name not in list_backbones():
            raise ValueError(f"unknown backbone, use one of {', '.join(list_backbones())}")
        return name


class Attention(Group):
    name: str
    cls: Optional[str] = None     # attention=custom: the dotted path of the user's class
    position: Literal["mid", "end"]
    kwargs: Dict[str, Any] = {}

    @model_validator(mode="after")
    def known_attention(self) -> "Attention":
        if self.cls is None and self.name not in list_attentions():
            raise ValueError(f"unknown attention '{self.name}', use one of {', '.join(list_attentions())} "
                             f"or attention=custom attention.cls=<package.module.Class>")
        return self

    def module_class(self) -> Callable:
        """The class the attention kwargs go to: the user's (``cls``) or the registered one's."""
        if self.cls is None:
            return attention_spec(self.name).cls
        if self.cls == MISSING:
            raise UserError("attention=custom needs attention.cls=<package.module.Class> (its package on PYTHONPATH)")
        try:
            return import_class(self.cls)
        except ValueError as e:
            raise UserError(f"attention.cls: {e}") from None


class Data(Group):
    name: str
    root: str
    loader: Literal["auto", "dali", "torch"]
    batch_size: PositiveInt
    workers: Count
    image_size: PositiveInt
    val_resize: PositiveInt
    scale: Tuple[Probability, Probability]
    ratio: Tuple[Positive, Positive]
    hflip: Probability
    mean: Tuple[float, float, float]
    std: Tuple[Positive, Positive, Positive]
    randaugment_n: Count
    randaugment_m: NonNegative
    re_prob: Probability


class Optim(Group):
    """Keys beyond these are the optimiser's own arguments (momentum, betas, ...): checked against it."""
    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True)
    name: str
    opt: str
    lr: Optional[Positive] = None
    lr_base: Positive
    lr_base_size: PositiveInt
    weight_decay: NonNegative
    filter_bias_and_bn: bool


class Schedule(Group):
    """Keys beyond these are ``create_scheduler_v2``'s own arguments: checked against it."""
    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True)
    name: str
    sched: str
    warmup_epochs: NonNegative = 0
    warmup_lr: NonNegative = 0
    min_lr: NonNegative = 0
    step_on_epochs: bool = True
    decay_milestones: Optional[List[Count]] = None
    decay_epochs: Optional[Positive] = None
    decay_rate: Optional[Positive] = None


class Trainer(Group):
    epochs: PositiveInt
    max_steps: Optional[PositiveInt] = None
    amp: Amp
    channels_last: bool
    compile: bool
    deterministic: bool
    sync_bn: bool
    accum_steps: PositiveInt
    clip_grad: Optional[Positive] = None
    max_nonfinite_steps: PositiveInt
    log_interval: PositiveInt
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    mixup: NonNegative
    cutmix: NonNegative
    mixup_prob: Probability
    mixup_switch_prob: Probability
    model_ema: bool
    model_ema_decay: Probability
    device: str


class Checkpoint(Group):
    every_steps: Count
    every_minutes: NonNegative
    keep_last: Count


class Wandb(Group):
    mode: Literal["offline", "online", "disabled"]
    project: str


class Train(Group):
    """``conf/train.yaml``: what ``train.py`` takes."""
    seed: Count
    resume: str
    model: Model
    attention: Attention
    data: Data
    optim: Optim
    schedule: Schedule
    trainer: Trainer
    checkpoint: Checkpoint
    wandb: Wandb


class Export(Group):
    format: Literal["onnx", "safetensors"]
    out: Optional[str] = None
    opset: Optional[Annotated[int, Field(ge=7)]] = None   # onnx only, as the three below
    dynamic_size: Optional[bool] = None
    verify_batch: Optional[PositiveInt] = None
    atol: Optional[Positive] = None


class Compare(Group):
    dir: Optional[str] = None
    throughput: bool
    batch_size: PositiveInt
    image_size: Optional[PositiveInt] = None
    amp: Amp
    channels_last: bool
    warmup: Count
    steps: PositiveInt
    rounds: PositiveInt


class Cam(Group):
    dir: Optional[str] = None
    checkpoints: List[str] = []
    layer: Optional[str] = None
    gate: bool
    block: Optional[str] = None
    out: Optional[str] = None
    data_root: Optional[str] = None


class Evaluate(Group):
    """``conf/evaluate.yaml``: what ``evaluate.py`` takes."""
    checkpoint: Optional[str] = None
    ema: bool
    throughput: bool
    compare: Compare
    cam: Cam
    images: PositiveInt
    device: str
    amp: Amp
    data: Data
    export: Optional[Export] = None


COMMANDS: Dict[str, Type[Group]] = {"train": Train, "evaluate": Evaluate}


def unknown_key(dotted: str, valid: Iterable[str], command: str) -> UserError:
    """The error for key ``dotted``, naming the key of ``valid`` (its siblings) nearest it (difflib)."""
    parent, _, key = dotted.rpartition(".")
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean '{'.'.join(filter(None, (parent, match[0])))}'?" if match else ""
    return UserError(f"unknown key '{dotted}'{hint} (`python {command}.py --help` lists every key)")


def fields_at(model: Type[BaseModel], loc: Tuple[Any, ...]) -> List[str]:
    """The field names of the group at ``loc`` inside ``model``."""
    for part in loc:
        field = model.model_fields.get(part)
        inner = [a for a in (field.annotation, *getattr(field.annotation, "__args__", ())) if field
                 and inspect.isclass(a) and issubclass(a, BaseModel)]
        if not inner:
            return []
        model = inner[0]
    return list(model.model_fields)


def _explain(error: Dict[str, Any], schema: Type[Group], command: str) -> UserError:
    loc = tuple(error["loc"])
    dotted = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        return unknown_key(dotted, fields_at(schema, loc[:-1]), command)
    if error["type"] == "missing":
        return UserError(f"{dotted} is missing: set it, e.g. {dotted}=<value>")
    value = error.get("input")
    return UserError(f"{dotted}={_show(value)}: {error['msg'][0].lower()}{error['msg'][1:]}: "
                     f"fix it on the command line")


def _show(value: Any) -> str:
    return OmegaConf.to_yaml(value).strip() if isinstance(value, (dict, list)) else str(value)


def check_kwargs(factory: Callable, kwargs: Dict[str, Any], where: str, command: str,
                 also: Iterable[str] = ()) -> None:
    """Each key of ``kwargs`` must be a parameter of ``factory`` (or in ``also``)."""
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    valid = [*(n for n, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL), *also]
    for key in kwargs:
        if key not in valid:
            raise unknown_key(f"{where}.{key}", valid, command)


def check_config(cfg: DictConfig, command: str) -> None:
    """Raise a one-line UserError for the first value of ``cfg`` (minus ``hydra``) its schema refuses."""
    schema = COMMANDS[command]
    values = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True,
                                    throw_on_missing=False)
    try:
        checked = schema.model_validate(values)
    except ValidationError as e:
        raise _explain(e.errors()[0], schema, command) from None
    if isinstance(checked, Train):
        check_kwargs(checked.attention.module_class(), checked.attention.kwargs, "attention.kwargs", command,
                     also=(KERNEL_KWARG,))  # every module is handed it; one without kernels drops it
        try:
            optimizer = get_optimizer_info(checked.optim.opt).opt_class
        except ValueError:
            raise UserError(f"optim.opt={checked.optim.opt}: not one of timm's optimisers: use e.g. momentum, "
                            f"sgd, adamw (timm.optim.list_optimizers())") from None
        check_kwargs(optimizer, checked.optim.model_extra or {}, "optim", command,
                     also=inspect.signature(create_optimizer_v2).parameters)
        check_kwargs(create_scheduler_v2, checked.schedule.model_extra or {}, "schedule", command)
