"""Steering overhead per forward: steerops.Steering vs a plain PyTorch hook.

A randomly initialised Llama-style model; one forward of (batch, seq) tokens
timed unsteered, steered with steerops (fused op, in place), and steered with
a forward hook doing the same math in plain PyTorch. Medians of repeated runs,
wall-clock around each call (synchronising the GPU first on CUDA). On the CPU it
measures the CPU path, not the kernels.
"""
import os
import statistics

import torch

from steerops.app.cli_args import Parser, device, output_folder, positive_int
from steerops.sweeps.costs import timed


def _llama(hidden, layers, device, dtype):
    import transformers as T
    cfg = T.LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                        vocab_size=1024)
    torch.manual_seed(0)
    return T.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def _time(fn, repeats, device):
    """Median of ``repeats`` timed runs after 3 warm-up runs."""
    for _ in range(3):
        fn()
    return statistics.median(timed(fn, device)[1] for _ in range(repeats))


def measure(hidden=256, layers=4, batch=4, seq=64, mode="norm_scaled", repeats=30, device="cpu",
            dtype=torch.float32):
    import steerops
    from steerops.model.blocks import find_layers
    device = torch.device(device)
    model = _llama(hidden, layers, device, dtype)
    ids = torch.randint(0, 1024, (batch, seq), device=device)
    v = torch.randn(hidden, device=device, dtype=dtype)
    layer = layers // 2

    def forward():
        with torch.no_grad():
            model(ids)

    base = _time(forward, repeats, device)
    with steerops.Steering(model, layer, v, 2.0, mode=mode):
        ours = _time(forward, repeats, device)
    u = v / v.norm()

    def plain(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h + 2.0 * h.norm(dim=-1, keepdim=True) * u
        return (h,) + out[1:] if isinstance(out, tuple) else h

    handle = find_layers(model)[layer - 1].register_forward_hook(plain)
    try:
        hooked = _time(forward, repeats, device)
    finally:
        handle.remove()
    # the steering work alone, per call, on a hidden state of the same shape: a
    # whole forward on a CPU is too noisy to resolve it
    h = torch.randn(batch, seq, hidden, device=device, dtype=dtype)
    with torch.no_grad(), steerops.unchecked():
        op_call = _time(lambda: steerops.steer_(h, v, 1e-3, mode=mode), 20 * repeats, device)
        plain_call = _time(lambda: h + 1e-3 * h.norm(dim=-1, keepdim=True) * u, 20 * repeats,
                           device)
    return {"device": str(device), "dtype": str(dtype), "hidden": hidden, "layers": layers,
            "batch": batch, "seq": seq, "mode": mode, "unsteered_ms": base * 1e3,
            "steerops_ms": ours * 1e3, "plain_hook_ms": hooked * 1e3,
            "steerops_overhead_ms": (ours - base) * 1e3,
            "plain_hook_overhead_ms": (hooked - base) * 1e3,
            "steerops_call_us": op_call * 1e6, "plain_math_call_us": plain_call * 1e6}


# ---------------------------------------------------------------------- decode
def _wrap_hooks(model, seconds):
    """Every forward (pre-)hook of the model's modules timed into ``seconds[0]``: the
    host time a hook costs per forward, whatever it does."""
    import time as _time
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for key, fn in list(hooks.items()):
                def timed_hook(*args, _fn=fn, **kwargs):
                    t0 = _time.perf_counter()
                    try:
                        return _fn(*args, **kwargs)
                    finally:
                        seconds[0] += _time.perf_counter() - t0
                hooks[key] = timed_hook


def _python_calls(fn, name):
    """How many times a Python function called ``name`` ran during ``fn()`` (cProfile
    sees frames the interpreter runs; code compiled by dynamo runs none)."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    return sum(v[1] for k, v in pstats.Stats(prof).stats.items() if k[2] == name)


def decode_hook_cost(hidden=256, layers=4, batch=1, new_tokens=32, repeats=3, compile=True,
                     backend="inductor"):
    """Host time of the hooks per generated token (add mode, batch ``batch``):
    steerops.Steering against a bare forward hook doing the same math; and under
    torch.compile (``model.compile``) the per-token time steered minus unsteered and
    how many times the steering hook's Python code ran (0: it is in the graph), with
    the compiled steered tokens checked equal to the eager steered ones."""
    import steerops
    from steerops.model.blocks import find_layers
    model = _llama(hidden, layers, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 1024, (batch, 16))
    v = torch.randn(hidden)
    layer = layers // 2

    def generate():
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  pad_token_id=0)

    def bare(module, args, out):  # the same math, nothing else: h += alpha v
        (out[0] if isinstance(out, tuple) else out).add_(4.0 * v)

    def hook_ms(attach, detach):
        per_token = []
        for _ in range(repeats):
            seconds = [0.0]
            handle = attach()
            _wrap_hooks(model, seconds)
            generate()
            detach(handle)
            for m in model.modules():  # the timing wrappers go with the hooks
                m._forward_hooks.clear()
                m._forward_pre_hooks.clear()
            per_token.append(seconds[0] / new_tokens * 1e3)
        return statistics.median(per_token)

    steering = steerops.Steering(model, layer, v, 4.0)
    eager_tokens = None
    with steering:
        eager_tokens = generate()
    out = {"hidden": hidden, "layers": layers, "batch": batch, "new_tokens": new_tokens,
           "threads": torch.get_num_threads()}
    rounds = {"steerops": [], "bare": []}
    for _ in range(3):  # interleaved
        rounds["steerops"].append(hook_ms(lambda: steering.attach(), lambda h: steering.detach()))
        rounds["bare"].append(hook_ms(
            lambda: find_layers(model)[layer - 1].register_forward_hook(bare),
            lambda h: h.remove()))
    out["eager_hook_ms_per_token"] = statistics.median(rounds["steerops"])
    out["bare_hook_ms_per_token"] = statistics.median(rounds["bare"])
    out["eager_over_bare"] = out["eager_hook_ms_per_token"] / out["bare_hook_ms_per_token"]
    with steering:
        out["eager_hook_python_calls"] = _python_calls(generate, "steer_site")
    if compile:
        # empty caches: dynamo counts recompiles per code object, shared with any llama
        # compiled earlier in this process, and past its limit it runs layers (and the
        # hook's Python) eagerly, which this reading would then count
        torch.compiler.reset()
        model.compile(backend=backend, dynamic=True)
        generate()  # compile unsteered
        with steering:
            compiled_tokens = generate()  # compile steered (hooks in the graph)
            out["compiled_hook_python_calls"] = _python_calls(generate, "steer_site")
        out["compiled_tokens_equal_eager"] = bool(torch.equal(compiled_tokens, eager_tokens))
        times = {"steered": [], "unsteered": []}
        for _ in range(max(repeats, 3)):  # interleaved: steered, then unsteered
            with steering:
                times["steered"].append(timed(generate, model.device)[1])
            times["unsteered"].append(timed(generate, model.device)[1])
        out["compiled_backend"] = backend
        out["compiled_ms_per_token"] = {k: statistics.median(x) / new_tokens * 1e3
                                        for k, x in times.items()}
        out["compiled_steering_ms_per_token"] = (out["compiled_ms_per_token"]["steered"]
                                                 - out["compiled_ms_per_token"]["unsteered"])
    return out


def op_call_cost(N=64, D=4096, mode="norm_scaled", device="cpu", dtype=torch.float32,
                 calls=2000, repeats=3):
    """Host wall clock per call (us) of one steering op, taken apart: eager PyTorch (the
    reference), the op's launch on arguments validated once, the validation alone (its
    one host sync included), the validated op, the op under ``unchecked()``. Each round
    times every variant over ``calls`` calls after a warm-up, synchronising the device
    before and after; the rounds are interleaved."""
    import steerops
    from steerops.ops.validation import steer_call
    from steerops.ops import reference as R
    from steerops.ops.custom_ops import intervene_impl
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(D, generator=gen).to(device)
    alpha = torch.rand(N, generator=gen).to(device)
    x, args = steer_call(h, v, alpha, mode, None, None, None)

    def unchecked():
        with steerops.unchecked():
            steerops.steer(h, v, alpha, mode=mode)
    variants = {
        "eager": lambda: R.intervene_forward(h, vector=v, alpha=alpha, mode=mode),
        "launch": lambda: intervene_impl(x, *args, None),
        "validation": lambda: steer_call(h, v, alpha, mode, None, None, None),
        "validated": lambda: steerops.steer(h, v, alpha, mode=mode),
        "unchecked": unchecked,
    }

    def per_call_us(fn):
        def loop(n):
            for _ in range(n):  # each output dropped at once: no n outputs held together
                fn()
        loop(max(1, calls // 40))
        return timed(lambda: loop(calls), device)[1] / calls * 1e6
    rounds = {name: [] for name in variants}
    with torch.no_grad():
        for _ in range(repeats):
            for name, fn in variants.items():
                rounds[name].append(per_call_us(fn))
    return {"N": N, "D": D, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
            "calls": calls, "us_per_call": rounds}


def op_call_markdown(rows):
    names = list(rows[0]["us_per_call"])
    lines = ["Host wall clock per op call, us (each cell: the rounds, interleaved)", "",
             "| N x D | mode | dtype | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = [" / ".join(f"{t:.0f}" for t in r["us_per_call"][n]) for n in names]
        lines.append(f"| {r['N']} x {r['D']} | {r['mode']} | {r['dtype']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser():
    p = Parser(prog="steerops bench overhead",
               description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   type=device, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--hidden", type=positive_int, default=256, help="d_model (default: 256)")
    p.add_argument("--layers", type=positive_int, default=4, help="number of blocks (default: 4)")
    p.add_argument("--batch", type=positive_int, default=4, help="batch size (default: 4)")
    p.add_argument("--seq", type=positive_int, default=64, help="tokens per sequence (default: 64)")
    p.add_argument("--repeats", type=positive_int, default=30, help="timed forwards (default: 30)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads, set explicitly and recorded (default: 1)")
    p.add_argument("--op-call", action="store_true",
                   help="instead: where one steering op call's time goes (eager, kernel launch, "
                        "validation, validated call, unchecked call) at N x D = 64 x 4096 and "
                        "16384 x 5120 (bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--calls", type=positive_int, default=2000,
                   help="with --op-call: calls per timed round (default: 2000)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile decode measurement (it compiles for ~1 min)")
    p.add_argument("--out", type=output_folder, default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", "overhead"),
        help="output folder (default: bench/results/overhead)")
    return p


def main(argv=None):
    from .provenance import environment, save_results
    p = build_parser()
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.op_call:
        cuda = torch.device(args.device).type == "cuda"
        shapes = ((64, 4096), (16384, 5120)) if cuda else ((64, 4096),)
        rows = [op_call_cost(N, D, device=args.device, calls=args.calls,
                             dtype=torch.bfloat16 if cuda else torch.float32)
                for N, D in shapes]
        result = {"environment": environment(), "threads": torch.get_num_threads(),
                  "op_call": rows}
        table = op_call_markdown(rows)
        save_results(args.out, "op_call", result, table)
        print(table)
        return result
    result = {"environment": environment(), "threads": torch.get_num_threads(),
              "forward": measure(args.hidden, args.layers, args.batch, args.seq,
                                 repeats=args.repeats, device=args.device)}
    if torch.device(args.device).type == "cpu":
        result["decode"] = [decode_hook_cost(args.hidden, args.layers, batch=b,
                                             compile=not args.no_compile and b == 1)
                            for b in (1, 8)]
    save_results(args.out, "overhead", result, decode_markdown(result))
    print(decode_markdown(result))
    return result


def decode_markdown(result):
    e = result["environment"]
    lines = [f"Steering overhead ({e['device']}, torch {e['torch']}, transformers "
             f"{e['transformers']}, threads {result['threads']}, commit {e['commit']}).", "",
             "Per forward (prefill): " + ", ".join(f"{k} {v:.3g}" for k, v in
                                                   result["forward"].items()
                                                   if k.endswith("_ms")), ""]
    if result.get("decode"):
        lines += ["Per generated token, add mode: host time inside hooks (every forward hook "
                  "of the model timed), median of 3 interleaved rounds.", "",
                  "| batch | steerops eager ms/token | bare hook ms/token | ratio | hook Python "
                  "calls eager | compiled: hook Python calls | compiled steered - unsteered "
                  "ms/token | compiled tokens = eager |", "|---|---|---|---|---|---|---|---|"]
        for d in result["decode"]:
            comp = ("-", "-", "-") if "compiled_tokens_equal_eager" not in d else (
                d["compiled_hook_python_calls"], f"{d['compiled_steering_ms_per_token']:.3f}",
                d["compiled_tokens_equal_eager"])
            lines.append(f"| {d['batch']} | {d['eager_hook_ms_per_token']:.4f} | "
                         f"{d['bare_hook_ms_per_token']:.4f} | {d['eager_over_bare']:.2f}x | "
                         f"{d['eager_hook_python_calls']} | {comp[0]} | {comp[1]} | {comp[2]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
