"""Where a benchmark run keeps its work: one compressed shard per run under
``OUT/runs/SCALE-KEY/`` (the key hashes the settings and the protocol version, so a
shard is reused only by a run it belongs to), the run's record beside them, the
compact results.json, and the committed run's weight hashes a rerun is checked against.
A shard is reused only by a run with its settings and on its model's weights."""
import hashlib
import json
import os
import sys

from .provenance import read_shard

PROTOCOL_VERSION = 4


def settings_key(settings):
    """Shards are reused only by a run with the same settings (and protocol version)."""
    keep = {k: settings[k] for k in ("scale", "n_fit", "n_val", "n_eval", "s2_steps",
                                     "n_boot")}
    text = json.dumps(dict(keep, protocol=PROTOCOL_VERSION), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def shard_path(out_dir, settings, task, train_seed, split_seed):
    return os.path.join(out_dir, "runs", f"{settings['scale']}-{settings_key(settings)}",
                        f"{task}-train{train_seed}-split{split_seed}.json.gz")


def record_path(out_dir, settings):
    """The run's own record beside its shards (environment, timings, the realistic stage):
    what --report-only needs to rebuild results.json exactly."""
    return os.path.join(os.path.dirname(shard_path(out_dir, settings, "x", 0, 0)),
                        "record.json")


def set_aside_stale(shards, check_weights=True):
    """``shards``: (shard path, the model file the run would load for it); each shard is
    read once. A shard cut short (a run killed mid-write, a full disk) is renamed
    ``NAME.unreadable``; with ``check_weights``, a shard computed on other weights than
    that model file holds now (a model shipped or retrained since) is renamed
    ``NAME.other-model`` (a model not trained yet cannot say: its shards stay). Either
    way a line names it, and the run recomputes it."""
    from .model_store import weights_sha256
    hashes = {}
    for path, model_file in shards:
        if not os.path.exists(path):
            continue
        try:
            shard = read_shard(path)
        except (ValueError, OSError, EOFError) as e:
            os.replace(path, path + ".unreadable")
            print(f"set aside {path} (not readable JSON: {e}); it will be recomputed",
                  file=sys.stderr)
            continue
        if not (check_weights and os.path.exists(model_file)):
            continue
        if model_file not in hashes:
            hashes[model_file] = weights_sha256(model_file)
        had = shard.get("model", {}).get("weights_sha256")
        if had != hashes[model_file]:
            os.replace(path, path + ".other-model")
            print(f"set aside {path}: computed on weights {str(had)[:12]}..., the model "
                  f"{model_file} is {hashes[model_file][:12]}... now; it will be recomputed",
                  file=sys.stderr)


def read_record(out_dir, settings, runs_done):
    """The finished run's record, when it describes these runs (None otherwise)."""
    try:
        with open(record_path(out_dir, settings)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if record.get("runs_done") == runs_done else None


def compact(results):
    """results.json without the per-run records and bootstrap draws (those stay in the
    run shards under OUT/runs): every aggregate, model and compute number."""
    out = {k: v for k, v in results.items() if k != "runs"}
    out["tasks"] = {name: {k: v for k, v in t.items() if k != "draws"}
                    for name, t in results.get("tasks", {}).items()}
    out["run_index"] = [{"task": r["task"], "train_seed": r.get("train_seed", 0),
                         "split_seed": r["split_seed"], "informative_sites": r[
                             "informative_sites"], "even_share": r["even_share"]}
                        for r in results.get("runs", [])]
    return out


# the committed full run: a rerun compares its task models' weights with these
COMMITTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                         "attribution_v4", "results.json")


def committed_hashes(scale, path=None):
    """{(task, training seed): sha256} of the committed results at ``scale`` ({} if none)."""
    path = COMMITTED if path is None else path
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if data.get("settings", {}).get("scale") != scale:
        return {}
    return {(m["task"], m["train_seed"]): m["weights_sha256"] for m in data.get("models", [])}


def models_seen(runs, scale, committed=None):
    """One record per task model the runs used: training record, |S*| over its runs,
    weight hash, and whether that hash is the committed results' one (None: no
    committed record of that model)."""
    committed = committed_hashes(scale) if committed is None else committed
    out = {}
    for r in runs:
        key = (r["task"], r.get("train_seed", 0))
        m = out.setdefault(key, dict(r["model"], task=key[0], train_seed=key[1],
                                     informative_sites=[]))
        m["informative_sites"].append(r["informative_sites"])
        m.pop("config", None)
    for key, m in out.items():
        known = committed.get(key)
        m["matches"] = None if known is None else known == m.get("weights_sha256")
    return [out[k] for k in sorted(out)]
