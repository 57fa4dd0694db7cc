"""Trajectory viewer: one self-contained HTML page that replays a diffusion decode.

TraceRL trains on the *order* in which a dLLM unmasked its tokens (the per-token decode
step of the rollout record). This page makes that order visible: every response starts
as ``[MASK]`` tokens and a slider (or the play button) reveals them step by step, the
tokens of the current step highlighted, so a reader sees block by block how the model
decoded (left to right within blocks, several tokens per step under dynamic decoding).

The page has no external resources (no CDN): it works offline and as an MLflow artifact.
The orchestrator logs every ``*.html`` file of a stage output to the stage's MLflow run,
so the rollout stage only writes ``trajectory.html`` with :func:`render_trajectories`.

Example:
    >>> html = render_trajectories([Trajectory("t0", "1+1=", ["2", "<eos>"], [1, 1])])
    >>> "<html" in html and '"steps": [1, 1]' in html
    True
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Trajectory:
    """One decoded response: ``tokens[j]`` was unmasked at decode step ``steps[j]``
    (1-based, global over blocks, as in the rollout record's ``decode_steps``)."""

    title: str
    prompt: str
    tokens: Sequence[str]
    steps: Sequence[int]
    reward: float | None = None

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
.traj {{ border: 1px solid #ccc; border-radius: 6px; padding: .6em; margin: .8em 0; }}
.prompt {{ color: #555; white-space: pre-wrap; }}
.tok {{ font-family: monospace; padding: 1px 2px; margin: 1px; display: inline-block;
        border-radius: 3px; white-space: pre; }}
.mask {{ background: #eee; color: #999; }}
.new {{ background: #ffd54f; }}
.done {{ background: #c8e6c9; }}
</style></head><body>
<h2>{title}</h2>
<p>Decode step <input id="s" type="range" min="0" value="0">
<span id="sv">0</span> <button id="play">play</button></p>
<div id="root"></div>
<script>
const data = {data};
const root = document.getElementById("root");
const s = document.getElementById("s"), sv = document.getElementById("sv");
let maxStep = 0;
for (const t of data) for (const x of t.steps) maxStep = Math.max(maxStep, x);
s.max = maxStep;
const views = data.map(t => {{
  const div = document.createElement("div"); div.className = "traj";
  const h = document.createElement("b");
  h.textContent = t.title + (t.reward === null ? "" : "  (reward " + t.reward + ")");
  const p = document.createElement("div"); p.className = "prompt"; p.textContent = t.prompt;
  const toks = t.tokens.map(tok => {{
    const e = document.createElement("span"); e.className = "tok"; div.appendChild(e);
    e.dataset.tok = tok; return e;
  }});
  div.prepend(h, p); root.appendChild(div); return {{t, toks}};
}});
function show(step) {{
  sv.textContent = step;
  for (const v of views) v.toks.forEach((e, j) => {{
    const st = v.t.steps[j];
    if (st > step) {{ e.className = "tok mask"; e.textContent = "[MASK]"; }}
    else {{ e.className = "tok " + (st === step ? "new" : "done"); e.textContent = e.dataset.tok; }}
  }});
}}
s.oninput = () => show(+s.value);
document.getElementById("play").onclick = () => {{
  let k = 0; const id = setInterval(() => {{ s.value = k; show(k); if (++k > maxStep) clearInterval(id); }}, 400);
}};
show(0);
</script></body></html>
"""


def render_trajectories(trajectories: Sequence[Trajectory], title: str = "TraceRL decode trace") -> str:
    """Render trajectories as one self-contained HTML page (see the module docstring)."""
    data = [{"title": t.title, "prompt": t.prompt, "tokens": list(t.tokens),
             "steps": [int(x) for x in t.steps], "reward": t.reward} for t in trajectories]
    # JSON inside <script>: escape "</" so a token cannot close the script element
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    return _PAGE.format(title=html.escape(title), data=payload)


def trajectories_from_ids(tokenizer, records, titles: Sequence[str]) -> list[Trajectory]:
    """Viewer records from sampler trajectories (anything with ``prompt_ids``,
    ``response_ids``, ``decode_steps``, ``response_len``): the response through EOS, one
    decoded string per token id."""
    out = []
    for rec, title in zip(records, titles):
        n = rec.response_len
        out.append(Trajectory(
            title=title,
            prompt=tokenizer.decode(list(rec.prompt_ids), skip_special_tokens=False),
            tokens=[tokenizer.decode([int(t)], skip_special_tokens=False)
                    for t in rec.response_ids[:n]],
            steps=list(rec.decode_steps[:n])))
    return out
