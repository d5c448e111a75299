"""Tiny randomly initialised Hugging Face models of several architectures (no downloads)."""
import inspect

import torch
import transformers as T

V = 61
COMMON = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64,
              vocab_size=V)
KV = dict(COMMON, num_key_value_heads=2)

CAUSAL = {
    "gpt2": lambda: T.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=V, n_positions=64,
                                 bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda: T.GPTNeoXConfig(**COMMON),
    "llama": lambda: T.LlamaConfig(**KV),
    "mistral": lambda: T.MistralConfig(**KV),
    "qwen2": lambda: T.Qwen2Config(**KV),
    "qwen3": lambda: T.Qwen3Config(**KV, head_dim=8),  # transformers >= 4.51
    "gemma": lambda: T.GemmaConfig(**KV, head_dim=8),
    "gemma2": lambda: T.Gemma2Config(**KV, head_dim=8),
    "phi3": lambda: T.Phi3Config(**KV, pad_token_id=0),
}

# architectures the installed transformers has (Qwen3 arrived in 4.51)
CAUSAL = {k: v for k, v in CAUSAL.items()
          if k != "qwen3" or hasattr(T, "Qwen3Config")}


def causal_lm(arch, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = CAUSAL[arch]()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, key, None) is not None and getattr(cfg, key) >= V:
            setattr(cfg, key, 0)
    model = T.AutoModelForCausalLM.from_config(cfg).to(dtype)  # 4.x and 5.x alike
    return model.eval()


def cache_kwargs(model, cache):
    """The KV cache passed as a caller on the installed release would: newer releases take
    `cache` (5.24 and 5.25 do, and warn on `past_key_values`), 4.x `past_key_values`."""
    takes_cache = "cache" in inspect.signature(model.forward).parameters
    return {"cache" if takes_cache else "past_key_values": cache}


def output_cache(out):
    """The KV cache a forward returned (`cache` on newer releases, else
    `past_key_values`)."""
    cache = out.get("cache")
    return cache if cache is not None else out.past_key_values


def bert(seed=0):
    torch.manual_seed(seed)
    return T.BertModel(T.BertConfig(**COMMON)).eval()


def prompts(batch=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, (batch, length), generator=g)
