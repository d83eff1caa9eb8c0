"""e1min: fine-tune Profluent's E1 protein language model to predict metal-binding residues.

Importing e1min has no side effects: no logging setup, no threads, no downloads.
"""

__version__ = "0.1.0"  # first: modules below read it (checkpoint metadata)

from e1min.adapters import load_adapter, save_adapter
from e1min.compile import compile_model
from e1min.config import E1Config
from e1min.errors import E1minError
from e1min.heads import BindingModel
from e1min.hub import load_model
from e1min.lora import LoRALinear, apply_lora, merge_lora, trainable_parameters, unmerge_lora
from e1min.model import E1ForMaskedLM, E1Model, E1Output
from e1min.predictor import Predictor, load_predictor
from e1min.tokenizer import prepare_batch

__all__ = [
    "__version__",
    "E1Config",
    "E1Model",
    "E1ForMaskedLM",
    "E1Output",
    "load_model",
    "prepare_batch",
    "LoRALinear",
    "apply_lora",
    "merge_lora",
    "unmerge_lora",
    "trainable_parameters",
    "save_adapter",
    "load_adapter",
    "BindingModel",
    "load_predictor",
    "Predictor",
    "E1minError",
    "compile_model",
]
