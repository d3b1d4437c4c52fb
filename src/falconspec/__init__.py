"""falconspec: lossless speculative decoding (Falcon's semi-autoregressive drafting) for Hugging Face models."""

from .batch import BatchFullError, BatchGenerator
from .generate import GenerationResult, SpeculativeGenerator
from .models import load_target
from .sampling import SamplingParams
from .target import TargetModel
from .tree import Tree, TreeError

__version__ = "0.1.0"
__all__ = ["BatchFullError", "BatchGenerator", "GenerationResult", "SamplingParams", "SpeculativeGenerator",
           "TargetModel", "Tree", "TreeError", "load_target", "__version__"]
