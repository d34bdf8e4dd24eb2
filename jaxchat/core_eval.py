"""CORE evaluation: DCLM's in-context-learning tasks scored as nanochat does (spec §8.2-§8.4).

    python -m jaxchat.core_eval --download      # fetch the eval bundle into $JAXCHAT_BASE_DIR/eval_bundle

Each example becomes one or more token rows (one per choice / context option, or the single LM prompt). The rows of a
task are sorted by length, padded on the right with BOS to a length bucket and packed into fixed-shape batches, so a
whole CORE pass compiles the scoring function once per length bucket. The model is causal, so right padding never
changes a row's losses or predictions. Batches are split over every device of every process (rows sharded over the
mesh the parameters live on); each process builds the same batch schedule, which SPMD requires, and the per-row
results come back replicated to every process.
"""

import argparse
import csv
import fcntl
import functools
import json
import os
import random
import shutil
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxchat.common import UserError, base_dir, print0, run_main

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
DOWNLOAD_COMMAND = "python -m jaxchat.core_eval --download"
BOS_TOKEN = "<|bos|>"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


def default_tokens_per_device() -> int:
    """Rows x padded length per device per forward pass: bounds the (rows, T, vocab) float32 logits on accelerators.

    CPU "devices" share the host's cores, so there a small batch wastes less time on filler rows.
    """
    return 2048 if jax.default_backend() == "cpu" else 16384


# ----------------------------------------------------------------------------------------------------------------
# The bundle (spec §8.2)


def default_bundle_dir() -> str:
    return os.path.join(base_dir(), "eval_bundle")


def download_bundle(url: str = EVAL_BUNDLE_URL, dest: str | None = None) -> str:
    """Download and unzip the eval bundle to `dest` (default $BASE/eval_bundle) once, under a file lock; return dest."""
    dest = os.path.abspath(dest or default_bundle_dir())
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    # One downloader per machine: the others wait on the lock and then find the finished directory.
    with open(os.path.join(parent, ".eval_bundle.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_bundle(dest):
            return dest
        zip_path = os.path.join(parent, "eval_bundle.zip")
        if not os.path.exists(zip_path):
            _fetch(url, zip_path)
        # Extract into a temporary directory beside dest and rename it into place: a crash never leaves half a bundle.
        tmp = tempfile.mkdtemp(prefix=".eval_bundle.", dir=parent)
        try:
            try:
                with zipfile.ZipFile(zip_path) as zf:
                    zf.extractall(tmp)
            except zipfile.BadZipFile:
                os.remove(zip_path)  # a truncated download; the next attempt fetches it again
                raise UserError(f"{zip_path} is not a valid zip file (removed); run `{DOWNLOAD_COMMAND}` again") from None
            root = _find_bundle_root(tmp)
            if root is None:
                raise UserError(f"{url} does not contain core.yaml / eval_meta_data.csv / eval_data")
            if os.path.exists(dest):
                shutil.rmtree(dest)  # an incomplete directory (not a bundle, checked above)
            os.rename(root, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _fetch(url: str, path: str) -> None:
    """Stream url to path (via path + '.part') with a progress bar."""
    from tqdm import tqdm

    part = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="eval_bundle.zip",
                      disable=jax.process_index() != 0) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:  # URLError, timeouts and connection resets are all OSErrors
        if os.path.exists(part):
            os.remove(part)
        raise UserError(f"cannot download the CORE eval bundle from {url} ({e}); run `{DOWNLOAD_COMMAND}` on a "
                        f"machine with network access, or pass --bundle DIR") from None
    os.rename(part, path)


def _is_bundle(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, name)) for name in ("core.yaml", "eval_meta_data.csv", "eval_data"))


def _find_bundle_root(path: str) -> str | None:
    """The bundle directory inside an extracted zip (the archive holds a top-level eval_bundle/ folder)."""
    if _is_bundle(path):
        return path
    for name in sorted(os.listdir(path)):
        if _is_bundle(os.path.join(path, name)):
            return os.path.join(path, name)
    return None


