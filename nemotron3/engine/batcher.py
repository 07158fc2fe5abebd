"""Continuous batching: requests join and leave one running batch at step boundaries, through cache slots.

    batcher = Batcher(model, rows=64, max_seq_len=4096, token_budget=512, num_speculative_tokens=3)
    batcher.start()                                   # a worker thread runs step() while there is work
    handle = batcher.submit(Request(prompt=[1, 2, 3], max_new_tokens=32), on_event)   # from any thread
    batcher.cancel(handle)                            # its slot is freed at the next step boundary
    batcher.stop()

`on_event(Event)` is called from the worker thread with each step's new tokens of the request (one token, or
up to k + 1 with speculation), their log-probabilities when asked for, and at the end a `finish` reason.

One step (docs/serving.md §3)
-----------------------------
The cache (engine/cache.py) has `rows` slots. The rows that are decoding are kept in a prefix [0, n) of it
(`HybridCache.prefix`), so the fast decoder (engine/decode.py), which runs every row of the cache it is given,
decodes exactly them, in place, while other rows are being prefilled. A step:

1. applies the cancellations and admits waiting requests into free slots (rows >= n), first come first served;
2. decodes the prefix: one token per row (plain), or one MTP speculative round per row (k drafts, a (k+1)-token
   verify, the rollback of the rejected ones: engine/speculative.py's rule and stats);
3. prefills: the rest of the step's `token_budget` (less one token per decoding row, k + 1 with speculation,
   and never less than `min_prefill_tokens`) goes to the prompts being prefilled, in arrival order, as one
   right-padded forward of chunks (a long prompt takes several steps, so it never stalls the others' streams);
   a prompt whose last chunk ran samples its first token and joins the decoding prefix (a row swap);
4. a row that stops (a stop token, its `max_new_tokens`, a cancellation) leaves the prefix at once: the last
   decoding row is swapped into its slot.

Each row decodes exactly what `Engine.generate` gives for its prompt alone: padding and chunking are exact
(docs/inference.md §2), and sampling draws from the row's own uniform stream, the stream row `stream_index` of
`row_uniforms(seed, ...)` with the same layout as the Engine's (one uniform per token, or 2k + 1 per
speculative round), so a seeded request reproduces `Engine.generate` with the same seed (choice i of n is row
i of an n-row call) up to float summation order. Rows may use different sampling settings in one step.

Log-probabilities are those of the model's raw distribution (log-softmax of the logits, before temperature,
top-k and top-p), vLLM's default; with speculation the verify forward's logits give them for every emitted
token.
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nemotron3.engine.cache import HybridCache
from nemotron3.engine.decode import FastDecoder
from nemotron3.engine.sampling import inverse_cdf, row_stream, sample, validate_sampling
from nemotron3.engine.speculative import Drafter, Sampling, accept, cut_rounds, uniforms_per_round
from nemotron3.engine.thinking import ThinkingBudget, ThinkTokens
from nemotron3.model.hybrid import HybridLM

FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass
class Request:
    """One sequence to generate. `stream_index`: which row stream of `seed` it samples from (choice i of a
    request for n choices uses stream i, as row i of `Engine.generate([prompt] * n, seed=seed)`).
    `logprobs`: None for none, else the number of top alternatives to return beside each token's own."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stream_index: int = 0
    stop_token_ids: frozenset[int] | None = None  # None: the config's eos ids
    max_thinking_tokens: int | None = None
    thinking_grace: float = 0.1
    logprobs: int | None = None


@dataclass
class Event:
    """What one step produced for one request."""

    tokens: list[int]
    logprobs: list[float] | None = None  # each token's log-probability
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, the most likely (id, logprob)
    finish: str | None = None  # one of FINISH_REASONS on the request's last event
    accepted: int | None = None  # speculative round: drafts accepted (the row emitted accepted + 1)


@dataclass
class _Seq:
    req: Request
    on_event: Callable[[Event], None]
    uniforms: torch.Tensor | None
    stops: frozenset[int]
    budget: ThinkingBudget | None
    row: int = -1
    prefilled: int = 0  # prompt tokens in the cache
    produced: int = 0
    rounds: int = 0
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)


