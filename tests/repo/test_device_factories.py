"""No tensor is created on an implicit CPU inside nemotron3/ (issue 31): every torch factory call says where.

On a GPU a tensor made by `torch.zeros(n)` in a step lands on the CPU while the model sits on CUDA, and the
next op that mixes them fails (`Expected all tensors to be on the same device`: the fast decoder's build did
exactly that). So this test reads every .py under nemotron3/ with `ast` and fails on a call of a tensor
factory (`torch.zeros`, `ones`, `empty`, `full`, `arange`, `tensor`, `rand*`, `Generator`, ... see FACTORIES,
including names imported from torch) that has no `device=` keyword, or has `device=None`. `*_like` functions
and the `new_*` methods inherit their input's device and are not factories here; `device="cpu"` written out
is a decision, not an accident, and passes.

Calls exempt without a device, by rule:

1. Module construction: the call's innermost enclosing function is `__init__`, `init_weights` or
   `reset_parameters` defined directly in a class that derives from `nn.Module` (directly, or through other
   classes of the package, resolved by name). A module is built where the ambient default device says
   (`with torch.device("cuda"): HybridLM(config)`, or `meta`) and moved with `.to(device)`: the PyTorch norm.
   The `__init__` of a plain class (the fast decoder's `Mamba2Step`, `MoEStep`, the `Batcher`) builds runtime
   state from a model that may already be on a GPU, and is NOT exempt.
2. Test oracles: functions whose name ends in `_reference` (and functions nested in one) are the one-row-at-a-
   time definitions the tests compare against, run on the host; the test checks that nothing in the package
   calls one, so they stay off every path a command runs.
3. ALLOWED below: (file, function) pairs, one reason each, kept short; an entry that no longer matches an
   offending call fails the test, so the list cannot go stale.

Each offender is reported as file:line:function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import TINY_HF_CONFIGS

import nemotron3
from nemotron3.engine import Engine, HybridCache
from nemotron3.engine.decode import FastDecoder
from nemotron3.engine.sampling import inverse_cdf, row_stream, row_uniforms, sample

PACKAGE = Path(__file__).resolve().parents[2] / "nemotron3"

# torch functions that create a tensor (or a generator) on the default device unless told otherwise
FACTORIES = frozenset({
    "zeros", "ones", "empty", "full", "arange", "range", "linspace", "logspace", "eye", "tensor", "as_tensor",
    "asarray", "scalar_tensor", "empty_strided", "tril_indices", "triu_indices", "rand", "randn", "randint",
    "randperm", "normal", "Generator", "sparse_coo_tensor", "complex", "polar",
    "from_numpy", "frombuffer",  # always on the CPU: only an allow-list entry or a reference may use them
    "Tensor", "FloatTensor", "DoubleTensor", "HalfTensor", "BFloat16Tensor", "LongTensor", "IntTensor",
    "ShortTensor", "CharTensor", "ByteTensor", "BoolTensor",
})
CONSTRUCTION = frozenset({"__init__", "init_weights", "reset_parameters"})
MODULE_BASES = frozenset({"nn.Module", "torch.nn.Module", "Module"})

# (path under nemotron3/, dotted function name) -> why it may create tensors on the host
ALLOWED = {
    ("train/data.py", "pack"): "data loading: packed rows are built on the host; the training loop moves batches",
    ("train/data.py", "PackedData.order"): "the shuffle is drawn on a CPU generator: same order on every device",
    ("train/sft_data.py", "rows"): "data loading: SFT rows are built on the host; the training loop moves batches",
    ("rl/rewards.py", "score"): "rewards are Python numbers scored on the host; the trainer moves advantages",
    ("stages/quantize.py", "calibration_batches"): "token batches built on the host; quant calibrate() moves each one",
}


def _dotted(node: ast.AST) -> str:
    """`torch.nn.Module` -> "torch.nn.Module" for Name/Attribute chains, "" otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _module_classes(trees: dict[Path, ast.Module]) -> set[str]:
    """Names of the package's classes that derive from nn.Module, through other package classes too."""
    bases = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases.setdefault(node.name, set()).update(_dotted(b) for b in node.bases)
    modules: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, bs in bases.items():
            if name not in modules and any(b in MODULE_BASES or b.split(".")[-1] in modules for b in bs):
                modules.add(name)
                changed = True
    return modules


