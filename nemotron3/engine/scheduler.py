"""The one generation loop: requests join and leave a running batch at step boundaries, through cache slots.

    scheduler = Scheduler(model, rows=64, max_seq_len=4096, token_budget=512, num_speculative_tokens=3)
    handle = scheduler.submit(Request([1, 2, 3], SamplingParams(max_tokens=32)), on_event)   # from any thread
    scheduler.step()                        # or scheduler.start(): a worker thread steps while there is work
    scheduler.cancel(handle)                # its slot is freed at the next step boundary

Engine.generate, the server and RL rollouts all run it. One step (docs/serving.md §3): admit waiting requests into
free slots; decode the prefix [0, n) of decoding rows (one token, or one MTP round, per row); prefill the next
chunks within the step's token budget; a group joins the prefix when its last prompt is done. In a `static` batch
(the Engine's) rows stay until all have ended, so shapes stay fixed for the compiled step.
"""

from __future__ import annotations

import collections
import threading
import traceback
from collections.abc import Callable

import torch

from nemotron3.engine.cache import HybridCache
from nemotron3.engine.decode import FastDecoder, batch_bucket, compile_static
from nemotron3.engine.params import speculative_config
from nemotron3.engine.requests import Event, Request, Seq, check_prompt, row_laws, sample_rows, token_logprobs_of
from nemotron3.engine.speculative import Drafter, speculative_round, uniforms_per_round
from nemotron3.engine.thinking import ThinkTokens
from nemotron3.model.hybrid import HybridLM


