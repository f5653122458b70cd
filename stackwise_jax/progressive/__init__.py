"""Progressive training: the builder, the trainer, evaluation, activation caching, masks, time."""
from stackwise_jax.progressive.builder import FROZEN, TRAINABLE, TRUNK, ProgressiveRackBuilder
from stackwise_jax.progressive.guard import TrainingDiverged
from stackwise_jax.progressive.loader import ProgressiveDataLoader
from stackwise_jax.progressive.masking import TimeStepMasking
from stackwise_jax.progressive.stages import load_rack
from stackwise_jax.progressive.trainer import ProgressiveTrainer, TrainingInterrupted
