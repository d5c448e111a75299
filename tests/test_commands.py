"""`steerops patch / attribute / steer` on the tiny local model: outputs (JSON, PNG,
HTML in headless Chromium), one-line user errors with exit 2."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from browser import dump_dom, screenshot
from helpers import read_json, read_jsonl, read_text
from steerops.app.tiny import TEMPLATE

CLEAN = TEMPLATE.format(a="Mary", b="John", place="store", obj="drink")
CORRUPT = TEMPLATE.format(a="Sarah", b="John", place="store", obj="drink")


def steerops_cli(*args, cwd=None):
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-m", "steerops", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def patch_run(tiny_folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("patch-out"))
    run = steerops_cli("patch", "--model", tiny_folder, "--clean", CLEAN, "--corrupt", CORRUPT,
                       "--answer", "Mary", "--wrong", "John", "--out", out)
    assert run.returncode == 0, run.stderr
    return run, out


def test_patch_outputs(patch_run, tiny):
    run, out = patch_run
    assert sorted(os.listdir(out)) == [".lock", "patching.json", "patching.png", "report.html"]
    rec = read_json(os.path.join(out, "patching.json"))
    tokens = CLEAN.split()
    assert rec["labels"] == tokens and rec["tokens"]["clean"] == [tokens]
    assert rec["tokens"]["corrupt"] == [CORRUPT.split()]
    assert rec["layers"] == [0, 1, 2, 3, 4] and rec["positions"] == list(range(len(tokens)))
    # the numbers are the Python API's on the same inputs
    import steerops
    model, tok = tiny
    # (in the form the command's sweep took: reuse='auto' times the machine)
    ref = steerops.patching_sweep(model, CLEAN, CORRUPT, steerops.logit_diff("Mary", "John"),
                                  tokenizer=tok, progress=False, reuse=rec["plan"]["form"])
    # to float rounding, not bit for bit: on a loaded machine the two differed once (with
    # trainers running beside the suite; alone they were bitwise equal), probably MKL using
    # fewer threads than asked (MKL_DYNAMIC) and so rounding a matmul otherwise
    torch.testing.assert_close(torch.tensor(rec["values"]), ref.effects.float(), rtol=1e-5,
                               atol=1e-6)
    assert rec["provenance"]["transformers"] and rec["settings"]["pairs"][0]["answer"] == "Mary"
    # the printed top sites carry their tokens
    top = rec["top_sites"][0]
    assert re.search(rf"{top['layer']}\s+{top['position']}\s+{top['token']}\s", run.stdout)
    assert "patching sweep" in run.stderr  # the progress bar


def test_png_labels_come_from_the_json(patch_run, tmp_path):
    """The PNG's tick labels are the JSON record's labels (redrawn from the file)."""
    from steerops.app.report import write_png
    _, out = patch_run
    rec = read_json(os.path.join(out, "patching.json"))
    drawn = write_png([rec], str(tmp_path / "again.png"))
    assert drawn == [{"x": rec["labels"], "y": [str(l) for l in rec["layers"]],
                      "colorbar": rec["value_name"]}]
    import matplotlib.image
    image = matplotlib.image.imread(os.path.join(out, "patching.png"))
    assert image.std() > 0.05  # not a blank canvas


def _cells(dom):
    return re.findall(r'<rect class="cell"[^>]*data-layer="(\d+)" data-position="(\d+)" '
                      r'data-token="([^"]*)"', dom)


def test_html_in_chromium(patch_run, tmp_path):
    _, out = patch_run
    html = read_text(os.path.join(out, "report.html"))
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") \
        and "https://" not in html and "<link" not in html  # self-contained
    dom = dump_dom(os.path.join(out, "report.html"))
    rec = read_json(os.path.join(out, "patching.json"))
    cells = _cells(dom)
    assert len(cells) == len(rec["layers"]) * len(rec["positions"])
    for layer, pos, token in cells:
        assert token == rec["labels"][int(pos)]
    assert {int(l) for l, _, _ in cells} == set(rec["layers"])
    assert 'id="tip"' in dom  # the hover box the script drives
    image = screenshot(os.path.join(out, "report.html"), str(tmp_path / "page.png"))
    rgb = image[..., :3]
    assert rgb.std() > 0.05, "blank page"
    reds = ((rgb[..., 0] > 0.6) & (rgb[..., 1] < 0.35) & (rgb[..., 2] < 0.35)).sum()
    assert reds > 200, "no heatmap cells rendered"


def test_attribute_compare_pairs_file(tiny_folder, tmp_path):
    out = str(tmp_path / "atp")
    run = steerops_cli("attribute", "--model", tiny_folder, "--pairs",
                       os.path.join(tiny_folder, "pairs.jsonl"), "--compare", "--out", out,
                       "--no-progress")
    assert run.returncode == 0, run.stderr
    atp = read_json(os.path.join(out, "attribution.json"))
    sweep = read_json(os.path.join(out, "patching.json"))
    pairs = read_jsonl(os.path.join(tiny_folder, "pairs.jsonl"))
    assert len(atp["tokens"]["clean"]) == len(pairs) == 8
    assert atp["tokens"]["clean"][3] == pairs[3]["clean"].split()
    assert atp["agreement"]["spearman"] > 0.5 and "Spearman" in run.stdout
    dom = dump_dom(os.path.join(out, "report.html"))
    panels = re.findall(r'<svg class="heatmap" data-panel="(\d)"', dom)
    assert panels == ["0", "1"] and len(_cells(dom)) == 2 * len(atp["values"]) * len(
        atp["positions"])
    assert 'id="agreement"' in dom and sweep["kind"] == "patching"


def test_steer_command(tiny_folder, tmp_path):
    prompt = TEMPLATE.format(a="Tom", b="Kate", place="park", obj="key")
    run = steerops_cli("steer", "--model", tiny_folder, "--prompt", prompt, "--learn-from",
                       os.path.join(tiny_folder, "steer_pairs.jsonl"), "--layer", "2",
                       "--alpha", "1,4", "--max-new-tokens", "1", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert re.search(r"unsteered\s+\| Tom", run.stdout)
    assert re.search(r"alpha 4\s+\| Mary", run.stdout)
    saved = read_json(tmp_path / "steer.json")
    assert saved["unsteered"] == "Tom" and [s["alpha"] for s in saved["steered"]] == [1.0, 4.0]
    # a saved vector file works the same way
    import steerops
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    tok = AutoTokenizer.from_pretrained(tiny_folder)
    rows = read_jsonl(os.path.join(tiny_folder, "steer_pairs.jsonl"))
    v = steerops.learn_steering_vector(model, [r["positive"] for r in rows],
                                       [r["negative"] for r in rows], 2, tokenizer=tok)
    v.save(str(tmp_path / "v.safetensors"))
    run = steerops_cli("steer", "--model", tiny_folder, "--prompt", prompt, "--vector",
                       str(tmp_path / "v.safetensors"), "--alpha", "4", "--max-new-tokens", "1")
    assert run.returncode == 0 and re.search(r"alpha 4\s+\| Mary", run.stdout), run.stderr


def _fails(run, *needles):
    code, err = run
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("steerops"), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_command_user_errors(tiny_folder, tmp_path, capsys, monkeypatch):
    """In process (the subprocess path is the same main(), tested above)."""
    from steerops.app.cli import main
    monkeypatch.chdir(tmp_path)  # the default --out (steerops-out) lands here

    def steerops_cli(*args):
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's own errors
            code = e.code
        return code, capsys.readouterr().err

    pair = ["--clean", CLEAN, "--corrupt", CORRUPT, "--answer", "Mary", "--wrong", "John",
            "--out", str(tmp_path / "o")]
    _fails(steerops_cli("patch", "--model", str(tmp_path / "nope"), *pair), "no such folder")
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_folder, name), no_tok / name)
    _fails(steerops_cli("patch", "--model", str(no_tok), *pair), "no tokenizer there")
    _fails(steerops_cli("patch", "--model", str(tmp_path), *pair), "no config.json")
    _fails(steerops_cli("patch", "--model", tiny_folder, *pair, "--layers", "9"),
           "--layers 9: out of range", "0..4")
    _fails(steerops_cli("patch", "--model", tiny_folder, "--clean", CLEAN, "--corrupt", CORRUPT,
                        "--wrong", "John", "--answer", "Mary John", "--out", str(tmp_path / "o")),
           "'Mary John' is 2 tokens")
    _fails(steerops_cli("patch", "--model", tiny_folder, "--clean", "When Mary went",
                        "--corrupt", "When Sarah and Tom went", "--answer", "Mary", "--wrong",
                        "John", "--out", str(tmp_path / "o")),
           "tokenise to 3 and 5 tokens", "1*: 'Mary' | 'Sarah'")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"clean": CLEAN, "corrupt": CORRUPT, "answer": "Mary",
                               "wrong": "John"}) + "\n\n{not json\n")
    _fails(steerops_cli("attribute", "--model", tiny_folder, "--pairs", str(bad)),
           "line 3: not JSON")
    bad.write_text(json.dumps({"clean": CLEAN, "corrupt": CORRUPT, "answer": "Mary"}) + "\n")
    _fails(steerops_cli("attribute", "--model", tiny_folder, "--pairs", str(bad)),
           "line 1: missing or empty ['wrong']")
    _fails(steerops_cli("patch", "--model", tiny_folder, "--clean", CLEAN), "missing --corrupt")
    _fails(steerops_cli("steer", "--model", tiny_folder, "--prompt", CLEAN, "--learn-from",
                        os.path.join(tiny_folder, "steer_pairs.jsonl"), "--layer", "7"),
           "--layer 7: out of range")
    _fails(steerops_cli("steer", "--model", tiny_folder, "--prompt", CLEAN, "--learn-from",
                        os.path.join(tiny_folder, "steer_pairs.jsonl")), "needs --layer")
    _fails(steerops_cli("steer", "--model", tiny_folder, "--prompt", CLEAN, "--vector",
                        str(tmp_path / "missing.safetensors")), "--vector")
    _fails(steerops_cli("steer", "--model", tiny_folder, "--prompt", CLEAN, "--vector", "x",
                        "--alpha", "1,two"), "--alpha")


def _in_process(capsys, tmp_path, monkeypatch):
    from steerops.app.cli import main
    monkeypatch.chdir(tmp_path)

    def run(*args):
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().err
    return run


def _folders(tmp_path, tiny_folder):
    """A BERT folder with the tiny tokenizer, a Llama whose vocabulary is smaller than the
    tokenizer's, and vector files whose layer or width is wrong."""
    import transformers as T
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    import steerops
    tok = T.AutoTokenizer.from_pretrained(tiny_folder)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64)
    T.BertModel(T.BertConfig(vocab_size=len(tok), **small)).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=20, num_key_value_heads=2, **small)) \
        .save_pretrained(tmp_path / "vocab20")
    tok.save_pretrained(tmp_path / "vocab20")
    model = T.AutoModelForCausalLM.from_pretrained(tiny_folder)
    sv = steerops.learn_steering_vector(model, [CLEAN], [CORRUPT], layer=2, tokenizer=tok)
    sv.save(str(tmp_path / "v.safetensors"))
    with safe_open(str(tmp_path / "v.safetensors"), "pt") as f:
        meta = f.metadata()["steerops"]
    tensors = load_file(str(tmp_path / "v.safetensors"))
    for name, m, t in (("v7", meta.replace('"layer": 2', '"layer": 7'), tensors),
                       ("vneg", meta.replace('"layer": 2', '"layer": -1'), tensors),
                       ("vwide", meta, {"vector": torch.randn(65)})):
        save_file(t, str(tmp_path / f"{name}.safetensors"), metadata={"steerops": m})


