"""Closed-set decoding components: candidate tries that constrain generation, candidate log-likelihoods that rank."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor

from surgvqa.data.answers import OPEN_ENDED
from surgvqa.data.records import Record

LABEL_SEPARATOR = "; "


def is_closed(record: Record) -> bool:
    """Closed-set records are constrained / ranked; open-ended ones (or closed types without candidates) are
    generated freely."""
    return record.question_type != OPEN_ENDED and bool(record.candidates)


# ----------------------------------------------------------------------------------------------------------------
# Candidate tries
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TrieNode:
    children: dict[int, TrieNode] = field(default_factory=dict)
    labels: set[int] = field(default_factory=set)  # labels whose token path passes through this node
    end: int | None = None  # the label whose token path ends here


def build_trie(sequences: Sequence[Sequence[int]]) -> TrieNode:
    root = TrieNode()
    for index, tokens in enumerate(sequences):
        node = root
        node.labels.add(index)
        for token in tokens:
            node = node.children.setdefault(int(token), TrieNode())
            node.labels.add(index)
        if node.end is not None:
            raise ValueError(f"candidates {node.end} and {index} have the same tokens {list(tokens)}")
        node.end = index
    return root


@dataclass(frozen=True)
class CandidateSet:
    """A record's candidates as token sequences, with the token that ends the answer.

    ``first[i]``: tokens of label i alone (the answer's first or only label); ``following[i]``: tokens of
    ``"; " + label``, for a label after the first (multi-label records only).
    """

    labels: tuple[str, ...]
    first: tuple[tuple[int, ...], ...]
    following: tuple[tuple[int, ...], ...]
    multi_label: bool
    terminator: int

    @property
    def sequences(self) -> list[list[int]]:
        """What ``rank`` scores per label: the label's tokens and the terminator."""
        return [[*tokens, self.terminator] for tokens in self.first]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def candidate_set(tokenizer: Any, candidates: Sequence[str], multi_label: bool, terminator: int) -> CandidateSet:
    labels = tuple(dict.fromkeys(label.strip() for label in candidates if label and label.strip()))
    if not labels:
        raise ValueError("a closed-set record needs at least one non-empty candidate")
    if any(";" in label for label in labels):
        raise ValueError(f"candidates must not contain ';' (the label separator): {labels}")
    first = tuple(tuple(encode_text(tokenizer, label)) for label in labels)
    following = tuple(tuple(encode_text(tokenizer, LABEL_SEPARATOR + label)) for label in labels) \
        if multi_label else ()
    return CandidateSet(labels, first, following, multi_label, int(terminator))


def max_new_tokens(candidates: CandidateSet) -> int:
    """Tokens of the longest valid output, terminator included: a too-small budget cuts an answer mid-label.
    Multi-label: every label once, then at most one repeat (which ends the answer)."""
    if not candidates.multi_label or len(candidates.labels) == 1:
        return max(len(tokens) for tokens in candidates.first) + 1
    all_following = sum(len(tokens) for tokens in candidates.following)
    distinct = max(len(first) + all_following - len(following)
                   for first, following in zip(candidates.first, candidates.following))
    return distinct + max(len(tokens) for tokens in candidates.following) + 1


class CandidateMatcher:
    """The state of one row's decoding through its candidate tries.

    ``allowed()`` is the exact set of next tokens that keep the output a prefix of a valid answer: a candidate
    (or several distinct candidates joined by "; " when multi-label, optionally closed by one repeat of a label
    already written) followed by the terminator.
    """

    def __init__(self, candidates: CandidateSet):
        self.candidates = candidates
        self.first_root = build_trie(candidates.first)
        self.following_root = build_trie(candidates.following) if candidates.multi_label else None
        if self.following_root is not None:
            # A token that could both continue a label and start the next one would make the state ambiguous.
            starts = set(self.following_root.children)
            for root in (self.first_root, self.following_root):
                stack = [root] if root is self.first_root else list(root.children.values())
                while stack:
                    node = stack.pop()
                    if starts & set(node.children):
                        raise ValueError(f"ambiguous candidate tokenisation around the separator: "
                                         f"{candidates.labels}")
                    stack.extend(node.children.values())
        self.node = self.first_root
        self.used: list[int] = []
        self.done = False

    def _can_follow(self, completed: int) -> bool:
        """Whether another label may follow the one just completed: multi-label, the completed label is new (a
        repeat ends the answer), and one is left unused."""
        return (self.following_root is not None and completed not in self.used
                and len(self.used) + 1 < len(self.candidates.labels))

    def allowed(self) -> list[int]:
        if self.done:
            return []
        tokens = list(self.node.children)
        completed = self.node.end
        if completed is not None:
            tokens.append(self.candidates.terminator)
            if self._can_follow(completed):
                tokens.extend(self.following_root.children)
        return tokens

    def advance(self, token: int) -> None:
        if self.done:
            raise ValueError("the answer is already complete")
        child = self.node.children.get(token)
        if child is not None:
            self.node = child
            return
        completed = self.node.end
        if completed is not None:
            if token == self.candidates.terminator:
                if completed not in self.used:
                    self.used.append(completed)
                self.done = True
                return
            if self._can_follow(completed):
                child = self.following_root.children.get(token)
                if child is not None:
                    self.used.append(completed)
                    self.node = child
                    return
        raise ValueError(f"token {token} is not a valid continuation of a candidate answer")

    @property
    def labels(self) -> list[str]:
        """The distinct labels chosen so far, in output order (complete once ``done``)."""
        return [self.candidates.labels[index] for index in self.used]


class CandidateLogitsProcessor(LogitsProcessor):
    """Restricts each batch row of ``generate`` to its own candidate trie (``None``: that row is free).

    Rows that have finished keep their scores: ``generate`` pads them regardless. Stateful: one instance per
    ``generate`` call.
    """

    def __init__(self, candidate_sets: Sequence[CandidateSet | None]):
        self.matchers = [CandidateMatcher(cs) if cs is not None else None for cs in candidate_sets]
        self.started = False  # the first call sees the prompt; later calls see one new token per row

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[0] != len(self.matchers):
            raise ValueError(f"batch has {input_ids.shape[0]} rows, the processor {len(self.matchers)}")
        if not self.started:
            self.started = True
        else:
            last = input_ids[:, -1].tolist()
            for matcher, token in zip(self.matchers, last):
                if matcher is not None and not matcher.done:
                    matcher.advance(token)
        rows: list[int] = []
        cols: list[int] = []
        free: list[int] = []
        for row, matcher in enumerate(self.matchers):
            if matcher is None or matcher.done:
                free.append(row)
                continue
            allowed = matcher.allowed()
            rows.extend([row] * len(allowed))
            cols.extend(allowed)
        if not rows:
            return scores
        # Everything -inf but the allowed entries (and the free rows): one write pass over the scores.
        masked = torch.full_like(scores, float("-inf"))
        index = (torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device))
        masked[index] = scores[index]
        if free:
            masked[free] = scores[free]
        return masked


