"""The PICACO optimizer: pools, proposals, candidate scoring and the resumable loop.

Public API: :func:`optimize` (async) and :func:`optimize_sync`, :class:`OptimizeParams` with the
named :data:`PRESETS`, :func:`estimate` for a pre-flight cost estimate, :class:`OptimizeResult`, and
the progress sinks.
"""

from picaco.optimize.engine import (
    Judge,
    OptimizeResult,
    RedundancyScorer,
    derive_seed,
    instruction_hash,
    optimize,
    optimize_sync,
)
from picaco.optimize.params import PRESETS, Estimate, OptimizeParams, estimate, preset
from picaco.optimize.progress import (
    JsonLinesProgress,
    ListProgress,
    ProgressEvent,
    ProgressSink,
    PlainProgress,
    QuietProgress,
    RichProgress,
    make_progress,
)
from picaco.optimize.proposer import default_seed_instruction
from picaco.optimize.rundir import RunDir, read_final_instruction
from picaco.optimize.scoring import select_mode

__all__ = [
    "PRESETS",
    "Estimate",
    "Judge",
    "JsonLinesProgress",
    "ListProgress",
    "OptimizeParams",
    "OptimizeResult",
    "ProgressEvent",
    "ProgressSink",
    "PlainProgress",
    "QuietProgress",
    "RedundancyScorer",
    "RichProgress",
    "RunDir",
    "default_seed_instruction",
    "derive_seed",
    "estimate",
    "instruction_hash",
    "make_progress",
    "optimize",
    "optimize_sync",
    "preset",
    "read_final_instruction",
    "select_mode",
]
