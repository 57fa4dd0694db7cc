"""The prepare stage's computation: task sources -> RL pool, held-out set, SFT examples,
with bad records skipped and counted by task id.

Sources: a procedural generator (``arithmetic``, ``rg:<name>``: ``n`` tasks per split
over the difficulty levels) or local task files (``file``: every readable row, at most
``n`` per split by a seeded sample kept in file order; SFT examples from the train
file's tasks that have an answer). Records that cannot be used are skipped into a
:class:`~tracerl.data.skips.Skipped` log: unreadable or invalid rows, train prompts that
are also held out. The outputs depend on the data and the seed only.

Prompts that do not fit the model's context with the run's generation budget (``fits``)
are kept in the outputs (the rollout and evaluate stages skip and count them against the
budget in force then), but counted here too: past ``max_skip_fraction`` of the records
considered, skipped now or later, it fails before any training.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tracerl.data.records import TaskRecord, validate_tasks
from tracerl.data.skips import REASONS, RECORD_REASONS, SkipError, Skipped
from tracerl.data.sources import generate_tasks, load_local_tasks


@dataclass
class PreparedTasks:
    train: list[TaskRecord]
    heldout: list[TaskRecord]
    sft: list[TaskRecord]
    sft_styles: list[str]  # per SFT example: the solution style, or "answer"
    skipped: Skipped = field(default_factory=Skipped)  # left out of the outputs
    too_long: list[str] = field(default_factory=list)  # kept; skipped by rollout/evaluate


def prepare_tasks(generator: str, *, train_size: int, heldout_size: int, sft_size: int,
                  levels: Sequence[int], seed: int, sft_style: str,
                  sft_answer_fraction: float, max_skip_fraction: float,
                  train_file: str = "", heldout_file: str = "",
                  fits: Callable[[str], bool] | None = None) -> PreparedTasks:
    """Build the three task sets (see the module docstring).

    Raises:
        SkipError: more than ``max_skip_fraction`` of the records were skipped, or no
            usable task is left in a set (the message names the files and task ids).
        TaskError: generated tasks are invalid, or a file repeats a task id.
        ValueError: a task file is empty (naming it).
    """
    log = Skipped(reasons=RECORD_REASONS)
    if generator == "file":
        train = _read(train_file, "train", train_size, seed, log)
        heldout = _read(heldout_file, "heldout", heldout_size, seed, log)
        held_prompts = {t.prompt for t in heldout}
        kept = []
        for t in train:
            if t.prompt in held_prompts:
                log.add("in_heldout", t.task_id, train_file, "the prompt is also held out")
            else:
                kept.append(t)
        train = kept
        sft_pool = [t for t in train if t.answer is not None and t.answer.strip()]
        sft = _sample(sft_pool, sft_size, f"prepare|{seed}|sft")
        sources = f"{train_file}, {heldout_file}"
    else:
        levels = list(levels)
        train = generate_tasks(generator, train_size, difficulty=levels, seed=seed,
                               split="train")
        heldout = generate_tasks(generator, heldout_size, difficulty=levels, seed=seed,
                                 split="heldout")
        sft = generate_tasks(generator, sft_size, difficulty=levels, seed=seed + 1,
                             split="train")
        for tasks in (train + heldout, sft):  # SFT and the RL pool may share train problems
            validate_tasks(tasks)
        log.considered += len(train) + len(heldout) + len(sft)
        sources = f"generator {generator}"
    # what the later stages will skip: checked now, together with what was skipped here
    later = Skipped(REASONS, log.considered, list(log.entries))
    if fits is not None:
        seen: set[str] = set()
        for t in train + heldout + sft:
            if t.task_id not in seen and not fits(t.prompt):
                where = (train_file if t.split == "train" else heldout_file) or generator
                later.add("too_long", t.task_id, where,
                          "the prompt and the generation budget exceed the model's context")
            seen.add(t.task_id)
    later.check(max_skip_fraction, f"prepare ({sources})")
    for name, tasks in (("train", train), ("held-out", heldout), ("SFT", sft)):
        if not tasks:
            raise SkipError(f"prepare ({sources}): no usable {name} task left")
    pick = random.Random(f"sft-style|{seed}")
    # code tasks have one target, the reference program ("program")
    styles = ["program" if t.source == "code" else
              "answer" if pick.random() < sft_answer_fraction else sft_style for t in sft]
    return PreparedTasks(train, heldout, sft, styles, log, later.ids("too_long"))


def _read(path: str, split: str, n: int, seed: int, log: Skipped) -> list[TaskRecord]:
    tasks, _ = load_local_tasks(path, skip_invalid=True, skipped=log)
    tasks = [dataclasses.replace(t, split=split) for t in tasks]
    return _sample(tasks, n, f"prepare|{seed}|{split}")


def _sample(tasks: list[TaskRecord], n: int, key: str) -> list[TaskRecord]:
    """At most ``n`` tasks, a seeded sample kept in the original order."""
    if len(tasks) <= n:
        return tasks
    return [tasks[i] for i in sorted(random.Random(key).sample(range(len(tasks)), n))]