def find_bundle(path: str | None = None, download: bool = True) -> str:
    """The bundle to use: `path` if given (must exist), else $BASE/eval_bundle, downloading it when missing."""
    if path is not None:
        if not _is_bundle(path):
            raise UserError(f"{path} is not a CORE eval bundle (needs core.yaml, eval_meta_data.csv and eval_data/); "
                            f"`{DOWNLOAD_COMMAND}` fetches the real one to {default_bundle_dir()}")
        return path
    path = default_bundle_dir()
    if _is_bundle(path):
        return path
    if not download:
        raise UserError(f"CORE eval bundle not found at {path}: run `{DOWNLOAD_COMMAND}` first")
    return download_bundle(dest=path)


@dataclass
class Task:
    """One entry of core.yaml with its random baseline (percent) from eval_meta_data.csv."""

    label: str
    task_type: str
    dataset_uri: str
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float


def load_tasks(bundle: str) -> list[Task]:
    """The tasks of core.yaml in order, with eval_meta_data.csv's baselines (DCLM v1 values, as shipped)."""
    import yaml

    with open(os.path.join(bundle, "core.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    baselines = {}
    with open(os.path.join(bundle, "eval_meta_data.csv"), encoding="utf-8") as f:
        for row in csv.DictReader(f):
            baselines[row["Eval Task"]] = float(row["Random baseline"])
    tasks = []
    for entry in config["icl_tasks"]:
        label = entry["label"]
        if entry["icl_task_type"] not in TASK_TYPES:
            raise UserError(f"{bundle}/core.yaml: task {label} has unknown icl_task_type {entry['icl_task_type']!r}")
        if label not in baselines:
            raise UserError(f"{bundle}/eval_meta_data.csv has no 'Random baseline' for task {label}")
        tasks.append(Task(label=label, task_type=entry["icl_task_type"], dataset_uri=entry["dataset_uri"],
                          num_fewshot=int(entry["num_fewshot"][0]),
                          continuation_delimiter=entry.get("continuation_delimiter", " "),
                          random_baseline=baselines[label]))
    return tasks


def load_task_data(bundle: str, task: Task, max_per_task: int = -1) -> list[dict]:
    """The task's JSONL rows, shuffled with Random(1337) and cut to max_per_task (when > 0)."""
    with open(os.path.join(bundle, "eval_data", task.dataset_uri), encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(1337).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


# ----------------------------------------------------------------------------------------------------------------
# Prompts (spec §8.4 steps 2-3). The reference renders Jinja2 templates; these are the same strings written out.


def fewshot_indices(idx: int, n: int, k: int) -> list[int]:
    """The few-shot examples of example idx: k distinct others, in the order Random(1234 + idx) samples them."""
    if k <= 0:
        return []
    return random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)


def render_prompts_mc(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """One prompt per choice: few-shot 'query delim gold_choice' blocks, each followed by a blank line."""
    context = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{context}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """One prompt per context option, all ending in the same continuation."""
    context = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{context}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]


def render_prompts_lm(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """[prompt without the continuation (stripped), prompt with it]; contexts are trimmed (Jinja's `trim`)."""
    context = "".join(f"{str(ex['context']).strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    prefix = f"{context}{str(item['context']).strip()}{delimiter}"
    # Stripping removes a trailing space delimiter, which the tokenizer would otherwise glue onto the next word.
    return [prefix.strip(), f"{prefix}{item['continuation']}"]


def common_length(sequences: list[list[int]], direction: str) -> int:
    """Length of the common prefix ('left') or suffix ('right') of token sequences."""
    min_len = min(len(s) for s in sequences)
    positions = range(min_len) if direction == "left" else range(-1, -min_len - 1, -1)
    for i, pos in enumerate(positions):
        if any(s[pos] != sequences[0][pos] for s in sequences):
            return i
    return min_len


@dataclass
class Example:
    """An example's token rows and, per row, the scored span [start, end) of positions."""

    rows: list[list[int]]
    starts: list[int]
    ends: list[int]
    gold: int | None = None


def prepare_task(task: Task, data: list[dict], encode: Callable[[list[str]], list[list[int]]]) -> list[Example]:
    """Render and tokenise (BOS first) every example of a task; spans as in the reference's batch_sequences_*."""
    render = {"multiple_choice": render_prompts_mc, "schema": render_prompts_schema,
              "language_modeling": render_prompts_lm}[task.task_type]
    prompts = [render(item, task.continuation_delimiter,
                      [data[i] for i in fewshot_indices(idx, len(data), task.num_fewshot)])
               for idx, item in enumerate(data)]
    flat = encode([p for ps in prompts for p in ps])  # one batch call per task: tiktoken encodes it in threads
    examples, pos = [], 0
    for idx, (item, ps) in enumerate(zip(data, prompts)):
        tokens, pos = flat[pos: pos + len(ps)], pos + len(ps)
        if task.task_type == "multiple_choice":
            start = common_length(tokens, "left")
            examples.append(Example(tokens, [start] * len(tokens), [len(t) for t in tokens], item["gold"]))
        elif task.task_type == "schema":
            suffix = common_length(tokens, "right")
            examples.append(Example(tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens], item["gold"]))
        else:
            without, with_ = tokens
            if not (len(without) < len(with_) and with_[: len(without)] == without):
                raise UserError(f"task {task.label}, example {idx}: the prompt without the continuation does not "
                                f"tokenise to a strict prefix of the prompt with it")
            examples.append(Example([with_], [len(without)], [len(with_)]))
    return examples


def batch_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """texts -> token lists with BOS prepended, special tokens not parsed, for a tiktoken Encoding or jaxchat Tokenizer."""
    enc = tokenizer if hasattr(tokenizer, "encode_ordinary_batch") else getattr(tokenizer, "enc", None)
    if enc is not None and hasattr(enc, "encode_ordinary_batch"):
        bos = enc.encode_single_token(BOS_TOKEN)
        return lambda texts: [[bos, *ids] for ids in enc.encode_ordinary_batch(texts)]
    if hasattr(tokenizer, "encode_batch"):
        return lambda texts: tokenizer.encode_batch(texts, prepend_bos=True)
    return lambda texts: [tokenizer.encode(t, prepend_bos=True) for t in texts]


def bos_id(tokenizer) -> int:
    """The BOS token id (also the padding token, as in the reference)."""
    enc = tokenizer if hasattr(tokenizer, "encode_single_token") else getattr(tokenizer, "enc", None)
    if enc is not None and hasattr(enc, "encode_single_token"):
        return enc.encode_single_token(BOS_TOKEN)
    for name in ("bos_id", "bos_token_id"):
        if isinstance(getattr(tokenizer, name, None), int):
            return getattr(tokenizer, name)
    return tokenizer.get_bos_token_id()


# ----------------------------------------------------------------------------------------------------------------
# Scoring rows on the devices (spec §8.4 steps 6-7)


def length_buckets(max_len: int) -> list[int]:
    """Padded lengths 64, 128, 192, 256, 384, 512, 768, ... (ratio <= 1.5 past 128) up to and including max_len."""
    buckets, base = [], 64
    while True:
        for mult in (1, 1.5) if base >= 128 else (1,):
            size = int(base * mult)
            if size >= max_len:
                return buckets + [max_len]
            buckets.append(size)
        base *= 2


def bucket_length(n: int, max_len: int) -> int:
    """The smallest bucket that holds n tokens."""
    if n > max_len:
        raise UserError(f"a CORE prompt of {n} tokens exceeds the model's rotary cache of {max_len} positions")
    return next(b for b in length_buckets(max_len) if b >= n)


def _score_rows(graphdef, state, tokens_RT, starts_R, ends_R):
    """Per row: mean CE over the span's targets and whether greedy predictions match them all."""
    logits_RTV = nnx.merge(graphdef, state)(tokens_RT)
    targets_RT = jnp.roll(tokens_RT, -1, axis=1)  # the reference's torch.roll; the wrapped column is never scored
    logz_RT = jax.nn.logsumexp(logits_RTV, axis=-1)
    ce_RT = logz_RT - jnp.take_along_axis(logits_RTV, targets_RT[..., None], axis=-1)[..., 0]
    pred_RT = jnp.argmax(logits_RTV, axis=-1)  # first maximum on ties, like torch
    pos = jnp.arange(tokens_RT.shape[1])[None, :]
    # Position p predicts token p+1, so the span [start, end) is scored at positions start-1 .. end-2. A start of 0
    # (identical schema options) gives the reference an empty slice: count nothing, and the mean is NaN like torch's.
    span = (pos >= starts_R[:, None] - 1) & (pos < ends_R[:, None] - 1) & (starts_R[:, None] >= 1)
    mean_R = jnp.where(span, ce_RT, 0.0).sum(axis=1) / span.sum(axis=1)
    match_R = jnp.all(jnp.where(span, pred_RT == targets_RT, True), axis=1)
    return mean_R, match_R


@dataclass
class _Scorer:
    """A jitted scoring function for one model structure and mesh, kept across calls (the training loop's CORE evals)."""

    fn: Callable
    shapes: set = field(default_factory=set)


_SCORERS: dict = {}


def _mesh_and_state(model) -> tuple:
    """(graphdef, state on a mesh spanning every device, mesh): the parameters' own mesh if they have one."""
    graphdef, state = nnx.split(model)
    leaves = jax.tree.leaves(state)
    sharding = leaves[0].sharding if leaves and isinstance(leaves[0], jax.Array) else None
    if isinstance(sharding, NamedSharding) and sharding.mesh.devices.size == jax.device_count():
        return graphdef, state, sharding.mesh  # e.g. the training mesh: GSPMD gathers FSDP shards as needed
    mesh = Mesh(np.array(jax.devices()), ("rows",), axis_types=(AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        state = jax.device_put(state, replicated)
    else:  # every process holds the same weights: build the global replicated arrays from host copies
        state = jax.tree.map(lambda x: _global_array(np.asarray(x), replicated), state)
    return graphdef, state, mesh


def _global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds in full."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


class RowScorer:
    """Scores token rows in fixed-shape padded batches on every device; counts the shapes it compiles."""

    def __init__(self, model: nnx.Module, pad_id: int, tokens_per_device: int | None = None):
        self.graphdef, self.state, self.mesh = _mesh_and_state(model)
        self.pad_id = pad_id
        self.max_len = 10 * model.config.sequence_len  # the model's rotary cache
        self.n_devices = self.mesh.devices.size
        self.tokens_per_device = tokens_per_device or default_tokens_per_device()
        self.row_sharding = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
        key = (self.graphdef, self.mesh)
        if key not in _SCORERS:
            fn = jax.jit(functools.partial(_score_rows, self.graphdef),
                         out_shardings=NamedSharding(self.mesh, P()))  # replicated: every process reads all rows
            _SCORERS[key] = _Scorer(fn)
        self._scorer = _SCORERS[key]
        self.compilations = 0  # new batch shapes seen by this scorer's jitted function during this object's life
        self.stats = {"batches": 0, "rows": 0, "tokens": 0, "padded_tokens": 0}  # padding efficiency, for the bench

    def rows_per_batch(self, length: int) -> int:
        """Rows of a batch of padded length `length`: a fixed function of the length, so one shape per bucket."""
        return self.n_devices * max(1, self.tokens_per_device // length)

    def score(self, rows: list[list[int]], starts: list[int], ends: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(mean span loss, all-greedy-match) per row, in the given order."""
        means, matches = np.full(len(rows), np.nan, np.float32), np.zeros(len(rows), bool)
        order = sorted(range(len(rows)), key=lambda r: len(rows[r]))  # similar lengths share a batch: less padding
        pending, i = [], 0
        while i < len(order):
            length = bucket_length(len(rows[order[i]]), self.max_len)
            n_rows = self.rows_per_batch(length)
            chunk = [r for r in order[i: i + n_rows] if len(rows[r]) <= length]
            i += len(chunk)
            tokens = np.full((n_rows, length), self.pad_id, np.int32)
            starts_b, ends_b = np.zeros(n_rows, np.int32), np.zeros(n_rows, np.int32)  # filler rows score nothing
            for j, r in enumerate(chunk):
                tokens[j, : len(rows[r])] = rows[r]
                starts_b[j], ends_b[j] = starts[r], ends[r]
            if (n_rows, length) not in self._scorer.shapes:
                self._scorer.shapes.add((n_rows, length))
                self.compilations += 1
            # Dispatch only: the device runs this batch while the host builds the next one; results are read below.
            pending.append((chunk, self._scorer.fn(self.state, self._put(tokens), self._put(starts_b),
                                                   self._put(ends_b))))
            self.stats["batches"] += 1
            self.stats["rows"] += len(chunk)
            self.stats["tokens"] += sum(len(rows[r]) for r in chunk)
            self.stats["padded_tokens"] += tokens.size
        for chunk, (mean_b, match_b) in pending:
            means[chunk], matches[chunk] = np.asarray(mean_b)[: len(chunk)], np.asarray(match_b)[: len(chunk)]
        return means, matches

    def _put(self, host: np.ndarray) -> jax.Array:
        return _global_array(host, self.row_sharding)


# ----------------------------------------------------------------------------------------------------------------
# Tasks and the CORE metric (spec §8.4 steps 7-9)


def evaluate_task(scorer: RowScorer, task: Task, examples: list[Example]) -> list[int]:
    """0/1 per example: LM exact greedy match; MC/schema the first option with the lowest mean loss is gold."""
    rows = [row for ex in examples for row in ex.rows]
    starts = [s for ex in examples for s in ex.starts]
    ends = [e for ex in examples for e in ex.ends]
    means, matches = scorer.score(rows, starts, ends)
    correct, pos = [], 0
    for ex in examples:
        n = len(ex.rows)
        if task.task_type == "language_modeling":
            correct.append(int(matches[pos]))
        else:
            # Python floats and list.index(min(...)): the first minimum wins, and NaNs behave as in the reference.
            losses = [float(m) for m in means[pos: pos + n]]
            correct.append(int(losses.index(min(losses)) == ex.gold))
        pos += n
    return correct


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """Accuracy rescaled so that chance (baseline in percent) is 0 and perfect is 1."""
    return (accuracy - 0.01 * random_baseline) / (1.0 - 0.01 * random_baseline)


def evaluate_core(model: nnx.Module, tokenizer, bundle_dir: str | None = None, max_per_task: int = 500,
                  tokens_per_device: int | None = None) -> dict:
    """CORE: {"core", "tasks": {label: {"accuracy", "centered", "correct"}}, "compilations", "seconds", "stats"}."""
    bundle = find_bundle(bundle_dir)
    tasks = load_tasks(bundle)
    encode = batch_encoder(tokenizer)
    scorer = RowScorer(model, bos_id(tokenizer), tokens_per_device)
    results, t_start = {}, time.time()
    for task in tasks:
        t0 = time.time()
        print0(f"Evaluating: {task.label} ({task.num_fewshot}-shot, type: {task.task_type})... ", end="")
        data = load_task_data(bundle, task, max_per_task)
        correct = evaluate_task(scorer, task, prepare_task(task, data, encode))
        accuracy = sum(correct) / len(correct) if correct else float("nan")
        centered = centered_accuracy(accuracy, task.random_baseline)
        results[task.label] = {"accuracy": accuracy, "centered": centered, "correct": correct}
        print0(f"accuracy: {accuracy:.4f} | centered: {centered:.4f} | time: {time.time() - t0:.2f}s")
    core = sum(r["centered"] for r in results.values()) / len(results)
    seconds = time.time() - t_start
    print0(f"CORE: {core:.4f} | {len(tasks)} tasks in {seconds:.2f}s | {scorer.compilations} new compilations")
    return {"core": core, "tasks": results, "compilations": scorer.compilations, "seconds": seconds,
            "stats": dict(scorer.stats)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--download", action="store_true", help="download and unzip the CORE eval bundle")
    parser.add_argument("--url", default=EVAL_BUNDLE_URL, help="where to download the bundle from")
    parser.add_argument("--dest", default=None, help="bundle directory (default: $JAXCHAT_BASE_DIR/eval_bundle)")
    args = parser.parse_args(argv)
    if not args.download:
        parser.error("nothing to do: pass --download (CORE itself runs from python -m jaxchat.base_eval)")
    path = download_bundle(args.url, args.dest)
    print(f"CORE eval bundle ready at {path}: {len(load_tasks(path))} tasks")


if __name__ == "__main__":
    run_main(main)