class Scheduler:
    """The scheduler over one HybridCache of `rows` slots of `max_seq_len` tokens (prompt + max_tokens + 2k + 1).
    token_budget: tokens one step processes (None: no limit); fast: a FastDecoder to share, True: build one when the
    model allows it, False: the reference path; compiled: the owner's dict of compiled steps (None: eager)."""

    def __init__(self, model: HybridLM, rows: int = 16, max_seq_len: int = 4096, token_budget: int | None = 512,
                 prefill_chunk: int = 2048, min_prefill_tokens: int = 32, num_speculative_tokens: int | None = 0,
                 think_tokens: ThinkTokens | None = None, fast: FastDecoder | bool | None = True,
                 compiled: dict | None = None, static: bool = False) -> None:
        if min(rows, max_seq_len, prefill_chunk, min_prefill_tokens, token_budget or 1) <= 0:
            raise ValueError("rows, max_seq_len, token_budget, prefill_chunk and min_prefill_tokens must be positive")
        self.spec = speculative_config(model, num_speculative_tokens)
        self.k = k = self.spec.k
        self.model, self.config = model.eval(), model.config
        self.rows, self.max_seq_len, self.static = rows, max_seq_len, static
        self.token_budget, self.prefill_chunk, self.min_prefill_tokens = token_budget, prefill_chunk, min_prefill_tokens
        self.think_tokens = think_tokens or ThinkTokens()
        self.device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        if fast is True:
            fast = FastDecoder(model) if FastDecoder.supports(model) else None
        self.fast, self.compiled = fast or None, compiled
        # rows of a static batch start their chunks together; otherwise a row's chunk is padded to the step's
        # widest (at most prefill_chunk and the budget), and padding positions are written too
        pad = 0 if static else min(prefill_chunk, max(token_budget or prefill_chunk, min_prefill_tokens))
        self.cache = HybridCache(self.config, rows, max_seq_len + pad, dtype, self.device,
                                 max_rollback=self.spec.max_rollback, include_mtp=bool(k))
        self.drafter = Drafter(model, self.fast, compiled) if k else None
        self.x = torch.zeros(rows, dtype=torch.long, device=self.device)  # each row's last emitted token
        self.h1 = torch.zeros(rows, self.config.hidden_size, device=self.device, dtype=dtype)  # next draft's input
        self.mtp_start = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.owner: list[Seq | None] = [None] * rows  # each slot's request; rows [0, n_decoding) are decoding
        self.n_decoding, self._prefixes = 0, {}
        self.waiting: collections.deque[Seq] = collections.deque()
        self._inbox: collections.deque[tuple[str, Seq]] = collections.deque()  # ("submit" | "cancel", seq)
        self._wake, self._thread, self._stopping, self.steps = threading.Condition(), None, False, 0
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "forward_passes": 0, "rounds": 0, "drafted": 0,
                      "accepted": 0, "accepted_at": [0] * self.k}

    def speculation_stats(self) -> dict:
        """Acceptance since reset_stats (docs/inference.md §5); {} before any round ran."""
        s, k = self.stats, self.k
        if not s["rounds"]:
            return {}
        rates = [n / max(s["drafted"] // k, 1) for n in s["accepted_at"]]
        return {"rounds": s["rounds"], "drafted": s["drafted"], "accepted": s["accepted"],
                "acceptance_length": 1 + sum(rates), "acceptance_rate_per_position": rates,
                "acceptance_rate": sum(rates) / k}

    # ------------------------------------------------------------------ requests (any thread)
    def check(self, req: Request) -> int:
        """Raise ValueError naming what is wrong with `req` (before it is queued); returns its max new tokens."""
        p = req.params
        check_prompt(req.prompt, self.config.vocab_size)
        if p.num_speculative_tokens is not None and p.num_speculative_tokens != self.k:
            raise ValueError(f"num_speculative_tokens={p.num_speculative_tokens}, but this scheduler drafts {self.k} "
                             "(its cache is sized for that)")
        room = self.max_seq_len - self.spec.room - len(req.prompt)
        new = room if p.max_tokens is None else p.max_tokens
        if new > room or new <= 0:
            raise ValueError(f"the prompt ({len(req.prompt)} tokens) plus max_tokens ({new}) needs "
                             f"{len(req.prompt) + max(new, 1) + self.spec.room} cache positions, more than a slot "
                             f"holds ({self.max_seq_len})")
        return new

    def submit(self, req: Request, on_event: Callable[[Event], None]) -> Seq:
        return self.submit_group([(req, on_event)])[0]  # checked first (ValueError); the handle for `cancel`

    def submit_group(self, items: list[tuple[Request, Callable[[Event], None]]]) -> list[Seq]:
        """Queue requests that join the decoding batch together (module docstring, step 3)."""
        group: list[Seq] = []
        for req, on_event in items:
            steps = self.check(req)
            group.append(Seq.build(req, on_event, steps, self.k, self.config.eos_token_ids, self.think_tokens,
                                   self.device, group))
        with self._wake:
            self._inbox.extend(("submit", seq) for seq in group)
            self._wake.notify()
        return group

    def cancel(self, seq: Seq) -> None:
        """Stop `seq` at the next step boundary (its slot is freed then; its last event says "cancelled")."""
        with self._wake:
            self._inbox.append(("cancel", seq))
            self._wake.notify()

    @property
    def running(self) -> int:  # requests holding a slot (decoding or prefilling)
        return sum(o is not None for o in self.owner)

    @property
    def queued(self) -> int:
        return len(self.waiting) + sum(1 for op, _ in list(self._inbox) if op == "submit")

    def idle(self) -> bool:
        return not self.waiting and not self._inbox and self.running == 0

    # ------------------------------------------------------------------ the worker thread
    def start(self) -> None:
        """Run `step()` on a daemon thread whenever there is work."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="nemotron3-scheduler", daemon=True)
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
            for seq in [*self.waiting, *(o for o in self.owner if o is not None and not o.done)]:
                self._finish(seq, "cancelled")

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
                self.fail()

    def fail(self) -> None:
        """End every request holding a slot with "error" and reset the cache."""
        for r, seq in enumerate(self.owner):
            if seq is not None:
                seq.row, seq.done, self.owner[r] = -1, True, None
                self.cache.free(r)
                self._emit(seq, Event([], finish="error"))
        self.n_decoding = 0
        self.cache.reset()

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
            elif not seq.cancelled and not seq.done:
                seq.cancelled = True
                if seq in self.waiting:
                    self.waiting.remove(seq)
                    self._emit(seq, Event([], finish="cancelled"))
                elif seq.row >= 0:
                    self._finish(seq, "cancelled")

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduler step (the module docstring)."""
        self._drain_inbox()
        if self.waiting:
            self._refresh()
        for r in range(self.n_decoding, self.rows):  # admit into free slots, first come first served
            if not self.waiting:
                break
            if self.owner[r] is None:
                seq = self.waiting.popleft()
                seq.row, self.owner[r] = r, seq
                self.cache.reset([r])
                self.cache.in_use[r] = True
        n = self.n_decoding
        if n:
            self._speculative(n) if self.k else self._decode(n)
        budget = self.token_budget
        self._prefill(None if budget is None else max(budget - n * (self.k + 1), self.min_prefill_tokens))
        if self.static and self.n_decoding and all(o.done for o in self.owner[: self.n_decoding]):
            for r in range(self.n_decoding):
                self.owner[r].row, self.owner[r] = -1, None
                self.cache.free(r)
            self.n_decoding = 0
        self.steps += 1

    def _refresh(self) -> None:
        """Rebuild a stale fast decoder (weights changed: RL), or drop it (a module swapped for a quantized one)."""
        if self.fast is None or not self.fast.is_stale():
            return
        if self.compiled is not None:
            self.compiled.clear()
        if FastDecoder.supports(self.model):
            self.fast.refresh()
        else:
            self.fast = None
            self.drafter = Drafter(self.model, None) if self.k else None

    def _prefix(self, n: int) -> HybridCache:  # rows [0, n), a view kept per n
        return self._prefixes.get(n) or self._prefixes.setdefault(n, self.cache.prefix(n))

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden (..., H) -> logits (..., V) fp32
        return self.drafter.logits(hidden) if self.k else self.model.lm_head(hidden).float()

    # ------------------------------------------------------------------ emitting
    def _emit(self, seq: Seq, event: Event) -> None:
        try:
            seq.on_event(event)
        except Exception:  # a consumer's bug must not stop the batch
            traceback.print_exc()

    def _deliver(self, seq: Seq, tokens: list[int], logits: torch.Tensor, accepted: int | None = None) -> None:
        """Give `seq` its new tokens, cut at a stop token or max_tokens; ends it when it is done."""
        tokens = tokens[: seq.max_tokens - seq.produced]
        tokens = tokens[: next((i + 1 for i, t in enumerate(tokens) if t in seq.stops), len(tokens))]
        seq.produced += len(tokens)
        finish = "stop" if tokens and tokens[-1] in seq.stops else "length" if seq.produced >= seq.max_tokens else None
        ev = Event(tokens, finish=finish, accepted=accepted)
        if seq.params.logprobs is not None and tokens:
            ev.logprobs, ev.top_logprobs = token_logprobs_of(logits[: len(tokens)], tokens, seq.params)
        self.stats["decode_tokens"] += len(tokens)
        if finish is not None:
            self._end(seq)
        self._emit(seq, ev)

    def _finish(self, seq: Seq, reason: str) -> None:
        if seq.row >= 0:
            self._end(seq)
        self._emit(seq, Event([], finish=reason))

    def _end(self, seq: Seq) -> None:
        """seq is done: free its slot (a decoding row's is refilled with the last decoding row, so the prefix stays
        dense), or in a static batch keep it until every row is done."""
        seq.done = True
        r = seq.row
        if self.static and r < self.n_decoding:
            return
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
    def _step_logits(self, n: int) -> torch.Tensor:
        """logits (n, V) of the decoding rows' next tokens, every row of the prefix advanced by one token. Compiled:
        the graph of batch_bucket(n) rows, the free rows past n decoded from length 0 and ignored."""
        fast, cache = self.fast, self._prefix(n)
        if fast is None:
            return self.model(self.x[:n, None], cache=cache)[:, 0]
        if self.compiled is not None and fast.traceable:  # static shapes: attention over the whole capacity
            b = min(batch_bucket(n), self.rows)
            self.cache.lengths[n:b] = 0
            if ("step",) not in self.compiled:
                self.compiled[("step",)] = compile_static(fast.step)
            cache = self._prefix(b)
            logits = self.compiled[("step",)](self.x[:b], cache, None, False)[:n]
        else:
            lengths = cache.lengths
            logits = fast.step(self.x[:n], cache, int(lengths.max()) + 1, bool((lengths == lengths[0]).all()))
        cache.lengths += 1
        return logits

    def _decode(self, n: int) -> None:
        """One token for every decoding row."""
        seqs = list(self.owner[:n])
        logits = self._step_logits(n)
        self.stats["forward_passes"] += 1
        live = [i for i, s in enumerate(seqs) if not s.done]
        tokens = self.x[:n].tolist()  # a finished row of a static batch reads its last token again
        for i, t in zip(live, sample_rows(logits[live], [seqs[i] for i in live], [seqs[i].produced for i in live])):
            forced = seqs[i].cut([t])[1]  # a forced </think> replaces the token and is what the row reads next
            tokens[i] = t if forced is None else forced
        self.x[:n] = torch.tensor(tokens, device=self.device)
        for i in live:
            self._deliver(seqs[i], [tokens[i]], logits[i : i + 1])

    def _speculative(self, n: int) -> None:
        """One MTP speculative round for every decoding row (engine/speculative.py, docs/inference.md §5)."""
        k, seqs, per = self.k, list(self.owner[:n]), uniforms_per_round(self.k)
        u = torch.zeros(n, per, dtype=torch.float64, device=self.device)
        for i, s in enumerate(seqs):
            if s.uniforms is not None and not s.done:
                u[i] = s.uniforms[1 + s.rounds * per : 1 + (s.rounds + 1) * per]
        done = [s.done for s in seqs]
        out, accepted, logits, new = speculative_round(
            self.drafter, self._prefix(n), self.x[:n].clone(), self.h1[:n], self.mtp_start[:n].clone(), k,
            row_laws(seqs), u, done, lambda b, row: seqs[b].cut(row))
        self.x[:n], self.h1[:n], self.mtp_start[:n] = new
        s = self.stats
        s["forward_passes"], s["rounds"] = s["forward_passes"] + 1, s["rounds"] + 1
        for b, seq in enumerate(seqs):
            if done[b]:
                continue
            seq.rounds += 1
            s["drafted"] += k
            s["accepted"] += accepted[b]
            for i in range(accepted[b]):
                s["accepted_at"][i] += 1
            self._deliver(seq, out[b], logits[b], accepted[b])

    # ------------------------------------------------------------------ prefill
    def _prefill(self, budget: int | None) -> None:
        """The next chunks of the prompts being prefilled, as one right-padded forward (module docstring, step 3)."""
        plan: list[tuple[Seq, int]] = []
        todo = [o for o in self.owner[self.n_decoding:] if o is not None and o.prefilled < len(o.req.prompt)]
        for seq in sorted(todo, key=lambda s: s.submitted):
            if budget is not None and budget <= 0:
                break
            c = min(len(seq.req.prompt) - seq.prefilled, self.prefill_chunk, budget or self.prefill_chunk)
            plan.append((seq, c))
            budget = None if budget is None else budget - c
        mtp: list[tuple[Seq, int, torch.Tensor, list[int]]] = []  # (seq, start, hidden (c, H), next ids (c))
        if plan:
            dev, width = self.device, max(c for _, c in plan)
            ids = torch.zeros(len(plan), width, dtype=torch.long, device=dev)
            for i, (seq, c) in enumerate(plan):
                ids[i, :c] = torch.tensor(seq.req.prompt[seq.prefilled : seq.prefilled + c], device=dev)
            rows = torch.tensor([seq.row for seq, _ in plan], device=dev)
            valid = torch.tensor([c for _, c in plan], device=dev)
            hidden = self.model.hidden_states(ids, self.cache, rows, valid)  # (b, width, H)
            self.stats["forward_passes"] += 1
            self.stats["prefill_tokens"] += int(valid.sum())
            for i, (seq, c) in enumerate(plan):
                start, seq.prefilled = seq.prefilled, seq.prefilled + c
                if seq.prefilled == len(seq.req.prompt):
                    seq.tail = (start, hidden[i, :c], ids[i, :c])
                elif self.k:  # the MTP block over the chunk: position t reads (h0[t], token t+1)
                    mtp.append((seq, start, hidden[i, :c], seq.req.prompt[start + 1 : start + c + 1]))
        ready = [s for s in self.owner[self.n_decoding:] if s is not None and s.tail is not None
                 and all(g.tail is not None or g.done for g in s.group)]
        ready.sort(key=lambda s: (s.group[0].submitted, s.group.index(s)))
        if ready:
            logits = self._head(torch.stack([s.tail[1][-1] for s in ready]))  # (b, V)
            first = sample_rows(logits, ready, [0] * len(ready))
            for j, seq in enumerate(ready):
                forced = seq.cut(first[j : j + 1])[1]
                first[j] = first[j] if forced is None else forced
                start, h, chunk = seq.tail
                mtp.append((seq, start, h, seq.req.prompt[start + 1 : start + len(chunk)] + [first[j]]))
        h1 = dict(zip([id(job[0]) for job in mtp], self.drafter.prompt_chunks(
            self.cache, [(seq.row, *rest) for seq, *rest in mtp]))) if self.k and mtp else {}
        for j, seq in enumerate(ready):
            r = seq.row
            self.x[r] = first[j]
            if self.k:
                self.h1[r], self.mtp_start[r] = h1[id(seq)], len(seq.req.prompt)
            seq.tail = None
            self._swap(r, self.n_decoding)  # join the decoding prefix
            self.n_decoding += 1
            self._deliver(seq, [first[j]], logits[j : j + 1])