# ----------------------------------------------------------------------------------------------------------------
# Candidate scoring (rank mode)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CandidateScore:
    sum: float  # log P(label tokens + terminator | prompt)
    mean: float  # the same per token: length-normalised, comparable across labels of different length

    def to_json(self) -> dict[str, float]:
        return {"sum": self.sum, "mean": self.mean}


def decoder_and_head(model: Any) -> tuple[Any, Any]:
    """The module that returns hidden states and the LM head, through a PEFT wrapper if any (PEFT injects its
    LoRA layers in place, so calling the inner modules runs them)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.model, causal_lm.get_output_embeddings()


def prompt_positions(decoder: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The prompts' position ids (M-RoPE: 3 × batch × length) and each row's next text position.

    After an image, Qwen2-VL's positions advance by the image's grid side, not by its token count, so the
    position of the first answer token is ``max(prompt positions) + 1`` (what the model calls ``rope_deltas``),
    not the prompt's length. Computed here, once, and passed explicitly, so that scoring continuations from a
    reused cache does not depend on state the model keeps between calls.
    """
    attention_mask = inputs["attention_mask"]
    if inputs.get("position_ids") is not None:  # a prompt continuing a cached prefix (prefix_cache): positions given
        positions = inputs["position_ids"]
        own = attention_mask[:, attention_mask.shape[1] - positions.shape[-1]:]
        return positions, positions.masked_fill(own[None] == 0, -1).amax(dim=(0, 2)) + 1
    if hasattr(decoder, "get_rope_index") and inputs.get("image_grid_thw") is not None:
        kwargs = {key: inputs[key] for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
                  if inputs.get(key) is not None}
        positions, _ = decoder.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                           attention_mask=attention_mask, **kwargs)
        masked = positions.masked_fill(attention_mask[None] == 0, -1)
        return positions, masked.amax(dim=(0, 2)) + 1
    return None, attention_mask.long().sum(-1)


