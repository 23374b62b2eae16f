"""The copy readout: how DIEKÆ writes a passage's tokens into the decoder's answer.

The pointer trunk of the encoders gives a state per position; the readout turns them into rows
added to one decoder layer's MLP output. Its parts, one idea each:

- :mod:`.config`    ``CopyConfig``: the serving-time settings (``copy.json``, overridable per call)
- :mod:`.head`      ``CopyHead``: the learned queries, keys, "nothing" slot, gains, match weight
- :mod:`.memory`    ``CopyMemory``: the slots it reads; ``KnowledgeLayout``: where passages sit
- :mod:`.pieces`    answer pieces and first pieces (a name copied as an answer writes it)
- :mod:`.values`    the row written for a copied token (raw or whitened)
- :mod:`.providers` question-aware slot scores: the passage prior and the answer-start reader
- :mod:`.score`     ``copy_scores``: the pointer score, its whole formula in one function
- :mod:`.readout`   ``CopyReadout``: one call's readout, the prefill then each decode step
"""

from .config import GATE_OFF, CopyConfig
from .head import CopyHead
from .memory import CopyMemory, KnowledgeLayout
from .providers import PassagePrior, ReaderScores, ScoreProvider
from .readout import CopyReadout
from .score import copy_scores

__all__ = ["GATE_OFF", "CopyConfig", "CopyHead", "CopyMemory", "CopyReadout", "KnowledgeLayout", "PassagePrior",
           "ReaderScores", "ScoreProvider", "copy_scores"]
