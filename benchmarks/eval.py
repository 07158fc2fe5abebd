"""Evaluation throughput: the `nemotron3` lm-eval backend against lm-eval's `hf` backend on the same weights.

    python benchmarks/eval.py --model CHECKPOINT [--repeats 3] [--batch-size 16] [--think off|on]
                              [--max-gen-toks 96] [--limit N] [--threads N] [--quick] [--out FILE.json]

One checkpoint folder (nemotron3's checkpoints load in transformers' NemotronHForCausalLM and their tokenizer.json /
tokenizer_config.json in AutoTokenizer), one fixture (benchmarks/eval_tasks: 64 held-out add and sort problems),
both backends built once (loading is not timed) and run through `lm_eval.simple_evaluate` alternately, `--repeats`
times each (the machine is shared and noisy; the best run counts):
  * generate_until (`nemotron3_tasks_gen`, chat template, greedy, the same `max_gen_toks` and batch size): items/s
    of each backend (over the whole `simple_evaluate`, and over the time spent inside the backend's request
    method, lm-eval's own work left out), their ratio, accuracy, and whether the extracted answers (the family's
    answer line) agree item by item;
  * loglikelihood (`nemotron3_tasks_mc`, 4 choices per item scored by likelihood): items/s, accuracy, the largest
    difference between the two backends' loglikelihoods, and whether the chosen answers agree.
Settings that make the two backends see the same tokens: `hf` gets `add_bos_token=True` (nemotron3 prompts start
with `<s>`; the tokenizer adds no BOS by itself), `enable_thinking` as `--think` (the checkpoint's chat template
reads it) and `think_end_token` as the id of `</think>` (lm-eval decodes replies without special tokens, so the
string form would never be found), dtype float32 on the CPU for both; loglikelihood runs with thinking off, as
`hf` requires. Both stop a row at `</s>` or `<|im_end|>`: `hf` gets both as its generation config's
`eos_token_id` (the checkpoint's names `</s>` alone, and a row stopped only by lm-eval's `until` strings goes on
generating until its batch ends, after which lm-eval reads the answer after the last `</think>` of it all).
Two known differences in replies: with `--think on`, a reply whose reasoning never closes is empty for nemotron3
and the whole text for `hf`; special tokens the model writes inside a reply (a stray `<s>`) stay in nemotron3's
text and not in `hf`'s (the table gives the agreement without them).
`--out` writes the same numbers as JSON. Without `--model`, a tiny random checkpoint is built in a temporary
folder. `--quick`: a smoke run of 8 items, 8 new tokens, one repeat.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TASKS = HERE / "eval_tasks"
GEN, MC = "nemotron3_tasks_gen", "nemotron3_tasks_mc"


def tiny_checkpoint(folder: Path) -> Path:
    """A tiny random model with nemotron3's tokenizer (chat special tokens), for smoke runs."""
    import nemotron3
    from nemotron3.tokenizer import Tokenizer

    text = "What is 12 + 30? Sort ascending: 5 3 9. Answer: 42. <think> 2+0=2 </think> the quick brown fox"
    tk = Tokenizer.train([text] * 50, vocab_size=300)
    config = nemotron3.ModelConfig.preset("tiny").replace(vocab_size=tk.tk.get_vocab_size(),
                                                          num_nextn_predict_layers=0)
    torch.manual_seed(0)
    nemotron3.save_pretrained(nemotron3.HybridLM(config), folder)
    tk.save(folder)
    return folder


def backends(folder: Path, batch_size: int, think: str) -> dict:
    """Both lm-eval models on the checkpoint in `folder`, built once so that loading is not timed."""
    from lm_eval.api.registry import get_model

    import nemotron3.eval.harness  # noqa: F401  (registers the nemotron3 model)

    ours = get_model("nemotron3")(pretrained=str(folder), think=think, batch_size=batch_size, dtype="float32")
    think_end_id = ours.tok.token_to_id("</think>")
    hf_args = dict(pretrained=str(folder), trust_remote_code=False, device="cpu", dtype="float32",
                   batch_size=batch_size, add_bos_token=True, enable_thinking=think == "on")
    if think_end_id is not None:
        hf_args["think_end_token"] = think_end_id
    elif think == "on":
        raise SystemExit(f"--think on: {folder}'s tokenizer has no single </think> token")
    hf = get_model("hf")(**hf_args)
    # the end-of-turn token as an end of sequence for transformers' `generate` (the checkpoint's generation config
    # names `</s>` alone): otherwise a finished row keeps generating until the whole batch stops, and lm-eval's
    # hf backend reads the answer after the LAST `</think>` of everything generated, past the reply's own end
    ends = [ours.tok.token_to_id(t) for t in ("</s>", "<|im_end|>")]
    hf.model.generation_config.eos_token_id = [t for t in ends if t is not None]
    return {"nemotron3": ours, "hf": hf}


