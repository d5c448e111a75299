"""What the commands read, checked before any weight loads: a model folder (its config
describes a causal LM, its tokenizer is there and fits the vocabulary), prompts (they
fit the model's positions; no word becomes the unknown token unless allowed) and
JSONL files (UTF-8, known keys). Every failure is a one-line ``UsageError``."""
import json
import os

from .cli_args import UsageError

# the files a saved tokenizer leaves (fast, sentencepiece, BPE / WordPiece vocabularies)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model")

def load_tokenizer(folder):
    """The folder's tokenizer (local files only), after checking it is a model folder."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UsageError(f"--model {folder}: no config.json there; give a Hugging Face model "
                         f"folder (what save_pretrained writes)")
    if not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        # decided from the folder's files, before transformers (whose error for a folder
        # without a tokenizer differs between releases: protobuf, sentencepiece, ...)
        raise UsageError(f"--model {folder}: no tokenizer there (none of "
                         f"{', '.join(TOKENIZER_FILES)}); save one with "
                         f"tokenizer.save_pretrained(folder)")
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"--model {folder}: no usable tokenizer there (tokenizer.json or "
                         f"tokenizer_config.json + vocabulary): {str(e).splitlines()[0]}") from None
    if not callable(tokenizer) or isinstance(tokenizer, bool):
        raise UsageError(f"--model {folder}: no tokenizer there")
    return tokenizer


def read_config(folder):
    """The folder's config, checked to describe a causal LM before any weight loads."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--model {folder}: unreadable config.json: "
                         f"{str(e).splitlines()[0]}") from None
    arch = list(getattr(config, "architectures", None) or [])
    if arch and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in arch):
        raise UsageError(f"--model {folder}: a {', '.join(arch)} has no causal language-model "
                         f"head (its config names no *ForCausalLM / *LMHeadModel); loading it "
                         f"as one would start from a random head")
    return config


def check_inputs(folder, tokenizer, texts, option, allow_unknown=False, rows=None):
    """Before the weights load: the tokenizer's ids fit the model's vocabulary, every
    prompt fits its positions, and no word becomes the unknown token (unless allowed).
    ``rows``: the prompts' token ids when the caller has encoded them already (the
    text is then tokenised again only to name an unknown word)."""
    config = read_config(folder)
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise UsageError(f"--model {folder}: the tokenizer has {len(tokenizer)} tokens but the "
                         f"model's vocabulary is {vocab}: they do not belong together")
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions",
                                                                        None)
    unk = getattr(tokenizer, "unk_token_id", None)
    unknown = []
    for text, ids in zip(texts, rows if rows is not None else (None,) * len(texts)):
        ids = tokenizer(text)["input_ids"] if ids is None else ids
        if limit is not None and len(ids) > limit:
            raise UsageError(f"{option}: a prompt is {len(ids)} tokens, more than this model's "
                             f"{limit} positions: {text[:60]!r}")
        if unk is not None and unk in ids and not allow_unknown:
            unknown += [w for w in text.split() if unk in tokenizer(w, add_special_tokens=False)[
                "input_ids"] and w != tokenizer.unk_token]
    if unknown:
        words = ", ".join(repr(w) for w in dict.fromkeys(unknown))
        raise UsageError(f"{option}: not in the tokenizer's vocabulary (they would all become "
                         f"{tokenizer.unk_token!r}): {words}; add --allow-unknown to run anyway")
    return config


def check_layers(folder, layers, option, sites="resid"):
    """Site layers against the config's block count, before any weight is loaded."""
    config = read_config(folder)
    L = getattr(config, "num_hidden_layers", None)
    for layer in layers if L is not None else ():
        if sites == "resid" and not 0 <= layer <= L:
            raise UsageError(f"{option} {layer}: out of range; this model has sites at layers "
                             f"0..{L} (0 = embeddings, {L} = last block's output)")
        if sites != "resid" and not 0 <= layer < L:
            raise UsageError(f"{option} {layer}: out of range; --sites {sites} is numbered by "
                             f"block, 0..{L - 1}")
    return layers


def load_model(folder, device_name="cpu", dtype="float32"):
    """The causal LM in a local folder (no hub access), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, output_loading_info=True,
            **_dtype_argument(getattr(torch, dtype)))
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--model {folder}: cannot load a causal LM from it: "
                         f"{str(e).splitlines()[0]}") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise UsageError(f"--model {folder}: {len(missing)} weight(s) are not in the folder and "
                         f"would start random ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}): not a causal LM's weights")
    return model.to(device_name).eval()


def _dtype_argument(dtype):
    """from_pretrained's dtype keyword: ``dtype`` since transformers 4.56 (where
    ``torch_dtype`` became deprecated), ``torch_dtype`` before."""
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def read_jsonl(path, keys, option):
    """Objects with string ``keys``, one per line (blank lines skipped); a bad line
    is named by its number."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a folder; give a .jsonl file")
    if not os.path.isfile(path):
        raise UsageError(f"{option} {path}: no such file")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise UsageError(f"{option} {path}: not UTF-8 text (byte {e.start}: "
                         f"{e.object[e.start:e.start + 1]!r})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{option} {path}, line {n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{option} {path}, line {n}: expected an object with keys "
                             f"{list(keys)}")
        missing = [k for k in keys if not isinstance(obj.get(k), str) or not obj[k].strip()]
        if missing:
            raise UsageError(f"{option} {path}, line {n}: missing or empty {missing} "
                             f"(each line needs {list(keys)} as strings)")
        extra = sorted(set(obj) - set(keys))
        if extra:
            raise UsageError(f"{option} {path}, line {n}: unknown key(s) {extra} (each "
                             f"line takes {list(keys)} only)")
        rows.append({k: obj[k] for k in keys})
    if not rows:
        raise UsageError(f"{option} {path}: no lines")
    return rows
