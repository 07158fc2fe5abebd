"""Throughput and latency of `nemotron3 serve` under concurrent streaming clients, against one client at a time.

    python benchmarks/serve.py                                  # a random t9 checkpoint (no MTP), built here
    python benchmarks/serve.py --model runs/sft/final           # a trained checkpoint (MTP speculation on)
    python benchmarks/serve.py --clients 64 --requests 384 --max-tokens 128 --prompt-tokens 16 128 --time-limit 600

Starts the server as a subprocess on a free loopback port (127.0.0.1 only), then runs two phases with the same
kind of request (a `/v1/completions` stream of random token ids, `--prompt-tokens` 16 to 128 of them, `--max-tokens`
128 new tokens, temperature 0.8, usage in the last chunk):

  * sequential: one client, `--sequential` requests one after the other;
  * concurrent: `--clients` clients at once sending `--requests` requests in all (each client sends its next
    request when the previous one has ended).

For each phase it prints the aggregate output tokens per second (every token generated, over the phase's wall
time), time to first token (request sent -> first text chunk) and inter-token latency (the gap between a
stream's consecutive chunks; with speculation a chunk may bring several tokens) at p50 / p99, time per output
token ((last - first chunk) / (tokens - 1), per request) and the errors, then the ratio of the two throughputs.
Every request is bounded: `--time-limit` seconds per phase in all, after which the phase stops and counts what
was done. The clients are plain asyncio HTTP/1.1 connections (no client library in the loop), in one process
beside the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import nemotron3
from nemotron3.tokenizer import Tokenizer


@dataclass
class Result:
    tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tpot: float | None = None
    error: str | None = None


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def build_random_checkpoint(folder: Path, preset: str) -> Path:
    """A randomly initialised `preset` model with nemotron3's tokenizer (trained on made-up words, so that most
    tokens are text), its vocabulary the tokenizer's, saved in `folder`."""
    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"]
    lines = [" ".join("".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(12)) for _ in range(3000)]
    tok = Tokenizer.train(lines, vocab_size=1024)
    torch.manual_seed(0)
    model = nemotron3.HybridLM(nemotron3.ModelConfig.preset(preset).replace(vocab_size=tok.vocab_size))
    nemotron3.save_pretrained(model, folder)
    tok.save(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(port: int, model: str, prompt: list[int], max_tokens: int, seed: int) -> Result:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    res = Result()
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            res.error = status.decode().strip()
            writer.close()
            return res
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        last, first = None, None
        while True:
            line = await reader.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                res.tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                if first is None:
                    first = now
                    res.ttft = now - t0
                else:
                    res.gaps.append(now - last)
                last = now
        writer.close()
        if first is not None and res.tokens > 1:
            res.tpot = (last - first) / (res.tokens - 1)
    except (OSError, ValueError, asyncio.IncompleteReadError) as e:
        res.error = repr(e)
    return res


async def phase(port: int, model: str, vocab: int, clients: int, requests: int, max_tokens: int, time_limit: float,
                seed: int, prompt_tokens: tuple[int, int] = (16, 128)) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(20, vocab) for _ in range(rng.randint(*prompt_tokens))] for _ in range(requests)]
    todo = list(range(requests))
    results: list[Result] = []
    deadline = time.perf_counter() + time_limit

    async def client() -> None:
        while todo and time.perf_counter() < deadline:
            i = todo.pop()
            remaining = deadline - time.perf_counter()
            try:
                results.append(await asyncio.wait_for(one_request(port, model, prompts[i], max_tokens, seed + i),
                                                      timeout=max(remaining, 0.1)))
            except asyncio.TimeoutError:
                results.append(Result(error="time limit"))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return results, time.perf_counter() - t0


