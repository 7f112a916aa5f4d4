"""The spec schema: small typed objects, a comment on every field (pydantic, unknown keys rejected).

A spec is stem -> stages of blocks -> head, plus the data set and the training recipe that go with it.
`block` holds defaults for every block; a stage's `block` overrides them for that stage, and a stage's
`blocks: {index: {...}}` overrides them for single blocks. Everything here is plain data: no tensors.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, \
    field_validator

from .registry import DATA_SETS, OPTIMIZERS, PLACEMENTS, SCHEDULES, SHORTCUTS, STEMS, VARIANTS
# ^ the network's registries are filled when `arches` is imported, the recipe's and the data's by runs/ on first use


def _placement_letter(value: Any) -> Any:
    """The paper's letters name the placements too: a..e -> original .. full_preact."""
    if isinstance(value, str) and len(value) == 1:
        return next((name for name, cls in PLACEMENTS.items() if cls.letter == value.lower()), value)
    return value


# A string that must name a registered piece (checked against the registry, with 'did you mean').
Shortcut = Annotated[str, AfterValidator(lambda v: SHORTCUTS.check(v))]
Placement = Annotated[str, BeforeValidator(_placement_letter), AfterValidator(lambda v: PLACEMENTS.check(v))]
Variant = Annotated[str, AfterValidator(lambda v: VARIANTS.check(v))]
StemType = Annotated[str, AfterValidator(lambda v: STEMS.check(v))]
ScheduleType = Annotated[Any, AfterValidator(lambda v: SCHEDULES.check(v))]
OptimizerName = Annotated[Any, AfterValidator(lambda v: OPTIMIZERS.check(v))]
DataSetName = Annotated[Any, AfterValidator(lambda v: DATA_SETS.check(v))]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Bounds: every number a spec holds has a finite, sane range, checked before anything heavy runs (so that `show`
# and `validate` answer in a second or two on any input); the limits sit well above every published network.
MAX_CHANNELS = 16384                   # a width (stem, stage, bottleneck base) as written
MAX_BLOCK_CHANNELS = 65536             # a block's channels after width_multiplier, widen, expansion, groups
MAX_DEPTH = 2000                       # blocks in one stage (ResNet-1202: 200; pre-act ResNet-1001: 111)
MAX_BLOCKS = 1200                      # blocks in the whole network (ResNet-1202: 600)
MAX_STEPS = 10**9                      # optimizer steps, milestones, warmup
Count = Annotated[int, Field(ge=1, le=10**9)]


class InputSpec(Strict):
    channels: int = Field(3, ge=1, le=64)   # image channels (1 for Fashion-MNIST)
    size: int = Field(224, ge=1, le=4096)   # square input side, pixels


class StemSpec(Strict):
    type: StemType = "imagenet"        # imagenet: 7x7/2 conv; deep: three 3x3 convs, the first /2 (ResNet-C);
    # ^ cifar: one 3x3/1 conv (arches/stems.py)
    width: int = Field(64, ge=1, le=MAX_CHANNELS)  # output channels of the stem
    act: bool = True                   # BN + ReLU after the stem conv (false for pre-activation nets)
    stride: Optional[int] = Field(None, ge=1, le=16)  # stride of the stem's (first) conv; null = the type's own (2; cifar: 1)
    pool: Optional[Literal["max", "conv", "none"]] = None  # after the stem: 3x3/2 max-pool, a 3x3/2 conv-BN-ReLU
    # ^ (ResNet-RS, timm's replace_stem_pool), or none; null = the stem type's own (max; none for cifar)


class BlockSpec(Strict):
    """Settings of one block. Every field has a default; blocks ignore the fields they have no use for."""
    type: str = "basic"                # a registered block: plain, basic, bottleneck, preact, ... (arches.blocks)
    shortcut: Shortcut = "B"           # where the shape changes: A zero-pad, B project, C project on every block,
    # ^ D avg-pool + project (Bag of Tricks ResNet-D) (arches/shortcuts.py)
    placement: Optional[Placement] = None
    # ^ BN/ReLU placement (He 2016 Fig. 4 a-e; the letters work too); null = the block type's own default
    variant: Variant = "identity"      # He 2016 Table 1: how branch and shortcut merge (arches/blocks/merges.py)
    scale: float = Field(0.5, gt=0.0, le=100.0)  # variant scaling: shortcut multiplied by this lambda
    scale_residual: bool = False       # variant scaling: also multiply the residual branch by 1 - lambda
    gate_bias: float = Field(-2.0, ge=-100.0, le=100.0)  # initial bias of sigmoid gates (highway, exclusive/shortcut gating)
    shortcut_dropout: float = Field(0.5, ge=0.0, lt=1.0)  # variant dropout: drop probability on the shortcut
    zero_init_residual: bool = False   # zero the last BN (or conv) of each residual branch: block = identity at init
    projection_bn: Optional[bool] = None  # BN after a projection shortcut's 1x1 conv; null = the placement's own:
    # ^ yes, except full pre-activation (a bare conv, as He et al.'s and the WRN code: the next unit normalises)
    zero_pad: Literal["append", "split"] = "append"  # shortcut A: zero channels after x's (fb.resnet.torch), or
    # ^ half before and half after (the common PyTorch CIFAR ResNets and their published weights)
    expansion: int = Field(4, ge=1, le=64)   # bottleneck: output channels = width * expansion
    cardinality: int = Field(1, ge=1, le=4096)  # groups of the 3x3 conv in a bottleneck (ResNeXt)
    base_width: int = Field(64, ge=1, le=MAX_CHANNELS)  # bottleneck inner width = width * base_width / 64 * cardinality
    stride_on: Optional[Literal["1x1", "3x3"]] = None  # bottleneck: the conv that strides: the first 1x1 (He et
    # ^ al. 2015, "v1") or the 3x3 (torchvision's "v1.5"); null = the block type's own (3x3)
    widen: float = Field(1.0, gt=0.0, le=64.0)  # WRN width multiplier k on this block's width
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # dropout on the input of every conv but the first: after the
    # ^ BN-ReLU right before the second conv in pre-activation blocks (the WRN code)
    se_ratio: float = 0.0              # squeeze-excitation on the branch output (Hu et al. 2018): hidden channels =
    # ^ out channels * se_ratio (1/16 in SE-ResNet, 1/4 in ResNet-RS); 0 = none
    se_divisor: int = Field(8, ge=1, le=1024)  # SE hidden channels rounded to a multiple of this (timm: 8; 1 = nearest)

    @field_validator("se_ratio")
    @classmethod
    def _se_ratio_in_range(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            hint = f"; a reduction of {v:g} is {1 / v:.4g}" if v > 1 else ""
            raise ValueError(f"must lie in [0, 1] (SE hidden channels = channels * se_ratio{hint})")
        return v


class StageSpec(Strict):
    depth: int = Field(ge=0, le=MAX_DEPTH)  # number of blocks (0 drops the stage)
    width: int = Field(ge=1, le=MAX_CHANNELS)  # block width (bottleneck: inner width before expansion)
    stride: int = Field(1, ge=1, le=16)  # stride of the stage's first block
    block: dict[str, Any] = {}         # overrides of the spec-wide block defaults for this stage
    blocks: dict[int, dict[str, Any]] = {}  # overrides for single blocks, by index in the stage


class HeadSpec(Strict):
    pool: Literal["avg", "max"] = "avg"  # global pooling before the classifier
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # dropout before the classifier


class DataSpec(Strict):
    name: DataSetName = "synthetic"
    root: Optional[str] = None         # folder holding the files; null = $RESLAB_DATA, then system places
    val_size: Union[Annotated[int, Field(ge=0, le=10**9)], Annotated[float, Field(ge=0.0, lt=1.0)]] = 5000
    # ^ held out of train by seed: a count, or a fraction if < 1
    train_subset: Optional[Count] = None  # use only this many training images (smoke tests, demos)
    test_subset: Optional[Count] = None   # use only this many test images
    augment: Optional[Literal["none", "crop_flip", "rrc_flip"]] = None  # null = the data set's standard
    download: bool = True              # try to download when files are missing and a network is there
    on_device: Literal["auto", "always", "never"] = "auto"  # hold small sets whole on the GPU
    num_workers: int = Field(0, ge=0, le=256)  # DataLoader workers for the host-side path
    decode: Literal["auto", "cpu", "gpu"] = "auto"  # imagefolder JPEGs: Pillow in the workers, or nvJPEG on the
    # ^ GPU (torchvision.io, batched); auto = gpu when training on CUDA and torchvision is importable
    synthetic_size: int = Field(512, ge=1, le=10**7)  # synthetic: number of training images (test set: a quarter)


class ScheduleSpec(Strict):
    type: ScheduleType = "multistep"
    milestones: list[Annotated[int, Field(ge=1, le=MAX_STEPS)]] = Field([], max_length=1000)
    # ^ multistep: where lr is multiplied by gamma
    unit: Literal["epoch", "step"] = "epoch"  # milestones counted in epochs or in optimizer steps
    gamma: float = Field(0.1, gt=0.0, le=100.0)  # multistep factor
    min_lr: float = Field(0.0, ge=0.0, le=100.0)  # cosine floor


class WarmupSpec(Strict):
    steps: int = Field(0, ge=0, le=MAX_STEPS)  # warmup length in optimizer steps (0 = none)
    start_factor: float = Field(0.1, gt=0.0, le=1.0)  # lr starts at lr * start_factor
    mode: Literal["linear", "constant"] = "linear"   # constant = He 2015's ResNet-110 warmup at lr/10


class TrainSpec(Strict):
    optimizer: OptimizerName = "sgd"
    lr: float = Field(0.1, gt=0.0, le=1e6)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0.0, le=100.0)
    decay_bn_and_bias: bool = True     # false: no weight decay on BN parameters and biases
    batch_size: int = Field(128, ge=1, le=2**20)
    epochs: Optional[int] = Field(10, ge=1, le=10**6)  # stop after this many epochs ...
    max_steps: Optional[int] = Field(None, ge=1, le=MAX_STEPS)  # ... or after this many optimizer steps (paper: 64k)
    schedule: ScheduleSpec = ScheduleSpec()
    warmup: WarmupSpec = WarmupSpec()
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # one seed fixes data split, data order and initial weights
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed"] = "auto"  # auto: bf16-mixed on GPU, 32 on CPU
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: Union[Annotated[int, Field(ge=1, le=4096)], Literal["auto"]] = 1
    num_nodes: int = Field(1, ge=1, le=10**5)
    strategy: Literal["auto", "ddp", "ddp_spawn"] = "auto"
    channels_last: Optional[bool] = None  # null = on for GPU runs
    threads: Optional[int] = Field(None, ge=1, le=4096)  # CPU threads of the run (torch); null = torch's default. A study sets
    # ^ one count for all its trials (results then do not depend on how many workers ran them)
    compile: Union[bool, Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = False
    # ^ torch.compile the model: true (= "default") or a torch.compile mode ("reduce-overhead": CUDA graphs)
    val_every: int = Field(1, ge=1, le=10**6)  # validate every this many epochs
    limit_batches: Optional[Count] = None  # cap train batches per epoch (smoke tests)


class DropPathSpec(Strict):
    """Stochastic depth (Huang et al. 2016): in training, each sample skips a residual branch with a per-block
    probability (the survivors are scaled by 1 / (1 - p), as timm's drop_path)."""
    rate: float = Field(0.0, ge=0.0, lt=1.0)  # the largest per-block drop probability; 0 = off
    schedule: Literal["linear", "linear_from_zero", "constant"] = "linear"  # block l of L (1-based) drops with
    # ^ rate * l / L (Huang et al.), rate * (l - 1) / (L - 1) (timm's ResNets), or rate everywhere


class Spec(Strict):
    """A whole network plus how to train it."""
    name: str                          # short identifier, used for run names and experiments
    family: Optional[str] = None       # experiment group in MLflow (default: name without depth digits)
    description: str = ""
    input: InputSpec = InputSpec()
    classes: int = Field(1000, ge=1, le=10**6)
    width_multiplier: float = Field(1.0, gt=0.0, le=64.0)  # scales stem and stage widths (compute-matched ablations)
    stem: StemSpec = StemSpec()
    block: BlockSpec = BlockSpec()
    stages: list[StageSpec] = Field(min_length=1, max_length=64)
    head: HeadSpec = HeadSpec()
    drop_path: DropPathSpec = DropPathSpec()  # stochastic depth over the residual blocks
    init_from: Optional[str] = None    # start from these weights: a state_dict file (torch.save'd .pt/.pth/.ckpt/.th,
    # ^ or .safetensors: torchvision, timm, CIFAR-ResNet checkpoints) or an MLflow run id (its last checkpoint)
    init_strict: bool = True           # every tensor must fit; false: load those that fit by name and shape
    # ^ and keep the seeded init elsewhere (`show` lists what loaded)
    init_map: dict[str, str] = {}      # regex -> replacement on the file's key names, after the built-in ones
    # ^ (a `module.` prefix dropped, `linear` -> `fc`, `shortcut` -> `downsample`)
    data: DataSpec = DataSpec()
    train: TrainSpec = TrainSpec()
    _source: Any = PrivateAttr(default=None)

    @field_validator("init_map")
    @classmethod
    def _init_map_patterns(cls, v: dict[str, str]) -> dict[str, str]:
        for pattern, replacement in v.items():
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a regular expression: {e}") from None
            try:
                compiled.sub(replacement, "")     # parses the replacement: its escapes and group references
            except (re.error, IndexError) as e:   # (IndexError: an unknown group name)
                raise ValueError(f"replacement '{replacement}' of '{pattern}': {e} (the pattern has "
                                 f"{compiled.groups} group{'s' if compiled.groups != 1 else ''}"
                                 f"{': ' + ', '.join(compiled.groupindex) if compiled.groupindex else ''}; "
                                 f"write a backslash as \\\\)") from None
        return v  # arches.spec.Source: files, lines, base, overrides