def run_task(lm, task: str, limit: int | None, gen_toks: int | None, manager) -> tuple[float, float, dict]:
    """Seconds of one `simple_evaluate` over `task`, the seconds of those inside the backend's request method
    (`generate_until` or `loglikelihood`: the rest is lm-eval's own work, the same for both), and the result."""
    from lm_eval import simple_evaluate

    method = "generate_until" if task == GEN else "loglikelihood"
    inner, spent = getattr(lm, method), [0.0]

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t

    kwargs = {"gen_kwargs": f"max_gen_toks={gen_toks}"} if gen_toks else {}
    setattr(lm, method, timed)
    try:
        t0 = time.perf_counter()
        res = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=True,
                              apply_chat_template=task == GEN, **kwargs)
        total = time.perf_counter() - t0
    finally:
        delattr(lm, method)
    return total, spent[0], res


def race(lms: dict, task: str, repeats: int, limit: int | None, gen_toks: int | None, manager) -> tuple[dict, dict]:
    """Best seconds per backend over `repeats` alternating runs (noise hits both alike), whole `simple_evaluate`
    and inside the backend, and the last results."""
    best, last = {k: [math.inf, math.inf] for k in lms}, {}
    for r in range(repeats):
        for name in (list(lms) if r % 2 == 0 else list(reversed(lms))):
            total, inner, last[name] = run_task(lms[name], task, limit, gen_toks, manager)
            best[name] = [min(best[name][0], total), min(best[name][1], inner)]
            print(f"  {task} {name} run {r + 1}: {total:.2f}s ({inner:.2f}s in the backend)", flush=True)
    return best, last


def _samples(res: dict, task: str) -> list[dict]:
    return sorted(res["samples"][task], key=lambda s: s["doc_id"])


def compare_gen(results: dict, specials: list[str]) -> dict:
    """Item-by-item agreement of the extracted answers (the family's answer line) between the backends: exactly,
    and once the special tokens' text is removed (`hf` decodes replies without special tokens, nemotron3 keeps
    any it generated, e.g. a `<s>` in the middle of a reply)."""
    from nemotron3.eval.extract import extract

    def strip(text: str) -> str:
        for sp in specials:
            text = text.replace(sp, "")
        return text

    replies = {k: [s["resps"][0][0] for s in _samples(res, GEN)] for k, res in results.items()}
    a, b = ([extract("task", r) for r in replies[k]] for k in ("nemotron3", "hf"))
    a2, b2 = ([extract("task", strip(r)) for r in replies[k]] for k in ("nemotron3", "hf"))
    differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    differ2 = [i for i, (x, y) in enumerate(zip(a2, b2)) if x != y]
    return {"items": len(a), "agree": len(a) - len(differ), "differ": differ[:10],
            "agree_without_specials": len(a) - len(differ2), "differ_without_specials": differ2[:10]}


def compare_mc(results: dict) -> dict:
    """The largest loglikelihood difference between the backends and how many items pick the same choice."""
    scores = {k: [[float(r[0][0]) for r in s["resps"]] for s in _samples(res, MC)] for k, res in results.items()}
    a, b = scores["nemotron3"], scores["hf"]
    gap = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    same = sum(max(range(len(ra)), key=ra.__getitem__) == max(range(len(rb)), key=rb.__getitem__)
               for ra, rb in zip(a, b))
    return {"items": len(a), "agree": same, "max_abs_diff": gap}


