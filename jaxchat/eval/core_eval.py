"""CORE evaluation: DCLM's in-context-learning tasks scored as nanochat does (nanochat/core_eval.py evaluate_task).

Each example becomes one or more token rows (one per choice / context option, or the single LM prompt). The rows of a
task are sorted by length, padded on the right with BOS to a length bucket and packed into fixed-shape batches, so a
whole CORE pass compiles the scoring function once per length bucket. The model is causal, so right padding never
changes a row's losses or predictions. Batches are split over every device of every process (rows sharded over the
mesh the parameters live on); each process builds the same batch schedule, which SPMD requires, and the per-row
results come back replicated to every process. The bundle itself (download, location) is core_bundle.py's job.
"""

import csv
import dataclasses
import functools
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxchat.data.tokenizer import Tokenizer
from jaxchat.eval import core_bundle
from jaxchat.eval.core_bundle import find_bundle
from jaxchat.model import mesh as meshlib
from jaxchat.runtime import faults
from jaxchat.runtime.common import UserError, print0

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


def default_tokens_per_device(platform: str) -> int:
    """Rows x padded length per device per forward pass: bounds the (rows, T, vocab) float32 logits on accelerators.

    CPU "devices" share the host's cores, so there a small batch wastes less time on filler rows. `platform`: the
    model's backend decision (Backend.platform), not jax.default_backend(), which can name another platform than the
    devices the model runs on.
    """
    return 2048 if platform == "cpu" else 16384


# ----------------------------------------------------------------------------------------------------------------
# Tasks: nanochat's scripts/base_eval.py evaluate_model reads core.yaml, eval_meta_data.csv and each task's JSONL.


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

    yaml_path, csv_path = os.path.join(bundle, "core.yaml"), os.path.join(bundle, "eval_meta_data.csv")
    fix = f"restore the bundle with `{core_bundle.restore_command(bundle)}`"
    try:
        with open(yaml_path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        with open(csv_path, encoding="utf-8") as f:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"cannot read the CORE bundle's {os.path.basename(yaml_path)} / eval_meta_data.csv in "
                        f"{bundle} ({type(e).__name__}: {first[:120]}); {fix}") from None
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{yaml_path} lists no tasks (expected a non-empty 'icl_tasks' list); {fix}")
    tasks = []
    for i, entry in enumerate(entries):
        try:
            label = entry["label"]
            if label in [t.label for t in tasks]:  # results are keyed by label: one task would vanish from CORE
                raise UserError(f"{yaml_path}: tasks {[t.label for t in tasks].index(label)} and {i} are both "
                                f"labelled {label!r}; give each task its own label, or {fix}")
            if entry["icl_task_type"] not in TASK_TYPES:
                raise UserError(f"{yaml_path}: task {label} has unknown icl_task_type {entry['icl_task_type']!r}")
            if label not in baselines:
                raise UserError(f"{csv_path} has no 'Random baseline' for task {label}")
            tasks.append(Task(label=label, task_type=entry["icl_task_type"], dataset_uri=entry["dataset_uri"],
                              num_fewshot=int(entry["num_fewshot"][0]),
                              continuation_delimiter=entry.get("continuation_delimiter", " "),
                              random_baseline=baselines[label]))
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise UserError(f"{yaml_path}: task {i} is malformed ({type(e).__name__}: {e}); {fix}") from None
    return tasks


def check_max_per_task(tasks: list[Task], max_per_task: int, flag: str = "max_per_task") -> None:
    """-1 (all) or enough examples per task for its few-shot prompts, which are drawn from the task's other examples
    after the cut (nanochat/core_eval.py evaluate_example's random.sample fails below that: nanochat #550)."""
    if max_per_task == -1:
        return
    worst = max(tasks, key=lambda t: t.num_fewshot)
    need = worst.num_fewshot + 1
    if max_per_task < need:
        reason = ("is not a number of examples" if max_per_task < 1 else
                  f"leaves task {worst.label} too few examples to draw its {worst.num_fewshot}-shot prompts from")
        raise UserError(f"{flag}={max_per_task} {reason}: use {flag}={need} or more, or -1 for all")


def check_bundle(bundle: str, max_per_task: int = -1, flag: str = "max_per_task") -> list[Task]:
    """Every task of the bundle and its data file readable, with enough examples for `max_per_task` (a training run
    checks this at start-up, naming its flag)."""
    tasks = load_tasks(bundle)
    check_max_per_task(tasks, max_per_task, flag)
    for task in tasks:
        load_task_data(bundle, task, max_per_task=1)
    return tasks


