"""One run's configuration, defined once: every flag of train.py, its range, its value in each
preset recipe, and what --resume may change.

A run is five small dataclasses, one per concern:
    data.Data               what it trains on: --dataset, --data-fraction, --img-size ...
    Model                   which network of Table 1, resized, with the paper's ablations
    Recipe                  the optimisation: epochs, batch, the lr and its schedule, regularisation
    augment.Augmentation    DeiT's augmentation
    Runtime                 how and where this command runs it: device, threads, folders, --resume ...
Each field is the flag of the same name (`--batch-size` is recipe.batch_size), declared once with
cli.flag: its help, its range, its value in each preset, and its role (cli.RUN: it defines the
run; cli.HOW: how the run executes; cli.COMMAND: what this one command does). From that one table
come the parser (`build_parser`), the --help text with both presets' values, the range checks
(`check`), and what --resume keeps (`resume`). A new flag is one field.

A flag left unset takes the first of: the dataset's value (data.DATASETS[name].defaults: its
recipe, image and patch size, --hflip 0 for digits), the model's in its preset (MODEL_DEFAULTS:
the "+" models' lr), the preset's (PRESETS: paper = DeiT's recipe, small = a few thousand small
images), and the field's own default.

    cfg, notes = config.resolve({"dataset": "mnist10k", "epochs": 5})   # python train.py --dataset mnist10k --epochs 5
    config.command_line({"dataset": "mnist10k", "epochs": 5})          # that command, as a lesson records it

Contents: Model, Recipe, Runtime -> RunConfig and the table (SECTIONS, FIELDS) -> presets ->
the command line (build_parser, parse, command_line) -> a new run (fill_unset, resolve) ->
the checks -> a resumed run (resume, stored).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path

import augment
import checkpoints
import cli
import convit
import data
from cli import COMMAND, HOW, RUN, flag

# The two preset recipes (--preset): each field below gives its value in both.
PRESETS = {
    "paper": "DeiT's recipe as paper.md gives it",
    # For a dataset of a few thousand small images and a few CPU minutes: a 6-block model, 24 dims
    # per head, a short schedule, more steps (batch 32) at a larger lr (1e-3 at batch 32), and
    # gentler augmentation: no MixUp/CutMix, milder crops (16x16 digits do not survive the paper's)
    # and RandAugment at 1.7 of timm's 10, each op still a coin flip with a noisy magnitude. One CPU
    # thread: matrices this small gain nothing from a second, which stalls them whenever another
    # program is busy (docs/speed.md).
    "small": "for datasets of a few thousand small images",
}


def preset_help() -> str:
    return "; ".join(f"{name} = {about}, the default for "
                     + ", ".join(dataset for dataset, spec in data.DATASETS.items() if spec.defaults["preset"] == name)
                     for name, about in PRESETS.items())


# ---------------------------------------------------------------------------------------
# The sections of a run that live here (data.Data and augment.Augmentation live beside their code)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Model:
    """Which network of Table 1 (convit.MODEL_PRESETS), resized, with the paper's ablations."""

    model: str = flag("a network of Table 1: convit_* or DeiT's own, deit_*", default="convit_tiny",
                      choices=list(convit.MODEL_PRESETS))
    patch_size: int = flag("side of the square patches", interval="[1, inf)")  # the dataset's
    embed_dim: int | None = flag("C (default: the model's, or with --preset small 24 per head)", default=None,
                                 interval="[1, inf)")
    depth: int = flag("transformer blocks", interval="[1, inf)", paper=12, small=6)
    num_heads: int | None = flag("H (default: the model's); without --embed-dim, --preset small keeps 24 dims per "
                                 "head, so C = 24 H", default=None, interval="[1, inf)")
    head_width: int | None = flag("C / H; None keeps the model's own width", typed=False, paper=None, small=24)
    local_up_to_layer: int | None = flag(
        "number of GPSA blocks (default: all but the last two for a ConViT); 0 = the same-size baseline, a ConViT "
        "with no GPSA (DeiT's own network is --model deit_*)", default=None, interval="[0, inf)")
    attention: str = flag("what those blocks are: gpsa, gated positional self-attention (Eq. 6-7), or psa, plain "
                          "positional self-attention (Eq. 4: content and position logits in one softmax, no gate; the "
                          "paper's SM A, Fig. 9), with the same conv init", default="gpsa", choices=["gpsa", "psa"])
    locality_strength: float = flag("alpha of Eq. 5", default=1.0, interval="[0, inf)")
    no_conv_init: bool = flag("Table 3 'conv init: no': GPSA starts random instead of as a convolution (Eq. 5)",
                              default=False)
    freeze_gates: bool = flag("Table 3 'train gating: no': every gate lambda is set to 0 (sigma = 0.5: content and "
                              "position weigh the same) and never trained", default=False)
    freeze_gpsa: bool = flag("Table 3 'train GPSA: no': the whole attention of every GPSA block (W_qry, W_key, "
                             "W_val, W_out, v_pos and the gates) keeps its init; the FFNs, norms and the rest train",
                             default=False)
    no_pos_embed: bool = flag("no absolute position embedding", default=False)
    global_pool: str = flag("what the head reads: token = the class token, joining after the last GPSA block (the "
                            "paper's); avg = the mean of the patch tokens, no class token (then --local-up-to-layer "
                            "may equal --depth: every block GPSA)", default="token", choices=["token", "avg"])

    @property
    def is_deit(self) -> bool:
        """DeiT's own network (--model deit_*), which has no GPSA block."""
        return convit.MODEL_PRESETS[self.model].get("class_token_in_pos_embed", False)

    @property
    def heads(self) -> int:
        """H: --num-heads, or the model's."""
        return self.num_heads or convit.MODEL_PRESETS[self.model]["num_heads"]

    @property
    def width(self) -> int:
        """C: --embed-dim, or H heads of --preset small's 24 dims, or the model's."""
        return self.embed_dim or (self.heads * self.head_width if self.head_width else
                                  convit.MODEL_PRESETS[self.model]["embed_dim"])

    @property
    def gpsa_blocks(self) -> int:
        """--local-up-to-layer, or by default: a ConViT makes all blocks GPSA but the last two (10
        of 12 in the paper); DeiT none."""
        if self.local_up_to_layer is not None:
            return self.local_up_to_layer
        return max(self.depth - 2, 1) if convit.MODEL_PRESETS[self.model]["local_up_to_layer"] > 0 else 0


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """DeiT's optimisation: the epochs, the batch, AdamW and its schedule, regularisation."""

    preset: str = flag(preset_help(), choices=list(PRESETS))  # the dataset's
    epochs: int = flag("epochs", interval="[1, inf)", paper=300, small=50)
    batch_size: int = flag("images per process and step", interval="[1, inf)", paper=64, small=32)
    base_lr: float = flag("lr per 512 images of the global batch", interval="(0, inf)", paper=5e-4, small=1.6e-2)
    lr: float | None = flag("absolute peak lr (default: base-lr * global batch / 512)", default=None,
                            interval="(0, inf)")
    warmup_epochs: int = flag("linear warmup epochs (at most half of the epochs)", interval="[0, inf)", paper=5,
                              small=2)
    warmup_lr: float = flag("lr at the start of the warmup", interval="(0, inf)", paper=1e-6, small=1e-6)
    min_lr: float = flag("lr at the end of the cosine", interval="[0, inf)", paper=1e-5, small=1e-5)
    weight_decay: float = flag("AdamW weight decay (never on biases, norms, pos_embed, cls_token or gates)",
                               interval="[0, inf)", paper=0.05, small=0.05)
    smoothing: float = flag("label smoothing", interval="[0, 1)", paper=0.1, small=0.1)
    drop_path: float = flag("stochastic depth rate (of the last block)", interval="[0, 1)", paper=0.1, small=0.0)
    ema: bool = flag("keep an exponential moving average of the weights and evaluate it too", default=False)
    ema_decay: float = flag("EMA decay per step", interval="[0, 1]", paper=0.99996, small=0.999)
    clip_grad: float | None = flag("clip the gradient norm to this value", default=None, interval="(0, inf)")
    seed: int = flag("seed of the weights, the data fraction, the shuffles and the augmentation", default=0,
                     interval="[0, inf)")


