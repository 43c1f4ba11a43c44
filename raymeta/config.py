"""Typed, validated configs shared by every layer.

An experiment is one `ExperimentConfig`; a sweep file is a `SweepSpec` whose grid expands
into many `ExperimentConfig`s. Every model forbids unknown keys and is frozen, so a typo
is an error before any work starts, and a config is a value that can be hashed and logged.
Only plain dicts (`model_dump()`) cross process boundaries.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import re
from contextlib import contextmanager
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model,
                      field_validator, model_validator)

from raymeta import plugins
from raymeta.data.sets import built_ins as _built_in_datasets
from raymeta.errors import ConfigError

DATASETS: tuple[str, ...] = tuple(_built_in_datasets())
"""the built-in datasets (each a module of raymeta.data.sets), in alphabetical order"""
NOISE_TYPES = ("none", "uniform", "symmetric", "flip_random", "flip_to_one", "pair",
               "asymmetric", "feature_dependent", "real")


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    plain_ce_until: ClassVar[str | None] = None
    """method configs: the field holding the epoch before which the method trains plain
    cross-entropy (its own step starts at that epoch); checked against train.epochs"""
    unread_fields: ClassVar[tuple[str, ...]] = ()
    """method configs: the settings the method never reads, its own inherited fields by name
    and other sections' by dotted key; set away from its default, such a setting is an error
    (`ExperimentConfig.unread`)"""


@contextmanager
def _as_value_error():
    """A ConfigError raised while a field is validated, as the ValueError that pydantic
    reports under the field's name."""
    try:
        yield
    except ConfigError as err:
        raise ValueError(str(err)) from None


def _built_in_or_plugin(name: str, builtins: tuple[str, ...], kind: str, what: str,
                        called: str | None = None) -> str:
    """`name`, when it is a built-in or a plugin of `kind` (a dataset, a noise model); an
    unknown name's error calls it `called` (default: `what`)."""
    with _as_value_error():
        if name in builtins or plugins.LOADERS[kind](name) is not None:
            return name
    raise ValueError(plugins.unknown(kind, what, name, builtins, "package.module:function",
                                     called or what))


def _plugin_options(options: dict[str, Any], name: str | None, builtins: tuple[str, ...],
                    kind: str, what: str) -> dict[str, Any]:
    """A plugin dataset's or noise model's options, checked against its keyword-only
    parameters; a built-in takes its settings as fields of its section, not options."""
    if name is None:  # the name's own error says it
        return options
    if name in builtins:
        if options:
            raise ValueError(f"options are a plugin {what}'s; the built-in {name} takes its "
                             f"settings as fields of its section: remove them")
        return options
    with _as_value_error():
        plugins.check_options(f"{what} {name!r}", options,
                              plugins.keyword_options(plugins.LOADERS[kind](name)))
    return options


# ---------------------------------------------------------------------------------- data
class DatasetConfig(_Config):
    name: str = "digits"
    """which dataset (DATASETS, each a module of raymeta.data.sets): digits (bundled with
    scikit-learn), mnist, fashion_mnist, kmnist, cifar10, cifar100, clothing1m, imagefolder
    (your own images: root/train/<class>/*, root/test/<class>/*, optionally
    root/val/<class>/*), synthetic (seeded Gaussian blobs); or a plugin dataset: an installed
    entry point of the group raymeta.datasets, or an import path (package.module:function)"""
    root: str | None = None
    """folder that holds the dataset files (not needed for digits and synthetic)"""
    options: dict[str, Any] = Field(default_factory=dict)
    """a plugin dataset's options (the keyword-only parameters of its function)"""
    cache: str | None = None
    """imagefolder: where the decoded images are kept for the next run (default: a
    .raymeta-cache folder inside root, or ~/.cache/raymeta when root is read-only)"""
    download: bool = False
    """fetch missing files with torchvision's downloaders (needs internet)"""
    augment: Literal["auto", "none", "flip", "crop", "crop_flip"] = "auto"
    """training augmentation on the device; auto = crop_flip for CIFAR, flip for Clothing1M,
    none for digits/MNIST (flipping digits changes their class); imagefolder: crop_flip for
    colour images up to 64 pixels (CIFAR-like), flip for larger ones, none for grey ones"""
    test_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    """share of samples held out as the test set for datasets without an official split
    (digits, synthetic); the split is fixed, independent of the seed"""
    classes: list[int] | None = None
    """keep only these classes (e.g. [4, 9] of MNIST: L2R's imbalance experiment), numbered
    0, 1, ... in the order given, in every split"""
    class_fractions: list[float] | None = None
    """the training split's share of each class (of `classes`, or of all), e.g. [0.005, 0.995];
    needs train_size; the meta and test sets are not changed"""
    train_size: int | None = Field(None, ge=1)
    """with class_fractions: the number of training samples kept (after the meta split)"""
    imbalance: float = Field(1.0, ge=1.0)
    """long-tailed training data: class c keeps n_max * imbalance^(-c/(K-1)) of its training
    samples (FaMUS Table 8 uses 10-100); the meta set stays balanced, the test set untouched;
    1 = as the dataset comes"""
    unlabeled_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """share of the training split whose labels are hidden (seeded); methods that can use
    unlabeled data (metalabelnet) train on them, the others skip them"""
    image_size: int | None = Field(None, ge=8)
    """side of decoded image files: the shorter side is resized to it, then center-cropped.
    clothing1m: 224 unless set; imagefolder: the images' own size unless set (they must then
    all have one size)"""
    synthetic_samples: int = Field(2000, ge=20)
    """synthetic only: number of samples (train + test)"""
    synthetic_classes: int = Field(4, ge=2)
    """synthetic only: number of classes"""
    synthetic_features: int = Field(16, ge=1)
    """synthetic only: feature dimension (samples are shaped (features, 1, 1))"""

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        return _built_in_or_plugin(name, DATASETS, "dataset", "dataset")

    @field_validator("options")
    @classmethod
    def _known_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _plugin_options(options, info.data.get("name"), DATASETS, "dataset", "dataset")

    @model_validator(mode="after")
    def _check(self) -> DatasetConfig:
        if self.classes is not None and (len(set(self.classes)) != len(self.classes)
                                         or len(self.classes) < 2 or min(self.classes) < 0):
            raise ValueError(f"dataset.classes must list at least 2 distinct class indices "
                             f"(0, 1, ...), got {self.classes}")
        if (self.class_fractions is None) != (self.train_size is None):
            raise ValueError("dataset.class_fractions and dataset.train_size go together: the "
                             "fractions say how the train_size training samples split over the "
                             "classes; set both, or neither")
        if self.class_fractions is not None:
            fractions = self.class_fractions
            if self.classes is not None and len(fractions) != len(self.classes):
                raise ValueError(f"dataset.class_fractions has {len(fractions)} entries for the "
                                 f"{len(self.classes)} dataset.classes; give one per class")
            if min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
                raise ValueError(f"dataset.class_fractions must be positive and sum to 1, got "
                                 f"{fractions} (sum {sum(fractions):g})")
            if self.imbalance != 1.0:
                raise ValueError("dataset.class_fractions and dataset.imbalance both set the "
                                 "class sizes; use one of them")
        if self.cache is not None and self.name != "imagefolder":
            raise ValueError(f"dataset.cache is where imagefolder keeps its decoded images; "
                             f"'{self.name}' does not read it: remove it")
        return self


