"""Steering overhead per forward: steerops.Steering vs a plain PyTorch hook.

A randomly initialised Llama-style model; one forward of (batch, seq) tokens
timed unsteered, steered with steerops (fused op, in place), and steered with
a forward hook doing the same math in plain PyTorch. Medians of repeated runs,
wall-clock around each call (synchronising the GPU first on CUDA). On the CPU it
measures the CPU path, not the kernels.
"""
import json
import statistics
import time

import torch

from steerops.cli_args import Parser, device, positive_int


def _llama(hidden, layers, device, dtype):
    import transformers as T
    cfg = T.LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                        vocab_size=1024)
    torch.manual_seed(0)
    return T.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def _time(fn, repeats, device):
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure(hidden=256, layers=4, batch=4, seq=64, mode="norm_scaled", repeats=30, device="cpu",
            dtype=torch.float32):
    import steerops
    from steerops.models import find_layers
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
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    result = measure(args.hidden, args.layers, args.batch, args.seq, repeats=args.repeats,
                     device=args.device)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