@dataclass(frozen=True, kw_only=True)
class Runtime:
    """How and where this command runs the run: none of it changes what the run computes."""

    device: str = flag("auto (a GPU if there is one), cpu, cuda, cuda:1, ...", default="auto", role=HOW)
    threads: int | None = flag("CPU threads per process (0 or None: torch's choice)", interval="[0, inf)", role=HOW,
                               paper=None, small=1)
    workers: int | None = flag("data-loading processes, 0 or more (default: 0 on a CPU, up to 8 per GPU)",
                               default=None, interval="[0, inf)", role=HOW)
    amp: bool | None = flag("mixed precision (autocast): on by default on a GPU, off by default on a CPU, where "
                            "--amp runs bf16 autocast", default=None, role=HOW)
    amp_dtype: str | None = flag("autocast dtype (implies --amp): bf16 (default where the device has it) or fp16, "
                                 "which trains with a gradient scaler", default=None, choices=["bf16", "fp16"],
                                 role=HOW)
    compile: bool = flag("torch.compile the model", default=False, role=COMMAND)
    eval_every: int = flag("evaluate, log to metrics.jsonl and save the checkpoint every this many epochs and after "
                           "the last (default 1; with --scale-epochs 1/F: the same steps apart at every fraction)",
                           interval="[1, inf)", metavar="EPOCHS", role=HOW)
    output_dir: str | None = flag(
        "the run folder: checkpoint.pth, metrics.jsonl and figure.png, the run's own Fig. 5/6, drawn when it ends "
        "(python plots.py DIR redraws it). Default: runs/<dataset>-<model>; with --resume, the folder of the "
        "checkpoint. A folder that holds another run is refused (continue it with --resume, or replace it with "
        "--overwrite), and so is a folder that another train.py is writing", default=None, role=COMMAND)
    overwrite: bool = flag("replace the run in --output-dir: its checkpoint, metrics and figure are removed once this "
                           "run has its data and model, just before its first epoch", default=False, role=COMMAND)
    resume: str | None = flag(
        "continue one of our checkpoints (or a run folder holding checkpoint.pth) exactly as the run was started: "
        "every flag comes from the checkpoint. A flag typed now may change where and how it runs (--output-dir, "
        "--device, --workers, --threads, --amp, --stop-after ...), and --epochs may grow (the rest of the cosine "
        "is re-fitted); any other flag must be its own", default=None, metavar="PATH", role=COMMAND)
    stop_after: int | None = flag("stop once this many epochs (at least 1) are done, the schedule still spanning "
                                  "--epochs (for jobs with a time limit: continue later with --resume)",
                                  default=None, interval="[1, inf)", metavar="EPOCHS", role=COMMAND)
    eval_only: bool = flag("only report top-1 / top-5 of --checkpoint", default=False, role=COMMAND)
    mask_pos_embed: bool = flag("with --eval-only: evaluate without the absolute position embedding (Table 5: "
                                "ConViT's GPSA keeps its sense of position through r_ij, DeiT has no other)",
                                default=False, role=COMMAND)
    mask_content: int = flag("with --eval-only: Tab. 6's 'mask content': sigma(lambda) forced to 1 in the first K GPSA "
                             "blocks, which then attend by position only (0: none)", default=0, interval="[0, inf)",
                             metavar="K", role=COMMAND)
    mask_position: int = flag("with --eval-only: Tab. 6's 'mask position': sigma(lambda) forced to 0 in the first K "
                              "GPSA blocks, which then attend by content only (0: none)", default=0, interval="[0, inf)",
                              metavar="K", role=COMMAND)
    checkpoint: str | None = flag(
        "weights to evaluate (--eval-only) or to start from: one of ours or a released ConViT or DeiT .pth, with "
        "the matching --model (read with weights_only=True: a file that needs anything but tensors and plain data "
        "is refused)", default=None, metavar="PATH", role=COMMAND)
    no_progress: bool = flag("no progress bar (one line per epoch only)", default=False, role=COMMAND)
    quiet: bool = flag("print only the final result line (and errors)", default=False, role=COMMAND)
    no_figure: bool = flag("draw no figure.png at the end (python plots.py RUN_DIR draws it from metrics.jsonl "
                           "later)", default=False, role=COMMAND)