class NoiseConfig(_Config):
    type: str = "none"
    """how noisy labels are made (NOISE_TYPES; docs/noise.md has the exact semantics of each),
    or a plugin noise model: an installed entry point of the group raymeta.noise, or an import
    path (package.module:function)"""
    rate: float = Field(0.0, ge=0.0, lt=1.0)
    """noise rate in [0, 1); its meaning per type is in docs/noise.md"""
    file: str | None = None
    """real: file with one noisy label per training sample (.npy, .txt, .csv, or a CIFAR-N .pt)"""
    key: str | None = None
    """real: which labels of a CIFAR-N .pt file (e.g. worse_label, aggre_label, random_label1)"""
    mapping: dict[int, int] | None = None
    """asymmetric: source class -> target class (default: the CIFAR-10 map 9->1, 2->0, 4->7, 3<->5)"""
    probs_file: str | None = None
    """feature_dependent: .npy of shape (N_train, K) with a clean-trained model's softmax
    (default: out-of-fold logistic regression on the clean training data)"""
    options: dict[str, Any] = Field(default_factory=dict)
    """a plugin noise model's options (the keyword-only parameters of its function)"""

    @field_validator("type")
    @classmethod
    def _known_type(cls, name: str) -> str:
        return _built_in_or_plugin(name, NOISE_TYPES, "noise", "noise model", called="noise type")

    @field_validator("options")
    @classmethod
    def _known_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _plugin_options(options, info.data.get("type"), NOISE_TYPES, "noise", "noise model")

    @model_validator(mode="after")
    def _check(self) -> NoiseConfig:
        if self.type == "none" and self.rate != 0.0:
            raise ValueError(f"noise.type none needs noise.rate 0.0, got {self.rate}; "
                             "pick a noise type, or set the rate to 0")
        if self.type == "real" and self.rate != 0.0:
            raise ValueError("noise.rate is not used with noise.type real (the labels come from "
                             "noise.file or the dataset); remove it")
        return self


class PseudoMetaConfig(_Config):
    """How the pseudo-clean meta set is chosen each epoch (meta_set.source pseudo; FaMUS
    supplement section E): a two-component Gaussian mixture on the per-sample training losses."""

    warmup_epochs: int = Field(5, ge=1)
    """plain cross-entropy epochs before the first meta step (the losses must separate first)"""
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    """a sample joins the meta set when its posterior of the low-loss component exceeds this"""
    min_size: int = Field(64, ge=1)
    """fewer samples than this pass the threshold: take those above the median posterior"""
    max_fraction: float = Field(0.9, gt=0.0, le=1.0)
    """more than this share of the training set passes: take those above the median posterior"""


class MetaSetConfig(_Config):
    per_class: int | None = Field(10, ge=1)
    """clean meta samples per class (class-stratified); set per_class or size"""
    size: int | None = Field(None, ge=1)
    """total clean meta samples, spread over the classes as evenly as possible"""
    source: Literal["train", "test", "val", "pseudo"] = "train"
    """where the meta set comes from: carved from the training split (and removed from it),
    from the test split (MLC/MetaLabelNet protocol; the rest stays the test set), from the
    dataset's clean validation split (clothing1m), or pseudo: no clean labels, each epoch the
    training samples a loss mixture calls clean, with their given labels (see `pseudo`)"""
    pseudo: PseudoMetaConfig = Field(default_factory=PseudoMetaConfig)
    """settings of source pseudo"""

    @model_validator(mode="before")
    @classmethod
    def _size_or_per_class(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("source") == "pseudo":
            given = [k for k in ("per_class", "size") if data.get(k) is not None]
            if given:
                raise ValueError(f"meta_set.{given[0]} does not apply to source pseudo: its size "
                                 f"is chosen each epoch by the loss mixture; remove it, or see "
                                 f"meta_set.pseudo (threshold, min_size, max_fraction)")
            return {**data, "per_class": None}
        if data.get("size") is not None and "per_class" not in data:
            data = {**data, "per_class": None}
        return data

    @model_validator(mode="after")
    def _check(self) -> MetaSetConfig:
        if self.source == "pseudo":
            return self
        if (self.per_class is None) == (self.size is None):
            raise ValueError("set exactly one of meta_set.per_class and meta_set.size")
        if self.pseudo != PseudoMetaConfig():
            raise ValueError(f"meta_set.pseudo applies only to meta_set.source pseudo, and the "
                             f"source is {self.source}; set source: pseudo or remove pseudo")
        return self


# --------------------------------------------------------------------------------- model
class ModelConfig(_Config):
    name: str = "mlp"
    """backbone by name (raymeta.models.MODEL_NAMES), or a plugin model: an installed entry
    point of the group raymeta.models, or an import path (package.module:Class)"""
    options: dict[str, Any] = Field(default_factory=dict)
    """backbone options, e.g. {hidden: [128]} for mlp, {depth: 28, width: 10} for wrn,
    {weights_path: /path/resnet50.pth} for resnet50"""

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        """A built-in model is checked without torch; a plugin's module is imported."""
        from raymeta.models import model_options

        with _as_value_error():
            model_options(name)
        return name

    @field_validator("options")
    @classmethod
    def _known_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Option names here, their values when the model is built."""
        from raymeta.models import check_model

        if "name" in info.data:  # else the name's own error says it
            with _as_value_error():
                check_model(info.data["name"], options)
        return options


# ---------------------------------------------------------------------------- optimizing
class OptimizerConfig(_Config):
    name: Literal["sgd", "adam"] = "sgd"
    """optimizer of the classifier"""
    lr: float = Field(0.1, gt=0.0)
    """initial learning rate"""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """SGD momentum"""
    nesterov: bool = False
    """SGD Nesterov momentum"""
    weight_decay: float = Field(5e-4, ge=0.0)
    """L2 weight decay"""


class ScheduleConfig(_Config):
    name: Literal["constant", "step", "cosine"] = "cosine"
    """learning-rate schedule over epochs"""
    milestones: list[int] = Field(default_factory=list)
    """step: epochs at which the learning rate is multiplied by gamma"""
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    """step: multiplier at each milestone"""


# -------------------------------------------------------------------------------- method
class _MethodConfig(_Config):
    """Base of every method's config: a built-in one here with its `name` (METHOD_CONFIGS has
    each, in the order they are defined), a plugin's in its own package (MethodOptions)."""


class CEConfig(_MethodConfig):
    """Plain cross-entropy on the noisy labels: the baseline every method is compared to."""

    name: Literal["ce"] = "ce"
    unread_fields: ClassVar[tuple[str, ...]] = ("train.meta_batch_size",)  # no meta batches


class _MetaConfig(_MethodConfig):
    """Settings every meta-learning method shares (the bilevel engine's knobs)."""

    meta_interval: int = Field(1, ge=1)
    """update the meta-model every k training steps (k > 1 amortises the meta step)"""
    virtual_step: Literal["optimizer", "sgd"] = "optimizer"
    """the virtual step: `optimizer` mirrors the real optimizer (momentum, Nesterov, weight
    decay) so the meta loss is measured where training really goes; `sgd` is the papers' and
    official code's plain theta - lr * grad"""
    virtual_lr: float | None = Field(None, gt=0.0)
    """learning rate of the virtual step (default: the classifier's current learning rate)"""
    meta_lr: float = Field(1e-3, gt=0.0)
    """learning rate of the meta-model"""
    famus: bool = False
    """FaMUS: back-propagate the meta gradient only through a learned, sampled subset of
    parameter tensors (settings in the top-level `famus` section)"""


class MWNetConfig(_MetaConfig):
    """Meta-Weight-Net (Shu et al., NeurIPS 2019): a 1-hidden-layer net maps each sample's loss
    to its weight."""

    name: Literal["mwnet"] = "mwnet"
    hidden: int = Field(100, ge=1)
    """hidden units of the weighting net (1 -> hidden -> 1, sigmoid output)"""
    weights: Literal["normalized", "mean"] = "normalized"
    """normalized: loss = sum of weights/sum(weights) * losses (official PGC script);
    mean: loss = mean of weights * losses (official MW-Net.py)"""
    meta_optimizer: Literal["sgd", "adam"] = "sgd"
    """sgd: momentum 0.9, Nesterov (PGC script); adam (MW-Net.py)"""
    meta_weight_decay: float = Field(5e-4, ge=0.0)
    """weight decay of the weighting net (official: 5e-4 with sgd, 1e-4 with adam)"""


