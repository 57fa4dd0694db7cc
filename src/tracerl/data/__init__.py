"""Task sources (generators, packaged problems, HF datasets, local files), the typed task
record, prompt rendering to token ids and reference solutions."""

from tracerl.data.arithmetic import split_of as arithmetic_split_of
from tracerl.data.prompts import reference_solution, render_prompt
from tracerl.data.records import (
    TaskError,
    TaskRecord,
    tasks_from_frame,
    tasks_to_frame,
    validate_tasks,
)
from tracerl.data.sources import (
    GENERATORS,
    HF_DATASETS,
    generate_tasks,
    humaneval_tasks,
    load_hf_tasks,
    load_local_tasks,
    load_tasks,
    source_names,
)

__all__ = [
    "GENERATORS", "HF_DATASETS", "TaskError", "TaskRecord", "arithmetic_split_of", "generate_tasks",
    "humaneval_tasks", "load_hf_tasks", "load_local_tasks", "load_tasks",
    "reference_solution", "render_prompt", "source_names", "tasks_from_frame",
    "tasks_to_frame", "validate_tasks",
]