def test_command_user_errors_part3(tiny_folder, tmp_path, capsys, monkeypatch):
    """Issue "never silently wrong, part 3": each case a one-line message naming the
    argument, exit 2, before the weights load where it can be."""
    run = _in_process(capsys, tmp_path, monkeypatch)
    _folders(tmp_path, tiny_folder)
    out = ["--out", str(tmp_path / "o")]
    pair = ["--clean", CLEAN, "--corrupt", CORRUPT, "--answer", "Mary", "--wrong", "John"]
    # 1. a folder holding a non-causal model
    _fails(run("patch", "--model", str(tmp_path / "bert"), *pair, *out),
           "BertModel has no causal language-model head")
    # 3. a word outside the vocabulary: listed, and accepted only with --allow-unknown
    zorb = CLEAN.replace("Mary", "Zorblax")
    _fails(run("patch", "--model", tiny_folder, "--clean", zorb, "--corrupt", CORRUPT,
               "--answer", "Mary", "--wrong", "John", *out),
           "--clean / --corrupt: not in the tokenizer's vocabulary", "'Zorblax'",
           "--allow-unknown")
    # 4. a prompt longer than the model's positions (64), for patch and steer
    long = " ".join([CLEAN] * 6)
    _fails(run("patch", "--model", tiny_folder, "--clean", long, "--corrupt", long, "--answer",
               "Mary", "--wrong", "John", *out), "more than this model's 64 positions")
    _fails(run("steer", "--model", tiny_folder, "--prompt", long, "--learn-from",
               os.path.join(tiny_folder, "steer_pairs.jsonl"), "--layer", "2"),
           "--prompt: a prompt is", "64 positions")
    # 5. answer equal to wrong, on the command line and in a --pairs line
    _fails(run("patch", "--model", tiny_folder, *pair[:-2], "--wrong", "Mary", *out),
           "answer and wrong are both 'Mary'")
    lines = tmp_path / "pairs.jsonl"
    rows = [dict(clean=CLEAN, corrupt=CORRUPT, answer="Mary", wrong="John"),
            dict(clean=CLEAN, corrupt=CORRUPT, answer="John", wrong="John")]
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _fails(run("patch", "--model", tiny_folder, "--pairs", str(lines), *out), "pair 2",
           "answer and wrong are both 'John'")
    # 6. ignored input: extra keys, --method beside --vector, repeated options, 1,,2
    lines.write_text(json.dumps(dict(rows[0], layer=2)) + "\n")
    _fails(run("patch", "--model", tiny_folder, "--pairs", str(lines), *out),
           "line 1: unknown key(s) ['layer']")
    _fails(run("steer", "--model", tiny_folder, "--prompt", CLEAN, "--vector",
               str(tmp_path / "v.safetensors"), "--method", "pca"), "--method applies to")
    _fails(run("patch", "--model", tiny_folder, *pair, "--layers", "1", "--layers", "2", *out),
           "--layers is given twice")
    _fails(run("steer", "--model", tiny_folder, "--prompt", CLEAN, "--vector",
               str(tmp_path / "v.safetensors"), "--alpha", "1", "--alpha", "2"),
           "--alpha is given twice")
    _fails(run("steer", "--model", tiny_folder, "--prompt", CLEAN, "--vector",
               str(tmp_path / "v.safetensors"), "--alpha", "1,,2"), "an empty item")
    # 7. tiny-model never overwrites another model's folder
    _fails(run("tiny-model", str(tmp_path / "bert")), "holds no earlier tiny model")
    # 9. a tokenizer whose ids exceed the model's vocabulary
    _fails(run("patch", "--model", str(tmp_path / "vocab20"), *pair, *out),
           "the tokenizer has", "vocabulary is 20")
    # 10. --pairs: invalid UTF-8, a folder
    lines.write_bytes(b'{"clean": "\xff\xfe"}\n')
    _fails(run("patch", "--model", tiny_folder, "--pairs", str(lines), *out), "not UTF-8")
    _fails(run("patch", "--model", tiny_folder, "--pairs", str(tmp_path), *out), "is a folder")
    # 11. a vector file whose layer is out of range, or whose width disagrees
    for name, needle in (("v7", "its layer 7 is out of range"),
                         ("vneg", "its layer -1 is out of range"),
                         ("vwide", "65 wide but its metadata says hidden_size 64")):
        _fails(run("steer", "--model", tiny_folder, "--prompt", CLEAN, "--vector",
                   str(tmp_path / f"{name}.safetensors")), needle)
    # 12. --out where no folder can be made (as root os.access says yes to /proc)
    for cmd in (["patch", "--model", tiny_folder, *pair], ["tiny-model"],
                ["bench", "attribution", "--quick"]):
        where = ["/proc/steerops-x/y"] if cmd == ["tiny-model"] else ["--out",
                                                                      "/proc/steerops-x/y"]
        _fails(run(*cmd, *where), "cannot create a folder in /proc")