class L2RConfig(_MetaConfig):
    """Learning to Reweight (Ren et al., ICML 2018): per-batch weights from the meta gradient
    at zero perturbation, clamped at 0 and normalised; no persistent meta-model."""

    name: Literal["l2r"] = "l2r"
    unread_fields: ClassVar[tuple[str, ...]] = ("meta_lr",)  # no meta-model to learn

    @model_validator(mode="after")
    def _no_interval(self) -> L2RConfig:
        if self.meta_interval != 1:
            raise ValueError("l2r has no meta-model to reuse between steps, so its weights are "
                             "recomputed every step; set method.meta_interval to 1")
        return self


class MLCConfig(_MetaConfig):
    """Meta Loss Correction (Wang et al., CVPR 2020): the noise transition matrix T is learned by
    the meta gradient, clamped at 0 and normalised."""

    name: Literal["mlc"] = "mlc"
    plain_ce_until: ClassVar[str | None] = "warmup_epochs"
    meta_lr: float = Field(0.1, gt=0.0)
    """learning rate of T (paper: 1e-2 for CIFAR with its tiny virtual lr; official code 0.11)"""
    t_on_logits: bool = False
    """official code: softmax(logits @ T); paper (default): softmax(logits) @ T"""
    reset_t_each_step: bool = False
    """official code: T restarts from the identity every step; paper (default): T persists"""
    loss_reduction: Literal["mean", "sum"] = "mean"
    """official code sums the corrected loss over the batch; the paper averages"""
    warmup_epochs: int = Field(0, ge=0)
    """plain cross-entropy epochs before MLC's own step, T at the identity until then (official
    code: MLC starts from a model trained 30,000 CE iterations at lr 0.1, which the paper does
    not describe; 0 = none, the paper)"""
    meta_grad_clip: float | None = Field(None, gt=0.0)
    """clip T's meta gradient elementwise at this size before its step (None: unclipped, the
    paper). With T on probabilities a training label that the corrected model finds nearly
    impossible gives a gradient of 1/(pT)_y, up to 1e5 times the usual; clamp and normalise keep
    what such a step adds off the diagonal, and T drifts flat (docs/fidelity.md)"""


class MLNTConfig(_MetaConfig):
    """MLNT (Li et al., CVPR 2019): meta-train on synthetic noisy labels so that the model after
    a step on them still agrees with a mean teacher."""

    name: Literal["mlnt"] = "mlnt"
    plain_ce_until: ClassVar[str | None] = "start_epoch"
    unread_fields: ClassVar[tuple[str, ...]] = ("meta_lr", "train.meta_batch_size")  # its meta
    # step trains the model itself, on synthetic labels of the training batch
    num_fast: int = Field(10, ge=1)
    """M, the number of synthetic label sets per step"""
    perturb_ratio: float = Field(0.5, gt=0.0, le=1.0)
    """share of the batch relabelled in each synthetic set"""
    neighbours: int = Field(10, ge=1)
    """k: a relabelled sample takes the label of one of its k nearest neighbours in the batch"""
    virtual_step: Literal["optimizer", "sgd"] = "sgd"
    """the official code's plain fast-weight step theta - a * grad on the synthetic labels (the
    real optimizer's momentum holds the real labels' gradients, not these)"""
    virtual_lr: float | None = Field(0.2, gt=0.0)
    """the fast-weight step size a (CIFAR 0.2, Clothing1M 0.02)"""
    meta_weight: float = Field(0.4, ge=0.0)
    """weight of the consistency loss once ramped up (CIFAR: 0.4)"""
    start_epoch: int = Field(2, ge=0)
    """plain cross-entropy before this epoch"""
    ramp_epochs: int = Field(20, ge=0)
    """the meta weight ramps up as exp(-5(1-u)^2) over this many epochs after start_epoch"""
    ema_decay: float = Field(0.999, gt=0.0, lt=1.0)
    """teacher EMA decay after the ramp (0.99 during it)"""

    @model_validator(mode="after")
    def _no_famus(self) -> MLNTConfig:
        if self.famus:
            raise ValueError("famus does not apply to mlnt: its meta gradient flows into the "
                             "classifier itself, not into a meta-model (see docs/methods.md); "
                             "use mwnet, l2r, mlc or metalabelnet")
        return self


class MetaLabelNetConfig(_MetaConfig):
    """MetaLabelNet (Algan & Ulusoy, TNNLS 2021): a single-layer net on frozen warm-up features
    generates soft labels, trained through the virtual step."""

    name: Literal["metalabelnet"] = "metalabelnet"
    plain_ce_until: ClassVar[str | None] = "warmup_epochs"
    warmup_epochs: int = Field(44, ge=1)
    """plain cross-entropy epochs; the feature encoder is frozen from the model at their end"""
    virtual_step: Literal["optimizer", "sgd"] = "sgd"
    """the official code's plain theta - 1 * grad: its size 1 is meant for a plain gradient;
    mirroring an optimizer with momentum 0.9 at that size steps about ten times further, and
    on MNIST with MetaLabelNet's own schedule that collapsed a run to chance"""
    virtual_lr: float | None = Field(1.0, gt=0.0)
    """the official code's virtual step size is 1"""
    meta_lr: float = Field(1e-2, gt=0.0)
    """Adam learning rate of the label net (CIFAR 1e-2, Clothing1M/WebVision 1e-3)"""
    meta_weight_decay: float = Field(1e-4, ge=0.0)
    """weight decay of the label net"""
    entropy_weight: float = Field(1.0, ge=0.0)
    """weight of the prediction-entropy term of the actual loss"""
    init_from_classifier: bool = True
    """start the label net from the warm-up model's classifier (same shape, same features), so
    the first soft labels are the warm-up predictions; false = random init (official code),
    which needs many steps before its soft labels are better than noise"""


# ----------------------------------------------------------------- baselines (no meta step)
class GCEConfig(_MethodConfig):
    """Generalized Cross Entropy (Zhang & Sabuncu, NeurIPS 2018): the Lq loss (1 - p_y^q) / q,
    between CE (q -> 0) and MAE (q = 1); truncated at p_y = k with pruning (the paper's
    truncated Lq)."""

    name: Literal["gce"] = "gce"
    unread_fields: ClassVar[tuple[str, ...]] = ("train.meta_batch_size",)  # no meta batches
    q: float = Field(0.7, gt=0.0, le=1.0)
    """the exponent q (paper: 0.7 on every dataset)"""
    truncate_k: float = Field(0.5, ge=0.0, lt=1.0)
    """truncated Lq: at the end of each pruning epoch, every training sample whose p_y under
    the current model is at most k gets weight 0 (the others 1) until the next pruning;
    0 = the plain Lq loss, no pruning (paper: k = 0.5)"""
    prune_start: int = Field(40, ge=0)
    """the first pruning epoch, counted from 0: the weights chosen at its end hold from the
    next epoch on (paper: 40 of 120 on CIFAR; the AlanChou/Truncated-Loss reimplementation
    prunes after 39 epochs, which is 38 here)"""
    prune_every: int = Field(10, ge=1)
    """epochs between prunings (paper: 10)"""


class SCEConfig(_MethodConfig):
    """Symmetric Cross Entropy (Wang et al., ICCV 2019): alpha CE + beta reverse CE, with
    log 0 of the one-hot label taken as A."""

    name: Literal["sce"] = "sce"
    unread_fields: ClassVar[tuple[str, ...]] = ("train.meta_batch_size",)  # no meta batches
    alpha: float = Field(0.1, ge=0.0)
    """weight of CE (paper: MNIST 0.01, CIFAR-10 0.1, CIFAR-100 6.0)"""
    beta: float = Field(1.0, ge=0.0)
    """weight of reverse CE (paper: MNIST 1.0, CIFAR-10 1.0, CIFAR-100 0.1)"""
    log_zero: float = Field(-4.0, lt=0.0)
    """A, the value taken for log 0 in the reverse CE (paper: -4; the official code clips the
    one-hot label at 1e-4: ln 1e-4 = -9.2103)"""