def token_logprobs(lm_head: Any, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                   chunk: int | None = None) -> torch.Tensor:
    """``log P(targets[i] | hidden[rows[i]])`` for every i: the LM head and the vocabulary normaliser run once per
    hidden row, in chunks of rows so that the (rows x vocabulary) logits never need to exist at once."""
    chunk = chunk or (32 if hidden.device.type == "cpu" else 1024)  # 32: cache-sized on a CPU (docs/decoding.md)
    values = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    for start in range(0, len(hidden), chunk):
        logits = lm_head(hidden[start:start + chunk]).float()
        normaliser = torch.logsumexp(logits, dim=-1)
        here = (rows >= start) & (rows < start + chunk)
        local = rows[here] - start
        values[here] = logits[local, targets[here]] - normaliser[local]
    return values


@torch.inference_mode()
def score_candidates(model: Any, inputs: dict[str, torch.Tensor],
                     sequences: Sequence[Sequence[Sequence[int]]]) -> list[list[CandidateScore]]:
    """Log-likelihood of each row's candidate token sequences given that row's (left-padded) prompt; or, when
    ``inputs`` carry ``position_ids`` and a ``cache`` (surgvqa.inference.prefix_cache), given the cached prefix and the rest
    of each prompt.

    The prompts (images included) run once, with the cache on. The cache is then expanded to one row per
    candidate (``reorder_cache`` with repeated row indices) and all candidates of the batch run as one
    right-padded continuation batch, with explicit M-RoPE positions continuing each prompt. The LM head — with a
    151k vocabulary most of a small model's cost — runs only where a token is scored, and once per distinct
    (row, candidate prefix): candidates sharing a prefix share its next-token distribution.
    """
    flat = [list(tokens) for candidates in sequences for tokens in candidates]
    owners = [row for row, candidates in enumerate(sequences) for _ in candidates]
    if any(len(tokens) == 0 for tokens in flat):
        raise ValueError("a candidate sequence is empty")
    if not flat:
        return [[] for _ in sequences]
    decoder, lm_head = decoder_and_head(model)
    device = inputs["input_ids"].device
    positions, next_position = prompt_positions(decoder, inputs)
    prompt = decoder(**{**inputs, "position_ids": positions}, use_cache=True)
    hidden = [prompt.last_hidden_state[:, -1]]  # row r: the distribution of every candidate's first token

    # Which hidden row predicts each scored token: (candidate, step) -> row in torch.cat(hidden).
    distinct: dict[tuple[int, tuple[int, ...]], int] = {(owner, ()): owner for owner in range(len(sequences))}
    width = max(len(tokens) for tokens in flat) - 1  # continuation inputs: every token but the last
    if width > 0:
        cache = getattr(prompt, "cache", None) or getattr(prompt, "past_key_values", None)
        owner_index = torch.tensor(owners, device=device)
        ids = torch.zeros((len(flat), width), dtype=torch.long, device=device)
        mask = torch.zeros((len(flat), width), dtype=inputs["attention_mask"].dtype, device=device)
        for row, tokens in enumerate(flat):
            ids[row, : len(tokens) - 1] = torch.tensor(tokens[:-1], device=device)
            mask[row, : len(tokens) - 1] = 1
        cache.reorder_cache(owner_index)  # one copy of its prompt's cache per candidate
        text_positions = next_position[owner_index][:, None] + torch.arange(width, device=device)[None]
        continuation_positions = text_positions[None].expand(3, -1, -1) if positions is not None \
            else text_positions
        continuation = decoder(input_ids=ids, attention_mask=torch.cat([inputs["attention_mask"][owner_index], mask],
                                                                        dim=1),
                               position_ids=continuation_positions, cache=cache, use_cache=True).last_hidden_state
        # One LM-head row per distinct (prompt, prefix): the 9 grid cells share "upper"/"center"/"lower", ...
        gather_rows, gather_steps = [], []
        for row, tokens in enumerate(flat):
            for step in range(len(tokens) - 1):
                key = (owners[row], tuple(tokens[: step + 1]))
                if key not in distinct:
                    distinct[key] = len(sequences) + len(gather_rows)
                    gather_rows.append(row)
                    gather_steps.append(step)
        hidden.append(continuation[torch.tensor(gather_rows, device=device),
                                   torch.tensor(gather_steps, device=device)])
    rows, targets = [], []
    for owner, tokens in zip(owners, flat):
        for step, token in enumerate(tokens):
            rows.append(distinct[(owner, tuple(tokens[:step]))])
            targets.append(token)
    values = token_logprobs(lm_head, torch.cat(hidden), torch.tensor(rows, device=device),
                            torch.tensor(targets, device=device)).tolist()
    results: list[list[CandidateScore]] = [[] for _ in sequences]
    offset = 0
    for owner, tokens in zip(owners, flat):
        total = float(sum(values[offset:offset + len(tokens)]))
        offset += len(tokens)
        results[owner].append(CandidateScore(total, total / len(tokens)))
    return results