class Batcher:
    """The continuous-batching scheduler over one HybridCache of `rows` slots; see the module docstring.

    rows: the most requests decoding or prefilling at once (the rest wait). max_seq_len: tokens one slot
    holds (prompt + new tokens + 2k + 1 with speculation). token_budget: tokens one step processes, decoding
    rows included; min_prefill_tokens: prefill tokens a step runs whatever the decoding rows take.
    num_speculative_tokens: k drafts per round with the model's MTP block (0: plain decoding).
    """

    def __init__(
        self,
        model: HybridLM,
        rows: int = 16,
        max_seq_len: int = 4096,
        token_budget: int = 512,
        min_prefill_tokens: int = 32,
        num_speculative_tokens: int = 0,
        think_tokens: ThinkTokens | None = None,
        fast: bool = True,
    ) -> None:
        if rows <= 0 or max_seq_len <= 0 or token_budget <= 0 or min_prefill_tokens <= 0:
            raise ValueError("rows, max_seq_len, token_budget and min_prefill_tokens must be positive")
        k = num_speculative_tokens
        if k < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {k}")
        if k and model.mtp is None:
            raise ValueError("num_speculative_tokens > 0 needs a model with an MTP block "
                             "(num_nextn_predict_layers > 0)")
        self.model = model.eval()
        self.config = model.config
        self.k = k
        self.rows, self.max_seq_len = rows, max_seq_len
        self.token_budget, self.min_prefill_tokens = token_budget, min_prefill_tokens
        self.think_tokens = think_tokens or ThinkTokens()
        self.device = model.lm_head.weight.device
        self.fast = FastDecoder(model) if fast and FastDecoder.supports(model) else None
        # room past max_seq_len for the right padding of a prefill forward: a row's chunk is padded to the
        # widest chunk of its step (at most the budget), and padding positions are written too
        pad = max(token_budget, min_prefill_tokens)
        self.cache = HybridCache(self.config, rows, max_seq_len + pad, model.lm_head.weight.dtype, self.device,
                                 max_rollback=k + 1 if k else 0, include_mtp=bool(k))
        self._prefixes: dict[int, HybridCache] = {}
        self.drafter = Drafter(model, self.fast) if k else None
        H = self.config.hidden_size
        self.x = torch.zeros(rows, dtype=torch.long, device=self.device)  # each row's last emitted token
        self.h1 = torch.zeros(rows, H, device=self.device, dtype=model.lm_head.weight.dtype)  # next draft's input
        self.mtp_start = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.owner: list[_Seq | None] = [None] * rows
        self.n_decoding = 0
        self.waiting: collections.deque[_Seq] = collections.deque()
        self._inbox: collections.deque[tuple[str, _Seq]] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.stats = {"rounds": 0, "drafted": 0, "accepted": 0, "prefill_tokens": 0, "decode_tokens": 0}

    # ------------------------------------------------------------------ requests (any thread)
    def check(self, req: Request) -> None:
        """Raise ValueError naming what is wrong with `req` (before it is queued)."""
        V = self.config.vocab_size
        if not req.prompt:
            raise ValueError("the prompt is empty: it needs at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V for t in req.prompt):
            raise ValueError(f"the prompt has token ids outside the vocabulary [0, {V})")
        if not isinstance(req.max_new_tokens, int) or req.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {req.max_new_tokens!r}")
        validate_sampling(req.temperature, req.top_k, req.top_p)
        need = len(req.prompt) + req.max_new_tokens + (2 * self.k + 1 if self.k else 0)
        if need > self.max_seq_len:
            raise ValueError(f"the prompt ({len(req.prompt)} tokens) plus max_new_tokens ({req.max_new_tokens}) "
                             f"needs {need} cache positions, more than a slot holds ({self.max_seq_len})")
        if req.max_thinking_tokens is not None and req.max_thinking_tokens < 0:
            raise ValueError(f"max_thinking_tokens must be >= 0, got {req.max_thinking_tokens}")

    def submit(self, req: Request, on_event: Callable[[Event], None]) -> _Seq:
        """Queue `req`; returns its handle (for `cancel`). Checks it first (ValueError)."""
        self.check(req)
        seed = req.seed if req.seed is not None else int(torch.randint(0, 2**62, (1,), device="cpu").item())
        uniforms = None
        if req.temperature > 0:
            steps = 1 + req.max_new_tokens * uniforms_per_round(self.k) if self.k else req.max_new_tokens
            uniforms = row_stream(seed, req.stream_index, steps, self.device)
        stops = frozenset(self.config.eos_token_ids if req.stop_token_ids is None else req.stop_token_ids)
        budget = None
        if req.max_thinking_tokens is not None:
            budget = ThinkingBudget(self.think_tokens, [req.max_thinking_tokens], [req.prompt], req.thinking_grace)
        seq = _Seq(req, on_event, uniforms, stops, budget)
        with self._wake:
            self._inbox.append(("submit", seq))
            self._wake.notify()
        return seq

    def cancel(self, seq: _Seq) -> None:
        """Stop `seq` at the next step boundary (its slot is freed then; its last event says "cancelled")."""
        with self._wake:
            self._inbox.append(("cancel", seq))
            self._wake.notify()

    @property
    def running(self) -> int:
        """Requests holding a slot (decoding or prefilling)."""
        return sum(o is not None for o in self.owner)

    @property
    def queued(self) -> int:
        return len(self.waiting) + sum(1 for op, _ in list(self._inbox) if op == "submit")

    def idle(self) -> bool:
        return not self.waiting and not self._inbox and self.running == 0

    # ------------------------------------------------------------------ the worker thread
    def start(self) -> None:
        """Run `step()` on a daemon thread whenever there is work."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="nemotron3-batcher", daemon=True)
        self._thread.start()

    def stop(self, cancel: bool = True) -> None:
        """End the worker thread; with `cancel`, every unfinished request first gets its "cancelled" event."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if cancel:
            self._drain_inbox()
            for seq in [*self.waiting, *(o for o in self.owner if o is not None)]:
                self._finish(seq, "cancelled", [])

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and self.idle():
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # a bug or an out-of-memory: fail what is in flight, reset, keep serving
                traceback.print_exc()
                for seq in [o for o in self.owner if o is not None]:
                    self._finish(seq, "error", [])
                self.cache.reset()
                self.n_decoding = 0

    # ------------------------------------------------------------------ one step
    def _drain_inbox(self) -> None:
        while True:
            with self._wake:
                if not self._inbox:
                    return
                op, seq = self._inbox.popleft()
            if op == "submit":
                if seq.cancelled:
                    self._emit(seq, Event([], finish="cancelled"))
                else:
                    self.waiting.append(seq)
            elif not seq.cancelled:
                seq.cancelled = True
                if seq in self.waiting:
                    self.waiting.remove(seq)
                    self._emit(seq, Event([], finish="cancelled"))
                elif seq.row >= 0:
                    self._finish(seq, "cancelled", [])

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduler step (the module docstring)."""
        self._drain_inbox()
        if self.waiting and self.fast is not None and self.fast.is_stale():  # weights changed in place (RL)
            self.fast.refresh()
        for r in range(self.n_decoding, self.rows):  # admit into free slots, first come first served
            if not self.waiting:
                break
            if self.owner[r] is None:
                seq = self.waiting.popleft()
                seq.row, self.owner[r] = r, seq
                self.cache.reset([r])
                self.cache.in_use[r] = True
        decoding = self.n_decoding
        if decoding:
            if self.k:
                self._speculative_round(decoding)
            else:
                self._decode(decoding)
        self._prefill(self.token_budget - decoding * (self.k + 1 if self.k else 1))
        self.steps += 1

    def _prefix(self, n: int) -> HybridCache:
        if n not in self._prefixes:
            self._prefixes[n] = self.cache.prefix(n)
        return self._prefixes[n]

    # ------------------------------------------------------------------ sampling, per row
    def _groups(self, seqs: list[_Seq]) -> dict[tuple, list[int]]:
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(seqs):
            r = s.req
            key = (0.0, 0, 1.0) if r.temperature == 0 else (float(r.temperature), r.top_k, float(r.top_p))
            groups.setdefault(key, []).append(i)
        return groups

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq], column: list[int]) -> torch.Tensor:
        """logits (b, V), row i's uniform at column[i] of its stream -> tokens (b,)."""
        out = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        for (t, k, p), idx in self._groups(seqs).items():
            u = None if t == 0 else torch.stack([seqs[i].uniforms[column[i]] for i in idx])
            out[idx] = sample(logits[idx], t, k, p, u)
        return out

    def _probs(self, logits: torch.Tensor, seqs: list[_Seq]) -> torch.Tensor:
        """logits (b, ..., V) -> each row's sampling law (one-hot at the argmax for a greedy row)."""
        out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        for key, idx in self._groups(seqs).items():
            out[idx] = Sampling(*key).probs(logits[idx])
        return out

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> tuple[list[float], list[list]]:
        """logits (t, V) of one row's emitted tokens -> their log-probabilities and top alternatives."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        own = lp[torch.arange(len(tokens), device=lp.device), torch.tensor(tokens, device=lp.device)].tolist()
        alts: list[list] = [[] for _ in tokens]
        if top:
            v, i = lp.topk(min(top, lp.shape[-1]), dim=-1)
            alts = [list(zip(ii, vv)) for ii, vv in zip(i.tolist(), v.tolist())]
        return own, alts

    # ------------------------------------------------------------------ emitting
    def _emit(self, seq: _Seq, event: Event) -> None:
        try:
            seq.on_event(event)
        except Exception:  # a consumer's bug must not stop the batch
            traceback.print_exc()

    def _deliver(self, seq: _Seq, tokens: list[int], logits: torch.Tensor | None, accepted: int | None = None
                 ) -> bool:
        """Give `seq` its new tokens (cut at a stop token or max_new_tokens); True if it finished."""
        room = seq.req.max_new_tokens - seq.produced
        tokens = tokens[:room]
        for i, t in enumerate(tokens):
            if t in seq.stops:
                tokens = tokens[: i + 1]
                break
        seq.produced += len(tokens)
        finish = None
        if tokens and tokens[-1] in seq.stops:
            finish = "stop"
        elif seq.produced >= seq.req.max_new_tokens:
            finish = "length"
        ev = Event(tokens, finish=finish, accepted=accepted)
        if seq.req.logprobs is not None and tokens:
            ev.logprobs, ev.top_logprobs = self._logprobs(logits[: len(tokens)], tokens, seq.req.logprobs)
        self.stats["decode_tokens"] += len(tokens)
        if finish is not None:
            self._release(seq)
        self._emit(seq, ev)
        return finish is not None

    def _finish(self, seq: _Seq, reason: str, tokens: list[int]) -> None:
        if seq.row >= 0:
            self._release(seq)
        self._emit(seq, Event(tokens, finish=reason))

    def _release(self, seq: _Seq) -> None:
        """Free seq's slot; a decoding row's slot is refilled with the last decoding row (the prefix stays dense)."""
        r = seq.row
        seq.row = -1
        if r < self.n_decoding:
            last = self.n_decoding - 1
            self._swap(r, last)
            self.n_decoding -= 1
            r = last
        self.owner[r] = None
        self.cache.free(r)

    def _swap(self, a: int, b: int) -> None:
        if a == b:
            return
        self.cache.swap_rows(a, b)
        for t in (self.x, self.h1, self.mtp_start):
            t[[a, b]] = t[[b, a]]
        self.owner[a], self.owner[b] = self.owner[b], self.owner[a]
        for r in (a, b):
            if self.owner[r] is not None:
                self.owner[r].row = r

    # ------------------------------------------------------------------ decoding
    def _decode(self, n: int) -> None:
        """One token for every decoding row."""
        cache = self._prefix(n)
        seqs = list(self.owner[:n])
        x = self.x[:n]
        if self.fast is not None:
            lengths = cache.lengths
            logits = self.fast.step(x, cache, int(lengths.max()) + 1, bool((lengths == lengths[0]).all()))
            cache.lengths += 1
        else:
            logits = self.model(x[:, None], cache=cache)[:, 0]
        tokens = self._sample(logits, seqs, [s.produced for s in seqs]).tolist()
        for i, seq in enumerate(seqs):
            if seq.budget is not None:  # a forced </think> replaces the token and is what the row reads next
                forced = seq.budget(0, tokens[i : i + 1])[1]
                if forced is not None:
                    tokens[i] = forced
        self.x[:n] = torch.tensor(tokens, device=self.device)
        for i, seq in enumerate(seqs):
            self._deliver(seq, [tokens[i]], logits[i : i + 1])

    def _speculative_round(self, n: int) -> None:
        """One MTP speculative round for every decoding row (engine/speculative.py, docs/inference.md §5)."""
        k, dev, cache, drafter = self.k, self.device, self._prefix(n), self.drafter
        seqs = list(self.owner[:n])
        per = uniforms_per_round(k)
        u = torch.zeros(n, per, dtype=torch.float64, device=dev)
        for i, s in enumerate(seqs):
            if s.uniforms is not None:
                u[i] = s.uniforms[1 + s.rounds * per : 1 + (s.rounds + 1) * per]
        mtp_start, x = self.mtp_start[:n].clone(), self.x[:n].clone()
        drafts, qs, h = [], [], self.h1[:n]
        for j in range(1, k + 1):
            if j > 1:
                h = drafter.mtp(cache, mtp_start + j - 2, h[:, None], drafts[-1][:, None], depth=j)[:, 0]
            qs.append(self._probs(drafter.logits(h), seqs))
            drafts.append(inverse_cdf(qs[-1], u[:, j - 1]))
        drafts_t = torch.stack(drafts, 1)  # (n, k)
        verified = drafter.verify(cache, torch.cat([x[:, None], drafts_t], 1))  # (n, k+1, H)
        logits = drafter.logits(verified)  # (n, k+1, V)
        a, extra = accept(drafts_t, torch.stack(qs, 1), self._probs(logits, seqs), u[:, k : 2 * k], u[:, 2 * k],
                          greedy=False)
        a_l, extra_l, drafts_l = a.tolist(), extra.tolist(), drafts_t.tolist()
        out = [drafts_l[b][: a_l[b]] + [extra_l[b]] for b in range(n)]
        accepted = list(a_l)
        cut_rounds(out, a_l, extra_l, [None if seq.budget is None else seq.budget(0, out[b])
                                       for b, seq in enumerate(seqs)])
        a, extra = torch.tensor(a_l, device=dev), torch.tensor(extra_l, device=dev)
        cache.rollback(k - a, check=False)
        ar = torch.arange(n, device=dev)
        nxt = torch.cat([drafts_t, drafts_t[:, :1]], 1)
        nxt[ar, a] = extra
        mtp_hidden = drafter.mtp(cache, mtp_start, verified, nxt)  # MTP positions of the kept tokens
        self.h1[:n], self.mtp_start[:n], self.x[:n] = mtp_hidden[ar, a], mtp_start + a + 1, extra
        self.stats["rounds"] += n
        self.stats["drafted"] += n * k
        self.stats["accepted"] += sum(accepted)
        for b, seq in enumerate(seqs):
            seq.rounds += 1
            self._deliver(seq, out[b], logits[b], accepted[b])

    # ------------------------------------------------------------------ prefill
    def _prefill(self, budget: int) -> None:
        """Run the next chunks of the prompts being prefilled, within `budget` tokens (at least
        min_prefill_tokens), as one right-padded forward; finished prompts sample their first token."""
        budget = max(budget, self.min_prefill_tokens)
        plan: list[tuple[_Seq, int]] = []
        for seq in sorted((o for o in self.owner[self.n_decoding:] if o is not None), key=lambda s: s.submitted):
            if budget <= 0:
                break
            c = min(len(seq.req.prompt) - seq.prefilled, budget)
            plan.append((seq, c))
            budget -= c
        if not plan:
            return
        dev = self.device
        width = max(c for _, c in plan)
        ids = torch.zeros(len(plan), width, dtype=torch.long, device=dev)
        for i, (seq, c) in enumerate(plan):
            ids[i, :c] = torch.tensor(seq.req.prompt[seq.prefilled : seq.prefilled + c], device=dev)
        rows = torch.tensor([seq.row for seq, _ in plan], device=dev)
        valid = torch.tensor([c for _, c in plan], device=dev)
        start = torch.tensor([seq.prefilled for seq, _ in plan], device=dev)
        hidden = self.model.hidden_states(ids, self.cache, rows, valid)  # (b, width, H)
        self.stats["prefill_tokens"] += int(valid.sum())
        ends = [seq.prefilled + c == len(seq.req.prompt) for seq, c in plan]
        done = [i for i, e in enumerate(ends) if e]
        first: dict[int, int] = {}
        if done:
            last = hidden[done, (valid[done] - 1)]
            logits = self.drafter.logits(last) if self.k else self.model.lm_head(last).float()  # as the Engine
            seqs = [plan[i][0] for i in done]
            tokens = self._sample(logits, seqs, [0] * len(seqs)).tolist()
            for j, seq in enumerate(seqs):
                if seq.budget is not None:
                    forced = seq.budget(0, tokens[j : j + 1])[1]
                    if forced is not None:
                        tokens[j] = forced
                first[done[j]] = tokens[j]
        if self.k:  # the MTP block over the chunk: position t reads (h0[t], token t+1)
            nxt = torch.zeros_like(ids)
            for i, (seq, c) in enumerate(plan):
                p = seq.req.prompt[seq.prefilled + 1 : seq.prefilled + c + 1]
                nxt[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=dev)
                if ends[i]:
                    nxt[i, c - 1] = first[i]
            h1 = self.drafter.mtp(self.cache, start, hidden, nxt, rows=rows, valid=valid)
        for seq, c in plan:
            seq.prefilled += c
        for j, i in enumerate(done):
            seq = plan[i][0]
            r = seq.row
            self.x[r] = first[i]
            if self.k:
                self.h1[r] = h1[i, plan[i][1] - 1]
                self.mtp_start[r] = len(seq.req.prompt)
            self._swap(r, self.n_decoding)  # join the decoding prefix
            self.n_decoding += 1
            self._deliver(seq, [first[i]], logits[j : j + 1])
