"""Agent trajectories -> span-labelled, tokenized training batches (see docs/DATA.md).

    trajectories = load_trajectories("train.jsonl", errors="skip")      # native/OpenAI/Anthropic/ReAct
    # a bad line is a TrajectoryError naming file, line and field; "skip" leaves out just that line
    encode = TrajectoryTokenizer(hf_fast_tokenizer, max_length=4096)
    examples = encode.tokenize_all(trajectories)
    batch = DistillationCollator.from_tokenizer(hf_fast_tokenizer, pad_to_multiple_of=8)(examples[:8])
    # batch: input_ids, labels, span_ids, attention_mask ([B, L] int64 tensors)

Nothing here imports transformers: any object with the fast-tokenizer call interface works.
"""

from .collate import DistillationCollator
from .formats import FORMATS, detect_format, parse_trajectory
from .schema import MAX_DEPTH, MAX_LINE_BYTES, LoadReport, TrajectoryList, load_trajectories
from .tokenized import TOKENIZED_KEYS, check_tokenized, load_tokenized
from .tokenize import (IGNORE_INDEX, TRAINED_SPANS, RenderedTrajectory, RenderError, TokenizeStats,
                       TrajectoryTokenizer, TruncationError, render_chat, render_plain, render_trajectory,
                       to_chat_messages, tokenize_trajectory)
from .trajectory import Step, ToolCall, Trajectory, TrajectoryError, UnknownKeyWarning

__all__ = [
    "Trajectory", "Step", "ToolCall", "TrajectoryError", "UnknownKeyWarning", "LoadReport", "TrajectoryList",
    "FORMATS", "detect_format", "parse_trajectory", "load_trajectories", "MAX_LINE_BYTES", "MAX_DEPTH",
    "RenderedTrajectory", "RenderError", "TruncationError", "TokenizeStats", "TrajectoryTokenizer",
    "IGNORE_INDEX", "TRAINED_SPANS", "render_plain", "render_chat", "render_trajectory", "to_chat_messages",
    "tokenize_trajectory",
    "DistillationCollator", "load_tokenized", "check_tokenized", "TOKENIZED_KEYS",
]
