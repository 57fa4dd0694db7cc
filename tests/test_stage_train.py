"""Stage smoke tests: sft -> (rollout + reward records) -> value -> policy, on the tiny model,
asserting each stage's output contract (files, metrics, resumed trainer state)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml

from tracerl.models import load_model, weights_digest
from tracerl.pipeline.artifacts import is_complete, read_metrics
from tracerl.rl import read_token_advantages
from tracerl.schemas import write_parquet

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
            max_position_embeddings=128)


def _params(tmp: Path, **sections) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"].update(TINY)
    raw["sft"].update(steps=3, batch_size=4, warmup_steps=1)
    raw["policy"].update(micro_batch=4, lr=1e-3)
    raw["value"].update(micro_batch=4)
    for k, v in sections.items():
        raw[k].update(v)
    p = tmp / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _sft_data(tmp: Path) -> Path:
    from tracerl.models import build_default_tokenizer

    tok = build_default_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"{a}+{a}="}],
                                       add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for a in range(6)]
    resp = [tok.encode(f"{2 * a}") + [tok.eos_token_id] for a in range(6)]
    d = tmp / "prepare"
    d.mkdir()
    pl.DataFrame({"prompt_ids": prompts, "response_ids": resp}).write_parquet(d / "sft.parquet")
    return d


def _scored(tmp: Path, ckpt: Path, block_size: int = 4, policy_id: str | None = None,
            name: str = "reward") -> Path:
    sampling = pytest.importorskip("tracerl.sampling")
    model, tok = load_model(ckpt)
    cfg = sampling.SamplingConfig(block_size=block_size, steps_per_block=4, max_tokens=8,
                                  strategy="low_confidence_static", batch_size=8)
    prompts = [list(range(10, 10 + n)) for n in (5, 5, 6, 6)]
    trajs = sampling.generate(model, prompts, cfg, generator=torch.Generator().manual_seed(0))
    df = sampling.trajectories_to_frame(trajs, ["a", "a", "b", "b"], [0, 1, 0, 1],
                                        policy_id or weights_digest(model), tok)
    df = df.with_columns(correct=pl.Series([True, False, False, True]),
                         reward=pl.Series([1.0, 0.0, 0.0, 1.0]),
                         advantage=pl.Series([1.0, -1.0, -1.0, 1.0]),
                         kept=pl.Series([True, True, True, True]))
    out = tmp / name
    out.mkdir()
    write_parquet(df, out / "scored.parquet", "scored")
    return out


def test_sft_value_policy_stages(tmp_path):
    from stages import policy as policy_stage
    from stages import sft as sft_stage
    from stages import value as value_stage

    params = _params(tmp_path, policy={"use_value": True})
    # SFT through the flow's --input convention
    assert sft_stage.main(["--params", str(params), "--input", f"data={_sft_data(tmp_path)}",
                           "--out", str(tmp_path / "sft")]) == 0
    sft = tmp_path / "sft"
    assert is_complete(sft) and (sft / "checkpoint" / "config.json").is_file()
    m = read_metrics(sft)
    assert m["steps"] == 3.0 and m["tokens"] > 0 and "nll" in m
    scored = _scored(tmp_path, sft / "checkpoint")

    assert value_stage.main(["--params", str(params), "--value", "none", "--policy", str(sft),
                             "--scored", str(scored), "--out", str(tmp_path / "v0"),
                             "--iteration", "0"]) == 0
    adv = read_token_advantages(tmp_path / "v0" / "advantages.parquet")
    assert set(adv) == {("a", 0), ("a", 1), ("b", 0), ("b", 1)}
    vm = read_metrics(tmp_path / "v0")
    assert vm["trained"] == 1.0 and "value_loss" in vm and "explained_var" in vm

    argv = ["--params", str(params), "--policy", str(sft), "--scored", str(scored),
            "--value-advantages", str(tmp_path / "v0"), "--out", str(tmp_path / "p0")]
    assert policy_stage.main(argv) == 0
    pm = read_metrics(tmp_path / "p0")
    # the SFT optimizer state is not a policy trainer's: not resumed
    assert pm["resumed"] == 0.0 and pm["old_logprobs_recorded"] == 1.0
    for k in ("loss", "policy_loss", "kl", "clip_fraction", "ratio_mean", "ratio_max", "grad_norm",
              "entropy", "tokens_per_s"):
        assert k in pm, k
    # iteration 1 resumes the optimizer of iteration 0 (the flow's --input form)
    assert policy_stage.main(["--params", str(params), "--input", f"policy={tmp_path / 'p0'}",
                              "--input", f"scored={scored}", "--input", f"value={tmp_path / 'v0'}",
                              "--out", str(tmp_path / "p1"), "--iteration", "1"]) == 0
    p1 = read_metrics(tmp_path / "p1")
    assert p1["resumed"] == 1.0 and p1["trainer/optimizer_steps"] == 2 * pm["trainer/optimizer_steps"]
    assert p1["old_logprobs_recorded"] == 0.0  # weights changed since the rollout
    manifest = json.loads((tmp_path / "p1" / "manifest.json").read_text())
    assert "checkpoint/model.safetensors" in manifest["files"]
    # the value stage resumes its own checkpoint and state
    assert value_stage.main(["--params", str(params), "--input", f"value={tmp_path / 'v0'}",
                             "--input", f"policy={tmp_path / 'p0'}", "--input", f"scored={scored}",
                             "--out", str(tmp_path / "v1"), "--iteration", "1"]) == 0
    assert read_metrics(tmp_path / "v1")["resumed"] == 1.0


def test_policy_stage_empty_batch_and_bad_input(tmp_path):
    from stages import policy as policy_stage
    from stages import sft as sft_stage

    params = _params(tmp_path, sft={"steps": 1})
    sft_stage.main(["--params", str(params), "--data", str(_sft_data(tmp_path) / "sft.parquet"),
                    "--out", str(tmp_path / "sft")])
    scored = _scored(tmp_path, tmp_path / "sft" / "checkpoint")
    df = pl.read_parquet(scored / "scored.parquet").with_columns(kept=pl.lit(False))
    write_parquet(df, tmp_path / "empty.parquet", "scored")
    assert policy_stage.main(["--params", str(params), "--policy", str(tmp_path / "sft"),
                              "--scored", str(tmp_path / "empty.parquet"),
                              "--out", str(tmp_path / "p")]) == 0
    m = read_metrics(tmp_path / "p")
    assert m["empty_batch"] == 1.0 and m["samples/filtered"] == 4.0
    assert (weights_digest(load_model(tmp_path / "p" / "checkpoint")[0])
            == weights_digest(load_model(tmp_path / "sft" / "checkpoint")[0]))
    # a step map that does not fit its response: a clear error naming the sample
    bad = pl.read_parquet(scored / "scored.parquet").with_columns(
        decode_steps=pl.col("decode_steps").list.head(3))
    write_parquet(bad, tmp_path / "bad.parquet", "scored")
    with pytest.raises(ValueError, match="a/0.*decode_steps has 3 entries"):
        policy_stage.main(["--params", str(params), "--policy", str(tmp_path / "sft"),
                           "--scored", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "q")])
    assert not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="use_value"):
        policy_stage.main(["--params", str(_params(tmp_path, policy={"use_value": True})),
                           "--policy", str(tmp_path / "sft"), "--scored", str(scored),
                           "--out", str(tmp_path / "r")])


def test_stages_train_at_the_records_block_size(tmp_path):
    """Rollouts decoded at block 8 (a curriculum schedule) from a model built at block 4:
    the value and policy stages build rows at block 8, with no params change, and a mix of
    block sizes is refused."""
    from stages import policy as policy_stage
    from stages import sft as sft_stage
    from stages import value as value_stage

    from tracerl.rl import TrajectoryError, read_scored, trajectory_logprobs

    params = _params(tmp_path, sft={"steps": 1}, model={"block_size": 4})
    sft_stage.main(["--params", str(params), "--data", str(_sft_data(tmp_path) / "sft.parquet"),
                    "--out", str(tmp_path / "sft")])
    model, _ = load_model(tmp_path / "sft")
    assert model.block_size == 4
    # policy_id of other weights: the policy stage recomputes the old log-probs
    scored8 = _scored(tmp_path, tmp_path / "sft" / "checkpoint", block_size=8,
                      policy_id="other-weights", name="r8")
    samples, _, _ = read_scored(scored8 / "scored.parquet")
    assert {(s.attention, s.block_size) for s in samples} == {("block", 8)}
    # the library: log-probs at the records' block size are the sampler's; the same
    # trajectories read at the model's block size are not (so the check below can fail)
    recorded = [torch.tensor(list(s.logprobs[: s.response_len])) for s in samples]
    for lp, want in zip(trajectory_logprobs(model, samples), recorded):
        assert (lp - want).abs().max() < 1e-4
    as4 = [dataclasses.replace(s, block_size=4) for s in samples]
    assert max((lp - want).abs().max() for lp, want in
               zip(trajectory_logprobs(model, as4), recorded)) > 1e-3

    assert value_stage.main(["--params", str(params), "--value", "none", "--policy",
                             str(tmp_path / "sft"), "--scored", str(scored8),
                             "--out", str(tmp_path / "v")]) == 0
    assert read_metrics(tmp_path / "v")["rows/block_size"] == 8.0
    assert policy_stage.main(["--params", str(params), "--policy", str(tmp_path / "sft"),
                              "--scored", str(scored8), "--out", str(tmp_path / "p")]) == 0
    pm = read_metrics(tmp_path / "p")
    assert pm["rows/block_size"] == 8.0 and pm["old_logprobs_recorded"] == 0.0
    assert pm["old_logprob_drift_max"] < 1e-4  # recomputed at block 8 == the sampler's
    assert load_model(tmp_path / "p")[0].block_size == 4  # the model itself is unchanged

    # one update over records of two block sizes: refused, naming both sizes
    scored4 = _scored(tmp_path, tmp_path / "sft" / "checkpoint", block_size=4, name="r4")
    mixed = pl.concat([pl.read_parquet(scored4 / "scored.parquet"),
                       pl.read_parquet(scored8 / "scored.parquet")])
    write_parquet(mixed, tmp_path / "mixed.parquet", "scored")
    with pytest.raises(TrajectoryError, match=r"different block sizes \(block_size 4: 4 "
                                              r"samples.*block_size 8: 4 samples"):
        policy_stage.main(["--params", str(params), "--policy", str(tmp_path / "sft"),
                           "--scored", str(tmp_path / "mixed.parquet"),
                           "--out", str(tmp_path / "pm")])
    # full-attention records given to a block model: refused, saying what to do
    full = pl.read_parquet(scored4 / "scored.parquet").with_columns(attention=pl.lit("full"))
    write_parquet(full, tmp_path / "full.parquet", "scored")
    with pytest.raises(TrajectoryError, match="decoded with full attention but model family "
                                              "'sdar' uses block attention"):
        policy_stage.main(["--params", str(params), "--policy", str(tmp_path / "sft"),
                           "--scored", str(tmp_path / "full.parquet"),
                           "--out", str(tmp_path / "pf")])


def test_policy_stage_trains_at_the_records_training_block(tmp_path):
    """Block-size adaptation: rollouts decoded at block 4 whose record names a training
    block of 8 (curriculum.train_block_size_schedule) are trained at block 8, with no
    params change; the sampler's log-probs (block-4 contexts) are not reused as the old
    log-probs even though the same weights sampled them."""
    from stages import policy as policy_stage
    from stages import sft as sft_stage

    params = _params(tmp_path, sft={"steps": 1}, model={"block_size": 4})
    sft_stage.main(["--params", str(params), "--data", str(_sft_data(tmp_path) / "sft.parquet"),
                    "--out", str(tmp_path / "sft")])
    scored = _scored(tmp_path, tmp_path / "sft" / "checkpoint", block_size=4)
    df = pl.read_parquet(scored / "scored.parquet").with_columns(
        train_block_size=pl.lit(8, dtype=pl.Int32))
    write_parquet(df, tmp_path / "train8.parquet", "scored")
    assert policy_stage.main(["--params", str(params), "--policy", str(tmp_path / "sft"),
                              "--scored", str(tmp_path / "train8.parquet"),
                              "--out", str(tmp_path / "p8")]) == 0
    m8 = read_metrics(tmp_path / "p8")
    assert m8["rows/block_size"] == 8.0 and m8["old_logprobs_recorded"] == 0.0
    # the old log-probs at block 8 differ from the sampler's at block 4 (contexts differ)
    assert m8["old_logprob_drift_max"] > 1e-3
    assert policy_stage.main(["--params", str(params), "--policy", str(tmp_path / "sft"),
                              "--scored", str(scored), "--out", str(tmp_path / "p4")]) == 0
    m4 = read_metrics(tmp_path / "p4")
    assert m4["rows/block_size"] == 4.0 and m4["old_logprobs_recorded"] == 1.0
    # records sampled with an approximate cache (rollout.full_cache: prefix): the trainer
    # never takes their log-probs as the old ones
    approx = pl.read_parquet(scored / "scored.parquet").with_columns(
        full_cache=pl.lit("prefix"))
    write_parquet(approx, tmp_path / "approx.parquet", "scored")
    assert policy_stage.main(["--params", str(params), "--policy", str(tmp_path / "sft"),
                              "--scored", str(tmp_path / "approx.parquet"),
                              "--out", str(tmp_path / "pa")]) == 0
    assert read_metrics(tmp_path / "pa")["old_logprobs_recorded"] == 0.0


_NO_PEFT = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                              reason="peft (a pinned dependency) is not installed")


@pytest.mark.parametrize("lora", [None, pytest.param(
    {"rank": 4, "alpha": 8.0, "dropout": 0.1}, marks=_NO_PEFT, id="lora")])
def test_sft_killed_mid_run_resumes_to_the_same_model(tmp_path, monkeypatch, lora):
    """SFT checkpoints every 2 steps (weights, optimizer, schedule, RNG, data order); a
    crash at step 5 of 7 resumes at step 4, and the final weights and trainer state equal
    an uninterrupted run's, bit for bit. Also with LoRA adapters (dropout draws from the
    torch RNG the checkpoint saves)."""
    from stages import sft as sft_stage

    from tracerl.rl import Trainer

    params = _params(tmp_path, sft={"steps": 7, "checkpoint_every": 2, "batch_size": 2,
                                    **({"lora": lora} if lora else {})})
    data = _sft_data(tmp_path)

    def run(out: str) -> Path:
        assert sft_stage.main(["--params", str(params), "--input", f"data={data}",
                               "--out", str(tmp_path / out)]) == 0
        return tmp_path / out

    clean = run("clean")
    real_step, calls = Trainer.step, []

    def crashing_step(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("killed at step 5")
        return real_step(self, *a, **k)

    monkeypatch.setattr(Trainer, "step", crashing_step)
    with pytest.raises(RuntimeError, match="killed at step 5"):
        run("resumed")
    resume = tmp_path / ".resumed.resume"
    assert json.loads((resume / "latest.json").read_text())["step"] == 4
    calls.clear()
    monkeypatch.setattr(Trainer, "step", lambda self, *a, **k: calls.append(1) or
                        real_step(self, *a, **k))
    resumed = run("resumed")
    assert 0 < len(calls) <= 3  # what is left after step 4 only
    assert not resume.exists()  # cleared once the output is written
    assert weights_digest(load_model(resumed / "checkpoint")[0]) == \
        weights_digest(load_model(clean / "checkpoint")[0])
    a = torch.load(clean / "trainer_state" / "trainer_state.pt", weights_only=False)
    b = torch.load(resumed / "trainer_state" / "trainer_state.pt", weights_only=False)
    assert a["counters"] == b["counters"]
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert read_metrics(resumed)["steps"] == read_metrics(clean)["steps"]
    if lora:  # only the adapters trained; the merged weights moved off the initial model
        m = read_metrics(clean)
        assert 0 < m["params/trainable"] < m["params/total"]
        assert (clean / "adapter" / "adapter_config.json").is_file()
        assert len(a["optimizer"]["state"]) == 2 * 2 * 7  # A and B of 7 targets, 2 layers


def _greedy_accuracy(model, tok, prep: Path, *, tasks: int, block: int, tokens: int) -> float:
    """Greedy static accuracy of ``model`` on the first ``tasks`` tasks of the prepare
    folder's RL pool, scored independently of the SFT stage's validator."""
    from tracerl.data.records import tasks_from_frame
    from tracerl.evaluation import evaluate_tasks
    from tracerl.rewards.scoring import score_rollouts
    from tracerl.sampling import SamplingConfig
    from tracerl.schemas import read_parquet

    pool = tasks_from_frame(read_parquet(prep / "train.parquet", "task").head(tasks))
    by_id = {t.task_id: t for t in pool}
    res, scored = evaluate_tasks(
        model, tok, pool, SamplingConfig(block_size=block, steps_per_block=block,
                                         max_tokens=tokens, temperature=0.0),
        k=1, pass_ks=[1], score=lambda f: score_rollouts(f, by_id, group_filter="none")[0])
    assert scored.height == tasks
    return res["accuracy"]


def test_sft_validates_on_the_rl_pool_and_records_it(tmp_path):
    from stages import prepare
    from stages import sft as sft_stage

    from tracerl.config import ConfigError, load_params

    params = _params(tmp_path, data={"train_size": 40, "heldout_size": 8, "sft_size": 40},
                     sft={"steps": 4, "val_every": 2, "val_tasks": 5, "val_max_tokens": 8})
    prep = tmp_path / "prepare"
    assert prepare.main(["--params", str(params), "--out", str(prep)]) == 0
    assert sft_stage.main(["--params", str(params), "--input", f"data={prep}",
                           "--out", str(tmp_path / "sft")]) == 0
    m = read_metrics(tmp_path / "sft")
    assert m["steps"] == 4.0 and m["val_step"] == 4.0 and m["stopped_early"] == 0.0
    # the last validation is the saved model's greedy accuracy on the pool's first 5 tasks
    model, tok = load_model(tmp_path / "sft" / "checkpoint")
    assert m["val_accuracy"] == _greedy_accuracy(model, tok, prep, tasks=5, block=4, tokens=8)
    # SFT data without its prepare folder: validation has no pool, and says so
    with pytest.raises(SystemExit, match="train.parquet"):
        sft_stage.main(["--params", str(params), "--data", str(prep / "sft.parquet"),
                        "--out", str(tmp_path / "sft2")])
    # a threshold without validation is refused at load, with the fix
    raw = yaml.safe_load(params.read_text())
    raw["sft"].update(val_every=0, stop_at=0.5)
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="set sft.val_every > 0"):
        load_params(params)


def test_full_attention_sft_examples_fill_the_canvas_with_trained_eos(tmp_path):
    """LLaDA's SFT (arXiv 2502.09992, 2.3): a full-attention model's response is EOS-filled
    to the canvas the sampler decodes, and the EOS tokens are trained; block models keep
    their untrained block padding. Hand-derived ids (EOS 9, pad 0)."""
    from tracerl.rl.io import read_sft_samples

    f = tmp_path / "sft.parquet"
    pl.DataFrame({"prompt_ids": [[1, 2], [1, 2, 3]],
                  "response_ids": [[5, 6, 9], [5, 6, 7, 8, 5, 6, 9]]}).write_parquet(f)
    full = read_sft_samples(f, eos_id=9, pad_id=0, fill_to=6)
    assert [s.response_ids for s in full] == [[5, 6, 9, 9, 9, 9], [5, 6, 7, 8, 5, 6, 9]]
    assert [s.response_len for s in full] == [6, 7]  # the fill is trained; longer: unchanged
    block = read_sft_samples(f, eos_id=9, pad_id=0, block_size=4)
    # padded to the end of the block of prompt + response: 5 -> 8, 10 -> 12 tokens
    assert [s.response_ids for s in block] == [[5, 6, 9, 0, 0, 0], [5, 6, 7, 8, 5, 6, 9, 0, 0]]
    assert [s.response_len for s in block] == [3, 7]
    with pytest.raises(ValueError, match="eos_id"):
        read_sft_samples(f, fill_to=6)


def test_full_attention_sft_validates_with_the_decoding_block(tmp_path):
    """A LLaDA-style model's SFT validation decodes block by block with model.block_size
    (the model itself has no block size): its recorded accuracy is the saved model's."""
    from stages import prepare
    from stages import sft as sft_stage

    params = _params(tmp_path, model={"family": "llada"},
                     data={"train_size": 40, "heldout_size": 8, "sft_size": 40},
                     rollout={"max_tokens": 8},
                     sft={"method": "random_masking", "steps": 4, "val_every": 2,
                          "val_tasks": 5, "val_max_tokens": 8})
    prep = tmp_path / "prepare"
    assert prepare.main(["--params", str(params), "--out", str(prep)]) == 0
    assert sft_stage.main(["--params", str(params), "--input", f"data={prep}",
                           "--out", str(tmp_path / "sft")]) == 0
    m = read_metrics(tmp_path / "sft")
    assert m["steps"] == 4.0 and m["val_step"] == 4.0
    model, tok = load_model(tmp_path / "sft" / "checkpoint")
    assert model.family.attention == "full" and model.block_size is None
    assert m["val_accuracy"] == _greedy_accuracy(model, tok, prep, tasks=5, block=4, tokens=8)


