"""Agent trajectories -> span-labelled, tokenized training batches (see docs/DATA.md).

    trajectories = load_trajectories("train.jsonl", errors="skip")      # native/OpenAI/Anthropic/ReAct
    encode = TrajectoryTokenizer(hf_fast_tokenizer, max_length=4096)
    examples = encode.tokenize_all(trajectories)
    batch = DistillationCollator.from_tokenizer(hf_fast_tokenizer, pad_to_multiple_of=8)(examples[:8])
    # batch: input_ids, labels, span_ids, attention_mask ([B, L] int64 tensors)

Nothing here imports transformers: any object with the fast-tokenizer call interface works.
"""

from .collate import DistillationCollator
from .formats import FORMATS, detect_format, parse_trajectory
from .schema import LoadReport, TrajectoryList, load_trajectories
from .tokenize import (IGNORE_INDEX, TRAINED_SPANS, RenderedTrajectory, RenderError, TokenizeStats,
                       TrajectoryTokenizer, TruncationError, render_chat, render_plain, render_trajectory,
                       to_chat_messages, tokenize_trajectory)
from .trajectory import Step, ToolCall, Trajectory, TrajectoryError

__all__ = [
    "Trajectory", "Step", "ToolCall", "TrajectoryError", "LoadReport", "TrajectoryList", "FORMATS",
    "detect_format", "parse_trajectory", "load_trajectories",
    "RenderedTrajectory", "RenderError", "TruncationError", "TokenizeStats", "TrajectoryTokenizer",
    "IGNORE_INDEX", "TRAINED_SPANS", "render_plain", "render_chat", "render_trajectory", "to_chat_messages",
    "tokenize_trajectory",
    "DistillationCollator",
]