def load_task_data(bundle: str, task: Task, max_per_task: int = -1) -> list[dict]:
    """The task's JSONL rows, shuffled with Random(1337) and cut to max_per_task (when > 0); a file with fewer
    examples than its few-shot prompts need is one line."""
    path = os.path.join(bundle, "eval_data", task.dataset_uri)
    try:
        with open(path, encoding="utf-8") as f:
            data = [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"task {task.label}: cannot read {path} ({type(e).__name__}: {str(e)[:100]}); restore the "
                        f"bundle with `{core_bundle.restore_command(bundle)}`") from None
    if len(data) <= task.num_fewshot:  # each example's shots are drawn from the others
        what = "no examples" if not data else f"{len(data)} example(s), too few for {task.num_fewshot}-shot prompts"
        raise UserError(f"task {task.label}: {path} holds {what}; restore the bundle with "
                        f"`{core_bundle.restore_command(bundle)}`")
    random.Random(1337).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


# ----------------------------------------------------------------------------------------------------------------
# Prompts: nanochat/core_eval.py render_prompts_{mc,schema,lm} render Jinja2 templates; these are the same strings
# written out.


def fewshot_indices(idx: int, n: int, k: int) -> list[int]:
    """The few-shot examples of example idx: k distinct others, as nanochat/core_eval.py evaluate_example samples them."""
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


def prepare_task(task: Task, data: list[dict], tokenizer: Tokenizer) -> list[Example]:
    """Render and tokenise (BOS first) every example; spans as nanochat/core_eval.py batch_sequences_{mc,schema,lm}."""
    render = {"multiple_choice": render_prompts_mc, "schema": render_prompts_schema,
              "language_modeling": render_prompts_lm}[task.task_type]
    prompts = [render(item, task.continuation_delimiter,
                      [data[i] for i in fewshot_indices(idx, len(data), task.num_fewshot)])
               for idx, item in enumerate(data)]
    # One batch call per task: tiktoken encodes it in threads. Special-token text in a prompt stays plain text.
    flat = tokenizer.encode([p for ps in prompts for p in ps], prepend_bos=True)
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


# ----------------------------------------------------------------------------------------------------------------
# Scoring rows on the devices: nanochat/core_eval.py forward_model and evaluate_example, batched


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


def _score_rows(graphdef, state, tokens_RT, spans_R2):
    """Per row: mean CE over the span [start, end) of targets and whether greedy predictions match them all."""
    starts_R, ends_R = spans_R2[:, 0], spans_R2[:, 1]
    logits_RTV = nnx.merge(graphdef, state)(tokens_RT)
    targets_RT = jnp.roll(tokens_RT, -1, axis=1)  # forward_model's torch.roll; the wrapped column is never scored
    logz_RT = jax.nn.logsumexp(logits_RTV, axis=-1)
    ce_RT = logz_RT - jnp.take_along_axis(logits_RTV, targets_RT[..., None], axis=-1)[..., 0]
    pred_RT = jnp.argmax(logits_RTV, axis=-1)  # first maximum on ties, like torch
    pos = jnp.arange(tokens_RT.shape[1])[None, :]
    # Position p predicts token p+1, so the span [start, end) is scored at positions start-1 .. end-2. A start of 0
    # (identical schema options) gives evaluate_example an empty slice: count nothing, and the mean is NaN like torch's.
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


def model_on_mesh(model) -> tuple:
    """(graphdef, state on a mesh spanning every device, mesh): the parameters' own mesh if they have one. The
    graphdef's backend names that mesh (Backend.mesh): splash attention runs per device in a shard_map over it."""
    graphdef, state = nnx.split(model)
    leaves = jax.tree.leaves(state)
    sharding = leaves[0].sharding if leaves and isinstance(leaves[0], jax.Array) else None
    if (isinstance(sharding, NamedSharding) and sharding.mesh.devices.size == jax.device_count()
            and sharding.mesh.axis_names == meshlib.DATA_AXES):
        mesh = sharding.mesh  # e.g. the training mesh: GSPMD gathers FSDP shards as needed
    else:
        mesh = meshlib.make_mesh()  # pure data parallel: the model replicated, rows split over every device
        replicated = meshlib.replicated(mesh)
        if jax.process_count() == 1:
            state = jax.device_put(state, replicated)
        else:  # every process holds the same weights: build the global replicated arrays from host copies
            state = jax.tree.map(lambda x: _global_array(np.asarray(x), replicated), state)
    on_mesh = nnx.merge(graphdef, state)  # a copy: the caller's model keeps its backend
    on_mesh.backend = dataclasses.replace(on_mesh.backend, mesh=mesh.abstract_mesh)
    return nnx.split(on_mesh)[0], state, mesh


def _global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds in full."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