# ---------------------------------------------------------------------------------------
# The whole run, and the table of its fields
# ---------------------------------------------------------------------------------------
SECTIONS = {  # RunConfig's attribute: (its dataclass, the title of its flags in --help)
    "data": (data.Data, "data"),
    "model": (Model, "model (defaults: the --model preset, shrunk by --preset small) and the paper's ablations "
                     "(Table 3, Fig. 8)"),
    "recipe": (Recipe, "recipe (unset flags take the --preset's value)"),
    "augment": (augment.Augmentation, "augmentation (augment.py; unset flags take the --preset's value)"),
    "runtime": (Runtime, "how and where it runs: speed, checkpoints, logging"),
}
FIELDS: dict[str, dataclasses.Field] = {field.name: field for section, _ in SECTIONS.values()
                                        for field in dataclasses.fields(section)}


@dataclass(frozen=True)
class RunConfig:
    """One run: cfg.recipe.epochs, cfg.data.dataset, cfg.model.depth, cfg.augment.mixup, cfg.runtime.device ..."""

    data: data.Data
    model: Model
    recipe: Recipe
    augment: augment.Augmentation
    runtime: Runtime

    def flat(self) -> dict:
        """Every field by name, as the checkpoint stores the configuration."""
        return {name: value for section in SECTIONS for name, value in dataclasses.asdict(getattr(self, section)).items()}

    @classmethod
    def from_flat(cls, values: dict) -> RunConfig:
        return cls(**{name: section(**{field.name: values[field.name] for field in dataclasses.fields(section)})
                      for name, (section, _) in SECTIONS.items()})

    def replace(self, **changes) -> RunConfig:
        """A copy with some fields changed, by name: cfg.replace(lr=1e-3)."""
        return RunConfig.from_flat({**self.flat(), **changes})


