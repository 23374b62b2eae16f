"""diekae-rag: retrieved knowledge for a local decoder through DIEKÆ side encoders, not the prompt."""

from .checkpoint import CheckpointError, DecoderMismatchError
from .config import EncoderConfig
from .copy import CopyConfig
from .encoder import DiekaeEncoder
from .model import DiekaeModel
from .prompts import KnowledgeTruncatedWarning

__all__ = ["CopyConfig", "DiekaeEncoder", "DiekaeModel", "EncoderConfig", "CheckpointError", "DecoderMismatchError",
           "KnowledgeTruncatedWarning"]
__version__ = "0.1.0"