def test_negative_alpha_and_a_reused_out_folder(tiny_folder, tmp_path, capsys, monkeypatch):
    run = _in_process(capsys, tmp_path, monkeypatch)
    # 13. a negative first value is a value
    code, err = run("steer", "--model", tiny_folder, "--prompt", CLEAN, "--learn-from",
                    os.path.join(tiny_folder, "steer_pairs.jsonl"), "--layer", "2", "--alpha",
                    "-4,4", "--max-new-tokens", "1", "--out", str(tmp_path / "o"))
    assert code == 0, err
    steer = json.loads((tmp_path / "o" / "steer.json").read_text())
    assert [s["alpha"] for s in steer["steered"]] == [-4.0, 4.0]
    # 7. a reused --out keeps only this run's files (steer.json was there)
    code, err = run("attribute", "--model", tiny_folder, "--clean", CLEAN, "--corrupt", CORRUPT,
                    "--answer", "Mary", "--wrong", "John", "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert sorted(f for f in os.listdir(tmp_path / "o") if f != ".lock") == [
        "attribution.json", "attribution.png", "report.html"]
    # --allow-unknown runs, and the unknown word shows as the unknown token
    code, err = run("attribute", "--model", tiny_folder, "--clean",
                    CLEAN.replace("Mary", "Zorblax"), "--corrupt", CORRUPT, "--answer", "Mary",
                    "--wrong", "John", "--allow-unknown", "--out", str(tmp_path / "o"))
    assert code == 0, err
    rec = json.loads((tmp_path / "o" / "attribution.json").read_text())
    assert "[UNK]" in json.dumps(rec)


