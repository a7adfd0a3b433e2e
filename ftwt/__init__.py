"""ftwt: dynamic channel pruning with self-supervised mask prediction.

Implements "Fire Together Wire Together: A Dynamic Pruning Approach with Self-Supervised
Mask Prediction" (Elkerdawy et al., CVPR 2022, arXiv 2110.08232) for any CNN.

Example:
    >>> import torch, torch.nn.functional as F, ftwt
    >>> model = ftwt.attach_gates(ftwt.models.resnet56(), ftwt.GateConfig(threshold=0.9))
    >>> out = model(torch.randn(8, 3, 32, 32))
    >>> loss = F.cross_entropy(out, torch.zeros(8, dtype=torch.long)) + ftwt.mask_loss(model)
"""

from importlib.metadata import PackageNotFoundError, version

from ftwt import models
from ftwt.calibrate import calibrate_decisions, fold_decisions
from ftwt.cascade import WidthCascade
from ftwt.criteria import filter_scores, ground_truth, mass_mask, uniform_mask
from ftwt.engine import SparseEngine, fold_bn
from ftwt.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DeviceError,
    FTWTError,
    ModelNotFoundError,
    NonFiniteLossError,
    OutputError,
    UnsupportedLayerError,
)
from ftwt.estimate import Estimate, estimate, find_threshold
from ftwt.evaluate import evaluate
from ftwt.export import export_model
from ftwt.flops import FlopsMeter, FlopsReport, LayerFlops, conv_macs, linear_macs, measure
from ftwt.gate import Gate, GateConfig
from ftwt.loss import fit_gates, mask_loss
from ftwt.models import get_model, list_models
from ftwt.record import Record, record
from ftwt.report import write_report
from ftwt.surgery import (
    attach_gates,
    backbone_parameters,
    detach_gates,
    find_units,
    gate_config,
    gate_parameters,
    gated_units,
    is_gated,
    mask_source,
    set_decision,
    set_label_mode,
    set_threshold,
)
from ftwt.train import PRESETS, Checkpoint, TrainConfig, Trainer, load_model, load_trained
from ftwt.unit import GatedUnit, UnitOutput, UnitSpec

try:
    __version__ = version("ftwt")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DeviceError",
    "Estimate",
    "FTWTError",
    "FlopsMeter",
    "FlopsReport",
    "Gate",
    "GateConfig",
    "GatedUnit",
    "LayerFlops",
    "SparseEngine",
    "TrainConfig",
    "Trainer",
    "ModelNotFoundError",
    "NonFiniteLossError",
    "OutputError",
    "PRESETS",
    "Record",
    "UnitOutput",
    "UnitSpec",
    "UnsupportedLayerError",
    "WidthCascade",
    "__version__",
    "attach_gates",
    "backbone_parameters",
    "calibrate_decisions",
    "conv_macs",
    "detach_gates",
    "estimate",
    "evaluate",
    "export_model",
    "filter_scores",
    "find_threshold",
    "find_units",
    "fit_gates",
    "fold_decisions",
    "fold_bn",
    "gate_config",
    "gate_parameters",
    "gated_units",
    "get_model",
    "ground_truth",
    "is_gated",
    "linear_macs",
    "list_models",
    "load_model",
    "load_trained",
    "mask_loss",
    "mask_source",
    "mass_mask",
    "measure",
    "models",
    "record",
    "set_decision",
    "set_label_mode",
    "set_threshold",
    "uniform_mask",
    "write_report",
]
