"""Peers' official code side by side with ours: FLAP and LLM-Pruner on SmolLM2-135M (issue 24).

Rows, per ``--ratios`` value: our default (``python -m minillm.prune``: flap scores + the refit),
our re-implementation of each peer (FLAP: ``--criterion flap --compensate``; LLM-Pruner's
first-order element-wise Taylor score: ``--criterion taylor --no-reconstruct``), and each peer's
own code run from the checkout whose path is passed (``--flap-dir``, ``--llm-pruner-dir``; no line
of theirs is stored in this repository). Our rows prune the heads and channels of ``--layers``
with one global ranking per kind, ``--ratio`` counting the prunable parameters of those layers;
the peers count differently, so each peer's ratio is searched (``match_ratio``) until its pruned
model has the total parameter count closest to our default's at that ratio. Every model gets the
same calibration tokens (``minillm.data.calibration_batches(--calib, tokenizer, --nsamples,
--seqlen, --seed)``: they replace the peers' own loaders) and the same evaluation: perplexity
(``minillm.evaluation.perplexity.perplexity_stats``) over the first ``--eval-tokens`` tokens, in
windows of ``--eval-seqlen``, of WikiText-2 test and of the other-domain text
(``bench_quality.other_domain_text()``, Python stdlib docstrings). No recovery (LoRA) anywhere.

Supported peer versions (a checkout that is missing or at another commit is refused in one line,
exit 2)::

    CASIA-IVA-Lab/FLAP   3bb57db3449dd2fa04a5c2192de80e87e33be2b1  (lib/prune.py: prune_flap)
    horseee/LLM-Pruner   128a07d977f9b205d60ab14cfbc6a78f8a8e39d2  (llama3.py, the GQA script)

(LLM-Pruner's ``lm-evaluation-harness/`` is not needed; a sparse checkout without it will do.)

Run-time adaptations, all done here around their code (their files are read, never changed):

FLAP (``prune_flap`` of ``lib/prune.py``, metric ``--flap-metrics`` (WIFV, theirs), structure
AL-AM (their default: one global ranking of heads and channels of every layer, with bias
compensation)):

1. The model: Hugging Face's ``LlamaForCausalLM`` (transformers 5) in float32, with zero biases
   added to every ``o_proj`` and ``down_proj``, which is what their ``main.py:get_llm`` does to
   their copy of the LLaMA modeling file (that copy is multi-head only, with ``head_dim = 128``
   and rope theta 10,000 hard-coded, so it cannot hold SmolLM2). ``model.seqlen = --seqlen``.
2. Calibration: ``lib.prune.get_loaders`` is replaced by a function returning our windows as
   their ``(input, target)`` pairs.
3. GQA and head width: ``lib/prune.py`` hard-codes LLaMA-7B's head width, the literal ``128``.
   The module is compiled from their file with an AST pass that replaces that integer literal
   by the width of the attention unit removed here (nothing else changes), and one attention
   unit is one **whole KV group** (SmolLM2: 3 query heads sharing one K/V head, 192 ``o_proj``
   input channels): FLAP's head score (the mean of the standardized WIFV of the unit's
   ``o_proj`` input channels) and its bias compensation apply unchanged, and its compression
   weight ``512/3`` (parameters of one LLaMA head over those of one MLP channel,
   ``4 x 128 / 3``) is exactly the ratio for a SmolLM2 KV group too (``(2 x 192 + 2 x 64) / 3``),
   which the script checks for the model it runs. Their ``compress`` slices q, k and v with one
   mask: it is wrapped so that k and v (one head of 64 rows per unit, not 192) are sliced by
   the wrapper per KV head, and FLAP's float16 input means (its models are float16) are cast to
   the model's dtype before it forms the bias. A layer left without attention returns the
   ``o_proj`` bias (what their MHA code computes with zero heads).
4. transformers 5 computes the rotary cos/sin once per model and passes them to every decoder
   layer; FLAP calls layers with ``position_ids`` only, so a forward pre-hook on each layer
   computes them from the model's ``rotary_emb`` when they are missing (removed after pruning).
5. CPU: ``device = cpu``; their prints go to stderr. Only AL-AM is supported (UL-UM/UL-MM read
   ``self_attn.num_heads``, AL-MM/UL-MM count heads as LLaMA's in ``cal_remove_neuron``).

LLM-Pruner (``llama3.py``, their entry point for GQA models, run as ``__main__`` with its own
argument parser: ``--block_wise``, ``--pruner_type taylor --taylor param_first``, attention and
MLP layers ``--layers``, one local ratio per layer):

1. ``LLMPruner/__init__.py`` imports ``LLMPruner.models`` (their copies of the LLaMA, Baichuan
   and ChatGLM modeling files for transformers 4.28, which ``llama3.py`` does not use and which
   need ``sentencepiece``): an empty module is registered under that name first.
2. The model: ``LlamaForCausalLM.from_pretrained`` is wrapped to load float32 (their script
   loads float16 for a GPU), with ``attn_implementation="eager"`` (transformers 5's SDPA path
   uses ``enable_gqa`` instead of ``repeat_kv``, whose ``expand`` their dependency graph follows
   to tie each K/V head to its query heads) and ``use_cache=False`` (transformers 5 returns a
   ``DynamicCache`` object, which their graph tracer cannot flatten). Evaluation switches the
   pruned model back to SDPA, like every other model.
3. Calibration: ``get_examples`` (10 bookcorpus samples of 64 tokens by default) returns our
   windows (``--num_examples`` = ``--nsamples``). Their single ``model(examples,
   labels=examples).loss.backward()`` over the whole batch is computed in micro-batches of
   ``--grad-chunk`` sequences whose losses are weighted by their share of the batch and
   back-propagated at once: the same gradient (all windows have the same length) without
   holding 64 x 256 tokens of activations. ``PPLMetric`` (which would download WikiText-2 and
   PTB) is replaced by a stub that hands the pruned model back to this script.
4. GQA: their graph removes whole KV groups (the K/V head and its query heads), the ratio
   counting ``k_proj`` channels in units of ``head_dim``: with 3 KV heads per layer no head goes
   below a ratio of 1/3 (``(192 - int(192 (1 - r))) // 64``), so at the 20% match LLM-Pruner
   removes MLP channels only. Worse, where the ratio asks for some ``k_proj`` channels but less
   than one head, their ``MetaPruner.prune_local`` fails (``torch.cat(): expected a non-empty
   list of Tensors``, ``LLMPruner/torch_pruning/pruner/algorithms/metapruner.py`` line 276)
   instead of removing no head; for those ratios the attention layer range is passed empty
   (``--block_attention_layer_start`` = ``--block_attention_layer_end``), which removes what
   their code means to (no head) through their own flags.
5. Ratio search: in their local block-wise mode the number of removed channels depends on the
   ratio only, so the count of a candidate ratio is found by running ``llama3.py`` with
   ``--pruner_type l2`` (no backward); the chosen ratio is then run with Taylor scores and its
   count checked against the dry run.

Ratio matching (``match_ratio``): FLAP: a first guess from the parameters one unit of ratio
removes (all attention + MLP weights of every layer), then up to ``--flap-tries`` runs
bracketing the target; LLM-Pruner: up to ``--llm-pruner-tries`` dry runs. The model kept is the
one whose count is closest to the target. Every model's exact parameter count is reported.

JSON on stdout (setup, one row per model: name, source, flags, parameters, perplexities, wall
time), logs on stderr. Finished rows are appended to ``WORK/rows.jsonl`` and not run again.

Command (see ``benchmarks/results/peers.md``)::

    git clone https://github.com/CASIA-IVA-Lab/FLAP /tmp/peers/FLAP
    git -C /tmp/peers/FLAP checkout 3bb57db3449dd2fa04a5c2192de80e87e33be2b1
    git clone --no-checkout https://github.com/horseee/LLM-Pruner /tmp/peers/LLM-Pruner
    git -C /tmp/peers/LLM-Pruner sparse-checkout set --no-cone '/*' '!/lm-evaluation-harness/'
    git -C /tmp/peers/LLM-Pruner checkout 128a07d977f9b205d60ab14cfbc6a78f8a8e39d2
    python benchmarks/bench_peers.py --flap-dir /tmp/peers/FLAP \\
        --llm-pruner-dir /tmp/peers/LLM-Pruner --calib ../shared/data/wikitext2/valid.txt \\
        --test ../shared/data/wikitext2/test.txt --cache-dir /tmp/smollm2-f32 \\
        --work-dir /tmp/peers-work > benchmarks/results/peers.json
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import runpy
import shlex
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

FLAP_REPO, FLAP_COMMIT = "CASIA-IVA-Lab/FLAP", "3bb57db3449dd2fa04a5c2192de80e87e33be2b1"
LLM_PRUNER_REPO = "horseee/LLM-Pruner"
LLM_PRUNER_COMMIT = "128a07d977f9b205d60ab14cfbc6a78f8a8e39d2"
FLAP_FILES = ("lib/prune.py", "lib/layerwrapper.py", "lib/data.py")
LLM_PRUNER_FILES = ("llama3.py", "LLMPruner/__init__.py", "LLMPruner/torch_pruning/__init__.py")
FLAP_HEAD_LITERAL = 128  # LLaMA-7B's head_dim, hard-coded in FLAP's lib/prune.py
FLAP_HEAD_WEIGHT = 512.0 / 3  # FLAP's compression weight of one head (in MLP channels)

# name -> (source, extra flags of python -m minillm.prune)
OURS = {
    "default": ("our default", []),
    "flap-ours": (
        "our re-implementation of FLAP",
        ["--criterion", "flap", "--compensate", "--no-reconstruct"],
    ),
    "taylor-ours": (
        "our re-implementation of LLM-Pruner's score",
        ["--criterion", "taylor", "--no-reconstruct"],
    ),
}
PEERS = ("flap-official", "llm-pruner-official")


def log(msg: str) -> None:
    print(f"[bench_peers] {msg}", file=sys.stderr, flush=True)


def checkout_error(path: str, repo: str, commit: str, files: tuple[str, ...]) -> str | None:
    """One line saying why ``path`` is not a checkout of ``repo`` at ``commit``; None if it is."""
    want = f"expected a checkout of {repo} at commit {commit}"
    root = Path(path)
    if not root.is_dir():
        return f"{path}: no such directory; {want}"
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"{path}: not a git checkout (git rev-parse HEAD failed); {want}"
    if head != commit:
        return f"{path}: at commit {head}; {want}"
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        return f"{path}: missing {', '.join(missing)}; {want}"
    return None


def match_ratio(
    count: Callable[[float], int],
    target: int,
    first: float,
    slope: float,
    max_evals: int,
    resolution: float = 1e-5,
) -> tuple[float, int, list[tuple[float, int]]]:
    """The evaluated ratio whose parameter count is closest to ``target``.

    ``count(ratio)``: parameters left at ``ratio`` (non-increasing in it); ``first``: the first
    guess; ``slope``: parameters one unit of ratio removes, for the steps until the target is
    bracketed; then bisection, until ``max_evals`` evaluations, an exact hit, or a bracket
    narrower than ``resolution``. Returns (ratio, count, every (ratio, count) evaluated).
    """
    seen: dict[float, int] = {}
    lo = hi = None  # lo: a ratio that leaves too many parameters, hi: too few
    r = min(max(first, 0.0), 1.0)
    while len(seen) < max_evals:
        c = seen[r] if r in seen else seen.setdefault(r, count(r))
        if c == target:
            break
        if c > target:
            lo = r if lo is None else max(lo, r)
        else:
            hi = r if hi is None else min(hi, r)
        if lo is not None and hi is not None:
            if hi - lo <= resolution:
                break
            r = (lo + hi) / 2
        else:
            step = (c - target) / slope
            step = max(abs(step), resolution) * (1 if step > 0 else -1)
            r = min(max(r + step, 0.0), 1.0)
            if r in seen:
                break
    best = min(seen, key=lambda k: (abs(seen[k] - target), k))
    return best, seen[best], sorted(seen.items())


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _bias_only_forward(self, hidden_states, *args, **kwargs):
    """Attention with no head left: ``o_proj`` of nothing, i.e. its bias."""
    empty = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
    return self.o_proj(empty), None


def fix_empty_attention(model: nn.Module) -> int:
    """Layers whose attention lost every head answer with the ``o_proj`` bias; their count."""
    n = 0
    for layer in model.model.layers:
        attn = layer.self_attn
        if attn.q_proj.out_features == 0:
            attn.forward = types.MethodType(_bias_only_forward, attn)
            n += 1
    return n


def add_rotary_hook(model: nn.Module) -> list:
    """Pre-hooks giving each decoder layer its rotary cos/sin when called without them."""

    def pre(module, args, kwargs):
        if kwargs.get("position_embeddings") is None:
            hidden = args[0] if args else kwargs["hidden_states"]
            pos = kwargs.get("position_ids")
            if pos is None:
                pos = torch.arange(hidden.shape[1], device=hidden.device)[None]
            kwargs["position_embeddings"] = model.model.rotary_emb(hidden, pos)
        return args, kwargs

    return [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in model.model.layers]


def chunked_backward_forward(model: nn.Module, chunk: int) -> Callable:
    """``model.forward`` whose loss over a batch larger than ``chunk`` is back-propagated in
    micro-batches weighted by their share of the batch (the full batch's gradient, as equal
    length windows weigh equally); the returned loss is then a detached leaf, so a caller's
    ``loss.backward()`` adds nothing."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    forward = model.forward

    def wrapped(*args, labels=None, **kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        if labels is None or ids is None or ids.shape[0] <= chunk or not torch.is_grad_enabled():
            return forward(*args, labels=labels, **kwargs)
        kwargs.pop("input_ids", None)
        n, total = ids.shape[0], 0.0
        for s in range(0, n, chunk):
            out = forward(ids[s : s + chunk], labels=labels[s : s + chunk], **kwargs)
            part = out.loss * (min(chunk, n - s) / n)
            part.backward()
            total += part.item()
        return CausalLMOutputWithPast(loss=torch.tensor(total, requires_grad=True))

    return wrapped


class _HeadLiteral(ast.NodeTransformer):
    """Replaces the integer literal 128 (LLaMA-7B's head width) by the name ``_FLAP_HEAD_WIDTH``."""

    def visit_Constant(self, node):
        if type(node.value) is int and node.value == FLAP_HEAD_LITERAL:
            return ast.copy_location(ast.Name("_FLAP_HEAD_WIDTH", ast.Load()), node)
        return node


def load_flap(flap_dir: str, unit_width: int):
    """FLAP's ``lib/prune.py`` as a module (package ``_flap_lib``, so their relative imports of
    ``layerwrapper`` and ``data`` resolve in their ``lib/``), head width ``unit_width``."""
    lib = Path(flap_dir) / "lib"
    pkg = sys.modules.get("_flap_lib") or types.ModuleType("_flap_lib")
    pkg.__path__ = [str(lib)]
    sys.modules["_flap_lib"] = pkg
    path = lib / "prune.py"
    tree = ast.fix_missing_locations(_HeadLiteral().visit(ast.parse(path.read_text(), str(path))))
    mod = types.ModuleType("_flap_lib.prune")
    mod.__file__, mod.__package__ = str(path), "_flap_lib"
    mod._FLAP_HEAD_WIDTH = unit_width
    sys.modules["_flap_lib.prune"] = mod
    exec(compile(tree, str(path), "exec"), mod.__dict__)
    return mod


def flap_model(model_dir: str):
    """SmolLM2 as FLAP's ``get_llm`` leaves LLaMA: zero biases on ``o_proj`` and ``down_proj``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for layer in model.model.layers:
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            lin.bias = nn.Parameter(torch.zeros(lin.out_features))
    return model


def run_flap(args, calib: torch.Tensor, tokenizer, ratio: float) -> nn.Module:
    """A model pruned by FLAP's own ``prune_flap`` at ``--pruning_ratio ratio``."""
    model = flap_model(args.cache_dir)
    cfg = model.config
    head_dim = cfg.head_dim
    n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
    unit = n_rep * head_dim
    weight = (2 * unit + 2 * head_dim) / 3  # KV group's parameters over one channel's
    if abs(weight - FLAP_HEAD_WEIGHT) > 1e-9:
        raise SystemExit(
            f"FLAP weighs a head as {FLAP_HEAD_WEIGHT:.2f} MLP channels; a KV group of this "
            f"model weighs {weight:.2f}: the comparison would not count parameters as FLAP does"
        )
    mod = load_flap(args.flap_dir, unit)
    compress = mod.compress

    def compress_gqa(
        layer, attn_mask, mlp_mask, attn_mean, mlp_mean, device, bias=True, unstr=False
    ):
        dtype = layer.self_attn.o_proj.weight.dtype
        attn_mean = None if attn_mean is None else attn_mean.to(dtype)
        mlp_mean = None if mlp_mean is None else mlp_mean.to(dtype)
        if attn_mask is None:
            return compress(layer, attn_mask, mlp_mask, attn_mean, mlp_mean, device, bias, unstr)
        attn = layer.self_attn
        k, v = attn.k_proj, attn.v_proj
        shape = (attn.q_proj.in_features, attn.q_proj.out_features)
        attn.k_proj = nn.Linear(*shape, bias=False, device="meta")  # stand-ins shaped like q
        attn.v_proj = nn.Linear(*shape, bias=False, device="meta")
        try:
            compress(layer, attn_mask, mlp_mask, attn_mean, mlp_mean, device, bias, unstr)
        finally:
            attn.k_proj, attn.v_proj = k, v
        rows = torch.where(attn_mask.repeat_interleave(head_dim))[0]
        for lin in (k, v):
            lin.weight.data = lin.weight.data[rows]
            lin.out_features = len(rows)

    mod.compress = compress_gqa

    def get_loaders(name, nsamples, seed, seqlen, tokenizer):
        assert nsamples == len(calib) and seqlen == calib.shape[1], (nsamples, seqlen)
        return [(x[None], x[None]) for x in calib], None

    mod.get_loaders = get_loaders
    model.seqlen = calib.shape[1]
    flap_args = argparse.Namespace(
        model=args.cache_dir,
        seed=args.seed,
        nsamples=len(calib),
        pruning_ratio=ratio,
        remove_heads=8,
        metrics=args.flap_metrics,
        structure="AL-AM",
        prune_method="flap",
        unstr=False,
    )
    hooks = add_rotary_hook(model)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            mod.prune_flap(flap_args, model, tokenizer, torch.device("cpu"))
    finally:
        for h in hooks:
            h.remove()
    empty = fix_empty_attention(model)
    if empty:
        log(f"FLAP {ratio:.6f}: {empty} layer(s) without attention")
    return model.eval()


@contextlib.contextmanager
def llm_pruner_env(args, calib: torch.Tensor, captured: dict):
    """The run-time adaptations of ``llama3.py`` (see the module docstring), undone on exit."""
    import logging

    import transformers

    root = Path(args.llm_pruner_dir)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    sys.modules.setdefault("LLMPruner.models", types.ModuleType("LLMPruner.models"))
    import LLMPruner.datasets.example_samples as examples
    import LLMPruner.evaluator.ppl as ppl

    def get_examples(dataset, tokenizer, n_samples, seq_len=128):
        assert n_samples == len(calib), (n_samples, len(calib))
        return calib.clone()

    def ppl_stub(model, tokenizer, datasets, *a, **k):
        captured["model"] = model
        return {}

    cls = transformers.LlamaForCausalLM
    load = cls.from_pretrained.__func__

    def from_pretrained(klass, name, *a, **kwargs):
        kwargs.pop("device_map", None)
        kwargs.pop("torch_dtype", None)
        kwargs.update(dtype=torch.float32, attn_implementation="eager")
        model = load(klass, name, *a, **kwargs)
        model.config.use_cache = False
        model.forward = chunked_backward_forward(model, args.grad_chunk)
        return model

    saved = (examples.get_examples, ppl.PPLMetric, cls.__dict__.get("from_pretrained"))
    handlers = list(logging.getLogger().handlers)
    cwd = os.getcwd()
    work = Path(args.work_dir) / "llm-pruner"
    work.mkdir(parents=True, exist_ok=True)
    examples.get_examples, ppl.PPLMetric = get_examples, ppl_stub
    cls.from_pretrained = classmethod(from_pretrained)
    os.chdir(work)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        os.chdir(cwd)
        examples.get_examples, ppl.PPLMetric = saved[0], saved[1]
        if saved[2] is None:
            del cls.from_pretrained  # back to the inherited one
        else:
            cls.from_pretrained = saved[2]
        for h in list(logging.getLogger().handlers):  # a copy: handlers are removed
            if h not in handlers:
                logging.getLogger().removeHandler(h)
                h.close()


def kv_heads_removed(ratio: float, kv_channels: int, head_dim: int) -> tuple[int, int]:
    """(``k_proj`` channels, whole KV heads) LLM-Pruner's local block-wise step removes per
    layer at ``ratio`` (``MetaPruner.prune_local`` with ``consecutive_groups = head_dim``)."""
    n = kv_channels - int(kv_channels * (1 - ratio))
    return n, n // head_dim


def llm_pruner_argv(args, ratio: float, pruner: str, kv_channels: int, head_dim: int) -> list[str]:
    """``llama3.py``'s arguments. Where the ratio asks for some ``k_proj`` channels but less than
    one KV head, their ``prune_local`` fails (``torch.cat`` of an empty list,
    ``metapruner.py`` line 276) instead of removing none: the attention layer range is then
    left empty, which removes what their code would (no head)."""
    first, last = (int(x) for x in args.layers.split("-"))
    argv = ["--base_model", args.cache_dir, "--pruning_ratio", repr(ratio)]
    argv += ["--device", "cpu", "--eval_device", "cpu", "--block_wise"]
    channels, heads = kv_heads_removed(ratio, kv_channels, head_dim)
    for kind in ("mlp", "attention"):
        start = last + 1 if kind == "attention" and channels > 0 and heads == 0 else first
        argv += [f"--block_{kind}_layer_start", str(start)]
        argv += [f"--block_{kind}_layer_end", str(last + 1)]
    argv += ["--pruner_type", pruner, "--num_examples", str(args.nsamples)]
    if pruner == "taylor":
        argv += ["--taylor", args.llm_pruner_taylor]
    return argv


_RUNS = [0]


def llm_pruner_dims(cfg) -> tuple[int, int]:
    """(``k_proj`` output channels, head_dim) of a LLaMA config."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_key_value_heads * head_dim, head_dim


def run_llm_pruner(args, calib: torch.Tensor, ratio: float, pruner: str) -> nn.Module:
    """A model pruned by LLM-Pruner's own ``llama3.py`` (run as a script) at ``ratio``."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(args.cache_dir)
    captured: dict = {}
    _RUNS[0] += 1
    name = f"run{_RUNS[0]}-{pruner}-{ratio:.6f}-{os.getpid()}"
    argv = llm_pruner_argv(args, ratio, pruner, *llm_pruner_dims(cfg))
    argv = ["llama3.py", *argv, "--save_ckpt_log_name", name]
    saved_argv = sys.argv
    with llm_pruner_env(args, calib, captured):
        sys.argv = argv
        try:
            runpy.run_path(str(Path(args.llm_pruner_dir) / "llama3.py"), run_name="__main__")
        finally:
            sys.argv = saved_argv
    model = captured["model"]
    del model.forward  # the chunked-backward wrapper
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    model.set_attn_implementation("sdpa")
    return model.eval()


def evaluate(model: nn.Module, texts: dict, args) -> dict:
    from minillm.evaluation.perplexity import perplexity_stats

    row = {"params": n_params(model)}
    start = time.perf_counter()
    for key, ids in texts.items():
        stats = perplexity_stats(model, ids, args.eval_seqlen, args.eval_tokens)
        row[f"ppl_{key}"], row[f"tokens_{key}"] = stats.ppl, stats.predicted_tokens
    row["eval_s"] = time.perf_counter() - start
    return row


def run_ours(flags: list[str], out_name: str, args) -> tuple[nn.Module, list[str], float]:
    """``python -m minillm.prune`` (in process) with ``flags`` on our calibration: the model,
    its flags and the wall time of the command (load, scoring, pruning, saving)."""
    from minillm import prune
    from minillm.model.loading import load_model

    out = Path(args.work_dir) / out_name
    argv = [args.cache_dir, *flags, "--calib", args.calib]
    argv += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    argv += ["--seed", str(args.seed), "--eval-text", "none", "--prompt", ""]
    argv += ["--out", str(out), "--overwrite", "--quiet"]
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the CLI prints its summary on stdout
        code = prune.main(argv)
    if code != 0:
        raise RuntimeError(f"python -m minillm.prune {' '.join(argv)}: exit {code}")
    seconds = time.perf_counter() - start
    model, _ = load_model(str(out))
    return model, flags, seconds


def _short(flag) -> str:
    """A flag for the table: searched ratios to 6 significant digits."""
    text = str(flag)
    try:
        value = float(text)
    except ValueError:
        return text
    return f"{value:.6g}" if "." in text else text


def markdown(rows: list[dict]) -> str:
    """The table: per ratio, our default, then each peer's official output and our
    re-implementation of it (and any diagnostic rows), with exact parameter counts."""
    head = ["our ratio", "model", "source", "ratio flags", "parameters", "vs default"]
    head += ["WikiText-2 ppl", "other-domain ppl", "pruning (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        default = next(
            (d for d in rows if d["name"] == "default" and d["ratio"] == r["ratio"]), None
        )
        diff = "" if default is None or r["name"] == "dense" else r["params"] - default["params"]
        flags = r["flags"]
        if isinstance(flags, dict):
            flags = [f"--{k} {_short(v)}" for k, v in flags.items() if k != "nsamples"]
        else:
            drop = {i + 1 for i, f in enumerate(flags) if f == "--base_model"}
            flags = [f for i, f in enumerate(flags) if f != "--base_model" and i not in drop]
        text = " ".join(_short(f) for f in flags)
        for ugly in ("--device cpu --eval_device cpu ", "--num_examples 64 "):
            text = text.replace(ugly, "")
        cells = [
            "-" if r["name"] == "dense" else f"{r['ratio']:.0%}",
            r["name"],
            r["source"],
            f"`{text}`" if text else "",
            f"{r['params']:,}",
            "" if diff == "" else f"{diff:+,}",
            f"{r['ppl_wikitext2']:.2f}",
            f"{r['ppl_other']:.2f}",
            f"{r['prune_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def extras(specs: list[str] | None, ratio: float) -> list[tuple[str, list[str]]]:
    """``--extra NAME[@RATIO]=FLAGS`` entries that apply at ``ratio``: (name, flags)."""
    out = []
    for spec in specs or []:
        head, sep, flags = spec.partition("=")
        name, _, at = head.partition("@")
        if not sep or not name or name in {"dense", *OURS, *PEERS}:
            raise SystemExit(f"--extra: expected NAME[@RATIO]=FLAGS with a new NAME, got '{spec}'")
        if not at or float(at) == ratio:
            out.append((name, shlex.split(flags)))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flap-dir", help=f"checkout of {FLAP_REPO} at {FLAP_COMMIT[:12]}")
    p.add_argument(
        "--llm-pruner-dir", help=f"checkout of {LLM_PRUNER_REPO} at {LLM_PRUNER_COMMIT[:12]}"
    )
    p.add_argument("--calib", required=True, help="calibration text (WikiText-2 validation)")
    p.add_argument("--test", required=True, help="WikiText-2 test text")
    p.add_argument("--cache-dir", required=True, help="float32 SmolLM2-135M model directory")
    p.add_argument("--work-dir", required=True, help="our pruned models, peers' logs, rows.jsonl")
    p.add_argument("--ratios", default="0.2,0.5", help="our --ratio values (the targets)")
    p.add_argument("--layers", default="3-27", help="our --layers; LLM-Pruner's block layers")
    p.add_argument(
        "--rows",
        default="dense," + ",".join([*OURS, *PEERS]),
        help="comma-separated subset of: dense, " + ", ".join([*OURS, *PEERS]),
    )
    p.add_argument(
        "--extra",
        action="append",
        metavar="NAME[@RATIO]=FLAGS",
        help="diagnostic row: python -m minillm.prune with FLAGS (after --layers), its --ratio "
        "searched to match the default's count (at RATIO only, if given); repeatable",
    )
    p.add_argument("--extra-tries", type=int, default=4, help="runs to match a count (--extra)")
    p.add_argument("--markdown", help="write the Markdown table here")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--flap-metrics", default="WIFV", choices=["WIFV", "WIFN", "IFV"])
    p.add_argument("--flap-tries", type=int, default=4, help="FLAP runs to match a count")
    p.add_argument("--llm-pruner-tries", type=int, default=24, help="dry runs to match a count")
    p.add_argument("--llm-pruner-taylor", default="param_first", help="their --taylor")
    p.add_argument(
        "--grad-chunk", type=int, default=8, help="LLM-Pruner: sequences per backward micro-batch"
    )
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    wanted = args.rows.split(",")
    unknown = set(wanted) - {"dense", *OURS, *PEERS}
    if unknown:
        raise SystemExit(f"--rows: unknown {', '.join(sorted(unknown))}")
    checks = [
        ("flap-official", "--flap-dir", args.flap_dir, FLAP_REPO, FLAP_COMMIT, FLAP_FILES),
        (
            "llm-pruner-official",
            "--llm-pruner-dir",
            args.llm_pruner_dir,
            LLM_PRUNER_REPO,
            LLM_PRUNER_COMMIT,
            LLM_PRUNER_FILES,
        ),
    ]
    for row, flag, path, repo, commit, files in checks:
        if row not in wanted:
            continue
        if path is None:
            log(f"{flag} not given: no '{row}' rows")
            wanted.remove(row)
            continue
        error = checkout_error(path, repo, commit, files)
        if error:
            print(f"bench_peers: {flag} {error}", file=sys.stderr)
            return 2
    for path in (args.calib, args.test, args.cache_dir):
        if not Path(path).exists():
            print(f"bench_peers: no such file or directory: {path}", file=sys.stderr)
            return 2

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_quality import other_domain_text
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minillm.data import calibration_batches

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows_log = work / "rows.jsonl"
    done = {}
    if rows_log.is_file():
        for line in rows_log.read_text().splitlines():
            r = json.loads(line)
            done[(r["name"], r["ratio"])] = r

    def finish(row: dict) -> dict:
        done[(row["name"], row["ratio"])] = row
        with rows_log.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        log(json.dumps(row))
        return row

    tok = AutoTokenizer.from_pretrained(args.cache_dir)
    calib = calibration_batches(args.calib, tok, args.nsamples, args.seqlen, args.seed)
    texts = {
        "wikitext2": tok(Path(args.test).read_text(encoding="utf-8"), return_tensors="pt"),
        "other": tok(other_domain_text(), return_tensors="pt"),
    }
    texts = {k: v.input_ids.reshape(-1) for k, v in texts.items()}
    dense = AutoModelForCausalLM.from_pretrained(args.cache_dir, dtype=torch.float32).eval()
    dense_params = n_params(dense)
    cfg = dense.config
    layer_params = (
        3 * cfg.hidden_size * cfg.intermediate_size
        + cfg.hidden_size
        * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
        * cfg.head_dim
    )
    first, last = (int(x) for x in args.layers.split("-"))

    if "dense" in wanted and ("dense", 0.0) not in done:
        row = {"name": "dense", "source": "SmolLM2-135M-Instruct", "ratio": 0.0, "flags": []}
        finish(row | evaluate(dense, texts, args) | {"prune_s": 0.0})
    del dense

    for ratio in (float(x) for x in args.ratios.split(",")):
        for name in OURS:  # the default always: its parameter count is the peers' target
            if (name, ratio) in done or (name != "default" and name not in wanted):
                continue
            log(f"{name} @ {ratio}")
            flags = ["--ratio", str(ratio), "--layers", args.layers, *OURS[name][1]]
            model, flags, seconds = run_ours(flags, f"{name}-{ratio}", args)
            row = {"name": name, "source": OURS[name][0], "ratio": ratio, "flags": flags}
            finish(row | evaluate(model, texts, args) | {"prune_s": seconds})
            del model
        target = done[("default", ratio)]["params"]

        for name, flags in extras(args.extra, ratio):
            if (name, ratio) in done:
                continue
            log(f"{name} @ {ratio}: target {target:,} parameters")
            best = {}

            def ours_count(r: float, best=best, flags=flags, name=name, at=ratio) -> int:
                argv = ["--ratio", repr(r), "--layers", args.layers, *flags]
                model, argv, seconds = run_ours(argv, f"{name}-{at}-{r:.6f}", args)
                c = n_params(model)
                log(f"{name} --ratio {r:.6f}: {c:,} parameters ({seconds:.0f} s)")
                goal = done[("default", at)]["params"]
                if not best or abs(c - goal) < abs(best["count"] - goal):
                    best.update(model=model, count=c, flags=argv, seconds=seconds)
                return c

            start = time.perf_counter()
            c0 = ours_count(ratio)  # our ratio counts differently with other flags: the slope
            slope = (dense_params - c0) / ratio
            cached = {ratio: c0}
            _, _, tried = match_ratio(
                lambda r, cached=cached, f=ours_count: cached[r] if r in cached else f(r),
                target,
                ratio,
                slope,
                args.extra_tries,
            )
            row = {"name": name, "source": "diagnostic: ours with other flags", "ratio": ratio}
            row |= {"flags": best["flags"], "target_params": target}
            row |= evaluate(best["model"], texts, args)
            row |= {"prune_s": best["seconds"], "search_s": time.perf_counter() - start}
            finish(row | {"tried": tried})
            best.clear()

        if "flap-official" in wanted and ("flap-official", ratio) not in done:
            log(f"FLAP @ {ratio}: target {target:,} parameters")
            best: dict = {}

            def flap_count(r: float, best=best, target=target) -> int:
                start = time.perf_counter()
                model = run_flap(args, calib, tok, r)
                seconds, c = time.perf_counter() - start, n_params(model)
                log(f"FLAP --pruning_ratio {r:.6f}: {c:,} parameters ({seconds:.0f} s)")
                if not best or abs(c - target) < abs(best["count"] - target):
                    best.update(model=model, count=c, ratio=r, seconds=seconds)
                return c

            biases = 2 * cfg.hidden_size * cfg.num_hidden_layers
            slope = cfg.num_hidden_layers * layer_params
            start = time.perf_counter()
            r, c, tried = match_ratio(
                flap_count, target, (dense_params + biases - target) / slope, slope, args.flap_tries
            )
            flags = {"pruning_ratio": r, "metrics": args.flap_metrics, "structure": "AL-AM"}
            flags |= {"nsamples": args.nsamples, "prune_method": "flap"}
            row = {"name": "flap-official", "source": f"official: {FLAP_REPO}@{FLAP_COMMIT[:12]}"}
            row |= {"ratio": ratio, "flags": flags, "target_params": target}
            row |= evaluate(best["model"], texts, args)
            row |= {"prune_s": best["seconds"], "search_s": time.perf_counter() - start}
            row["tried"] = tried
            finish(row)
            best.clear()

        if "llm-pruner-official" in wanted and ("llm-pruner-official", ratio) not in done:
            log(f"LLM-Pruner @ {ratio}: target {target:,} parameters")

            def dry_count(r: float) -> int:
                c = n_params(run_llm_pruner(args, calib, r, "l2"))
                log(f"LLM-Pruner --pruning_ratio {r:.6f} (l2 dry run): {c:,} parameters")
                return c

            slope = (last - first + 1) * layer_params
            start = time.perf_counter()
            r, c, tried = match_ratio(
                dry_count, target, (dense_params - target) / slope, slope, args.llm_pruner_tries
            )
            search = time.perf_counter() - start
            start = time.perf_counter()
            model = run_llm_pruner(args, calib, r, "taylor")
            seconds = time.perf_counter() - start
            if n_params(model) != c:
                raise RuntimeError(f"LLM-Pruner taylor run: {n_params(model):,} != dry run {c:,}")
            row = {"name": "llm-pruner-official"}
            row["source"] = f"official: {LLM_PRUNER_REPO}@{LLM_PRUNER_COMMIT[:12]} llama3.py"
            row |= {
                "ratio": ratio,
                "flags": llm_pruner_argv(args, r, "taylor", *llm_pruner_dims(cfg))[2:],
            }
            row["target_params"] = target
            row |= evaluate(model, texts, args) | {"prune_s": seconds, "search_s": search}
            row["tried"] = tried
            finish(row)
            del model

    names = ["dense", "default", PEERS[0], "flap-ours", PEERS[1], "taylor-ours"]
    names += [n for spec in args.extra or [] for n in [spec.partition("=")[0].partition("@")[0]]]
    order = {n: i for i, n in enumerate(dict.fromkeys(names))}
    shown = set(wanted) | set(names[6:])
    rows = sorted(
        (r for k, r in done.items() if k[0] in shown),
        key=lambda r: (r["ratio"], order[r["name"]]),
    )
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows) + "\n")
    setup = {k: v for k, v in vars(args).items() if k != "work_dir"}
    setup["peers"] = {
        FLAP_REPO: {"path": args.flap_dir, "commit": FLAP_COMMIT},
        LLM_PRUNER_REPO: {"path": args.llm_pruner_dir, "commit": LLM_PRUNER_COMMIT},
    }
    setup["torch"], setup["threads"] = torch.__version__, torch.get_num_threads()
    json.dump({"setup": setup, "rows": rows}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