def test_patch_and_attribute_heads_and_neurons(tiny_folder, tmp_path):
    """--sites head_out: a (block.head x token) map in JSON, PNG and the HTML (one cell per
    block, head and position), top sites by block, head and position; --sites neuron for
    AtP: top sites by block, position and neuron."""
    out = str(tmp_path / "heads")
    run = steerops_cli("patch", "--model", tiny_folder, "--clean", CLEAN, "--corrupt", CORRUPT,
                       "--answer", "Mary", "--wrong", "John", "--sites", "head_out", "--out",
                       out, "--no-progress")
    assert run.returncode == 0, run.stderr
    rec = read_json(os.path.join(out, "patching.json"))
    L, H = 4, len(rec["row_labels"]) // 4
    assert rec["sites"] == "head_out" and rec["axes"] == ["block", "head", "position"]
    assert rec["row_labels"][:2] == ["0.0", "0.1"] and H > 1
    assert len(rec["values"]) == L * H and len(rec["values"][0]) == len(rec["positions"])
    top = rec["top_sites"][0]
    assert rec["values"][top["block"] * H + top["head"]][top["position"]] == \
        pytest.approx(top["value"])
    assert re.search(r"\bblock\s+head\s+position\s+token", run.stdout)
    dom = dump_dom(os.path.join(out, "report.html"))
    cells = re.findall(r'<rect class="cell"[^>]*data-layer="(\d+)\.(\d+)" '
                       r'data-position="(\d+)"[^>]*data-row-axis="block.head"', dom)
    assert len(cells) == L * H * len(rec["positions"])
    assert "head_out sites" in dom and "<th>head</th>" in dom
    out = str(tmp_path / "neurons")
    run = steerops_cli("attribute", "--model", tiny_folder, "--clean", CLEAN, "--corrupt",
                       CORRUPT, "--answer", "Mary", "--wrong", "John", "--sites", "neuron",
                       "--layers", "1", "2", "--out", out)
    assert run.returncode == 0, run.stderr
    rec = read_json(os.path.join(out, "attribution.json"))
    assert rec["axes"] == ["block", "position", "neuron"] and rec["layers"] == [1, 2]
    assert {"block", "position", "neuron", "token"} <= set(rec["top_sites"][0])
    assert rec["note"] == "summed over neurons"


