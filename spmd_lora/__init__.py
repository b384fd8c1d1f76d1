"""spmd_lora: explicit-SPMD LoRA fine-tuning of Llama-family models in JAX."""
from .api import Model, load_model
from .config import PRESETS, ModelConfig
from .errors import SpmdLoraError
from .lora import LoraConfig
from .mesh import make_mesh

__all__ = ["Model", "load_model", "ModelConfig", "LoraConfig", "PRESETS", "SpmdLoraError",
           "make_mesh"]
__version__ = "0.1.0"
