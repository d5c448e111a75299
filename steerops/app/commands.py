"""``steerops patch``, ``steerops attribute`` and ``steerops steer``: a local
Hugging Face model folder and prompts written as text in; the top sites printed,
and JSON, a token-labelled PNG heatmap and a self-contained HTML report out.

Every user error (a missing folder, a folder without a tokenizer, a layer out of
range, a bad JSONL line, a multi-token answer, clean and corrupt of different
lengths) is one line and exit status 2, found before the model runs.
"""
import json
import os
import sys
import time

from .cli_args import (SITE_KIND_NAMES, FolderLock, Parser, UsageError, device, existing_folder,
                       output_folder, positive_int)
from .command_inputs import (check_inputs, check_layers, load_model, load_tokenizer, read_config,
                             read_jsonl)

DTYPES = ("float32", "bfloat16", "float16")
# what the commands write into --out: a new run removes an earlier run's copies first
OUTPUT_FILES = ("patching.json", "attribution.json", "patching.png", "attribution.png",
                "report.html", "steer.json")


def provenance(args, model_folder):
    import platform

    import torch
    import transformers

    from .. import __version__
    return {"steerops": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "model": os.path.abspath(model_folder),
            "device": str(args.device), "dtype": args.dtype, "python": platform.python_version(),
            "command": "steerops " + " ".join(sys.argv[1:]) if sys.argv else "",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _user_errors(fn, *args, **kwargs):
    """Runs ``fn``; a ValueError about the inputs (tokenisation, answers) is a user error."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


# ---------------------------------------------------------------------- patch / attribute
def _pair_parser(prog, description):
    p = Parser(prog=prog, description=description)
    p.add_argument("--model", required=True, type=existing_folder,
                   help="a local Hugging Face causal-LM folder with its tokenizer")
    p.add_argument("--clean", help="the clean prompt (text)")
    p.add_argument("--corrupt", help="the corrupted prompt: same number of tokens")
    p.add_argument("--answer", help="the clean run's answer: one token, e.g. ' Mary'")
    p.add_argument("--wrong", help="the competing answer: one token")
    p.add_argument("--pairs", metavar="FILE.jsonl",
                   help='many pairs: one {"clean", "corrupt", "answer", "wrong"} per line')
    p.add_argument("--layers", type=int, nargs="+",
                   help="site layers (default: all): 0..L on the residual stream, blocks "
                        "0..L-1 for component sites")
    p.add_argument("--sites", choices=SITE_KIND_NAMES, default="resid",
                   help="the site kind: resid (residual stream, default), resid_mid, attn_out, "
                        "mlp_out, head_out (attention heads), neuron (attribute only)")
    p.add_argument("--metric", choices=("logit_diff", "prob_diff"), default="logit_diff")
    p.add_argument("--out", type=output_folder, default="steerops-out",
                   help="results folder (default steerops-out)")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--allow-unknown", action="store_true",
                   help="run even when a word is not in the tokenizer's vocabulary (it becomes "
                        "the unknown token; default: an error listing such words)")
    return p


PAIR_KEYS = ("clean", "corrupt", "answer", "wrong")


def _pairs(args):
    given = [k for k in PAIR_KEYS if getattr(args, k) is not None]
    if args.pairs is not None:
        if given:
            raise UsageError(f"give either --pairs or --{'/--'.join(PAIR_KEYS)}, not both")
        rows = read_jsonl(args.pairs, PAIR_KEYS, "--pairs")
        where = lambda n: f"--pairs {args.pairs}, pair {n}"  # noqa: E731
    else:
        missing = [k for k in PAIR_KEYS if getattr(args, k) is None]
        if missing:
            raise UsageError(f"missing --{', --'.join(missing)} (or give --pairs FILE.jsonl)")
        rows = [{k: getattr(args, k) for k in PAIR_KEYS}]
        where = lambda n: "--answer / --wrong"  # noqa: E731
    for n, r in enumerate(rows, 1):
        if r["answer"].strip() == r["wrong"].strip():
            raise UsageError(f"{where(n)}: answer and wrong are both {r['answer']!r}; the "
                             f"metric compares two different answers")
    return rows


def clear_outputs(out):
    """Removes what an earlier steerops command wrote into ``out`` (its known output
    files), so a report never sits beside another run's results."""
    for name in OUTPUT_FILES:
        path = os.path.join(out, name)
        if os.path.isfile(path):
            os.remove(path)


class PairJob:
    """The model, tokenizer, pairs and metric of a patch / attribute command,
    checked before any forward pass."""

    def __init__(self, args):
        from ..model import metrics
        from ..model.pairs import PromptPairs
        from ..model.text import token_rows
        self.args = args
        self.pairs = _pairs(args)
        self.tokenizer = load_tokenizer(args.model)
        if getattr(args, "all_positions", False) and args.sites != "head_out":
            raise UsageError(f"--all-positions patches a head at every position at once: it "
                             f"needs --sites head_out, got --sites {args.sites}")
        self.layers = check_layers(args.model, args.layers, "--layers", args.sites) \
            if args.layers else None
        self.clean = [p["clean"] for p in self.pairs]
        self.corrupt = [p["corrupt"] for p in self.pairs]
        make = getattr(metrics, args.metric)
        metric = _user_errors(make, [p["answer"] for p in self.pairs],
                              [p["wrong"] for p in self.pairs])
        # the prompts and answers tokenised once, here: checked (on those ids) before the
        # model loads, then handed to the sweep as they are
        self.prompt_pairs = _user_errors(PromptPairs.build, self.clean, self.corrupt, metric,
                                         tokenizer=self.tokenizer)
        check_inputs(args.model, self.tokenizer, self.clean + self.corrupt,
                     "--pairs" if args.pairs else "--clean / --corrupt", args.allow_unknown,
                     rows=token_rows(self.prompt_pairs.clean)
                     + token_rows(self.prompt_pairs.corrupt))
        self.model = load_model(args.model, args.device, args.dtype)  # inputs checked first
        self.settings = {"metric": args.metric, "pairs": self.pairs, "layers": args.layers,
                         "dtype": args.dtype, "sites": args.sites}
        self.provenance = provenance(args, args.model)

    def sweep(self):
        import steerops
        return _user_errors(steerops.patching_sweep, self.model, self.prompt_pairs,
                            layers=self.layers, progress=not self.args.no_progress,
                            sites=self.args.sites,
                            per_position=not getattr(self.args, "all_positions", False))

    def attribute(self):
        import steerops
        return _user_errors(steerops.attribution_patching, self.model, self.prompt_pairs,
                            layers=self.layers, sites=self.args.sites)

    def record(self, result, kind, extra=None):
        from .report import site_record
        settings = dict(self.settings, **(extra or {}))
        return site_record(result, kind, settings, self.provenance)

    def describe(self):
        p = self.pairs[0]
        more = f" (+{len(self.pairs) - 1} more pairs)" if len(self.pairs) > 1 else ""
        return (f"clean: {p['clean']!r} -> {p['answer']!r}; corrupt: {p['corrupt']!r} "
                f"(wrong {p['wrong']!r}){more}")


def print_top(record, k=10):
    axes = [a for a in record.get("axes", ["layer", "position"])]
    names = axes + (["token"] if "position" in axes else [])
    sites = "" if record.get("sites", "resid") == "resid" else f", {record['sites']} sites"
    print(f"top sites ({record['value_name']}{sites}):")
    print("  " + " ".join(f"{a:>8}" if a != "token" else f"{a:<16}" for a in names) + " value")
    for s in record["top_sites"][:k]:
        print("  " + " ".join(f"{s[a]:>8}" if a != "token" else f"{s[a]:<16}" for a in names)
              + f" {s['value']:+.4f}")


def write_outputs(out, stem, records, title, prompt, agreement=None):
    from .report import write_html, write_json, write_png
    os.makedirs(out, exist_ok=True)
    clear_outputs(out)
    for rec in records:
        write_json(dict(rec, agreement=agreement) if agreement else rec,
                   os.path.join(out, f"{rec['kind']}.json"))
    write_png(records, os.path.join(out, f"{stem}.png"))
    write_html(records, os.path.join(out, "report.html"), title, prompt, agreement)
    print(f"wrote {out}/: " + ", ".join([f"{r['kind']}.json" for r in records]
                                        + [f"{stem}.png", "report.html"]))


def patch_main(argv):
    p = _pair_parser("steerops patch", "Activation patching of every site (layer x token on "
                     "the residual stream, at the sweep's floor; or attention heads, attention "
                     "and MLP outputs with --sites), from prompts written as text.")
    p.add_argument("--all-positions", action="store_true",
                   help="with --sites head_out: patch each head at every position at once "
                        "(a block x head map)")
    args = p.parse_args(argv)
    if args.sites == "neuron":
        raise UsageError("--sites neuron: patching one neuron per forward is not offered; "
                         "use `steerops attribute --sites neuron` (AtP scores every neuron)")
    with FolderLock(args.out):
        job = PairJob(args)
        result = job.sweep()
        rec = job.record(result, "patching", {"form": result.extra["reuse"].get("mode")})
        print_top(rec)
        write_outputs(args.out, "patching", [rec], "Activation patching", job.describe())
    return 0


def attribute_main(argv):
    p = _pair_parser("steerops attribute", "Attribution patching (AtP): every site's linear "
                     "estimate of its patching effect, from prompts written as text.")
    p.add_argument("--compare", action="store_true",
                   help="also run the patching sweep and report the rank agreement")
    args = p.parse_args(argv)
    if args.compare and args.sites == "neuron":
        raise UsageError("--compare with --sites neuron: the patching sweep does not patch "
                         "single neurons; compare at --sites mlp_out, or drop --compare")
    with FolderLock(args.out):
        job = PairJob(args)
        records = [job.record(job.attribute(), "attribution")]
        agreement = None
        if args.compare:
            from .report import rank_agreement
            records.insert(0, job.record(job.sweep(), "patching"))
            agreement = rank_agreement(records[0], records[1])
        print_top(records[-1])
        if agreement:
            print(f"rank agreement with the patching sweep: Spearman "
                  f"{agreement['spearman']:.3f}, top-{agreement['top_k']} overlap "
                  f"{agreement['top_k_overlap']:.0%}")
        title = "Attribution patching vs the patching sweep" if args.compare else \
            "Attribution patching (AtP)"
        write_outputs(args.out, "attribution", records, title, job.describe(), agreement)
    return 0


# ---------------------------------------------------------------------- steer
def _alphas(text):
    import argparse
    if any(not x.strip() for x in text.split(",")):
        raise argparse.ArgumentTypeError(f"expected numbers separated by single commas, got "
                                         f"{text!r} (an empty item)")
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")
    if not values or any(v != v or abs(v) == float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def steer_main(argv):
    from ..ops import modes
    p = Parser(prog="steerops steer", description="Generate from a prompt unsteered and "
               "steered (several strengths in one batch), side by side.")
    p.add_argument("--model", required=True, type=existing_folder,
                   help="a local Hugging Face causal-LM folder with its tokenizer")
    p.add_argument("--prompt", required=True, help="the prompt (text)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--vector", metavar="FILE", help="a SteeringVector file (.save())")
    which.add_argument("--learn-from", metavar="FILE.jsonl",
                       help='learn a vector from {"positive", "negative"} prompts, one per line')
    p.add_argument("--method", choices=("mean_diff", "pca"), default=None,
                   help="how --learn-from learns (default mean_diff)")
    p.add_argument("--layer", type=int, help="the site layer (required with --learn-from)")
    p.add_argument("--alpha", type=_alphas, default=[4.0],
                   help="strength(s), comma-separated: 2,4,8 (default 4)")
    p.add_argument("--mode", choices=modes.names(), default="add",
                   help="how the vector steers: one of the registered modes "
                        "(steerops.ops.modes; default add)")
    p.add_argument("--max-new-tokens", type=positive_int, default=20)
    p.add_argument("--out", type=output_folder, help="also write steer.json here")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--allow-unknown", action="store_true",
                   help="run even when a word is not in the tokenizer's vocabulary")
    args = p.parse_args(argv)
    if args.learn_from and args.layer is None:
        raise UsageError("--learn-from needs --layer (where to learn and steer)")
    if args.vector and args.method is not None:
        raise UsageError("--method applies to --learn-from; a --vector is already learned")
    args.method = args.method or "mean_diff"
    learn_rows = read_jsonl(args.learn_from, ("positive", "negative"), "--learn-from") \
        if args.learn_from else None
    tokenizer = load_tokenizer(args.model)
    check_inputs(args.model, tokenizer, [args.prompt], "--prompt", args.allow_unknown)
    if learn_rows:
        learn_rows = _learning_inputs(args, tokenizer, learn_rows)
    if args.layer is not None:
        check_layers(args.model, [args.layer], "--layer")
    vector = _load_vector(args) if args.vector else None
    model = load_model(args.model, args.device, args.dtype)
    vector = _vector(args, model, tokenizer, learn_rows, vector)
    import torch

    import steerops

    from ..model.text import generate_text
    plain = _user_errors(generate_text, model, tokenizer, [args.prompt],
                         args.max_new_tokens)[0]
    alphas = torch.tensor(args.alpha, dtype=torch.float32)
    steering = _user_errors(steerops.Steering, model, None, vector, alpha=alphas,
                            mode=args.mode)
    steered = _user_errors(steering.generate, [args.prompt] * len(args.alpha), tokenizer,
                           args.max_new_tokens)
    width = max(len("unsteered"), *(len(f"alpha {a:g}") for a in args.alpha))
    print(f"prompt: {args.prompt!r} (layer {vector.layers}, mode {args.mode})")
    print(f"  {'unsteered':<{width}} | {plain}")
    for a, text in zip(args.alpha, steered):
        print(f"  {f'alpha {a:g}':<{width}} | {text}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        clear_outputs(args.out)
        with open(os.path.join(args.out, "steer.json"), "w") as f:
            json.dump({"prompt": args.prompt, "layer": vector.layers, "mode": args.mode,
                       "unsteered": plain,
                       "steered": [{"alpha": a, "text": t} for a, t in zip(args.alpha, steered)],
                       "vector": {"method": vector.method, "settings": vector.settings},
                       "provenance": provenance(args, args.model)}, f, indent=1)
    return 0


def _learning_inputs(args, tokenizer, rows):
    """The --learn-from prompts encoded once (padded on the left: the vector is read at
    each prompt's last token), checked on those ids before the model loads."""
    from ..model.text import encode, token_rows
    texts = {k: [r[k] for r in rows] for k in ("positive", "negative")}
    encoded = {k: _user_errors(encode, tokenizer, v, name=k, side="left")
               for k, v in texts.items()}
    check_inputs(args.model, tokenizer, texts["positive"] + texts["negative"], "--learn-from",
                 args.allow_unknown, rows=token_rows(encoded["positive"])
                 + token_rows(encoded["negative"]))
    return encoded


def _vector(args, model, tokenizer, learning_inputs, vector):
    import steerops
    if learning_inputs is not None:
        return _user_errors(steerops.learn_steering_vector, model,
                            learning_inputs["positive"], learning_inputs["negative"],
                            args.layer, method=args.method, tokenizer=tokenizer)
    _user_errors(vector.check_model, model)
    return vector


def _load_vector(args):
    import steerops
    try:
        vector = steerops.SteeringVector.load(args.vector, device=args.device)
    except (OSError, ValueError) as e:
        raise UsageError(f"--vector: {e}") from None
    if args.layer is not None and [args.layer] != vector.layers:
        raise UsageError(f"--layer {args.layer}: the vector in {args.vector} is for layer(s) "
                         f"{vector.layers}")
    config = read_config(args.model)  # before any weight loads: its layers and width
    L, width = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    for layer in vector.layers if L is not None else ():
        if not 0 <= layer <= L:
            raise UsageError(f"--vector {args.vector}: its layer {layer} is out of range; this "
                             f"model has sites at layers 0..{L}")
    if width is not None and vector.hidden_size != width:
        raise UsageError(f"--vector {args.vector}: {vector.hidden_size} wide, but this model's "
                         f"hidden size is {width}")
    return vector

