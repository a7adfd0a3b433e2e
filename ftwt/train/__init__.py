"""Training: the configuration and recipes, the runtime (devices, processes, seeds, loaders),
the checkpoint type and the trainer.

Example:
    >>> from ftwt.train import TrainConfig, Trainer
    >>> report = Trainer(TrainConfig(model="resnet20", dense=True, epochs=10, out_dir="runs/dense")).fit()
"""

from ftwt.train.checkpoint import Checkpoint, load_model, load_trained
from ftwt.train.config import PRESETS, TrainConfig
from ftwt.train.recipes import list_recipes, load_recipe
from ftwt.train.trainer import Callback, Trainer

__all__ = ["PRESETS", "Callback", "Checkpoint", "TrainConfig", "Trainer", "list_recipes", "load_model", "load_recipe",
           "load_trained"]