class _Finder(ast.NodeVisitor):
    """Collects (line, function, call text) of factory calls without a device, and calls of `*_reference`."""

    def __init__(self, modules: set[str]) -> None:
        self.modules = modules
        self.torch_names: set[str] = set()  # names bound to the torch module
        self.factory_names: set[str] = set()  # factories imported by name (from torch import zeros)
        self.stack: list[ast.AST] = []
        self.found: list[tuple[int, str, str]] = []
        self.reference_calls: list[tuple[int, str, str]] = []

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name == "torch":
                self.torch_names.add(a.asname or "torch")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == "torch":
            self.factory_names |= {a.asname or a.name for a in node.names if a.name in FACTORIES}

    def _scoped(self, node: ast.AST) -> None:
        self.stack.append(node)
        self.generic_visit(node)
        self.stack.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _scoped

    def where(self) -> str:
        return ".".join(n.name for n in self.stack if not isinstance(n, ast.Lambda)) or "<module>"

    def exempt(self) -> bool:
        if any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.endswith("_reference")
               for n in self.stack):
            return True
        if len(self.stack) >= 2 and isinstance(self.stack[-1], ast.FunctionDef):
            owner = self.stack[-2]
            return (self.stack[-1].name in CONSTRUCTION and isinstance(owner, ast.ClassDef)
                    and owner.name in self.modules)
        return False

    def is_factory(self, func: ast.AST) -> bool:
        if isinstance(func, ast.Name):
            return func.id in self.factory_names
        return (isinstance(func, ast.Attribute) and func.attr in FACTORIES
                and isinstance(func.value, ast.Name) and func.value.id in self.torch_names)

    def visit_Call(self, node: ast.Call) -> None:
        name = _dotted(node.func).split(".")[-1]
        if name.endswith("_reference") and not self.exempt():
            self.reference_calls.append((node.lineno, self.where(), ast.unparse(node)[:80]))
        if self.is_factory(node.func) and not self.exempt():
            device = [k for k in node.keywords if k.arg == "device"]
            splat = any(k.arg is None for k in node.keywords)  # **kwargs may carry a device
            implicit = not device and not splat
            if device and isinstance(device[0].value, ast.Constant) and device[0].value.value is None:
                implicit = True
            if implicit:
                self.found.append((node.lineno, self.where(), ast.unparse(node)[:80]))
        self.generic_visit(node)


def scan(package: Path) -> tuple[list[str], set[tuple[str, str]], list[str]]:
    """(offenders as 'file:line:function: call', the (file, function) pairs they fall in, calls of references)."""
    trees = {p: ast.parse(p.read_text(), filename=str(p)) for p in sorted(package.rglob("*.py"))}
    modules = _module_classes(trees)
    offenders, pairs, refs = [], set(), []
    for path, tree in trees.items():
        rel = path.relative_to(package).as_posix()
        finder = _Finder(modules)
        finder.visit(tree)
        for line, func, text in finder.found:
            pairs.add((rel, func))
            if (rel, func) not in ALLOWED:
                offenders.append(f"nemotron3/{rel}:{line}:{func}: {text}")
        refs += [f"nemotron3/{rel}:{line}:{func}: {text}" for line, func, text in finder.reference_calls]
    return offenders, pairs, refs


def test_no_factory_call_without_a_device():
    offenders, _, _ = scan(PACKAGE)
    assert not offenders, (
        "tensors created on an implicit CPU (give device=..., from the model or the input; or x.new_*):\n  "
        + "\n  ".join(offenders))


def test_allow_list_has_no_stale_entry():
    _, pairs, _ = scan(PACKAGE)
    stale = sorted(set(ALLOWED) - pairs)
    assert not stale, f"ALLOWED entries with no device-less factory call left, remove them: {stale}"


def test_references_are_not_called_by_the_package():
    """The `_reference` exemption holds only while those functions are test oracles, never run by a command."""
    _, _, refs = scan(PACKAGE)
    assert not refs, "the package calls a *_reference function (exempt from the device rule):\n  " + "\n  ".join(refs)


def _scan_source(tmp_path: Path, source: str) -> list[str]:
    pkg = tmp_path / "pkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "m.py").write_text(source)
    return scan(pkg)[0]


def test_the_rules_on_small_sources(tmp_path):
    """What the scanner flags and what it lets through, on sources written for it (the rule, checked)."""
    flagged = _scan_source(tmp_path, (
        "import torch\nimport torch as th\nfrom torch import zeros as z, nn\n"
        "class Step:\n    def __init__(self, m):\n        self.b = torch.zeros(3)\n"  # plain class: flagged
        "def f(x):\n    a = th.arange(4)\n    g = torch.Generator()\n    c = z(2)\n"
        "    d = torch.ones(2, device=None)\n    return torch.tensor([1], dtype=torch.long)\n"
        "T = torch.eye(2)\n"
    ))
    assert [o.split(": ")[0] for o in flagged] == [
        "nemotron3/m.py:6:Step.__init__", "nemotron3/m.py:8:f", "nemotron3/m.py:9:f", "nemotron3/m.py:10:f",
        "nemotron3/m.py:11:f", "nemotron3/m.py:12:f", "nemotron3/m.py:13:<module>"]
    passed = _scan_source(tmp_path, (
        "import torch\nfrom torch import nn\n"
        "class A(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.w = nn.Parameter(torch.empty(3))\n    def init_weights(self):\n"
        "        self.w.copy_(torch.rand(3))\n"
        "class B(A):\n    def __init__(self):\n        super().__init__()\n        self.v = torch.ones(2)\n"
        "def g(x, **kw):\n    return torch.zeros(2, device=x.device), torch.ones(1, device='cpu'), "
        "torch.empty(1, **kw), x.new_zeros(3), torch.zeros_like(x)\n"
        "def g_reference(x):\n    return torch.tensor([1.0])\n"
    ))
    assert passed == []