def preset_values(name: str) -> dict:
    """Every value that the preset recipe `name` sets, by field: preset_values("small")["epochs"] is 50."""
    return {field: spec.metadata["presets"][name] for field, spec in FIELDS.items() if spec.metadata["presets"]}


# Recipe values that a model of Table 1 brings to a preset: paper.md's "+" models train at base_lr
# 4e-4 per 512 images in DeiT's recipe (the others at 5e-4).
MODEL_DEFAULTS = [  # (which models, in words; the preset; the models; the values they set)
    ('the "+" models', "paper", [name for name in convit.MODEL_PRESETS if name.endswith("_plus")], {"base_lr": 4e-4}),
]


def default_of(name: str, values: dict):
    """The value of the unset field `name`, given the dataset, preset and model of `values`."""
    if name == "eval_every":  # evaluating a 5% run 20 times as often as a full one would cost more than training it
        return max(1, round(1 / values["data_fraction"])) if values["scale_epochs"] else 1
    if name != "dataset" and name in data.DATASETS[values["dataset"]].defaults:
        return data.DATASETS[values["dataset"]].defaults[name]
    for _, rule_preset, models, settings in MODEL_DEFAULTS:
        if values.get("preset") == rule_preset and values.get("model") in models and name in settings:
            return settings[name]
    presets = FIELDS[name].metadata["presets"]
    if presets:
        return presets[values["preset"]]
    return None if FIELDS[name].default is dataclasses.MISSING else FIELDS[name].default


# ---------------------------------------------------------------------------------------
# The command line: the parser from the table, and a command back from settings
# ---------------------------------------------------------------------------------------
def help_of(field: dataclasses.Field) -> str:
    """A field's help, with its value in each preset (and a model's, where one differs) or each dataset's."""
    text, presets = field.metadata["help"], field.metadata["presets"]
    if presets:
        values = [f"{preset}: {value}" + "".join(f" ({who}: {settings[field.name]})" for who, rule_preset, _, settings
                                                  in MODEL_DEFAULTS if rule_preset == preset and field.name in settings)
                  for preset, value in presets.items()]
        text += f" [{', '.join(values)}]"
    by_dataset = [f"{name} {spec.defaults[field.name]}" for name, spec in data.DATASETS.items()
                  if field.name in spec.defaults]
    if by_dataset and field.name != "preset":
        text += f" (default: the dataset's: {', '.join(by_dataset)})"
    return text


