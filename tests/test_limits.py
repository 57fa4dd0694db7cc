"""What fits before any work: the embedded default's prompt length without its tokenizer,
the sampler's canvas, the budgets of a run."""

from __future__ import annotations

import pytest

from tracerl.data import generate_tasks, render_prompt
from tracerl.data.arithmetic import LEVELS, longest_prompt
from tracerl.limits import (
    DEFAULT_CHAT_OVERHEAD,
    canvas_length,
    default_prompt_tokens,
    init_kind,
    run_budgets,
    too_long,
)


def test_default_prompt_length_matches_the_real_tokenizer(default_tokenizer):
    assert DEFAULT_CHAT_OVERHEAD == 19
    texts = ["", "What is 1+1?", "naïve ünïcode ✓", "a\nb", "What is 20+20-20?"]
    texts += [t.prompt for t in generate_tasks("arithmetic", 60, list(LEVELS), seed=1)]
    for text in texts:
        assert default_prompt_tokens(text) == len(render_prompt(default_tokenizer, text)), text


def test_longest_arithmetic_prompt_bounds_what_the_generator_writes():
    for levels in ([0], [1], [0, 1, 2, 3], list(LEVELS)):
        longest = max(len(t.prompt) for t in generate_tasks("arithmetic", 400, levels, seed=2))
        assert len(longest_prompt(levels)) == longest  # reached (400 draws) and never exceeded
    assert longest_prompt([0, 3]) == "What is 99-99?"


def test_canvas_agrees_with_the_sampler(tiny_sdar):
    from tracerl.sampling import SamplingConfig, check_prompts

    model, _ = tiny_sdar
    context = model.config.max_position_embeddings
    cfg = SamplingConfig(block_size=4, steps_per_block=4, max_tokens=32)
    fits = [n for n in range(1, context) if canvas_length(n, 4, 32) <= context]
    check_prompts(model, [[5] * max(fits)], cfg)  # the longest that fits decodes
    with pytest.raises(ValueError, match="positions > the model's context"):
        check_prompts(model, [[5] * (max(fits) + 1)], cfg)
    assert too_long([max(fits), max(fits) + 1], context, [(4, 32)]) == [1]
    assert too_long([10 ** 6], None, [(4, 32)]) == []  # unknown context: nothing to say


def test_run_budgets_follow_the_schedules():
    assert run_budgets(4, 40) == [(4, 40)]
    assert run_budgets(4, 40, [[3, 8]], [[3, 48], [6, 64]]) == [(4, 40), (8, 48), (8, 64)]


def test_init_kind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert init_kind("tiny") == "tiny" and init_kind("org/name") == "hub"
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert init_kind("org/name") == "path"  # on disk: a local folder wins
    assert init_kind("./org") == init_kind("ckpt") == init_kind("/abs/x") == "path"


def test_prompt_fit_measures_a_checkpoint_with_its_own_tokenizer_and_context(
        tmp_path, default_tokenizer):
    from tracerl.limits import prompt_fit
    from tracerl.models import build_for_tokenizer, save_model

    model = build_for_tokenizer(default_tokenizer, "sdar", max_position_embeddings=64)
    save_model(model, default_tokenizer, tmp_path / "stage" / "checkpoint")
    # the checkpoint's context (64), not model.max_position_embeddings (999), decides;
    # a stage folder holding checkpoint/ is accepted like the pipeline's policy inputs
    fits = prompt_fit(str(tmp_path / "stage"), 999, [(4, 32)])
    longest = "x" * (32 - DEFAULT_CHAT_OVERHEAD)  # 32 ids: 32 + 32 = 64 positions
    assert fits(longest) and not fits(longest + "xxxx")
    tiny = prompt_fit("tiny", 64, [(4, 32)])
    assert tiny(longest) and not tiny(longest + "xxxx")
    assert prompt_fit("org/name", 64, [(4, 32)]) is None  # a hub id: known only once loaded
