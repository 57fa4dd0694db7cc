"""Multi-process training through DeepSpeed ZeRO on CPU (gloo): 2 ranks give the same
parameters as one process with the same global batch."""

from __future__ import annotations

import importlib.util
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("deepspeed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _update(trainer, seed: int) -> dict:
    from test_trainer import make_samples
    from tracerl.rl import PolicyConfig, policy_update

    # 8 samples, 4 rows per optimizer step: two steps (the second uses Adam's moments)
    return policy_update(trainer, make_samples(8, seed=seed), PolicyConfig(shuffle=False))


STAGES = (2, 3)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: ZeRO-2 then ZeRO-3 updates of fresh tiny models, in one process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from tracerl.models import tiny_model
    from tracerl.rl import TokenScorer, TrainConfig, Trainer

    # DeepSpeed JIT-compiles an optional shared-memory all-reduce for CPU (minutes on a
    # cold cache); gloo does every collective without it.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    try:
        results = {}
        for stage in STAGES:
            model, _ = tiny_model(seed=0)
            trainer = Trainer(TokenScorer(model), TrainConfig(lr=1e-3, micro_batch=2,
                                                              grad_accum=1, zero_stage=stage))
            metrics = _update(trainer, seed=5)
            params = list(trainer.module.parameters())
            with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
                state = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}
            results[stage] = {"params": state, "metrics": metrics}
        if importlib.util.find_spec("peft") is not None:  # LoRA under ZeRO-2
            from tracerl.models.lora import LoraSpec, apply_lora, parameter_report

            model, _ = tiny_model(seed=0)
            torch.manual_seed(7)  # peft draws A from torch's global RNG
            apply_lora(model, LoraSpec(rank=4, alpha=8.0))
            _randomize_b(model)
            trainer = Trainer(TokenScorer(model), TrainConfig(lr=1e-3, micro_batch=2,
                                                              grad_accum=1, zero_stage=2))
            metrics = _update(trainer, seed=5)
            results["lora"] = {"params": {n: p.detach().clone() for n, p in
                                          trainer.module.named_parameters()},
                               "metrics": metrics,
                               "report": parameter_report(trainer.module, trainer.optimizer)}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _randomize_b(model) -> None:
    """Nonzero LoRA B (fresh B = 0 would leave A without gradient in the first step)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_two_rank_zero_equals_single_process(tmp_path):
    from tracerl.models import tiny_model
    from tracerl.rl import TokenScorer, TrainConfig, Trainer

    out = str(tmp_path / "ranks.pt")
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True,
                       start_method="spawn")
    results = torch.load(out, weights_only=False)

    model, _ = tiny_model(seed=0)
    # one process, same global batch: micro_batch 2 x grad_accum 2 = 2 ranks x 2
    single = Trainer(TokenScorer(model), TrainConfig(lr=1e-3, micro_batch=2, grad_accum=2))
    m1 = _update(single, seed=5)
    ref = {n.removeprefix("lm."): p for n, p in single.module.named_parameters()}
    init = {n: p for n, p in tiny_model(seed=0)[0].named_parameters()}
    for stage in STAGES:
        got = results[stage]
        assert m1["steps"] == got["metrics"]["steps"] == 2.0
        assert got["metrics"]["loss"] == pytest.approx(m1["loss"], abs=1e-5)
        assert got["metrics"]["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
        for name, p in got["params"].items():
            name = name.removeprefix("lm.")
            # Adam moves every weight by about lr = 1e-3 per step; reduction order differs
            # between ZeRO's reduce-scatter and one process's accumulation, and Adam's
            # m / sqrt(v) amplifies that for tiny gradients: tolerance 2% of one step.
            diff = (p - ref[name]).abs().max().item()
            assert diff <= 2e-5, (stage, name, diff)
            assert (p - init[name]).abs().max().item() > 1e-3  # it did train
    if "lora" not in results:
        return
    # LoRA under ZeRO-2: the frozen base stays put, the adapters match one process
    from tracerl.models.lora import LoraSpec, apply_lora

    model, _ = tiny_model(seed=0)
    torch.manual_seed(7)  # peft draws A from torch's global RNG
    apply_lora(model, LoraSpec(rank=4, alpha=8.0))
    _randomize_b(model)
    single = Trainer(TokenScorer(model), TrainConfig(lr=1e-3, micro_batch=2, grad_accum=2))
    m1 = _update(single, seed=5)
    ref = dict(single.module.named_parameters())
    got = results["lora"]
    assert got["metrics"]["loss"] == pytest.approx(m1["loss"], abs=1e-5)
    trained = 0
    for name, p in got["params"].items():
        if ".lora_" in name:
            trained += 1
            assert (p - ref[name]).abs().max().item() <= 2e-5, name
        else:
            plain = name.removeprefix("lm.").replace(".base_layer.", ".")
            assert torch.equal(p, init[plain]), name  # frozen
    assert trained == 2 * 2 * 7  # A and B of the 7 projections of 2 layers
    assert 0 < got["report"]["optimizer/state_bytes"]
    assert got["report"]["params/trainable"] < got["report"]["params/total"]