def build_parser() -> argparse.ArgumentParser:
    """train.py's command line. Every flag's default is argparse.SUPPRESS, so that parsing returns
    exactly the flags typed: --resume tells a typed --seed 0 from an unset one."""
    parser = cli.ArgumentParser(prog="python train.py", description=(
        "Train or evaluate ConViT / DeiT (see the commands at the top of train.py; docs/runs.md: the run folder, "
        "--resume and --overwrite). Every flag left unset takes its value from the dataset and the --preset."))
    for section, title in SECTIONS.values():
        group = parser.add_argument_group(title)
        for field in dataclasses.fields(section):
            if field.metadata["typed"]:
                group.add_argument("--" + field.name.replace("_", "-"), dest=field.name, default=argparse.SUPPRESS,
                                   help=help_of(field).replace("%", "%%"), **cli.argument_kind(field))
    return parser


def parse(argv: list[str] | None) -> dict:
    """The flags typed on train.py's command line, by field name: {"epochs": 5, "scale_epochs": True}."""
    return vars(build_parser().parse_args(argv))


def command_line(settings: dict) -> list[str]:
    """The train.py flags that type `settings` (field name: value), in their order: the inverse of
    parse, so that a lesson records the command that runs the configuration it built. Floats are
    written as briefly as they read back exactly (0.05, not 0.05000000000000000277)."""
    argv = []
    for name, value in settings.items():
        option = "--" + name.replace("_", "-")
        if value is True or value is False:
            argv += [option] if value else ([f"--no-{name.replace('_', '-')}"] if "None" in FIELDS[name].type else [])
        elif isinstance(value, float):
            brief = f"{value:g}"
            argv += [option, brief if float(brief) == value else repr(value)]
        elif value is not None:
            argv += [option, str(value)]
    return argv


def command(settings: dict) -> str:
    """The shell command that runs `settings` from the repository root."""
    return " ".join(["python", "train.py", *(shlex.quote(token) for token in command_line(settings))])


# ---------------------------------------------------------------------------------------
# A new run
# ---------------------------------------------------------------------------------------
def fill_unset(values: dict) -> dict:
    """`values` with every field left unset (absent, or None) given its default: the dataset's, the
    model's in its preset, the preset's, or the field's own (default_of)."""
    values = dict(values)
    for name in ("dataset", "preset", "model", *FIELDS):  # the dataset, preset and model decide the others
        if values.get(name) is None:
            values[name] = default_of(name, values)
        cli.check_field(FIELDS[name], values[name])  # a choice argparse would refuse, in a lesson's settings
    return values


def resolve(settings: dict) -> tuple[RunConfig, list[str]]:
    """The configuration of a new run typed as `settings` (field name: value, as parse returns the
    flags): unset fields filled, every value checked, --epochs scaled by --scale-epochs and the
    warmup capped; and the notes the command should print (a capped warmup)."""
    values = fill_unset(settings)
    check(values)
    values["resume"] = checkpoints.find_checkpoint(values["resume"], "--resume")
    values["checkpoint"] = checkpoints.find_checkpoint(values["checkpoint"], "--checkpoint")
    if values["output_dir"] is None:
        values["output_dir"] = (str(Path(values["resume"]).parent) if values["resume"]
                                else f"runs/{values['dataset']}-{values['model']}")
    if values["scale_epochs"]:  # the warmup is not scaled: the released code leaves it at its 5 epochs
        values["epochs"] = round(values["epochs"] / values["data_fraction"])
    notes = []
    if values["warmup_epochs"] > values["epochs"] // 2:
        # A warmup as long as the run would hold the lr at --warmup-lr throughout (`--epochs 1` would
        # train at 1e-6): it may take at most half of the epochs.
        notes.append(f"note: --warmup-epochs {values['warmup_epochs']} capped to {values['epochs'] // 2}, half of "
                     f"the {values['epochs']} epochs, so that the lr reaches its peak")
        values["warmup_epochs"] = values["epochs"] // 2
    return RunConfig.from_flat(values), notes


