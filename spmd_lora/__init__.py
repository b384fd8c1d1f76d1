"""spmd_lora: explicit-SPMD LoRA fine-tuning of Llama-family models in JAX."""
from .api import Model, load_model
from .config.lora_config import LoraConfig
from .config.model_config import PRESETS, ModelConfig
from .errors import SpmdLoraError
from .parallel.mesh import make_mesh
from .runtime.distributed import initialize_distributed

__all__ = ["Model", "load_model", "ModelConfig", "LoraConfig", "PRESETS", "SpmdLoraError",
           "make_mesh", "initialize_distributed"]
__version__ = "0.1.0"
