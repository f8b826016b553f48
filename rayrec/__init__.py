"""rayrec: Ray-distributed knowledge distillation for recommenders."""
__version__ = "0.1.0"