# ---------------------------------------------------------------------------------------
# The checks: values that no run can use, each one line naming the flag
# ---------------------------------------------------------------------------------------
def check(values: dict):
    """Every value in its field's range and choices, the flags that contradict each other, and the
    shape of the model: all before the run reads its data or writes anything."""
    for name, field in FIELDS.items():
        cli.check_field(field, values.get(name))
    if values["mask_pos_embed"] and not values["eval_only"]:
        raise ValueError("--mask-pos-embed masks the position embedding at test time: use it with --eval-only")
    check_masked_gates(values)
    if values["eval_only"] and not values["checkpoint"]:
        raise ValueError("--eval-only needs --checkpoint PATH (one of our checkpoints or a released ConViT .pth)")
    if values["num_classes_subset"] is not None and values["dataset"] != "imagefolder":
        raise ValueError(f"--num-classes-subset keeps the first K classes of an image folder (--dataset imagefolder); "
                         f"--dataset {values['dataset']} always trains all its classes")
    augment.op_names(values["randaug_op_set"])  # names RandAugment knows
    if values["output_dir"] == "":
        raise ValueError("--output-dir is empty: name a folder (or leave the flag out for runs/<dataset>-<model>)")
    check_table3_switches(values)
    check_model_shape(values)


def check_model_shape(values: dict):
    """The network these flags build, checked as convit.ConViTConfig checks it (an image the
    patches do not tile, a width the heads do not divide, no MHSA block after the GPSA ones), and
    named by its flags: now, not after the data has loaded."""
    model = Model(**{field.name: values[field.name] for field in dataclasses.fields(Model)})
    preset = convit.MODEL_PRESETS[model.model]
    try:
        convit.ConViTConfig(**{**preset, "img_size": values["img_size"], "patch_size": model.patch_size,
                               "embed_dim": model.width, "num_heads": model.heads, "depth": model.depth,
                               "local_up_to_layer": model.gpsa_blocks, "global_pool": model.global_pool})
    except ValueError as err:
        raise ValueError(f"{err} (the network of these flags: --model {model.model}, --img-size {values['img_size']}, "
                         f"--patch-size {model.patch_size}, C = {model.width}, H = {model.heads}, --depth {model.depth}, "
                         f"GPSA blocks {model.gpsa_blocks})") from None


def check_masked_gates(values: dict):
    """Tab. 6's switches: at test time only, one of the two, and on GPSA blocks the model has."""
    asked = {name: values[name] for name in ("mask_content", "mask_position") if values[name]}
    if not asked:
        return
    flags = " and ".join(f"--{name.replace('_', '-')} {k}" for name, k in asked.items())
    if not values["eval_only"]:
        raise ValueError(f"{flags} forces gates at test time: use it with --eval-only")
    if len(asked) == 2:
        raise ValueError(f"{flags}: give one of the two (Tab. 6 masks content or position, never both in a layer)")
    psa = values["attention"] == "psa"
    gpsa_blocks = 0 if psa else Model(**{field.name: values[field.name] for field in dataclasses.fields(Model)}).gpsa_blocks
    if next(iter(asked.values())) > gpsa_blocks:
        raise ValueError(f"{flags}: this {values['model']} has {gpsa_blocks} GPSA blocks"
                         f"{' (PSA, --attention psa, has no gate)' if psa else ''}; K counts them from the first")