class RowScorer:
    """Scores token rows in fixed-shape padded batches on every device; counts the shapes it compiles."""

    def __init__(self, model: nnx.Module, pad_id: int, tokens_per_device: int | None = None):
        self.graphdef, self.state, self.mesh = model_on_mesh(model)
        self.pad_id = pad_id
        self.max_len = 10 * model.config.sequence_len  # the model's rotary cache
        self.n_devices = self.mesh.devices.size
        self.tokens_per_device = tokens_per_device or default_tokens_per_device(model.backend.platform)
        self.row_sharding = meshlib.row_sharding(self.mesh)
        key = (self.graphdef, self.mesh)
        if key not in _SCORERS:
            fn = jax.jit(functools.partial(_score_rows, self.graphdef),
                         out_shardings=meshlib.replicated(self.mesh))  # every process reads all rows
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
            faults.check()  # a signal during training stops CORE here (or while reading back, below)
            length = bucket_length(len(rows[order[i]]), self.max_len)
            n_rows = self.rows_per_batch(length)
            chunk = [r for r in order[i: i + n_rows] if len(rows[r]) <= length]
            i += len(chunk)
            tokens = np.full((n_rows, length), self.pad_id, np.int32)
            spans = np.zeros((n_rows, 2), np.int32)  # filler rows score nothing
            for j, r in enumerate(chunk):
                tokens[j, : len(rows[r])] = rows[r]
                spans[j] = starts[r], ends[r]
            if (n_rows, length) not in self._scorer.shapes:
                self._scorer.shapes.add((n_rows, length))
                self.compilations += 1
            # Dispatch only: the device runs this batch while the host builds the next one; results are read below.
            pending.append((chunk, self._scorer.fn(self.state, self._put(tokens), self._put(spans))))
            self.stats["batches"] += 1
            self.stats["rows"] += len(chunk)
            self.stats["tokens"] += sum(len(rows[r]) for r in chunk)
            self.stats["padded_tokens"] += tokens.size
        for chunk, (mean_b, match_b) in pending:
            faults.check()
            means[chunk], matches[chunk] = np.asarray(mean_b)[: len(chunk)], np.asarray(match_b)[: len(chunk)]
        return means, matches

    def _put(self, host: np.ndarray) -> jax.Array:
        return _global_array(host, self.row_sharding)


# ----------------------------------------------------------------------------------------------------------------
# Tasks and the CORE metric: nanochat/core_eval.py evaluate_task and scripts/base_eval.py evaluate_model


def evaluate_task(scorer: RowScorer, task: Task, examples: list[Example]) -> list[int]:
    """0/1 per example (nanochat/core_eval.py evaluate_example): LM exact greedy match; MC/schema: the first option
    with the lowest mean loss is gold."""
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
            # Python floats and list.index(min(...)): the first minimum wins, and NaNs behave as in evaluate_example.
            losses = [float(m) for m in means[pos: pos + n]]
            correct.append(int(losses.index(min(losses)) == ex.gold))
        pos += n
    return correct


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """Accuracy rescaled so that chance (baseline in percent) is 0 and perfect is 1."""
    return (accuracy - 0.01 * random_baseline) / (1.0 - 0.01 * random_baseline)


def evaluate_core(model: nnx.Module, tokenizer: Tokenizer, bundle_dir: str | None = None, max_per_task: int = 500,
                  tokens_per_device: int | None = None) -> dict:
    """CORE: {"core", "tasks": {label: {"accuracy", "centered", "correct"}}, "compilations", "seconds", "stats"}."""
    bundle = find_bundle(bundle_dir)
    tasks = load_tasks(bundle)
    check_max_per_task(tasks, max_per_task)  # before the first task: not after an hour of the others
    scorer = RowScorer(model, tokenizer.bos_id, tokens_per_device)  # BOS pads, as in stack_sequences
    results, t_start = {}, time.time()
    for task in tasks:
        t0 = time.time()
        print0(f"Evaluating: {task.label} ({task.num_fewshot}-shot, type: {task.task_type})... ", end="")
        data = load_task_data(bundle, task, max_per_task)
        correct = evaluate_task(scorer, task, prepare_task(task, data, tokenizer))
        accuracy = sum(correct) / len(correct) if correct else float("nan")
        centered = centered_accuracy(accuracy, task.random_baseline)
        results[task.label] = {"accuracy": accuracy, "centered": centered, "correct": correct}
        print0(f"accuracy: {accuracy:.4f} | centered: {centered:.4f} | time: {time.time() - t0:.2f}s")
    core = sum(r["centered"] for r in results.values()) / len(results)
    seconds = time.time() - t_start
    print0(f"CORE: {core:.4f} | {len(tasks)} tasks in {seconds:.2f}s | {scorer.compilations} new compilations")
    return {"core": core, "tasks": results, "compilations": scorer.compilations, "seconds": seconds,
            "stats": dict(scorer.stats)}