class _CorrectionConfig(_MethodConfig):
    """Settings of the two-stage loss corrections: train CE, estimate T, train corrected."""

    plain_ce_until: ClassVar[str | None] = "estimate_epoch"

    estimate_epoch: int = Field(10, ge=1)
    """cross-entropy epochs before T is estimated; the corrected loss trains from this epoch
    to train.epochs, which counts both stages (the learning-rate schedule runs over all of
    them, without restarting at the estimate)"""
    retrain: bool = True
    """put the model back to its initial weights (the same as the first stage's) and clear the
    optimizer's state once T is estimated, as the papers do; false = go on from the
    cross-entropy model"""


class ForwardConfig(_CorrectionConfig):
    """Forward correction (Patrini et al., CVPR 2017): T estimated from anchor points of the
    cross-entropy model on the noisy training data; loss = CE(softmax(logits) @ T, y)."""

    name: Literal["forward"] = "forward"
    unread_fields: ClassVar[tuple[str, ...]] = ("train.meta_batch_size",)  # no meta batches
    anchor_percentile: float = Field(97.0, gt=0.0, le=100.0)
    """per class i, the anchor is the training sample at this percentile of p(i | x) (paper
    code: 97; 100 = the arg max, the paper's Eq. 9)"""
    oracle_t: bool = False
    """use the realized noise matrix instead of the estimate (an upper bound, not a method:
    rows are labelled forward-oracle in summaries)"""


class GLCConfig(_CorrectionConfig):
    """Gold Loss Correction (Hendrycks et al., NeurIPS 2018): T estimated from the cross-entropy
    model's predictions on the clean meta set (the trusted data); then the corrected loss on
    the noisy data plus CE on a trusted (meta) batch, the two means weighted by their shares
    of the data, as the official code's mixed batches weigh them."""

    name: Literal["glc"] = "glc"


class CoteachingConfig(_MethodConfig):
    """Co-teaching (Han et al., NeurIPS 2018): two networks; each trains on the small-loss
    samples chosen by the other, keeping 1 - forget rate of each batch."""

    name: Literal["coteaching"] = "coteaching"
    unread_fields: ClassVar[tuple[str, ...]] = ("train.meta_batch_size",)  # no meta batches
    forget_rate: float | None = Field(None, ge=0.0, lt=1.0)
    """the final share of each batch dropped (default: noise.rate, as in the paper and its
    code; 0 for noise.type none; noise.type real has no known rate: set it)"""
    num_gradual: int = Field(10, ge=0)
    """T_k: the forget rate ramps up linearly over this many epochs (paper: 10; 0: no ramp)"""
    exponent: float = Field(1.0, gt=0.0)
    """c in the ramp (paper and code: 1)"""
    ramp: Literal["paper", "code"] = "paper"
    """with T = epoch + 1 (the first training epoch is T = 1 in both): paper: forget_rate *
    min((T / T_k)^c, 1); code (official main.py): linspace(0, forget_rate^c, T_k)[T] for
    T < T_k, then forget_rate (full one epoch sooner; with c != 1 it jumps at T_k)"""
    evaluate: Literal["first", "second"] = "first"
    """which network is evaluated and saved as the model (the other's test accuracy is
    reported as peer_test_acc)"""


def _built_in_method_configs(base: type = _MethodConfig) -> dict[str, type[_Config]]:
    found = {}
    for cls in base.__subclasses__():
        if "name" in cls.model_fields:
            found[cls.model_fields["name"].default] = cls
        found.update(_built_in_method_configs(cls))
    return found


METHOD_CONFIGS: dict[str, type[_Config]] = _built_in_method_configs()
"""method name -> its config class: every method config defined above, by its `name` (a
plugin method joins it when a config names it)"""


def _method_union() -> Any:
    """`method`'s type: the configs of METHOD_CONFIGS, told apart by their `name`."""
    return Annotated[Union[tuple(METHOD_CONFIGS.values())], Field(discriminator="name")]  # noqa: UP007


MethodConfig = _method_union()
METHODS = tuple(METHOD_CONFIGS)
"""the built-in methods"""

MethodOptions = _MethodConfig
"""base class of a plugin method's options (raymeta.plugins): its own fields, documented in
place; `name` is set by raymeta"""
MetaMethodOptions = _MetaConfig
"""base class of a bilevel plugin method's options: adds the engine's knobs (meta_interval,
virtual_step, virtual_lr, meta_lr, famus)"""


def register_method_config(name: str, options: Any, where: str = "options") -> type[_Config]:
    """Make a plugin method's options a member of the method union under `name`."""
    if not (isinstance(options, type) and issubclass(options, _MethodConfig)):
        raise ConfigError(f"method '{name}': {where} must be a subclass of "
                          f"raymeta.config.MethodOptions or MetaMethodOptions (got {options!r})")
    if "name" in options.model_fields:
        raise ConfigError(f"method '{name}': {where} declares a field 'name'; remove it: a "
                          f"method's name is how configs call it, and raymeta sets it")
    named = create_model(options.__name__, __base__=options, __module__=options.__module__,
                         name=(Literal[name], name))
    named.__doc__ = options.__doc__
    METHOD_CONFIGS[name] = named
    _ignored_settings.cache_clear()  # its lists of the methods that read a setting
    ExperimentConfig.model_fields["method"].annotation = _method_union()
    ExperimentConfig.model_rebuild(force=True)
    return named


class FamusConfig(_Config):
    """FaMUS (Xu et al., CVPR 2021): per-parameter-tensor gradient samplers choose which
    tensors keep their second-order path in the virtual step."""

    k: int = Field(4, ge=0)
    """expected number of active tensors (the count loss pulls the sum of gates toward k)"""
    lambda_count: float = Field(0.1, ge=0.0)
    """weight of the count loss (sum of gates - k)^2"""
    lambda_grad: float = Field(0.1, ge=0.0)
    """weight of the gradient-distance loss on the classifier layer"""
    sampler_lr: float = Field(0.1, gt=0.0)
    """SGD learning rate of the samplers (momentum 0.9, Nesterov)"""
    hidden: int = Field(128, ge=1)
    """hidden units of each sampler (D -> hidden -> hidden -> 2, PReLU)"""
    temperature: float = Field(5.0, gt=0.0)
    """Gumbel-softmax temperature"""
    window: Literal["last_stage", "all"] = "last_stage"
    """what the samplers cover when `candidates` is not set. last_stage: the released code's
    setup, which produced the paper's speed-ups: the model's last stage (preact_resnet18:
    layer4), its final norm and the classifier, the classifier always on, the meta forward
    detached below the stage; all: every parameter tensor, as the paper describes"""
    candidates: int | None = Field(None, ge=1)
    """gate only the last N parameter tensors, in model order; tensors below are always off
    (instead of `window`)"""
    classifier_always_on: bool = False
    """keep the classifier's tensors always on (window last_stage always does)"""
    detach_at: str | None = None
    """name of a module whose output the meta forward detaches (the released code's truncation,
    e.g. blocks.5); nothing below it is back-propagated in the meta step"""
    cosine_every: int = Field(50, ge=0)
    """every N meta steps, measure the cosine similarity between the FaMUS meta gradient and
    the full one on the same batch (0: never)"""
    exact_below_window: bool = True
    """true: the tensors below the window (`candidates`) take their exact virtual step, as in
    the paper and the released code; false: they keep their current values in the meta
    forward, so neither the virtual nor the meta backward goes below the window (cheaper;
    theta' is then approximate below the window)"""

    @model_validator(mode="after")
    def _window(self) -> FamusConfig:
        if not self.exact_below_window and self.candidates is None and self.window == "all":
            raise ValueError("famus.exact_below_window false needs a window: set famus.candidates "
                             "(the number of last parameter tensors the samplers cover), or "
                             "famus.window: last_stage")
        return self