def report(name: str, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.tokens for r in ok)
    gaps = [g for r in ok for g in r.gaps]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    row = {"phase": name, "requests": len(results), "errors": len(results) - len(ok), "tokens": tokens,
           "wall_s": wall, "tok_s": tokens / wall if wall > 0 else 0.0,
           "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
           "itl_p50_ms": 1e3 * percentile(gaps, 50), "itl_p99_ms": 1e3 * percentile(gaps, 99),
           "tpot_mean_ms": 1e3 * statistics.fmean(tpot) if tpot else float("nan")}
    print(f"{name:>11}: {row['requests']:4d} requests, {row['errors']} errors, {tokens:6d} tokens in {wall:6.1f} s = "
          f"{row['tok_s']:7.1f} tok/s | TTFT p50 {row['ttft_p50_ms']:7.1f} ms p99 {row['ttft_p99_ms']:7.1f} ms | "
          f"ITL p50 {row['itl_p50_ms']:6.1f} ms p99 {row['itl_p99_ms']:6.1f} ms | TPOT {row['tpot_mean_ms']:6.1f} ms",
          flush=True)
    for r in results:
        if r.error:
            print(f"             error: {r.error}")
            break
    return row


def acceptance(port: int) -> float | None:
    """Mean speculative acceptance length so far, from the server's /metrics (None without speculation)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    found = dict(re.findall(r"^nemotron3_spec_decode_acceptance_length_(sum|count) (\S+)$", text, re.M))
    count = float(found.get("count", 0))
    return float(found["sum"]) / count if count else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint folder (default: a random --preset model built here)")
    ap.add_argument("--preset", default="t9", help="preset of the random checkpoint (default t9)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=384, help="requests of the concurrent phase")
    ap.add_argument("--sequential", type=int, default=16, help="requests of the one-client phase")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds per phase at most")
    ap.add_argument("--speculative", type=int, default=None, help="the server's --speculative (default: its own)")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--token-budget", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--json", type=Path, help="write the two phases' figures here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or build_random_checkpoint(Path(tmp) / args.preset, args.preset)
        port = free_port()
        vocab = min(nemotron3.ModelConfig.from_hf(folder / "config.json").vocab_size,
                    Tokenizer.load(folder).vocab_size if (folder / "tokenizer.json").is_file() else 1 << 30)
        cmd = [sys.executable, "-m", "nemotron3.cli", "serve", "--model", str(folder), "--host", "127.0.0.1",
               "--port", str(port), "--max-batch", str(args.max_batch),
               "--max-seq-len", str(args.prompt_tokens[1] + args.max_tokens + 16),
               "--token-budget", str(args.token_budget), "--threads", str(args.threads),
               "--max-requests", str(max(256, args.clients * 2)), "--shutdown-timeout", "5"]
        if args.speculative is not None:
            cmd += ["--speculative", str(args.speculative)]
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            banner = server.stdout.readline().strip()
            print(banner, flush=True)
            if not banner.startswith("serving "):
                print(server.stdout.read())
                return 1
            model = banner.split()[1]
            span = tuple(args.prompt_tokens)
            asyncio.run(phase(port, model, vocab, 4, 8, args.max_tokens, 120, 10_000, span))  # warm up
            seq = report("sequential", *asyncio.run(phase(port, model, vocab, 1, args.sequential, args.max_tokens,
                                                          args.time_limit, 0, span)))
            con = report(f"{args.clients} clients", *asyncio.run(phase(
                port, model, vocab, args.clients, args.requests, args.max_tokens, args.time_limit, 1, span)))
            accepted = acceptance(port)
            if accepted is not None:
                print(f"speculative acceptance length (all phases): {accepted:.2f} tokens per round per row")
            ratio = con["tok_s"] / seq["tok_s"] if seq["tok_s"] else float("nan")
            print(f"aggregate throughput, {args.clients} clients / one at a time: {ratio:.2f}x")
            if args.json:
                args.json.write_text(json.dumps({"server": banner, "sequential": seq, "concurrent": con,
                                                 "ratio": ratio, "acceptance_length": accepted}, indent=2) + "\n")
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
