"""diekae-rag: retrieved knowledge for a local decoder through DIEKÆ side encoders, not the prompt."""

from .checkpoint import CheckpointError, DecoderMismatchError
from .config import DiekaeConfig
from .encoder import DiekaeEncoder
from .model import DiekaeModel
from .prompts import KnowledgeTruncatedWarning

__all__ = ["DiekaeConfig", "DiekaeEncoder", "DiekaeModel", "CheckpointError", "DecoderMismatchError",
           "KnowledgeTruncatedWarning"]
__version__ = "0.1.0"