def check_table3_switches(values: dict):
    """Table 3's switches act on GPSA blocks: DeiT's own network (--model deit_*) has none to add
    or to switch, nor has a ConViT with --local-up-to-layer 0 (the same-size baseline). DeiT's
    class token is part of its network: it has no --global-pool avg."""
    model = values["model"]
    is_deit = convit.MODEL_PRESETS[model].get("class_token_in_pos_embed", False)
    if is_deit and values["local_up_to_layer"]:
        raise ValueError(f"--local-up-to-layer {values['local_up_to_layer']}: {model} is DeiT's own network, which "
                         f"has no GPSA block; for a ConViT of its size use --model convit_{model[5:]} --num-heads "
                         f"{convit.MODEL_PRESETS[model]['num_heads']}")
    if is_deit and values["global_pool"] == "avg":
        raise ValueError(f"--global-pool avg: {model} is DeiT's own network, whose class token joins before block 1 "
                         f"with a position of its own; a head on the mean of the patches is --model convit_*")
    switches = [f"--{name.replace('_', '-')}" for name in ("freeze_gates", "freeze_gpsa", "no_conv_init") if values[name]]
    if switches and (is_deit or values["local_up_to_layer"] == 0):
        raise ValueError(f"{' '.join(switches)} act(s) on GPSA blocks, and this model has none "
                         f"(Table 3's row e, DeiT, is --model deit_* with no switch)")
    if values["attention"] == "psa" and (is_deit or values["local_up_to_layer"] == 0):
        raise ValueError("--attention psa makes the first --local-up-to-layer blocks PSA, and this model has no such "
                         "block (DeiT's own network, or --local-up-to-layer 0)")
    if values["attention"] == "psa" and values["freeze_gates"]:
        raise ValueError("--freeze-gates freezes GPSA's gates, and PSA (--attention psa) has none")


# ---------------------------------------------------------------------------------------
# A resumed run: the run as its checkpoint stores it
# ---------------------------------------------------------------------------------------
# Fields newer than some checkpoints, with the value that the runs before them had where today's
# default differs: a run from an older checkpoint goes on as it began.
BEFORE_THE_FIELD = {"randaug_op_set": "all", "crop_edge": "fill"}


def stored(args: dict) -> RunConfig:
    """The configuration a train.py checkpoint stores (its "args"). A field newer than the
    checkpoint takes the value it had then (BEFORE_THE_FIELD), else its default."""
    return RunConfig.from_flat(fill_unset({**BEFORE_THE_FIELD, **{name: value for name, value in args.items()
                                                                  if name in FIELDS}}))


def resume(settings: dict, checkpoint: dict, path: str) -> RunConfig:
    """--resume: the run as it was started, stored in `checkpoint` (read from `path`), with the
    flags typed now (`settings`) on top where their role allows it. A field that defines the run
    (cli.RUN) must keep its value, except that --epochs may grow; how it runs (cli.HOW) may change;
    what the command does (cli.COMMAND) is never taken from the checkpoint."""
    # As resolved when the run began: scaled epochs, capped warmup, absolute lr.
    started = {**BEFORE_THE_FIELD, **checkpoint["args"]}
    kept = {name: value for name, value in started.items()
            if name in FIELDS and name not in settings and FIELDS[name].metadata["role"] != COMMAND}
    values = {**settings, **kept, "resume": path}
    # A typed value means what it meant when the run began: resolve it as the start did.
    if "epochs" in settings and started.get("scale_epochs"):
        values["epochs"] = round(settings["epochs"] / started["data_fraction"])
    if "warmup_epochs" in settings:
        values["warmup_epochs"] = min(settings["warmup_epochs"], started["epochs"] // 2)
    if values.get("output_dir") is None:
        values["output_dir"] = str(Path(path).parent)
    values = fill_unset(values)  # a field newer than the checkpoint
    check(values)
    values["checkpoint"] = checkpoints.find_checkpoint(values["checkpoint"], "--checkpoint")

    if values["epochs"] < started["epochs"]:
        raise ValueError(f"--resume {path}: --epochs {values['epochs']} is fewer than the {started['epochs']} the run "
                         f"was planned for ({checkpoint['epoch']} done); to end it early, pass --stop-after instead")
    changed = [f"--{name.replace('_', '-')} {values[name]} (checkpoint: {started[name]})" for name in FIELDS
               if name in settings and name in started and FIELDS[name].metadata["role"] == RUN
               and name != "epochs" and values[name] != started[name]]
    if changed:
        raise ValueError(f"--resume {path}: these flags differ from the run that wrote it: {', '.join(changed)}. "
                         f"A resumed run keeps its own flags: leave these out. Only --epochs may grow, and where and "
                         f"how it runs may change (--output-dir, --device, --workers, --threads ...)")
    return RunConfig.from_flat(values)