# ---------------------------------------------------------------------------- train/run
class TrainConfig(_Config):
    epochs: int = Field(20, ge=1)
    """training epochs over the noisy training set"""
    batch_size: int = Field(64, ge=1)
    """training mini-batch size"""
    meta_batch_size: int = Field(100, ge=1)
    """clean meta mini-batch size (meta methods)"""
    eval_batch_size: int = Field(1024, ge=1)
    """batch size for evaluation"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where to train; auto = cuda when available"""
    dtype: Literal["float32", "float64"] = "float32"
    """floating-point type of models and inputs (float64: exactness checks, gradient tests)"""
    sync_batchnorm: bool = False
    """data parallel: BatchNorm normalises with the statistics of the global batch (one
    all-reduce per layer and forward) instead of each worker's own (the default)"""
    checkpoint: bool = True
    """save a checkpoint every epoch (needed to resume)"""
    bf16: bool = False
    """run matrix multiplies and convolutions in bfloat16 (torch.autocast; tensor cores on
    GPUs); parameters, optimizer state, losses and the meta-model's updates stay float32"""
    channels_last: bool = False
    """images and convolution weights in channels-last memory layout (faster convolutions on
    GPUs, especially with bf16)"""
    compile: bool = False
    """torch.compile the model (once per trial) for what differentiates it once: plain
    cross-entropy steps (ce, warm-up epochs) and evaluation. Meta steps stay eager: a compiled
    backward cannot be differentiated again"""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.bf16 and self.dtype != "float32":
            raise ValueError(f"train.bf16 autocasts float32 models; train.dtype is {self.dtype}: "
                             f"use one or the other")
        return self


