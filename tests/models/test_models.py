"""Behaviour of the built-in models: shapes, structure contracts, masking, trainability."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distml.models import build_model
from distml.models.bert import BERT
from distml.models.gpt import GPT
from distml.models.layers import SelfAttention
from distml.models.resnet import BasicBlock, ResNet

TINY_GPT = {"vocab_size": 32, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}
TINY_BERT = {"vocab_size": 32, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}


def tiny_gpt(**overrides: Any) -> GPT:
    model = build_model("gpt", {**TINY_GPT, **overrides})
    assert isinstance(model, GPT)
    return model


def tiny_bert(**overrides: Any) -> BERT:
    model = build_model("bert", {**TINY_BERT, **overrides})
    assert isinstance(model, BERT)
    return model


# ----------------------------------------------------------------------------- shapes


def test_mlp_flattens_input() -> None:
    model = build_model("mlp", {"in_features": 64, "hidden": [32], "num_classes": 7})
    assert model(torch.randn(5, 8, 8)).shape == (5, 7)
    assert build_model("mlp", {"hidden": []})(torch.randn(3, 64)).shape == (3, 10)
    with pytest.raises(ValueError, match="expects 64 features per sample, got 63"):
        model(torch.randn(5, 63))


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (1, 28), (3, 32)])
def test_cnn_shapes(channels: int, size: int) -> None:
    model = build_model("cnn", {"in_channels": channels, "image_size": size, "num_classes": 4})
    assert model(torch.randn(2, channels, size, size)).shape == (2, 4)


def test_cnn_flattened_size_matches_classic_net() -> None:
    # The PyTorch MNIST example: 28 -> 26 -> 24 -> pool 12, 64 * 12 * 12 = 9216 inputs to fc1.
    model = build_model("cnn", {"image_size": 28})
    fc1 = model.classifier[1]
    assert isinstance(fc1, nn.Linear) and fc1.in_features == 9216 and fc1.out_features == 128


def test_cnn_rejects_wrong_image_shape() -> None:
    model = build_model("cnn", {"image_size": 8})
    with pytest.raises(ValueError, match=r"expects input \(B, 1, 8, 8\), got \(2, 1, 28, 28\)"):
        model(torch.randn(2, 1, 28, 28))


@pytest.mark.parametrize("size", [32, 8, 3])
def test_resnet_shapes(size: int) -> None:
    model = build_model("resnet", {"image_size": size, "num_classes": 5})
    assert model(torch.randn(2, 3, size, size)).shape == (2, 5)


def test_transformer_shapes() -> None:
    idx = torch.randint(0, 32, (3, 10))
    assert tiny_gpt()(idx).shape == (3, 10, 32)
    bert = tiny_bert()
    assert bert(idx).shape == (3, 10, 32)
    assert bert.encode(idx).shape == (3, 10, 32)
    types = torch.randint(0, 2, (3, 10))
    assert bert(idx, torch.ones(3, 10), types).shape == (3, 10, 32)


# ----------------------------------------------------------------------------- resnet


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_resnet_blocks_exposed_in_order(norm: str) -> None:
    model = build_model(
        "resnet", {"widths": [8, 16, 32], "blocks_per_stage": [2, 1, 3], "norm": norm}
    )
    assert isinstance(model, ResNet)
    assert len(model.blocks) == 6
    assert all(isinstance(b, BasicBlock) for b in model.blocks)
    x = torch.randn(2, 3, 32, 32)
    # Running the parts by hand (as a pipeline split would) reproduces forward, and
    # each stage after the first halves the spatial size.
    h = model.stem(x)
    shapes = []
    for block in model.blocks:
        h = block(h)
        shapes.append(tuple(h.shape[1:]))
    assert shapes == [(8, 32, 32)] * 2 + [(16, 16, 16)] + [(32, 8, 8)] * 3
    torch.testing.assert_close(model.fc(model.pool(h).flatten(1)), model(x))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.GroupNorm)]
    expected = {"batch": nn.BatchNorm2d, "group": nn.GroupNorm}
    if norm == "none":
        assert norms == []
    else:
        assert norms and all(isinstance(m, expected[norm]) for m in norms)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------- gpt


def test_gpt_module_names_and_tied_weights() -> None:
    model = tiny_gpt()
    names = dict(model.named_modules())
    for name in [
        "wte",
        "wpe",
        "drop",
        "blocks",
        "ln_f",
        "lm_head",
        "blocks.1.ln_1",
        "blocks.1.attn.q_proj",
        "blocks.1.attn.k_proj",
        "blocks.1.attn.v_proj",
        "blocks.1.attn.o_proj",
        "blocks.1.ln_2",
        "blocks.1.mlp.fc",
        "blocks.1.mlp.proj",
    ]:
        assert name in names, name
    assert model.lm_head.weight is model.wte.weight
    untied = tiny_gpt(tie_weights=False)
    assert untied.lm_head.weight is not untied.wte.weight
    fc = untied.blocks[0].mlp.fc
    assert isinstance(fc, nn.Linear) and fc.out_features == 4 * 32
    assert tiny_gpt(bias=False).blocks[0].attn.q_proj.bias is None


def test_gpt_residual_projection_init_is_scaled() -> None:
    model = tiny_gpt(n_layer=8, n_embd=64, n_head=4)
    o_std = torch.cat([b.attn.o_proj.weight.flatten() for b in model.blocks]).std().item()
    q_std = torch.cat([b.attn.q_proj.weight.flatten() for b in model.blocks]).std().item()
    assert q_std == pytest.approx(0.02, rel=0.05)
    assert o_std == pytest.approx(0.02 / 4.0, rel=0.05)  # 0.02 / sqrt(2 * 8)


def test_gpt_is_causal() -> None:
    model = tiny_gpt().eval()
    idx = torch.randint(0, 32, (2, 12))
    base = model(idx)
    for t in [0, 5, 10]:
        changed = idx.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.randint(0, 30, (2, 11 - t))) % 32
        out = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        # The perturbation must be visible later on, or the check above proves nothing.
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])


def test_gpt_block_size_overflow() -> None:
    model = tiny_gpt()
    with pytest.raises(ValueError, match="sequence length 17 exceeds block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt_generate_length_and_seeded_determinism() -> None:
    model = tiny_gpt().eval()
    prompt = torch.randint(0, 32, (2, 5))

    def sample(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 20, temperature=1.0, top_k=10, generator=gen)

    out = sample(1)
    assert out.shape == (2, 25) and out.dtype == torch.long
    assert torch.equal(out[:, :5], prompt)
    assert torch.equal(out, sample(1))
    assert not torch.equal(out, sample(2))


def test_gpt_generate_greedy_crops_context_to_block_size() -> None:
    model = tiny_gpt().eval()
    prompt = torch.randint(0, 32, (2, 10))
    out = model.generate(prompt, 12, temperature=0.0)  # runs to 22 > block_size 16
    assert out.shape == (2, 22)
    for n in range(10, 22):
        context = out[:, max(0, n - 16) : n]
        assert torch.equal(out[:, n], model(context)[:, -1].argmax(-1))
    # top_k=1 sampling is greedy whatever the generator does.
    top1 = model.generate(prompt, 12, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(top1, out)


def test_attention_heads_can_be_sharded_by_rows() -> None:
    # Tensor parallelism will split q/k/v by output rows (whole heads) and o_proj by
    # input columns; the sum of the shards' outputs must equal the full attention.
    full = tiny_gpt().blocks[0].attn
    assert isinstance(full, SelfAttention) and full.num_local_heads == 2
    x = torch.randn(2, 7, 32)
    shards = []
    for rank in range(2):
        rows = slice(rank * 16, (rank + 1) * 16)
        shard = SelfAttention(32, 2, causal=True)
        for name in ["q_proj", "k_proj", "v_proj"]:
            src = getattr(full, name)
            lin = nn.Linear(32, 16)
            lin.weight.data.copy_(src.weight.data[rows])
            lin.bias.data.copy_(src.bias.data[rows])
            setattr(shard, name, lin)
        o = nn.Linear(16, 32)
        o.weight.data.copy_(full.o_proj.weight.data[:, rows])
        o.bias.data.copy_(full.o_proj.bias.data if rank == 0 else torch.zeros(32))
        shard.o_proj = o
        assert shard.num_local_heads == 1
        shards.append(shard(x))
    torch.testing.assert_close(shards[0] + shards[1], full(x), rtol=1e-5, atol=1e-6)


def test_gpt_forward_is_a_plain_loop_over_blocks() -> None:
    model = tiny_gpt().eval()
    idx = torch.randint(0, 32, (2, 9))
    h = model.drop(model.wte(idx) + model.wpe(torch.arange(9)))
    for block in model.blocks:
        h = block(h)
    torch.testing.assert_close(model.lm_head(model.ln_f(h)), model(idx))


def test_tiny_gpt_overfits_a_fixed_batch() -> None:
    model = tiny_gpt()
    data = torch.randint(0, 32, (4, 17))
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(32.0)).item(), abs=0.3)
    assert losses[-1] < 0.25 * losses[0], losses


# ----------------------------------------------------------------------------- bert


def test_bert_names_and_tied_decoder() -> None:
    model = tiny_bert()
    names = dict(model.named_modules())
    for name in [
        "blocks.0.attn.q_proj",
        "blocks.0.attn.k_proj",
        "blocks.0.attn.v_proj",
        "blocks.0.attn.o_proj",
        "blocks.0.mlp.fc",
        "blocks.0.mlp.proj",
    ]:
        assert name in names, name
    assert model.head.decoder.weight is model.embeddings.tok.weight
    assert model.head.decoder.bias is not None


def test_bert_padding_mask_hides_pad_tokens() -> None:
    model = tiny_bert().eval()
    idx = torch.randint(0, 32, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 8:] = 0
    mask[1, 10:] = 0
    other = idx.clone()
    other[mask == 0] = (other[mask == 0] + 7) % 32
    keep = mask.bool()
    a, b = model(idx, mask), model(other, mask)
    torch.testing.assert_close(a[keep], b[keep], rtol=0, atol=1e-6)
    # Without the mask the encoder is bidirectional, so the pad tokens leak everywhere.
    assert not torch.allclose(model(idx)[keep], model(other)[keep])


def test_bert_is_bidirectional_and_uses_token_types() -> None:
    model = tiny_bert().eval()
    idx = torch.randint(0, 32, (1, 8))
    later = idx.clone()
    later[0, -1] = (later[0, -1] + 1) % 32
    assert not torch.allclose(model(idx)[0, 0], model(later)[0, 0])
    types = torch.zeros(1, 8, dtype=torch.long)
    types[0, 4:] = 1
    assert not torch.allclose(model(idx), model(idx, token_type_ids=types))
    torch.testing.assert_close(model(idx), model(idx, token_type_ids=torch.zeros_like(idx)))


def test_bert_input_checks() -> None:
    model = tiny_bert()
    with pytest.raises(ValueError, match="sequence length 17 exceeds block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of idx \(1, 4\)"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5))


# ----------------------------------------------------------------------------- all models

INPUTS: dict[str, tuple[dict[str, Any], Any]] = {
    "mlp": ({"dropout": 0.5}, lambda: torch.randn(4, 64)),
    "cnn": ({"dropout": 0.5}, lambda: torch.randn(4, 1, 8, 8)),
    "resnet": ({"image_size": 16}, lambda: torch.randn(4, 3, 16, 16)),
    "gpt": ({**TINY_GPT, "dropout": 0.5}, lambda: torch.randint(0, 32, (4, 8))),
    "bert": ({**TINY_BERT, "dropout": 0.5}, lambda: torch.randint(0, 32, (4, 8))),
}


@pytest.mark.parametrize("name", list(INPUTS))
def test_eval_mode_is_deterministic(name: str) -> None:
    args, make = INPUTS[name]
    model = build_model(name, args)
    x = make()
    model.train()
    train_a, train_b = model(x), model(x)
    model.eval()
    eval_a, eval_b = model(x), model(x)
    assert torch.equal(eval_a, eval_b)
    assert torch.isfinite(eval_a).all()
    if name != "resnet":  # resnet has no dropout; its train mode uses batch statistics
        assert not torch.equal(train_a, train_b), "dropout should make train mode stochastic"
    else:
        assert not torch.allclose(train_a, eval_a)