def test_site_option_errors(tiny_folder, tmp_path, capsys, monkeypatch):
    run = _in_process(capsys, tmp_path, monkeypatch)
    pair = ["--model", tiny_folder, "--clean", CLEAN, "--corrupt", CORRUPT, "--answer", "Mary",
            "--wrong", "John"]
    _fails(run("patch", *pair, "--sites", "mlp_out", "--layers", "4"), "--layers 4",
           "numbered by block, 0..3")
    _fails(run("patch", *pair, "--sites", "attn_out", "--all-positions"), "--all-positions",
           "--sites head_out")
    _fails(run("patch", *pair, "--sites", "neuron"), "--sites neuron", "attribute")
    _fails(run("attribute", *pair, "--sites", "neuron", "--compare"), "--compare")
    code, err = run("patch", *pair, "--sites", "heads")
    assert code == 2 and "--sites" in err and "head_out" in err


def test_commands_tokenise_each_prompt_once(tiny_folder, tmp_path, monkeypatch):
    """The pair commands check the prompts on the ids the sweep then takes, and steer
    --learn-from learns from the ids it checked: no prompt is tokenised twice."""
    from test_text import CountingTokenizer

    from steerops.app import cli, commands
    calls = []
    load = commands.load_tokenizer
    monkeypatch.setattr(commands, "load_tokenizer",
                        lambda folder: CountingTokenizer(load(folder), calls))
    pairs = read_jsonl(os.path.join(tiny_folder, "pairs.jsonl"))
    assert cli.main(["attribute", "--model", tiny_folder, "--pairs",
                     os.path.join(tiny_folder, "pairs.jsonl"), "--out", str(tmp_path / "a"),
                     "--no-progress"]) == 0
    prompts = [p[k] for p in pairs for k in ("clean", "corrupt")]
    assert sorted(c for c in calls if c in prompts) == sorted(prompts)
    calls.clear()
    rows = read_jsonl(os.path.join(tiny_folder, "steer_pairs.jsonl"))
    learn = [r[k] for r in rows for k in ("positive", "negative")]
    assert cli.main(["steer", "--model", tiny_folder, "--prompt", CLEAN, "--learn-from",
                     os.path.join(tiny_folder, "steer_pairs.jsonl"), "--layer", "2",
                     "--max-new-tokens", "1"]) == 0
    assert sorted(c for c in calls if c in learn) == sorted(learn)
