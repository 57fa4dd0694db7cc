"""Model layer: block masks, cache, families, loading and saving."""

from __future__ import annotations

import json
import time

import pytest
import torch

from conftest import build_release_checkpoint
from tracerl.models import (
    BlockKVCache,
    ModelLoadError,
    ValueModel,
    block_visibility,
    build_for_tokenizer,
    build_model,
    load_model,
    save_model,
    training_layout,
)
from tracerl.models.masks import attention_bias, block_ids, ensure_nonempty
from tracerl.models.model import SpecialTokens, rename_llada_key


def _sets(visible: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in visible]


def _layout_visibility(P: int, L: int, b: int) -> torch.Tensor:
    pos, blk, noisy = training_layout(P, L, b)
    valid = torch.ones_like(noisy)
    return block_visibility(blk[None], noisy[None], blk[None], noisy[None], valid[None])[0]


# ----------------------------------------------------------------------------- masks


def test_training_mask_prompt_not_multiple_of_block():
    # P=3, L=3, b=2. Index: 0,1 = prompt block 0; 2 = prompt tail (block 1); 3 = r0 (block 1);
    # 4,5 = r1,r2 (block 2); 6..9 = noisy copies of positions 2,3,4,5 (blocks 1,1,2,2).
    vis = _layout_visibility(3, 3, 2)
    expected = [
        {0, 1}, {0, 1},                    # clean block 0 sees itself
        {0, 1, 2, 3}, {0, 1, 2, 3},        # clean block 1: earlier clean + itself
        {0, 1, 2, 3, 4, 5}, {0, 1, 2, 3, 4, 5},
        {0, 1, 6, 7}, {0, 1, 6, 7},        # noisy block 1: clean block 0 + its own noisy block
        {0, 1, 2, 3, 8, 9}, {0, 1, 2, 3, 8, 9},  # noisy block 2: clean blocks 0,1 + itself
    ]
    assert _sets(vis) == expected


def test_training_mask_prompt_multiple_of_block():
    # P=4, L=4, b=2: no prompt tail; noisy copies of positions 4..7 at indices 8..11.
    pos, blk, noisy = training_layout(4, 4, 2)
    assert pos.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7]
    vis = _layout_visibility(4, 4, 2)
    assert _sets(vis)[8] == {0, 1, 2, 3, 8, 9}
    assert _sets(vis)[10] == {0, 1, 2, 3, 4, 5, 10, 11}
    assert _sets(vis)[5] == {0, 1, 2, 3, 4, 5}
    # clean rows never see noisy rows; noisy blocks never see other noisy blocks
    assert not vis[:8, 8:].any()
    assert not vis[8:10, 10:].any() and not vis[10:, 8:10].any()


def test_pad_keys_hidden_and_empty_rows_opened():
    blk = torch.tensor([[-1, 0, 0, 1]])
    valid = torch.tensor([[False, True, True, True]])
    noisy = torch.zeros_like(valid)
    vis = block_visibility(blk, noisy, blk, noisy, valid)
    assert not vis[0, :, 0].any()  # nobody attends to the pad
    assert not vis[0, 0].any()  # the pad query sees nothing ...
    assert ensure_nonempty(vis)[0, 0].all()  # ... until opened, to keep softmax finite
    bias = attention_bias(vis, torch.float32)
    assert bias.shape == (1, 1, 4, 4) and torch.isfinite(bias).all()
    assert block_ids(torch.tensor([[0, 5]]), 4, torch.tensor([[False, True]])).tolist() == [[-1, 1]]


# ----------------------------------------------------------------------- model paths


def _prefix_visibility(n_clean: int, blocks_clean: torch.Tensor, blocks_q: torch.Tensor,
                       q_noisy: bool) -> torch.Tensor:
    k_blk = torch.cat([blocks_clean, blocks_q])[None]
    k_noisy = torch.tensor([False] * n_clean + [q_noisy] * len(blocks_q))[None]
    q_n = torch.full((1, len(blocks_q)), q_noisy)
    return block_visibility(blocks_q[None], q_n, k_blk, k_noisy, torch.ones_like(k_noisy))