def table(name: str, secs: dict, results: dict, task: str, n: int, agree: dict) -> list[str]:
    rows = []
    for k in ("nemotron3", "hf"):
        r = results[k]["results"][task]
        acc, se = r["acc,none"], r.get("acc_stderr,none")
        se_s = f"{se:.3f}" if isinstance(se, float) else "n/a"
        total, inner = secs[k]
        rows.append(f"| {name} | {k} | {n} | {total:.2f} / {inner:.2f} | {n / total:.1f} / {n / inner:.1f} | "
                    f"{acc:.3f} ± {se_s} |")
    ratio = [secs["hf"][i] / secs["nemotron3"][i] for i in (0, 1)]
    if "max_abs_diff" in agree:
        extra = f"max |Δ loglikelihood| {agree['max_abs_diff']:.2e}"
    else:
        extra = (f"differing items {agree['differ']}; without special tokens {agree['agree_without_specials']}/"
                 f"{agree['items']}" if agree["differ"] else "all answers equal")
    rows.append(f"| {name} | nemotron3 / hf | | | {ratio[0]:.2f}× / {ratio[1]:.2f}× | agree {agree['agree']}/"
                f"{agree['items']} ({extra}) |")
    return rows


def summary(secs: dict, results: dict, task: str, n: int, agree: dict) -> dict:
    """One task's numbers for `--out`: per backend seconds (whole and in the backend), items/s, accuracy, stderr;
    the ratios and the agreement."""
    out = {k: {"seconds": secs[k][0], "backend_seconds": secs[k][1], "items_per_s": n / secs[k][0],
               "backend_items_per_s": n / secs[k][1], "acc": results[k]["results"][task]["acc,none"],
               "stderr": results[k]["results"][task].get("acc_stderr,none")} for k in secs}
    return {**out, "ratio": secs["hf"][0] / secs["nemotron3"][0],
            "backend_ratio": secs["hf"][1] / secs["nemotron3"][1], "agreement": agree}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="checkpoint folder (default: a tiny random one built here)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--think", choices=("off", "on"), default="off")
    p.add_argument("--max-gen-toks", type=int, default=96)
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all 64)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 8 items, 8 new tokens, 1 repeat")
    p.add_argument("--out", type=Path, help="also write the numbers here as JSON")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.limit, a.max_gen_toks = 1, a.limit or 8, min(a.max_gen_toks, 8)
    if a.repeats < 1 or a.batch_size < 1 or a.max_gen_toks < 1 or (a.limit is not None and a.limit < 1):
        p.error("--repeats, --batch-size, --max-gen-toks and --limit must be at least 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        folder = a.model or tiny_checkpoint(Path(tmp))
        if not (folder / "config.json").is_file():
            raise SystemExit(f"--model {folder}: not a checkpoint folder (no config.json)")
        lms = backends(folder, a.batch_size, a.think)
        specials = [t.content for t in lms["nemotron3"].tok.tk.get_added_tokens_decoder().values() if t.special]
        manager = TaskManager(include_path=str(TASKS), include_defaults=False)
        n = a.limit or sum(1 for line in (TASKS / "problems.jsonl").read_text().splitlines() if line.strip())
        g_secs, g_res = race(lms, GEN, a.repeats, a.limit, a.max_gen_toks, manager)
        if a.think == "on":  # lm-eval's hf backend refuses loglikelihood requests with enable_thinking=True
            lms = backends(folder, a.batch_size, "off")
        m_secs, m_res = race(lms, MC, a.repeats, a.limit, None, manager)
    gen_agree, mc_agree = compare_gen(g_res, specials), compare_mc(m_res)
    print(f"\ncheckpoint {folder}; think={a.think}, batch size {a.batch_size}, max_gen_toks {a.max_gen_toks}, "
          f"best of {a.repeats}, {torch.get_num_threads()} threads")
    print("| task | backend | items | best s (all / in backend) | items/s (all / in backend) | acc ± stderr |")
    print("|---|---|---|---|---|---|")
    for row in (table("generate_until", g_secs, g_res, GEN, n, gen_agree)
                + table("loglikelihood (4 choices)", m_secs, m_res, MC, n, mc_agree)):
        print(row)
    if a.out:
        report = {"checkpoint": str(a.model or "tiny random"), "think": a.think, "batch_size": a.batch_size,
                  "max_gen_toks": a.max_gen_toks, "repeats": a.repeats, "threads": torch.get_num_threads(),
                  "items": n, "generate_until": summary(g_secs, g_res, GEN, n, gen_agree),
                  "loglikelihood": summary(m_secs, m_res, MC, n, mc_agree)}
        a.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
