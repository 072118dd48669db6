"""A causal language model that proposes ReAct steps (:class:`LMPolicy`), batched and memoized.

Confidence of a step: the probability the model gives to the action (or answer)
line it produced (greedily, unless the policy samples), i.e. the product of the token
probabilities of that line (a sequence probability in [0, 1]); 0 for a step with no
action or answer line.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional, Sequence

import torch

from .protocol import ReActFormat, decode_ids, encode_text

__all__ = ["Proposal", "LMPolicy"]


def _kv_cache_kwarg(model) -> str:
    """The forward argument that takes the KV cache: ``cache`` in newer transformers, else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _kv_cache_of(output):
    """The KV cache of a causal-LM output, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


@dataclasses.dataclass
class Proposal:
    text: str  # the generated step (reasoning lines + action/answer line)
    confidence: float  # P(action or answer line) under the model; 0.0 when there is none
    num_tokens: int


class LMPolicy:
    """A causal LM + tokenizer that proposes ReAct steps, batched and memoized.

    ``model`` is any Hugging Face causal LM (``model(input_ids, attention_mask, position_ids,
    past_key_values, use_cache)``); it is put in eval mode. Contexts are lists of text lines; each
    line is tokenized on its own (as :func:`encode_trajectory` does for training). Decoding is greedy
    (``temperature=0``) or sampled; a step ends with its action/answer line, after ``max_lines``
    lines, at an EOS token or after ``max_new_tokens``.
    """

    def __init__(self, model, tokenizer, *, name: Optional[str] = None, fmt: ReActFormat = ReActFormat(),
                 max_new_tokens: int = 64, max_lines: int = 4, batch_size: int = 64,
                 bos_id: Optional[int] = None, memoize: bool = True, temperature: float = 0.0,
                 seed: Optional[int] = None):
        self.model, self.tokenizer, self.fmt = model, tokenizer, fmt
        # temperature 0: greedy (deterministic, memoized); > 0: sampling (never memoized)
        self.temperature = float(temperature)
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.name = name or type(model).__name__
        self.max_new_tokens, self.max_lines, self.batch_size = max_new_tokens, max_lines, batch_size
        self.bos_id, self.memoize = bos_id, memoize
        self.cache: dict[tuple[int, ...], Proposal] = {}
        self.generated_tokens = 0  # tokens generated (cache misses only), for cost accounting
        self.calls = 0  # proposals requested (cache hits included)
        self._newline_ids: Optional[set[int]] = None
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
        self._eos_ids = set(eos) if isinstance(eos, (list, tuple, set)) else ({eos} if eos is not None else set())
        model.eval()  # inference only (no dropout)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def encode_lines(self, lines: Sequence[str]) -> list[int]:
        ids = [] if self.bos_id is None else [self.bos_id]
        for line in lines:
            ids += encode_text(self.tokenizer, line)
        return ids

    def _newlines(self) -> set[int]:
        if self._newline_ids is None:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._newline_ids = {i for i in range(vocab) if "\n" in decode_ids(self.tokenizer, [i])}
        return self._newline_ids

    def propose(self, contexts: Sequence[Sequence[str]]) -> list[Proposal]:
        """One proposed step per context; greedy proposals are memoized on the exact token ids."""
        keys = [tuple(self.encode_lines(c)) for c in contexts]
        self.calls += len(keys)
        memoize = self.memoize and self.temperature == 0
        todo = sorted({k for k in keys if k not in self.cache}, key=len) if memoize else keys
        fresh: list[Proposal] = []
        for start in range(0, len(todo), self.batch_size):
            fresh += self._generate([list(k) for k in todo[start:start + self.batch_size]])
        if memoize:
            self.cache.update(zip(todo, fresh))
            return [self.cache[k] for k in keys]
        return fresh

    @torch.no_grad()
    def _generate(self, batch: list[list[int]]) -> list[Proposal]:
        model = self.model
        device = next(model.parameters()).device
        newline_ids = self._newlines()
        size, width = len(batch), max(len(ids) for ids in batch)
        input_ids = torch.zeros(size, width, dtype=torch.long)
        mask = torch.zeros(size, width, dtype=torch.long)
        for row, ids in enumerate(batch):  # left padding
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        past, logits = _kv_cache_of(out), out.logits[:, -1]
        cache_kwarg = _kv_cache_kwarg(model)
        next_pos = positions[:, -1] + 1
        generated: list[list[int]] = [[] for _ in range(size)]
        probs_out: list[list[float]] = [[] for _ in range(size)]
        line_start = [0] * size  # index in generated[row] where the current line starts
        final_start: list[Optional[int]] = [None] * size
        lines_done = [0] * size
        done = [False] * size
        for _ in range(self.max_new_tokens):
            probs = torch.softmax(logits.float(), dim=-1)
            if self.temperature > 0:
                sample_probs = torch.softmax(logits.float() / self.temperature, dim=-1).cpu()
                chosen = torch.multinomial(sample_probs, 1, generator=self._generator).to(probs.device)
                top_p, top_id = probs.gather(-1, chosen).squeeze(-1), chosen.squeeze(-1)
            else:
                top_p, top_id = probs.max(dim=-1)
            top_p, top_id = top_p.tolist(), top_id.tolist()
            for row in range(size):
                if done[row]:
                    continue
                token = top_id[row]
                generated[row].append(token)
                probs_out[row].append(top_p[row])
                if token in self._eos_ids:
                    done[row] = True
                elif token in newline_ids:
                    line = decode_ids(self.tokenizer, generated[row][line_start[row]:]).lstrip("\n")
                    lines_done[row] += 1
                    if self.fmt.is_final_line(line):
                        final_start[row] = line_start[row]
                        done[row] = True
                    elif lines_done[row] >= self.max_lines:
                        done[row] = True
                    line_start[row] = len(generated[row])
            if all(done):
                break
            mask = torch.cat([mask, mask.new_ones(size, 1)], dim=1)
            step_ids = torch.tensor(top_id, device=device).unsqueeze(1)
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=next_pos.unsqueeze(1),
                        use_cache=True, **{cache_kwarg: past})
            past, logits = _kv_cache_of(out), out.logits[:, -1]
            next_pos = next_pos + 1
        proposals = []
        for row in range(size):
            self.generated_tokens += len(generated[row])
            conf = 0.0
            if final_start[row] is not None:
                conf = float(torch.tensor(probs_out[row][final_start[row]:], dtype=torch.float64).prod())
            proposals.append(Proposal(decode_ids(self.tokenizer, generated[row]), conf, len(generated[row])))
        return proposals

    @torch.no_grad()
    def score(self, contexts: Sequence[Sequence[str]], continuations: Sequence[str]) -> list[float]:
        """P(continuation | context) under this model: the product of its token probabilities."""
        device = next(self.model.parameters()).device
        scores: list[float] = []
        pairs = [(self.encode_lines(c), encode_text(self.tokenizer, x)) for c, x in zip(contexts, continuations)]
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            width = max(len(a) + len(b) for a, b in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, (a, b) in enumerate(chunk):  # right padding
                ids[row, :len(a) + len(b)] = torch.tensor(a + b)
                mask[row, :len(a) + len(b)] = 1
            logp = torch.log_softmax(self.model(input_ids=ids.to(device), attention_mask=mask.to(device))
                                     .logits.float(), dim=-1).cpu()
            for row, (a, b) in enumerate(chunk):
                pos = torch.arange(len(a) - 1, len(a) + len(b) - 1)
                target = torch.tensor(b, dtype=torch.long)
                scores.append(float(logp[row, pos, target].double().sum().exp()))
        return scores