class ResourcesConfig(_Config):
    cpus_per_trial: float = Field(1.0, gt=0.0)
    """CPUs reserved per trial (shared by its workers)"""
    gpus_per_trial: float = Field(0.0, ge=0.0)
    """GPUs per trial; a fraction (0.25) packs several small trials on one GPU; with several
    workers, each gets gpus_per_trial / workers_per_trial (a whole number of GPUs)"""
    workers_per_trial: int = Field(1, ge=1)
    """data-parallel workers per trial (Ray Train); batch_size is per worker, so N workers
    train with global batch N * batch_size"""
    max_failures: int = Field(1, ge=0)
    """multi-worker trials: restarts from the last checkpoint after a worker dies"""
    capacity_wait_s: float = Field(120.0, ge=0.0)
    """multi-worker trials: after a worker or node is lost, how long the trial waits for
    the resources of its workers to be free again (a replaced node, an autoscaler) before
    it fails with a failed row that names the lost node; `--resume` continues it later from
    its last checkpoint"""
    elastic: bool = False
    """multi-worker trials: after a node is lost, go on with the workers that remain (at
    least min_workers) instead of waiting for the lost ones, and grow back when capacity
    returns. The global batch stays workers_per_trial * batch_size (each worker takes a
    larger share), so the results are those of the full worker count"""
    min_workers: int | None = Field(None, ge=1)
    """with elastic: the fewest workers a trial trains on (default 1)"""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """at most this many trials at once (default: what the cluster's resources allow)"""
    seeds_per_trial: int = Field(1, ge=1)
    """cells that differ only in their seed train this many at a time in one process, their
    models packed into one (vmap); each seed still gets its own results row. For small models
    on a GPU (every method but mlnt); on a CPU it is slower (docs/benchmarks.md)"""
    cells_per_trial: int = Field(1, ge=1)
    """cells one Tune trial trains one after another (in grid order). For sweeps of many
    short cells (seconds each), where Tune's scheduling between trials leaves slots idle;
    each cell keeps its own rows, curves and checkpoint, and a cell that fails does not stop
    the others. Not with seeds_per_trial > 1, workers_per_trial > 1 or early stopping"""

    @model_validator(mode="after")
    def _check(self) -> ResourcesConfig:
        if self.cells_per_trial > 1 and (self.seeds_per_trial > 1 or self.workers_per_trial > 1):
            raise ValueError("cells_per_trial > 1 chains short one-process cells; it does not "
                             "combine with seeds_per_trial > 1 or workers_per_trial > 1 (use "
                             "one or the other)")
        per_worker = self.gpus_per_trial / self.workers_per_trial
        if self.workers_per_trial > 1 and per_worker and per_worker != int(per_worker):
            raise ValueError(
                f"gpus_per_trial {self.gpus_per_trial:g} over workers_per_trial "
                f"{self.workers_per_trial} gives {per_worker:g} GPU per worker; workers of one "
                f"run cannot share a GPU (NCCL refuses); use a multiple of workers_per_trial")
        if self.seeds_per_trial > 1 and self.workers_per_trial > 1:
            raise ValueError("seeds_per_trial > 1 packs small models into one process; it does "
                             "not combine with workers_per_trial > 1 (use one or the other)")
        if self.min_workers is not None and not self.elastic:
            raise ValueError("min_workers is the fewest workers of an elastic trial; set "
                             "elastic: true, or drop min_workers")
        if self.elastic and self.workers_per_trial < 2:
            raise ValueError("elastic needs workers_per_trial >= 2 (a one-worker trial has "
                             "no workers to go on with); raise workers_per_trial or drop elastic")
        if self.elastic and self.min_workers is not None and self.min_workers > self.workers_per_trial:
            raise ValueError(f"min_workers {self.min_workers} is more than workers_per_trial "
                             f"{self.workers_per_trial}; use at most {self.workers_per_trial}")
        return self

    def world_sizes(self) -> range:
        """How many workers a multi-worker trial may train on: workers_per_trial, or with
        elastic any number from min_workers up."""
        low = (self.min_workers or 1) if self.elastic else self.workers_per_trial
        return range(low, self.workers_per_trial + 1)

    def check_elastic_batches(self, batch_size: int, meta_batch_size: int) -> None:
        """An elastic trial keeps its global batches (workers_per_trial * batch_size, and the
        meta batch likewise) on fewer workers, so each size must split evenly over every
        worker count it may train on; ConfigError naming the fix otherwise."""
        if not self.elastic:
            return
        n = self.workers_per_trial
        for key, size in (("batch_size", batch_size), ("meta_batch_size", meta_batch_size)):
            bad = [w for w in self.world_sizes() if (n * size) % w]
            if not bad:
                continue
            step = math.lcm(*(w // math.gcd(w, n) for w in self.world_sizes()))
            fixed = -(-size // step) * step
            low = min(self.world_sizes())
            raise ConfigError(
                f"resources.elastic keeps the global {key.replace('_', ' ')} workers_per_trial "
                f"x train.{key} = {n} x {size} = {n * size} on any number of workers from "
                f"{low} to {n}, but it does not split evenly over {bad[0]} worker"
                f"{'s' if bad[0] > 1 else ''}; set train.{key} to a multiple of {step} (e.g. "
                f"{fixed}), or narrow the range with resources.min_workers")

    def per_worker(self, driver_cpus: float = 0.0) -> dict[str, float]:
        """Ray resources of one worker, when the trial's driver takes `driver_cpus` of the
        trial's CPUs (so a trial never needs more than cpus_per_trial)."""
        return {"CPU": (self.cpus_per_trial - driver_cpus) / self.workers_per_trial,
                "GPU": self.gpus_per_trial / self.workers_per_trial}


_READ_BY = {**{f"dataset.{key}": ("dataset", tuple(n for n, d in _built_in_datasets().items()
                                                if key in d.reads))
               for key in sorted({key for d in _built_in_datasets().values() for key in d.reads})},
            "noise.mapping": ("noise", ("asymmetric",)), "noise.file": ("noise", ("real",)),
            "noise.key": ("noise", ("real",)), "noise.probs_file": ("noise", ("feature_dependent",))}
"""dataset and noise settings -> (section, the datasets or noise types that read them)"""


def methods_reading(key: str) -> list[str]:
    """The built-in methods that read a setting: an option of theirs by name (`meta_lr`), or
    another section's by dotted key (`train.meta_batch_size`)."""
    return [n for n, c in METHOD_CONFIGS.items() if key not in c.unread_fields
            and ("." in key or key in c.model_fields)]


@functools.cache
def _ignored_settings(method: type[_Config], famus: bool, optimizer: str, schedule: str,
                      dataset: str = "digits", noise: str = "none") -> tuple[tuple[str, str], ...]:
    """(dotted key, why) of the settings a run of these choices never reads."""
    found = []
    chosen = {"dataset": dataset, "noise": noise}
    for key, (section, readers) in _READ_BY.items():
        if chosen[section] not in readers:
            what = "dataset" if section == "dataset" else "noise.type"
            found.append((key, f"{what} {chosen[section]} does not read it (read by: "
                               f"{', '.join(readers)})"))
    for key in method.unread_fields:
        takers = methods_reading(key)
        found.append((key if "." in key else f"method.{key}",
                      f"method {method.model_fields['name'].default} does not read it (the "
                      f"methods that do: {', '.join(takers)})"))
    if not famus:
        why = ("read only when the method runs FaMUS (method.famus: true)" if "famus" in
               method.model_fields else f"method {method.model_fields['name'].default} has no FaMUS")
        found += [(f"famus.{key}", why) for key in FamusConfig.model_fields]
    if optimizer != "sgd":
        found += [(f"optimizer.{key}", f"optimizer {optimizer} does not read it (sgd does)")
                  for key in ("momentum", "nesterov")]
    if schedule != "step":
        found += [(f"schedule.{key}", f"schedule {schedule} does not read it (step does)")
                  for key in ("milestones", "gamma")]
    return tuple(found)


def _short_hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


@functools.cache
def _default(section: type[_Config], field: str) -> Any:
    return section.model_fields[field].get_default(call_default_factory=True)


class ExperimentConfig(_Config):
    """One training run: data, noise, meta set, model, method, optimizer, schedule, seed."""

    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    meta_set: MetaSetConfig = Field(default_factory=MetaSetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=CEConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    famus: FamusConfig = Field(default_factory=FamusConfig)
    seed: int = Field(0, ge=0)
    """fixes the noisy labels, the meta split, the initialisation and the batch order"""

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> ExperimentConfig:
        """Validate, first loading a plugin method the config names (raymeta.plugins)."""
        method = obj.get("method") if isinstance(obj, dict) else None
        name = method.get("name") if isinstance(method, dict) else None
        if isinstance(name, str) and name not in METHOD_CONFIGS:
            plugins.load_method(name)  # nothing when it names no plugin: the union says so
        return super().model_validate(obj, **kwargs)

    @model_validator(mode="after")
    def _coteaching_forget_rate(self) -> ExperimentConfig:
        """Co-teaching forgets the noise rate by default: resolve it here, where the noise is known."""
        if self.method.name != "coteaching" or self.method.forget_rate is not None:
            return self
        if self.noise.type == "real":
            raise ValueError("method coteaching needs method.forget_rate with noise.type real "
                             "(real noisy labels have no known noise rate): set method.forget_rate "
                             "to an estimate of the share of wrong labels")
        rate = self.noise.rate  # 0.0 for noise.type none: nothing to forget
        object.__setattr__(self, "method", self.method.model_copy(update={"forget_rate": rate}))
        return self

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        # A method whose own step would start after the last epoch trains plain CE throughout,
        # and its rows would pass for the method's results.
        field = self.method.plain_ce_until
        start = getattr(self.method, field) if field else None
        if start is not None and start >= self.train.epochs:
            raise ValueError(f"method.{field} ({start}) is not below train.epochs "
                             f"({self.train.epochs}): {self.method.name} would train plain "
                             f"cross-entropy throughout and never run its own step; raise "
                             f"train.epochs above {start}, or lower method.{field}")
        warmup = self.meta_set.pseudo.warmup_epochs
        if self.meta_set.source == "pseudo" and warmup >= self.train.epochs:
            raise ValueError(f"meta_set.pseudo.warmup_epochs ({warmup}) leaves no epoch for the "
                             f"meta method in train.epochs ({self.train.epochs}); lower the "
                             f"warm-up or train longer")
        return self

    def flat(self) -> dict[str, Any]:
        """The config as one flat dict with dotted keys (for results columns)."""
        return flatten(self.model_dump(mode="json"))

    def digest(self) -> str:
        """The run's identity: a short stable hash of the config (defaults included, the seed
        too) with every setting the run never reads (`unread`) at its default, so two configs
        that train the same run have one digest: a store finds a finished trial by it, and a
        summary counts each run once (rows written before this rule are given it when read,
        `results.query.load`)."""
        data = self._as_earlier_versions_wrote()
        for key in self.unread():
            section, field = key.split(".")
            if field in data[section]:  # (famus.window is left out where FaMUS is off)
                data[section][field] = _default(type(getattr(self, section)), field)
        return _short_hash(data)

    def _as_earlier_versions_wrote(self) -> dict:
        """The config as the versions before each of these options hashed it, wherever the
        option changes nothing: a store finds a finished trial by its digest, so a new option
        must not make a resumed sweep rerun it, or a summary count it twice."""
        data = self.model_dump(mode="json")
        dataset, famus = data["dataset"], data["famus"]
        for key in ("cache", "classes", "class_fractions", "train_size"):  # new, at their defaults
            if dataset[key] is None:
                del dataset[key]
        for section in ("noise", "dataset"):  # options: new, at their default
            if not data[section]["options"]:
                del data[section]["options"]
        if dataset["image_size"] is None and dataset["name"] != "imagefolder":
            dataset["image_size"] = 224  # clothing1m's size, the former default
        if data["method"]["name"] == "mlc":
            for key, default in (("warmup_epochs", 0), ("meta_grad_clip", None)):  # new options
                if data["method"][key] == default:
                    del data["method"][key]
        if not getattr(self.method, "famus", False) or famus["candidates"] is not None \
                or famus["window"] == "all":
            del famus["window"]  # the window is then what it was before the option existed
        return data

    def ignored(self) -> dict[str, str]:
        """The settings this run never reads (whatever their values), each with why."""
        return dict(_ignored_settings(type(self.method), bool(getattr(self.method, "famus", False)),
                                      self.optimizer.name, self.schedule.name, self.dataset.name,
                                      self.noise.type))

    def unread(self) -> dict[str, str]:
        """The settings this run never reads although they differ from their defaults, each
        with why. Such a setting changes nothing (the digest resets it), and its author
        expects an effect there is none of."""
        found = {}
        for key, why in self.ignored().items():
            section, field = key.split(".")
            part = getattr(self, section)
            if getattr(part, field) != _default(type(part), field):
                found[key] = why
        return found

    def setting_digest(self) -> str:
        """The digest without the seed: the runs of one setting on several seeds share it."""
        return self.model_copy(update={"seed": 0}).digest()

    def trial_id(self) -> str:
        """The experiment's identity in results stores: readable, and a function of the config
        digest alone, so the same experiment has the same id whichever sweep, command or pack
        of seeds ran it."""
        # a plugin's import path ("pkg.module:Class") is not a file name
        readable = functools.partial(re.sub, r"[^A-Za-z0-9_.-]+", "-")
        noise = "clean" if self.noise.type == "none" else f"{readable(self.noise.type)}{self.noise.rate:g}"
        method = readable(self.method.name)
        method += "-famus" if getattr(self.method, "famus", False) else ""
        data = readable(self.dataset.name) + ("-pseudo" if self.meta_set.source == "pseudo" else "")
        return f"{method}_{data}_{noise}_s{self.seed}_{self.digest()}"


# -------------------------------------------------------------------------------- sweeps
class EarlyStoppingConfig(_Config):
    """Optional early stopping of unpromising trials (ASHA). Off by default: paper replication
    runs every trial to the end. Trials are compared on a metric of the clean meta set or the
    training data, never the test set."""

    scheduler: Literal["none", "asha"] = "none"
    """none, or asha (asynchronous successive halving)"""
    metric: str = "meta_acc"
    """per-epoch metric that ranks trials (meta_acc, meta_loss, train_loss, ...)"""
    mode: Literal["max", "min"] = "max"
    """whether a larger metric is better"""
    grace_period: int = Field(5, ge=1)
    """epochs every trial runs before it can be stopped"""
    reduction_factor: float = Field(3.0, gt=1.0)
    """at each rung, about 1 / reduction_factor of the trials go on"""

    @model_validator(mode="after")
    def _check(self) -> EarlyStoppingConfig:
        if self.metric.startswith("test_"):
            raise ValueError(f"early_stopping.metric {self.metric} is a test-set metric: choosing "
                             f"trials on the test set biases every result; use meta_acc")
        return self


def _suggest(word: str, choices) -> str:
    """" (did you mean 'x'?)" for a near miss among `choices`, else ""."""
    hint = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{hint[0]}'?)" if hint else ""


DISTRIBUTIONS = {"uniform": "[low, high]", "loguniform": "[low, high], both > 0",
                 "randint": "[low, high], whole numbers, both included", "choice": "[value, ...]"}
"""the search distributions a sweep file's `search.space` takes, with the form of each"""

SEARCH_METRICS = ("meta_acc", "meta_loss")
"""what a search chooses on: the clean meta set's accuracy (larger is better) or loss"""


def check_distribution(key: str, spec: Any) -> tuple[str, list]:
    """(kind, arguments) of one `search.space` entry, or ValueError saying what is wrong."""
    forms = "; ".join(f"{{{k}: {v}}}" for k, v in DISTRIBUTIONS.items())
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"{key}: {spec!r} is not a distribution; give one of {forms}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"{key}: unknown distribution {kind!r}"
                         f"{_suggest(str(kind), DISTRIBUTIONS)}; give one of {forms}")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ValueError(f"{key}: choice takes a non-empty list of values, got "
                             f"{args!r}")
        texts = [json.dumps(a, sort_keys=True, default=str) for a in args]
        if len(set(texts)) < len(texts):
            raise ValueError(f"{key}: choice {args!r} repeats a value; list each once")
        return kind, args
    numbers = isinstance(args, list) and len(args) == 2 and all(
        isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args)
    if not numbers:
        raise ValueError(f"{key}: {kind} takes {DISTRIBUTIONS[kind]}, got {args!r}")
    low, high = args
    if not low < high:
        raise ValueError(f"{key}: {kind} {args!r} needs low < high")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"{key}: loguniform {args!r} needs low > 0 (its logarithm "
                         f"is sampled uniformly); use uniform for a range that starts at 0")
    if kind == "randint" and not all(float(a).is_integer() for a in args):
        raise ValueError(f"{key}: randint takes whole numbers, got {args!r}")
    return kind, [int(a) for a in args] if kind == "randint" else [float(a) for a in args]


class SearchConfig(_Config):
    """A hyperparameter search inside each cell of the grid, chosen on the clean meta set
    (never on the test set); the chosen configuration is then trained on `confirm_seeds`,
    whose rows are the sweep's results (docs/search.md)."""

    space: dict[str, dict[str, Any]]
    """dotted key -> distribution: {uniform: [low, high]}, {loguniform: [low, high]},
    {randint: [low, high]} (both included) or {choice: [value, ...]}"""
    algorithm: Literal["optuna", "random"] = "optuna"
    """optuna (Optuna's TPE sampler, through Ray Tune) or random (no extra dependency)"""
    num_samples: int = Field(8, ge=1)
    """configurations tried per grid cell"""
    metric: str = "meta_acc"
    """what the search maximises (meta_acc) or minimises (meta_loss), on the clean meta set"""
    at: Literal["last", "best"] = "last"
    """the metric at the last epoch, or its best over the epochs"""
    confirm_seeds: list[int] | None = None
    """seeds the chosen configuration trains on afterwards, as the sweep's result rows (default:
    the seeds it was searched on, whose runs are copied, not trained again)"""
    seed: int = 0
    """the search algorithm's own seed: the same sweep file proposes the same configurations"""

    @field_validator("metric")
    @classmethod
    def _meta_metric(cls, metric: str) -> str:
        if metric.startswith("test_"):
            raise ValueError(f"{metric} is a test-set metric: choosing a configuration on the test "
                             f"set makes its test accuracy a biased estimate; choose on "
                             f"{' or '.join(SEARCH_METRICS)} (the clean meta set)")
        if metric not in SEARCH_METRICS:
            raise ValueError(f"unknown search metric {metric!r}{_suggest(metric, SEARCH_METRICS)}; "
                             f"choose {' or '.join(SEARCH_METRICS)}")
        return metric

    @field_validator("space")
    @classmethod
    def _distributions(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not space:
            raise ValueError("search.space is empty: give at least one dotted key and its "
                             "distribution, e.g. method.meta_lr: {loguniform: [1.0e-4, 1.0e-1]}")
        for key, spec in space.items():
            if key == "seed":
                raise ValueError("seed: the seed is not a hyperparameter; list seeds "
                                 "in the grid (searched together) or in search.confirm_seeds")
            check_distribution(key, spec)
        return space

    @field_validator("confirm_seeds")
    @classmethod
    def _seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and (not seeds or len(set(seeds)) < len(seeds)):
            raise ValueError(f"search.confirm_seeds {seeds!r}: give one or more distinct seeds")
        return seeds

    @property
    def mode(self) -> Literal["max", "min"]:
        return "max" if self.metric.endswith("_acc") else "min"

    @property
    def random_only(self) -> str | None:
        """Why an optuna search is a random one, or None: TPE proposes only after its random
        start, so with as few samples (the default 8 among them) every sample is a random draw."""
        if self.algorithm != "optuna" or self.num_samples > TPE_RANDOM_START:
            return None
        return (f"note: Optuna's TPE draws its first {TPE_RANDOM_START} samples at random, so all "
                f"{self.num_samples} samples of each cell are random draws; give num_samples above "
                f"{TPE_RANDOM_START} for TPE to choose the later ones, or say algorithm: random")


TPE_RANDOM_START = 10
"""samples Optuna's TPESampler draws at random before it models the results (its
n_startup_trials default, which Ray Tune's OptunaSearch keeps)"""


class MlflowTracking(_Config):
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI: sqlite:///file.db, a local folder, or http(s)://server"""
    experiment: str | None = None
    """MLflow experiment name (default: the sweep's name)"""


class WandbTracking(_Config):
    project: str | None = None
    """W&B project (default: the sweep's name)"""
    entity: str | None = None
    """W&B entity (team or user; default: yours)"""
    mode: Literal["online", "offline"] = "online"
    """offline writes runs under `dir` to upload later with `wandb sync`"""
    dir: str | None = None
    """where W&B writes its run folders (default: ./wandb)"""


class TrackingConfig(_Config):
    """Experiment trackers every trial is logged to, besides the Parquet store (which stays the
    source of truth): config, per-epoch metrics, final outcomes (docs/tracking.md)."""

    mlflow: MlflowTracking | None = None
    wandb: WandbTracking | None = None

    @property
    def enabled(self) -> bool:
        return self.mlflow is not None or self.wandb is not None


SWEEP_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
"""a sweep name is one folder name of the store (`sweep=<name>`): no '/', never '..'"""


def check_sweep_name(name: str, where: str = "sweep name") -> str:
    if not re.fullmatch(SWEEP_NAME, name):
        raise ConfigError(f"{where} {name!r} is not a valid sweep name: it names a folder of the "
                          f"store, so it takes letters, digits, '_', '-' and '.', starting with a "
                          f"letter or digit (e.g. runs, mnist-ablation)")
    return name


class SweepSpec(_Config):
    """A sweep file: a base experiment and a grid over dotted keys, run as one trial per cell."""

    name: str = Field(pattern=SWEEP_NAME)
    """sweep name: letters, digits, '_', '-', '.'; names its results partition"""
    store: str = "results"
    """results store: a local folder (relative to where you run) or a URI (s3://, gs://)"""
    base: dict[str, Any] = Field(default_factory=dict)
    """the experiment config every cell starts from"""
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    """dotted key -> values; the sweep runs every combination (a value may be a dict that
    sets several keys under that key, e.g. noise: [{type: none}, {type: uniform, rate: 0.4}];
    the key "." takes dicts of dotted keys from the top, e.g. {method.name: l2r, optimizer.lr: 0.03})"""
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    """cells to skip: each entry maps dotted keys to values; a cell matching all is skipped"""
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    search: SearchConfig | None = None
    """a search over hyperparameters inside each grid cell (docs/search.md)"""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """MLflow and W&B tracking of every trial (docs/tracking.md)"""

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        if self.search is not None:
            if clash := sorted(set(self.search.space) & set(self.grid)):
                raise ValueError(f"{', '.join(clash)} is both a grid key and searched "
                                 f"(search.space); a key is either listed or searched")
            if self.resources.cells_per_trial > 1:
                raise ValueError("search does not combine with resources.cells_per_trial > 1: "
                                 "each sample is one Tune trial")
        if self.resources.seeds_per_trial > 1 and self.early_stopping.scheduler != "none":
            raise ValueError("early_stopping does not combine with resources.seeds_per_trial > 1 "
                             "(it would stop every seed of a pack on their mean); use one or the "
                             "other")
        if self.resources.cells_per_trial > 1 and self.early_stopping.scheduler != "none":
            raise ValueError("early_stopping does not combine with resources.cells_per_trial > 1 "
                             "(the scheduler would stop a chain of cells on one cell's metric); "
                             "use one or the other")
        return self


# ------------------------------------------------------------------------------- helpers
def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and empty dicts stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and not _is_leaf_dict(dotted):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _is_leaf_dict(dotted: str) -> bool:
    # free-form dicts whose keys are data, not config fields
    return dotted in ("model.options", "noise.mapping")


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set tree['a']['b'] = value for 'a.b'; a dict value merges into what is there.
    The key "." takes a dict of dotted keys from the top (one grid entry setting several
    sections at once, e.g. {method.name: l2r, optimizer.lr: 0.03})."""
    if dotted == ".":
        if not isinstance(value, dict):
            raise ConfigError(f"grid key '.' takes mappings of dotted keys, like "
                              f"{{method.name: l2r, optimizer.lr: 0.03}}; got {value!r}")
        for key, sub in value.items():
            set_dotted(tree, key, sub)
        return
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    if isinstance(value, dict) and isinstance(node.get(last), dict) and not _is_leaf_dict(dotted):
        merged = dict(node[last])
        for key, sub in value.items():
            set_dotted(merged, key, sub)
        node[last] = merged
    else:
        node[last] = value


def get_dotted(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def format_validation_error(err: ValidationError, model: type[BaseModel], where: str = "") -> str:
    """One line per problem: the dotted field, the bad value, what is allowed, a did-you-mean."""
    lines = []
    for problem in err.errors():
        raw_loc = [str(p) for p in problem["loc"]]
        loc = [p for i, p in enumerate(raw_loc) if not (i and raw_loc[i - 1] == "method")]
        field = ".".join(loc) or "(top level)"
        kind = problem["type"]
        if kind == "extra_forbidden":
            parent = _model_at(model, raw_loc[:-1])
            allowed = sorted(parent.model_fields) if parent else []
            hint = difflib.get_close_matches(loc[-1], allowed, n=1)
            msg = f"unknown key '{field}'"
            if hint:
                msg += f" (did you mean '{'.'.join(loc[:-1] + [hint[0]])}'?)"
            takers = methods_reading(loc[-1]) if raw_loc[0] == "method" and len(raw_loc) == 3 else []
            if takers:  # another method's option
                msg += f": method {raw_loc[1]} does not take it (the methods that do: {', '.join(takers)})"
            if allowed:
                msg += f"; allowed here: {', '.join(allowed)}"
        elif kind == "literal_error":
            allowed = problem.get("ctx", {}).get("expected", "")
            value = problem.get("input")
            choices = [c.strip().strip("'") for c in str(allowed).replace(" or ", ", ").split(",")]
            hint = difflib.get_close_matches(str(value), choices, n=1)
            msg = f"{field}: '{value}' is not allowed; choose one of {allowed}"
            if hint:
                msg += f" (did you mean '{hint[0]}'?)"
        elif kind == "union_tag_invalid":
            tag = problem.get("ctx", {}).get("tag")
            expected = problem.get("ctx", {}).get("expected_tags", "")
            hint = difflib.get_close_matches(str(tag), [t.strip().strip("'") for t in
                                                        str(expected).split(",")], n=1)
            more = sorted(set(plugins.installed()) - set(METHOD_CONFIGS))
            hint = hint or difflib.get_close_matches(str(tag), more, n=1)
            msg = f"{field}.name: unknown method '{tag}'; choose one of {expected}"
            if hint:
                msg += f" (did you mean '{hint[0]}'?)"
            msg += ", or a plugin method: " + (f"one installed here ({', '.join(more)}), or one "
                                               if more else "") + \
                "named by its import path (package.module:Class)"
        elif kind == "string_pattern_mismatch":
            msg = (f"{field}: '{problem.get('input')}' may only contain letters, digits, '_', '-' "
                   f"and '.', and must start with a letter or digit")
        elif kind == "value_error":
            msg = f"{field}: {problem['msg'].removeprefix('Value error, ')}"
        else:
            msg = f"{field}: {problem['msg']} (got {problem.get('input')!r})"
        lines.append(msg)
    return _problems(where, lines)


def _problems(where: str, lines: list[str], what: str = "") -> str:
    """`invalid config in WHERE: WHAT` and one line per problem."""
    return f"invalid config{(' in ' + where) if where else ''}:{what}" + "\n  - " + "\n  - ".join(lines)


def _model_at(model: type[BaseModel], path: list[str]) -> type[BaseModel] | None:
    """The config class at a validation-error location (method tags pick their class)."""
    current: Any = model
    previous = None
    for part in path:
        if previous == "method":  # the discriminated union puts the method name in the path
            current = METHOD_CONFIGS.get(part)
        else:
            field = getattr(current, "model_fields", {}).get(part)
            if field is None:
                return None
            current = field.annotation
        previous = part
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def parse_experiment(data: dict[str, Any], where: str = "", unread_ok: bool = False) -> ExperimentConfig:
    """Validate a dict as an ExperimentConfig; raise ConfigError with readable lines. A setting
    the run never reads is an error unless `unread_ok` (a sweep judges those over its cells)."""
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, ExperimentConfig, where)) from None
    if not unread_ok and (unread := cfg.unread()):
        raise ConfigError(_problems(where, [f"{key}: {why}" for key, why in unread.items()],
                                    " settings this run never reads (remove them):"))
    return cfg


def parse_sweep(data: Any, where: str = "") -> SweepSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid sweep file{(' ' + where) if where else ''}: expected a mapping "
                          f"with keys name, base, grid, ...; got {type(data).__name__}")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, SweepSpec, where)) from None