@pytest.mark.parametrize("P", [4, 5, 7])
def test_cached_denoise_equals_uncached_and_training_layout(tiny_sdar, P):
    """The three ways of scoring a noisy block agree (fp32, <= 1e-5).

    (a) KV-cached: prefill the clean blocks, denoise the current block without storing;
    (b) one uncached forward of [clean prefix | current block] with the block mask;
    (c) the trainer's [prompt | clean response | noisy copy] layout.
    """
    model, _ = tiny_sdar
    b, mask = 4, model.tokens.mask_id
    g = torch.Generator().manual_seed(P)
    prompt = torch.randint(4, 90, (P,), generator=g)
    response = torch.randint(4, 90, (8,), generator=g)  # two full blocks after the tail
    tail = P % b
    start = P - tail  # first position of the block that holds the prompt tail
    # the current block: prompt tail + response tokens, some masked
    cur = torch.cat([prompt[start:], response[: b - tail]]).clone()
    cur[tail + 1:] = mask
    pos_cur = torch.arange(start, start + b)

    # (a) cached
    cache = BlockKVCache.for_model(model.config, 1, 64, torch.float32)
    if start:
        pos = torch.arange(start)
        vis = _prefix_visibility(0, torch.empty(0, dtype=torch.long), pos // b, False)
        model(prompt[None, :start], visible=vis, position_ids=pos[None], cache=cache.begin(True))
        cache.end()
    vis = _prefix_visibility(start, torch.arange(start) // b, pos_cur // b, True)
    la = model(cur[None], visible=vis, position_ids=pos_cur[None], cache=cache.begin(False)).logits
    cache.end()
    assert cache.length == start  # the denoised block was not committed

    # (b) uncached: one forward of [clean prefix | current block]
    ids = torch.cat([prompt[:start], cur])
    posb = torch.arange(start + b)
    noisyb = posb >= start
    visb = block_visibility((posb // b)[None], noisyb[None], (posb // b)[None], noisyb[None],
                            torch.ones(1, start + b, dtype=torch.bool))
    lb = model(ids[None], visible=visb, position_ids=posb[None]).logits[:, start:]
    assert (la - lb).abs().max().item() <= 1e-5

    # (c) training layout: the noisy copy of the first response block
    L = len(response)
    pos, blk, noisy = training_layout(P, L, b)
    clean = torch.cat([prompt, response])
    noisy_ids = torch.cat([prompt[start:], response]).clone()
    noisy_ids[: b][tail + 1:] = mask
    ids_c = torch.cat([clean, noisy_ids])
    valid = torch.ones_like(noisy)
    visc = block_visibility(blk[None], noisy[None], blk[None], noisy[None], valid[None])
    lc = model(ids_c[None], visible=visc, position_ids=pos[None]).logits
    n0 = P + L  # first noisy index
    assert (la - lc[:, n0:n0 + b]).abs().max().item() <= 1e-5


def test_commit_then_denoise_next_block(tiny_sdar):
    """Committing a block through the cache equals encoding it in the prefix."""
    model, _ = tiny_sdar
    b = 4
    ids = torch.randint(4, 90, (1, 12), generator=torch.Generator().manual_seed(1))
    cache = BlockKVCache.for_model(model.config, 1, 32, torch.float32)
    for s in (0, 4):  # commit blocks 0 and 1 one at a time
        pos = torch.arange(s, s + b)
        vis = _prefix_visibility(s, torch.arange(s) // b, pos // b, False)
        model(ids[:, s:s + b], visible=vis, position_ids=pos[None], cache=cache.begin(True))
        cache.end()
    pos = torch.arange(8, 12)
    vis = _prefix_visibility(8, torch.arange(8) // b, pos // b, True)
    la = model(ids[:, 8:], visible=vis, position_ids=pos[None], cache=cache.begin(False)).logits
    allpos = torch.arange(12)
    blk = allpos // b
    noisy = allpos >= 8
    vis_full = block_visibility(blk[None], noisy[None], blk[None], noisy[None],
                                torch.ones(1, 12, dtype=torch.bool))
    lb = model(ids, visible=vis_full, position_ids=allpos[None]).logits[:, 8:]
    assert (la - lb).abs().max().item() <= 1e-5


def test_bool_and_float_masks_give_same_logits(tiny_sdar):
    model, _ = tiny_sdar
    P, L, b = 5, 6, 4
    pos, blk, noisy = training_layout(P, L, b)
    ids = torch.randint(4, 90, (1, len(pos)), generator=torch.Generator().manual_seed(0))
    vis = block_visibility(blk[None], noisy[None], blk[None], noisy[None],
                           torch.ones(1, len(pos), dtype=torch.bool))
    ours = model(ids, visible=vis, position_ids=pos[None]).logits
    raw_bool = model.backbone(input_ids=ids, attention_mask=ensure_nonempty(vis)[:, None],
                              position_ids=pos[None]).logits
    assert (ours - raw_bool).abs().max().item() <= 1e-5
    # a wrong mask would differ: full attention gives other logits
    full = model(ids, position_ids=pos[None]).logits
    assert (ours - full).abs().max().item() > 1e-3


def test_eager_attention_is_refused(default_tokenizer):
    model = build_for_tokenizer(default_tokenizer, "sdar")
    model.backbone.config._attn_implementation = "eager"
    with pytest.raises(ModelLoadError, match="SDPA"):
        type(model)(model.backbone, model.family, model.tokens, 4)
    with pytest.raises(TypeError, match="bool"):
        build_for_tokenizer(default_tokenizer)(torch.zeros(1, 2, dtype=torch.long),
                                               visible=torch.zeros(1, 2, 2))


def test_tiny_model_builds_fast(default_tokenizer):
    t0 = time.perf_counter()
    m = build_for_tokenizer(default_tokenizer, "sdar")
    assert time.perf_counter() - t0 < 1.0
    assert m.config.num_hidden_layers == 2 and m.config.hidden_size == 32


# ------------------------------------------------------------------ save and load


def test_save_load_roundtrip_identical_logits(tiny_sdar, tmp_path):
    model, tok = tiny_sdar
    ids = torch.randint(4, 90, (2, 9), generator=torch.Generator().manual_seed(3))
    before = model(ids).logits
    save_model(model, tok, tmp_path / "ckpt")
    loaded, tok2 = load_model(tmp_path / "ckpt")
    assert loaded.family.name == "sdar" and loaded.block_size == 4
    assert loaded.tokens == model.tokens
    assert torch.equal(loaded(ids).logits, before)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"))
    assert type(plain).__name__ == "Qwen3ForCausalLM"


def test_release_layout_loads_offline(release_checkpoint):
    model, tok = load_model(release_checkpoint)
    assert model.family.name == "sdar" and model.block_size == 4
    assert model.tokens.mask_id == 151669 == tok.convert_tokens_to_ids("<|MASK|>")
    assert model.tokens.pad_id == tok.pad_token_id == 151643
    assert 151645 in model.tokens.stop_ids  # <|im_end|> from generation_config.json
    ids = tok.apply_chat_template([{"role": "user", "content": "1+1?"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    out = model(torch.tensor([ids])).logits
    assert out.shape == (1, len(ids), 151936) and torch.isfinite(out).all()
    # the weights are the shards' (not random init): embedding row matches the file
    from safetensors import safe_open

    index = json.loads((release_checkpoint / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.embed_tokens.weight"]
    with safe_open(str(release_checkpoint / shard), "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(model.backbone.model.embed_tokens.weight, emb.float())


def test_llada_names_load_into_llama(default_tokenizer, tmp_path):
    """A checkpoint saved under LLaDA's parameter names and config keys loads, same logits."""
    from safetensors.torch import save_file

    ref = build_for_tokenizer(default_tokenizer, "llada", seed=2, tie_word_embeddings=False)
    inv = {  # Llama name -> LLaDA name, the inverse of the loader's mapping
        "model.embed_tokens.weight": "model.transformer.wte.weight",
        "model.norm.weight": "model.transformer.ln_f.weight",
        "lm_head.weight": "model.transformer.ff_out.weight",
    }
    parts = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
             "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
             "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm"}
    state = {}
    for name, t in ref.backbone.state_dict().items():
        if name in inv:
            new = inv[name]
        else:
            _, _, i, *rest = name.split(".")
            new = f"model.transformer.blocks.{i}.{parts['.'.join(rest[:-1])]}.{rest[-1]}"
        assert rename_llada_key(new) == name
        state[new] = t.contiguous()
    d = tmp_path / "llada"
    d.mkdir()
    save_file(state, str(d / "model.safetensors"))
    c = ref.config
    (d / "config.json").write_text(json.dumps({
        "model_type": "llada", "d_model": c.hidden_size, "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads, "n_layers": c.num_hidden_layers,
        "mlp_hidden_size": c.intermediate_size, "vocab_size": c.vocab_size,
        "max_sequence_length": 256, "rope_theta": 10000.0, "rms_norm_eps": c.rms_norm_eps,
        "weight_tying": False, "mask_token_id": ref.tokens.mask_id,
    }))
    default_tokenizer.save_pretrained(str(d))
    model, _ = load_model(d)
    assert model.family.name == "llada" and model.family.attention == "full"
    ids = torch.randint(4, 90, (1, 7), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-6)


def test_dream_logits_are_realigned(default_tokenizer):
    m = build_for_tokenizer(default_tokenizer, "dream", seed=1)
    assert m.family.shifted and m.config.model_type == "qwen2"
    ids = torch.randint(4, 90, (1, 6), generator=torch.Generator().manual_seed(0))
    raw = m.backbone(input_ids=ids, attention_mask=torch.zeros(1, 1, 6, 6)).logits
    ours = m(ids).logits
    assert torch.allclose(ours[:, 1:], raw[:, :-1], atol=1e-6)  # logit t read from t-1
    assert torch.allclose(ours[:, 0], raw[:, 0], atol=1e-6)


def test_value_model_zero_head_and_save_load(tiny_sdar, tmp_path):
    model, tok = tiny_sdar
    vm = ValueModel.from_policy(model)
    ids = torch.randint(4, 90, (2, 5))
    assert torch.equal(vm(ids), torch.zeros(2, 5))
    with torch.no_grad():
        vm.head.weight.normal_()
    vm.save(tmp_path / "v", tok)
    v2 = ValueModel.load(tmp_path / "v")
    assert torch.allclose(v2(ids), vm(ids), atol=1e-6)
    # the copy is independent of the policy
    assert vm.lm.backbone is not model.backbone


# ------------------------------------------------------------------- bad input


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="local folder"):
        load_model("some-org/not-a-model-here")


def test_unknown_family_is_a_clear_error(tiny_sdar, tmp_path):
    model, tok = tiny_sdar
    save_model(model, tok, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="is unknown; valid: sdar, llada, dream"):
        load_model(tmp_path / "m", family="gpt2")
    cfg.pop("tracerl_family")
    cfg["model_type"] = "bert"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unknown model family"):
        load_model(tmp_path / "m")
    cfg["model_type"] = "qwen3"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="family='sdar'"):
        load_model(tmp_path / "m")
    assert load_model(tmp_path / "m", family="sdar")[0].family.name == "sdar"


def test_tokenizer_without_mask_token_is_a_clear_error(tmp_path):
    d = build_release_checkpoint(tmp_path / "rel")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.pop("mask_token")
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("mask_token_id")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="mask token"):
        load_model(d)


def test_build_model_unknown_family():
    with pytest.raises(ModelLoadError, match="is unknown; valid: sdar, llada, dream"):
        build_model("gpt", vocab_size=10, tokens=SpecialTokens(1, 0, (2,)))


def test_native_gqa_attention_matches_stock_sdpa(tiny_sdar):
    """Our CPU attention (SDPA with enable_gqa) equals transformers' SDPA path (repeat_kv)."""
    model, _ = tiny_sdar
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # GQA in use
    P, L, b = 5, 6, 4
    pos, blk, noisy = training_layout(P, L, b)
    ids = torch.randint(4, 90, (2, len(pos)), generator=torch.Generator().manual_seed(0))
    vis = block_visibility(blk[None], noisy[None], blk[None], noisy[None],
                           torch.ones(1, len(pos), dtype=torch.bool)).expand(2, -1, -1)
    ours = model(ids, visible=vis, position_ids=pos[None].expand(2, -1)).logits
    model.backbone.config._attn_implementation = "sdpa"
    stock = model(ids, visible=vis, position_ids=pos[None].expand(2, -1)).logits
    assert (ours - stock).abs().max().item() <= 1e-5
