"""Pad tokenized trajectories into a batch of torch tensors."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from ..core.spans import PAD_SPAN
from .tokenize import IGNORE_INDEX

_REQUIRED = ("input_ids", "labels")
# An example's index in a teacher cache (distillkit.training.cached_teacher adds it): passed through as [B].
CACHE_INDEX = "cache_index"


class DistillationCollator:
    """features (dicts from TrajectoryTokenizer) -> {"input_ids", "labels", "span_ids",
    "attention_mask"} int64 tensors [batch, length], right-padded to the longest example (rounded
    up to pad_to_multiple_of). Padding is input_ids=pad_token_id, labels=ignore_index,
    span_ids=PAD_SPAN, attention_mask=0. Labels are padded by position, never derived from
    pad_token_id, so pad == eos leaves every real EOS label intact.

    Features without span_ids (a plain {input_ids, labels} dataset) give a batch without span_ids:
    DistillationTrainer then counts labelled tokens as ANSWER spans. A batch must not mix the two."""

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: Optional[int] = None,
                 ignore_index: int = IGNORE_INDEX):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: set a pad token (pad == eos is fine here)")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.ignore_index = ignore_index

    @classmethod
    def from_tokenizer(cls, tokenizer, **options) -> "DistillationCollator":
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to its eos_token; "
                             "labels are masked by span, never by id, so pad == eos is safe)")
        return cls(tokenizer.pad_token_id, **options)

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        with_spans = "span_ids" in features[0]
        required = _REQUIRED + (("span_ids",) if with_spans else ())
        lengths = []
        for n, feature in enumerate(features):
            if not isinstance(feature, Mapping):
                raise TypeError(f"feature {n} must be a mapping of input_ids, labels[, span_ids]; "
                                f"got {type(feature).__name__}")
            missing = [key for key in _REQUIRED if key not in feature]
            if missing:
                raise ValueError(f"feature {n} lacks {', '.join(missing)} (keys: {', '.join(map(str, feature))})")
            if ("span_ids" in feature) != with_spans:
                raise ValueError(f"feature {n} {'lacks' if with_spans else 'has'} span_ids but feature 0 "
                                 f"{'has' if with_spans else 'lacks'} them: a batch must not mix the two")
            length = len(feature["input_ids"])
            keys = required + (("attention_mask",) if "attention_mask" in feature else ())
            if any(len(feature[key]) != length for key in keys):
                raise ValueError(f"feature {n}: {', '.join(keys)} differ in length")
            lengths.append(length)
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        out = {
            "input_ids": torch.full((batch, width), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((batch, width), self.ignore_index, dtype=torch.long),
            "attention_mask": torch.zeros((batch, width), dtype=torch.long),
        }
        if with_spans:
            out["span_ids"] = torch.full((batch, width), PAD_SPAN, dtype=torch.long)
        if CACHE_INDEX in features[0]:
            out[CACHE_INDEX] = torch.tensor([int(feature[CACHE_INDEX]) for feature in features], dtype=torch.long)
        for row, (feature, length) in enumerate(zip(features, lengths)):
            for key in required:
                out[key][row, :length] = torch.as_tensor(feature[key], dtype=torch.long)
            mask = feature.get("attention_mask")
            out["attention_mask"][row, :length] = 1 if mask is None else torch.as_tensor(mask, dtype=torch.long)
        return out
