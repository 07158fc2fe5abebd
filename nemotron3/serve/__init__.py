"""The serving stage: an OpenAI-compatible HTTP server over a checkpoint folder, with continuous batching
(docs/serving.md: endpoints, fields, limits, the scheduler, metrics).

    nemotron3 serve --model runs/sft/final --port 8000 --api-key SECRET     # the chat page at /

`serve(cfg)` runs the server until SIGINT / SIGTERM; `build_server(cfg)` returns the `app.Server` without running it.
"""

from __future__ import annotations

import inspect
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from nemotron3 import checkpoint
from nemotron3.config import ModelConfig
from nemotron3.engine.cache import cache_size
from nemotron3.engine.folder import open_folder
from nemotron3.engine.params import default_speculative_tokens, has_mtp, speculative_config
from nemotron3.engine.scheduler import Scheduler
from nemotron3.options import CPU_COUNT, ConfigError, StageConfig, check_fits, device_of, device_option, fail, option
from nemotron3.serve.app import Server, Settings, create_app

API_KEY_ENV = "NEMOTRON3_API_KEY"


@dataclass
class ServeConfig(StageConfig):
    """An OpenAI-compatible server over one checkpoint: where it listens, how it batches, what it allows."""

    stage = "serve"

    model: Path = option(help="checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = option(8000, "TCP port (0: any free one)", min=0, max=65535)
    api_key: str | None = option(None, f"require `Authorization: Bearer KEY` on /v1/ (default: ${API_KEY_ENV})",
                                 metavar="KEY")
    served_model_name: str | None = option(None, "the model id clients name (default: the folder's name)")
    max_batch: int = option(32, "cache slots: the most requests decoding or prefilling at once", min=1)
    max_seq_len: int | None = option(None, "tokens one slot holds, prompt and reply (default: the model's "
                                     "max_position_embeddings, at most 4096)", min=16)
    token_budget: int = option(512, "tokens one scheduler step processes (decode rows + prefill chunks)", min=1)
    speculative: int | None = option(None, "MTP drafts per verify forward (default: the device's, engine/params.py: "
                                     "off on a CPU, where it was measured slower; 0 turns it off)", min=0,
                                     metavar="K")
    max_prompt_tokens: int | None = option(None, "longest prompt accepted (default: what a slot holds)", min=1)
    max_tokens: int = option(2048, "the most tokens a request may ask for (max_tokens), also its default", min=1)
    max_n: int = option(8, "the most choices (n) one request may ask for", min=1)
    max_requests: int = option(256, "choices running + queued at most; beyond, 429 with Retry-After", min=1)
    max_body_bytes: int = option(1 << 20, "largest request body accepted (413 beyond)", min=1024)
    shutdown_timeout: float = option(30.0, "seconds running streams get to finish after SIGTERM", min=0.0)
    dtype: str = option("float32", "weights' dtype in memory", choices=("float32", "bfloat16"))
    device: str = device_option()
    strict_finite: bool = option(False, "refuse a checkpoint with NaN or inf in a weight (default: load it, "
                                 "warning once per such tensor)")
    threads: int | None = option(None, "torch intra-op threads (default: torch's; at most the CPUs this process may "
                                 "use)", min=1, max=CPU_COUNT)

    def validate(self) -> None:
        super().validate()
        if self.served_model_name is not None and not self.served_model_name:
            fail(self, "served_model_name", "is empty")
        if self.api_key is not None and not self.api_key:
            fail(self, "api_key", "is empty")
        self.check_memory()

    def slots(self, config: ModelConfig) -> tuple[int, int]:
        """(tokens per slot, speculative tokens) the server runs `config` with: the flags, or their defaults."""
        k = self.speculative
        if k is None:  # the default of the device the server loads on (a device it lacks: build_server says so)
            try:
                kind = device_of(self).type
            except ConfigError:
                kind = "cpu"
            k = default_speculative_tokens(kind, bool(config.num_nextn_predict_layers))
        return self.max_seq_len or min(config.max_position_embeddings, 4096), k

    def check_memory(self) -> None:
        """Refuse a cache or a body this machine cannot hold (options.check_fits), computed from config.json before
        anything loads: one slot, the padding a step adds to each, all slots (skipped if config.json is unreadable)."""
        check_fits(self, "max_body_bytes", self.max_body_bytes, "a request body")
        try:
            config = checkpoint.read_config(self.model)
        except (ValueError, OSError, TypeError):
            return
        max_seq_len, k = self.slots(config)
        defaults = inspect.signature(Scheduler).parameters  # what build_server uses, the padding Scheduler adds
        pad = min(defaults["prefill_chunk"].default, max(self.token_budget, defaults["min_prefill_tokens"].default))
        dtype = torch.float32 if self.dtype == "float32" else torch.bfloat16

        def cache(rows: int, tokens: int) -> int:
            return cache_size(config, rows, tokens, dtype, max_rollback=k + 1 if k else 0, include_mtp=bool(k)).total

        check_fits(self, "token_budget", cache(1, pad) + self.token_budget * config.hidden_size * 4,
                   f"a step of {self.token_budget:,} tokens (fp32 hidden states, and the padding it adds to a cache "
                   "slot)")
        check_fits(self, "max_seq_len", cache(1, max_seq_len + pad), f"one cache slot of {max_seq_len:,} tokens")
        check_fits(self, "max_batch", cache(self.max_batch, max_seq_len + pad),
                   f"the cache's {self.max_batch:,} slots of {max_seq_len:,} tokens")


def build_server(cfg: ServeConfig) -> Server:
    """Load the checkpoint and build the scheduler and the app's state (nothing runs yet)."""
    device = device_of(cfg)
    folder = Path(cfg.model)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # the scheduler builds its own fast decoder
    opened = open_folder(folder, cfg.dtype, strict_finite=cfg.strict_finite, device=device, fast=False)
    if opened.tokenizer is None:
        raise ConfigError(f"model (--model) {folder} has no tokenizer.json: the server needs one to read text")
    model = opened.engine.model
    max_seq_len, k = cfg.slots(model.config)
    if k and not has_mtp(model):
        fail(cfg, "speculative", f"needs a checkpoint with an MTP block; {folder} has none (use 0)")
    if max_seq_len <= speculative_config(model, k).room + 1:
        fail(cfg, "max_seq_len", f"leaves no room for a prompt and a reply with {k} speculative tokens")
    scheduler = Scheduler(model, rows=cfg.max_batch, max_seq_len=max_seq_len, token_budget=cfg.token_budget,
                          num_speculative_tokens=k, think_tokens=opened.engine.think_tokens)
    api_key = cfg.api_key if cfg.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    settings = Settings(cfg.served_model_name or folder.resolve().name, api_key,
                        cfg.max_prompt_tokens or max_seq_len, cfg.max_tokens, cfg.max_n, cfg.max_requests,
                        cfg.max_body_bytes)
    return Server(scheduler, opened.tokenizer, settings)


def serve(cfg: ServeConfig, sock: socket.socket | None = None) -> None:
    """Run the server until SIGINT / SIGTERM, on `sock` if given, else on a socket bound to cfg.host:cfg.port
    before the line `serving ... on http://HOST:PORT` is printed (so a client may connect once it is read)."""
    import uvicorn

    server = build_server(cfg)
    if sock is None:
        sock = socket.create_server((cfg.host, cfg.port), family=socket.AF_INET6 if ":" in cfg.host else
                                    socket.AF_INET, backlog=2048)
    config = uvicorn.Config(create_app(server), log_level="warning", timeout_graceful_shutdown=cfg.shutdown_timeout,
                            access_log=False)
    host, port = sock.getsockname()[:2]
    s, b = server.settings, server.scheduler
    print(f"serving {s.served_model_name} on http://{host}:{port} ({b.rows} slots of {b.max_seq_len} tokens, "
          f"{b.k} speculative tokens{', API key required' if s.api_key else ''})", flush=True)
    runner = uvicorn.Server(config)
    if threading.current_thread() is threading.main_thread():
        # uvicorn handles SIGINT / SIGTERM itself (graceful shutdown), then re-raises them to the handlers it
        # found; with these, that re-raise ends nothing and `nemotron3 serve` exits with status 0
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            runner.run(sockets=[sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    else:
        runner.run(sockets=[sock])


def main(cfg: ServeConfig) -> int:
    """`nemotron3 serve`: runs until stopped."""
    serve(cfg)
    return 0