# ---------------------------------------------------------------------------------------------- behaviour
def _meta_model(name: str) -> nemotron3.HybridLM:
    """A tiny model on the `meta` device: every op checks devices but computes nothing, so a tensor left on
    the CPU by a step fails here as it would on CUDA (`Tensor on device cpu is not on the expected device`)."""
    config = nemotron3.ModelConfig.from_hf(dict(TINY_HF_CONFIGS[name], model_type="nemotron_h"))
    with torch.device("meta"):
        return nemotron3.HybridLM(config).eval()


@pytest.mark.parametrize("name", sorted(TINY_HF_CONFIGS))
@pytest.mark.parametrize("rows", [1, 40])  # 40: the traceable MoE step's dense path (N·k > 4E)
def test_fast_decoder_builds_and_steps_on_the_models_device(name, rows):
    """The issue's crash: building the fast decoder of a model that is not on the CPU (Mamba2Step made its
    bias on the CPU). The traceable step has no host sync, so it runs whole on `meta`."""
    model = _meta_model(name)
    with torch.no_grad():
        fast = FastDecoder(model, traceable=True)
        cache = HybridCache(model.config, rows, 32, torch.float32, "meta", include_mtp=False)
        logits = fast.step(torch.zeros(rows, dtype=torch.long, device="meta"), cache, None, False)
    assert logits.device.type == "meta" and logits.shape == (rows, model.config.vocab_size)


def test_uniform_streams_are_drawn_on_the_host_whatever_the_device():
    """engine/sampling.py's docstring: row i's stream is the CPU generator seeded with (seed·1000003 + i) mod
    (2⁶³ - 1), float64, copied to the requested device; so a seed gives the same uniforms on every device."""
    seed, rows, steps = 1234, 3, 7
    u = row_uniforms(seed, rows, steps)
    for i in range(rows):
        gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + i) % (2**63 - 1))
        expected = torch.rand(steps, generator=gen, dtype=torch.float64, device="cpu")
        assert torch.equal(u[i], expected)  # exact: the same generator and seed draw the same bits
        assert torch.equal(row_stream(seed, i, steps), expected)
    on_meta = row_uniforms(seed, rows, steps, device="meta")
    assert on_meta.device.type == "meta" and on_meta.shape == (rows, steps) and on_meta.dtype == torch.float64
    assert row_stream(seed, 0, steps, "meta").device.type == "meta"


def test_inverse_cdf_reads_uniforms_on_the_weights_device():
    """The Batcher and the Engine keep the streams beside the logits; a stream handed over on the host must
    still work (it used to multiply a CPU tensor into the device's CDF)."""
    weights = torch.ones(2, 5, device="meta")
    assert inverse_cdf(weights, torch.tensor([0.1, 0.9], dtype=torch.float64)).device.type == "meta"


# ---------------------------------------------------------------------------------------------- on CUDA
@pytest.mark.gpu
def test_sampled_tokens_are_the_same_on_cpu_and_cuda():
    """What the sampling docstring promises: same seed, same uniforms (bit for bit: one host draw, copied),
    hence the same tokens from the same logits; and the engine's seeded samples agree across devices."""
    assert torch.equal(row_uniforms(7, 4, 50, device="cuda").cpu(), row_uniforms(7, 4, 50))
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    u = row_uniforms(3, 64, 1)[:, 0]
    cpu = sample(logits, 0.8, 20, 0.9, u)
    cuda = sample(logits.cuda(), 0.8, 20, 0.9, u.cuda())
    assert torch.equal(cuda.cpu(), cpu)
    config = nemotron3.ModelConfig.from_hf(dict(TINY_HF_CONFIGS["dense-mlp"], model_type="nemotron_h"))
    torch.manual_seed(0)
    model = nemotron3.HybridLM(config).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    outs = {}
    for dev in ("cpu", "cuda"):
        engine = Engine(model.to(dev))
        outs[dev] = [engine.generate(prompts, 12, temperature=1.0, seed=5, stop_token_ids=[]).tokens,
                     engine.generate(prompts, 12, stop_token_ids=[]).tokens]
    assert outs["cuda"] == outs["cpu"]
