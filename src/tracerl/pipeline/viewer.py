"""Trajectory viewer: one self-contained HTML page that replays diffusion decodes.

TraceRL trains on the *order* in which a dLLM unmasked its tokens (the per-token decode
step of the rollout record). This page makes that order visible, together with what the
order earned: a few tasks of an iteration, each with its prompt and gold answer, and every
response of the task with its reward, whether it was correct, its advantage and why it
stopped. The page opens on the finished responses; a slider (or the play button) replays
them from all ``[MASK]`` tokens step by step, the tokens of the current step highlighted,
so a reader sees block by block how the model decoded (left to right within blocks,
several tokens per step under dynamic decoding). A filter shows only the correct or only
the wrong responses; the decoding settings of the records head the page.

The page has no external resources (no CDN): it works offline and as an MLflow artifact.
The orchestrator logs every ``*.html`` file of a stage output to the stage's MLflow run,
so the reward stage (which knows rewards and answers) only writes ``trajectory.html``
with :func:`scored_viewer`.

Example:
    >>> html = render_trajectories([Trajectory("t0", "1+1=", ["2", "<eos>"], [1, 1])])
    >>> "<html" in html and '"steps": [1, 1]' in html
    True
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

VIEWER_TASKS = 4  # tasks shown per page (all their responses)


@dataclass(frozen=True)
class Trajectory:
    """One decoded response: ``tokens[j]`` was unmasked at decode step ``steps[j]``
    (1-based, global over blocks, as in the rollout record's ``decode_steps``).
    ``task`` groups the responses of one task (shown under its ``prompt`` and gold
    ``answer``); ``reward``, ``correct``, ``advantage`` and ``finish`` say what it earned."""

    title: str
    prompt: str
    tokens: Sequence[str]
    steps: Sequence[int]
    reward: float | None = None
    correct: bool | None = None
    answer: str | None = None
    task: str = ""
    advantage: float | None = None
    finish: str = ""

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.steps):
            raise ValueError(
                f"trajectory {self.title!r}: {len(self.tokens)} tokens but "
                f"{len(self.steps)} decode steps; they must align one to one"
            )


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 70em; }}
.task {{ border: 1px solid #bbb; border-radius: 6px; padding: .6em; margin: 1em 0; }}
.traj {{ border-top: 1px dashed #ccc; padding: .4em 0; }}
.prompt {{ color: #444; white-space: pre-wrap; font-family: monospace; }}
.gold {{ font-weight: bold; }}
.ok {{ color: #1b5e20; }} .bad {{ color: #b71c1c; }}
.settings {{ color: #555; font-size: 90%; }}
.tok {{ font-family: monospace; padding: 1px 2px; margin: 1px; display: inline-block;
        border-radius: 3px; white-space: pre; }}
.mask {{ background: #eee; color: #999; }}
.new {{ background: #ffd54f; }}
.done {{ background: #c8e6c9; }}
</style></head><body>
<h2>{title}</h2>
<p class="settings">decoding: {settings}</p>
<p>Decode step <input id="s" type="range" min="0" value="0">
<span id="sv">0</span> <button id="play">play</button>
&nbsp; show <select id="filter"><option value="all">all responses</option>
<option value="correct">correct only</option><option value="wrong">wrong only</option></select></p>
<div id="root"></div>
<script>
const data = {data};
const root = document.getElementById("root");
const s = document.getElementById("s"), sv = document.getElementById("sv");
let maxStep = 0;
for (const t of data) for (const x of t.steps) maxStep = Math.max(maxStep, x);
s.max = maxStep;
const boxes = {{}};
const views = data.map(t => {{
  const key = t.task || t.title;
  let box = boxes[key];
  if (!box) {{
    box = document.createElement("div"); box.className = "task"; boxes[key] = box;
    const p = document.createElement("div"); p.className = "prompt"; p.textContent = t.prompt;
    box.appendChild(p);
    if (t.answer !== null) {{
      const g = document.createElement("div"); g.className = "gold";
      g.textContent = "gold answer: " + t.answer; box.appendChild(g);
    }}
    root.appendChild(box);
  }}
  const div = document.createElement("div"); div.className = "traj";
  const h = document.createElement("b");
  let head = t.title;
  if (t.correct !== null) {{ head += t.correct ? "  \u2713 correct" : "  \u2717 wrong";
    h.className = t.correct ? "ok" : "bad"; }}
  if (t.reward !== null) head += "  reward " + t.reward;
  if (t.advantage !== null) head += "  advantage " + t.advantage.toFixed(2);
  if (t.finish) head += "  (" + t.finish + ")";
  h.textContent = head; div.appendChild(h); div.appendChild(document.createElement("br"));
  const toks = t.tokens.map(tok => {{
    const e = document.createElement("span"); e.className = "tok"; div.appendChild(e);
    e.dataset.tok = tok; return e;
  }});
  box.appendChild(div); return {{t, toks, div}};
}});
function show(step) {{
  sv.textContent = step;
  for (const v of views) v.toks.forEach((e, j) => {{
    const st = v.t.steps[j];
    if (st > step) {{ e.className = "tok mask"; e.textContent = "[MASK]"; }}
    else {{ e.className = "tok " + (st === step ? "new" : "done"); e.textContent = e.dataset.tok; }}
  }});
}}
document.getElementById("filter").onchange = ev => {{
  const f = ev.target.value;
  for (const v of views) v.div.style.display = (f === "all" || v.t.correct === null ||
      (f === "correct") === v.t.correct) ? "" : "none";
}};
s.oninput = () => show(+s.value);
document.getElementById("play").onclick = () => {{
  let k = 0; const id = setInterval(() => {{ s.value = k; show(k); if (++k > maxStep) clearInterval(id); }}, 400);
}};
s.value = maxStep; show(maxStep);  // the finished responses; play replays from step 0
</script></body></html>
"""


def render_trajectories(trajectories: Sequence[Trajectory], title: str = "TraceRL decode trace",
                        settings: Mapping[str, Any] | None = None) -> str:
    """Render trajectories as one self-contained HTML page (see the module docstring);
    ``settings``: the decoding settings shown at the top."""
    data = [{**asdict(t), "tokens": list(t.tokens), "steps": [int(x) for x in t.steps]}
            for t in trajectories]
    # JSON inside <script>: escape "</" so a token cannot close the script element
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    shown = ", ".join(f"{k} {v}" for k, v in (settings or {}).items()) or "not recorded"
    return _PAGE.format(title=html.escape(title), data=payload, settings=html.escape(shown))


def trajectories_from_ids(tokenizer, records, titles: Sequence[str]) -> list[Trajectory]:
    """Viewer records from sampler trajectories (anything with ``prompt_ids``,
    ``response_ids``, ``decode_steps``, ``response_len``): the response through EOS, one
    decoded string per token id."""
    return [_trajectory(tokenizer, rec, title) for rec, title in zip(records, titles)]


def _trajectory(tokenizer, rec, title: str, **extra) -> Trajectory:
    get = (lambda k: rec[k]) if isinstance(rec, Mapping) else (lambda k: getattr(rec, k))
    n = int(get("response_len"))
    return Trajectory(
        title=title,
        prompt=tokenizer.decode(list(get("prompt_ids")), skip_special_tokens=False),
        tokens=[tokenizer.decode([int(t)], skip_special_tokens=False)
                for t in list(get("response_ids"))[:n]],
        steps=list(get("decode_steps"))[:n], **extra)


def pick_tasks(correct_by_task: Mapping[str, Sequence[bool]], n: int = VIEWER_TASKS) -> list[str]:
    """Up to ``n`` task ids worth showing, in turn from the tasks whose responses are
    partly right (the ones TraceRL learns from), all wrong, and all right.

    >>> pick_tasks({"a": [True, True], "b": [True, False], "c": [False], "d": [True, False]}, 3)
    ['b', 'c', 'a']
    """
    kinds: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for task, flags in correct_by_task.items():
        kinds[0 if 0 < sum(flags) < len(flags) else (1 if not any(flags) else 2)].append(task)
    out: list[str] = []
    while len(out) < n and any(kinds.values()):
        for k in (0, 1, 2):
            if kinds[k] and len(out) < n:
                out.append(kinds[k].pop(0))
    return out


def scored_viewer(scored, answers: Mapping[str, str | None], tokenizer, title: str,
                  n_tasks: int = VIEWER_TASKS) -> str:
    """The page of one iteration from its scored records (a SCORED polars frame):
    :func:`pick_tasks` of its tasks, every response of each with reward and correctness,
    the gold ``answers`` by task id, the records' decoding settings on top."""
    from tracerl.schemas import DECODING

    rows = scored.to_dicts()
    flags: dict[str, list[bool]] = {}
    for r in rows:
        flags.setdefault(r["task_id"], []).append(bool(r["correct"]))
    chosen = pick_tasks(flags, n_tasks)
    shown = sorted((r for r in rows if r["task_id"] in chosen),
                   key=lambda r: (chosen.index(r["task_id"]), r["sample_index"]))
    trajs = [_trajectory(tokenizer, r, f"#{r['sample_index']}", task=r["task_id"],
                         reward=None if r["reward"] is None else round(float(r["reward"]), 4),
                         correct=r["correct"], answer=answers.get(r["task_id"]),
                         advantage=r["advantage"], finish=r["finish_reason"])
             for r in shown]
    settings = {k: rows[0][k] for k in DECODING} if rows else {}
    head = f"{title}: {len(chosen)} of {len(flags)} tasks, all their responses"
    return render_trajectories(trajs, title=head, settings=settings)