def test_sft_validation_sample_has_the_pool_levels_not_the_head():
    """``sft.val_pick: sample`` draws the validation tasks from the whole pool (levels as in
    the pool), ``first`` takes its head. A pool whose first 20 tasks are level-balanced and
    whose other 80 are level 3 (as the generators' pools are: level-balanced until the small
    levels run out of distinct tasks)."""
    from stages.sft import validation_frame

    levels = [i % 4 for i in range(20)] + [3] * 80
    pool = pl.DataFrame({"task_id": [f"t{i}" for i in range(100)], "difficulty": levels})
    head = validation_frame(pool, 20, "first", seed=0)
    assert head["task_id"].to_list() == [f"t{i}" for i in range(20)]
    assert (head["difficulty"] == 3).sum() == 5
    a, b = (validation_frame(pool, 20, "sample", seed=s) for s in (0, 0))
    assert a["task_id"].to_list() == b["task_id"].to_list()  # the run's seed fixes it
    assert a["task_id"].n_unique() == 20
    assert (a["difficulty"] == 3).sum() >= 12  # 85% of the pool is level 3; the head has 25%
    assert validation_frame(pool, 20, "sample", seed=1)["task_id"].to_list() != \
        a["task_id"].to_list()
    assert validation_frame(pool, 500, "sample", seed=0).height == 100  # capped at the pool