def best_label(scores: Sequence[CandidateScore]) -> int:
    """The label with the highest log-likelihood (sum; the first on ties, i.e. candidate order)."""
    return max(range(len(scores)), key=lambda index: (scores[index].sum, -index))


def best_label_pooled(scores: Sequence[CandidateScore], meanings: Sequence[object]) -> int:
    """The best label when labels with the same meaning pool their likelihood (as greedy decoding pools a shared
    prefix: ``">20"`` and ``">20mm"`` split one answer's probability, which must not let a third label win):
    the most likely label of the most likely meaning."""
    groups: dict[object, list[int]] = {}
    for index, meaning in enumerate(meanings):
        groups.setdefault(meaning, []).append(index)

    def pooled(indices: list[int]) -> float:
        top = max(scores[i].sum for i in indices)
        return top + math.log(sum(math.exp(scores[i].sum - top) for i in indices))

    best_group = max(groups.values(), key=lambda indices: (pooled(indices), -indices[0]))
    return max(best_group, key=lambda index: (scores[index].sum, -index))


def select_labels(scores: Sequence[CandidateScore], multi_label: bool, threshold: float | None) -> list[int]:
    """The chosen label indices, best first: the best label, plus (multi-label) every other label whose
    length-normalised score (mean log-probability per token) reaches ``threshold``."""
    best = best_label(scores)
    if not multi_label or threshold is None:
        return [best]
    others = sorted((index for index, score in enumerate(scores) if index != best and score.mean >= threshold),
                    key=lambda index: -scores[index].mean)
    return [best, *others]


def threshold_grid(values: Sequence[float], size: int = 200) -> list[float]:
    """Candidate thresholds: the distinct observed scores (quantiles when there are many), and +inf
    (best label only)."""
    distinct = sorted(set(values))
    if len(distinct) > size:
        distinct = [distinct[round(i * (len(distinct) - 1) / (size - 1))] for i in range(size)]
    return [*distinct, math.inf]


def calibrate_threshold(examples: Sequence[tuple[Sequence[str], Sequence[CandidateScore], frozenset[str]]],
                        ) -> tuple[float, float]:
    """The multi-label threshold (on the per-label mean log-probability) that maximises set-exact match.

    ``examples``: (labels, their scores, the reference label set) per validation record. Ties go to the highest
    threshold (fewest extra labels). Returns (threshold, set-exact match at it); +inf when there is nothing
    to calibrate on (best label only).
    """
    if not examples:
        return math.inf, 0.0
    best_threshold, best_match = math.inf, -1.0
    for threshold in reversed(threshold_grid([s.mean for _, scores, _ in examples for s in scores])):
        hits = sum(frozenset(labels[i] for i in select_labels(scores, True, threshold)) == reference
                   for labels, scores, reference in examples)
        match = hits / len(examples)
        if match > best_match:
            best_threshold, best_match = threshold, match
    return best_threshold, best_match
