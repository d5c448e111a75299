"""A tiny local causal LM with a real tokenizer, built offline in seconds: the
model folder that the README's text-in examples, the CLI lines and the tests run
on (no hub access anywhere).

It is a 4-block Llama (hidden size 64) with a word-level tokenizer (the
``tokenizers`` library), trained for a few hundred steps on an indirect-object
task: "When Mary and John went to the store , John gave a drink to" -> "Mary".
Patching then finds real structure: the name positions and the last position.

    steerops tiny-model DIR        # or: python -m steerops.app.tiny DIR
"""
import json
import os
import random

NAMES = ["Mary", "John", "Alice", "Bob", "Sarah", "Tom", "Emma", "James", "Anna", "Paul",
         "Kate", "Mark"]
PLACES = ["store", "park", "school", "office", "garden", "station"]
OBJECTS = ["drink", "book", "ball", "letter", "gift", "key"]
TEMPLATE = "When {a} and {b} went to the {place} , {b} gave a {obj} to"
WORDS = ["When", "and", "went", "to", "the", ",", "gave", "a", "happy", "sad", "day", "was",
         "It", "very", "good", "bad", "is", "The"]
SPECIAL = ["[PAD]", "[UNK]"]


def ioi_example(rng):
    """(prompt, answer, wrong): the answer is the name that does not repeat."""
    a, b = rng.sample(NAMES, 2)
    text = TEMPLATE.format(a=a, b=b, place=rng.choice(PLACES), obj=rng.choice(OBJECTS))
    return text, a, b


def ioi_pairs(n, seed=0):
    """Patching pairs: the corrupt prompt swaps the first name for a third one, so the
    answer's evidence is gone (clean answer ``answer``, wrong ``wrong``)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = rng.sample(NAMES, 3)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        out.append({"clean": TEMPLATE.format(a=a, b=b, place=place, obj=obj),
                    "corrupt": TEMPLATE.format(a=c, b=b, place=place, obj=obj),
                    "answer": a, "wrong": b})
    return out


def steer_pairs(n, seed=0, toward="Mary", away="John"):
    """Contrastive pairs for learning a vector: prompts whose answer is ``toward``
    (positive) and the same prompts with the two names' roles swapped, whose
    answer is ``away`` (negative). Added to another prompt's last position, the
    vector moves its answer toward ``toward``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        out.append({"positive": TEMPLATE.format(a=toward, b=away, place=place, obj=obj),
                    "negative": TEMPLATE.format(a=away, b=toward, place=place, obj=obj)})
    return out


def build_tokenizer():
    """A word-level tokenizer over the task's words (whitespace-split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + NAMES + PLACES + OBJECTS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="[PAD]", padding_side="left")


def build_model(vocab_size, seed=0):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=64, pad_token_id=0, eos_token_id=0,
                      bos_token_id=0, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg)


def train(model, tokenizer, steps=300, batch=64, lr=3e-3, seed=0):
    """Next-token loss on the answer of IOI prompts; returns the answer accuracy
    on a fresh batch."""
    import torch
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        rows = [ioi_example(rng) for _ in range(batch)]
        ids = torch.tensor([tokenizer(p + " " + a)["input_ids"] for p, a, _ in rows])
        logits = model(input_ids=ids[:, :-1]).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, ids[:, -1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    rows = [ioi_example(rng) for _ in range(256)]
    with torch.no_grad():
        ids = torch.tensor([tokenizer(p)["input_ids"] for p, _, _ in rows])
        pred = model(input_ids=ids).logits[:, -1].argmax(-1)
    answers = torch.tensor([tokenizer.convert_tokens_to_ids(a) for _, a, _ in rows])
    return float((pred == answers).float().mean())


def make_tiny_model(folder, steps=300, seed=0):
    """Builds, trains and saves the tiny model and its tokenizer into ``folder``,
    with example inputs: pairs.jsonl (patching) and steer_pairs.jsonl (learning).
    Returns the answer accuracy after training."""
    import torch
    tokenizer = build_tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))  # same numbers on any machine size
    try:
        model = build_model(len(tokenizer), seed)
        accuracy = train(model, tokenizer, steps=steps, seed=seed)
    finally:
        torch.set_num_threads(threads)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for name, rows in (("pairs.jsonl", ioi_pairs(8, seed)),
                       ("steer_pairs.jsonl", steer_pairs(16, seed))):
        with open(os.path.join(folder, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(folder, "steerops_tiny.json"), "w") as f:
        json.dump({"task": "indirect object identification (toy)", "steps": steps,
                   "seed": seed, "answer_accuracy": accuracy}, f, indent=1)
    return accuracy


def _check_target(parser, folder):
    """Refuses a folder holding anything but an earlier tiny model (another model's
    folder is never overwritten)."""
    if not os.path.isdir(folder) or not os.listdir(folder):
        return
    if not os.path.isfile(os.path.join(folder, "steerops_tiny.json")):
        parser.error(f"{folder} is not empty and holds no earlier tiny model "
                     f"(no steerops_tiny.json); give an empty or new folder")


def main(argv=None):
    from .cli_args import Parser, output_folder, positive_int
    p = Parser(prog="steerops tiny-model",
               description="Build a tiny local causal LM (4-block Llama, word-level tokenizer) "
                           "trained on a toy indirect-object task, with example pairs, into "
                           "FOLDER. Offline; about half a minute on 2 CPU cores.")
    p.add_argument("folder", type=output_folder, help="where to save the model and tokenizer")
    p.add_argument("--steps", type=positive_int, default=300, help="training steps (300)")
    args = p.parse_args(argv)
    _check_target(p, args.folder)
    accuracy = make_tiny_model(args.folder, steps=args.steps)
    print(f"tiny model saved to {args.folder} (answer accuracy {accuracy:.0%}); try:\n"
          f"  steerops patch --model {args.folder} --pairs {args.folder}/pairs.jsonl "
          f"--out patch-out")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
