"""Trajectory viewer page: self-contained, data aligned, safe against odd tokens."""

from __future__ import annotations

import json
import re

import pytest

from tracerl.pipeline.viewer import Trajectory, render_trajectories


def test_page_embeds_steps_and_tokens():
    t = Trajectory("t0#1", "12+30=", ["4", "2", "<eos>", "x"], [2, 1, 3, 3], reward=1.0)
    page = render_trajectories([t], title="iter 0")
    assert page.startswith("<!doctype html>") and "<title>iter 0</title>" in page
    data = json.loads(re.search(r"const data = (.*);\n", page).group(1))
    assert data == [{"title": "t0#1", "prompt": "12+30=", "tokens": ["4", "2", "<eos>", "x"],
                     "steps": [2, 1, 3, 3], "reward": 1.0, "correct": None, "answer": None,
                     "task": "", "advantage": None, "finish": ""}]
    assert "http://" not in page and "https://" not in page  # offline, no CDN


def test_script_cannot_be_closed_by_a_token():
    page = render_trajectories([Trajectory("a", "p", ["</script><b>"], [1])])
    assert page.count("</script>") == 1


def test_misaligned_trajectory_is_refused():
    with pytest.raises(ValueError, match="2 tokens but 1 decode steps"):
        Trajectory("a", "p", ["x", "y"], [1])
