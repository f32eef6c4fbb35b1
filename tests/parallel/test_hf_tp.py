"""Hugging Face models built from a tiny config under tp=2 train like single-process:
distml's hf-gpt2 wrapper (vocabulary-parallel loss) and Hugging Face BERT (MLM and QA)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mesh_case import TEXT, metric_losses, tiny_text_cfg

from distml.testing import run_ranks

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="transformers is not installed (pip install 'distml[hf]')",
)

LR = 0.5
TINY = {"n_layer": 2, "n_head": 4, "n_embd": 16, "vocab_size": 32, "block_size": 8}


def _batches(n: int, masked: bool = False, qa: bool = False) -> list:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randint(32, (4, 8), generator=gen)
        y = torch.randint(32, (4, 8), generator=gen)
        if masked:
            y = y.masked_fill(torch.rand(4, 8, generator=gen) < 0.6, -100)
        if qa:  # ids, token types, mask (last two positions padded); start/end targets
            x = torch.stack(
                [x, (torch.arange(8) >= 3).long().expand(4, 8), torch.ones(4, 8).long()], 1
            )
            x[:, 2, 6:] = 0
            y = torch.randint(0, 6, (4, 2), generator=gen)
        out.append((x, y))
    return out


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)


def _train(model, loss_fn, batches) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for x, y in batches:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _ranks(rank: int, world: int) -> dict:
    from distml.models import build_model
    from distml.parallel.mesh import axis_group, build_mesh
    from distml.parallel.tensor import apply_tensor_parallel, full_state_dict, tensor_parallel_loss
    from distml.parallel.tensor.hf_bert import is_hf_bert, parallelize_hf_bert

    torch.set_num_threads(1)
    mesh = build_mesh(1, 1, 2)
    out: dict = {}
    # distml's hf-gpt2 wrapper goes through the regular plan entry point.
    torch.manual_seed(0)
    gpt = build_model("hf-gpt2", TINY).double()
    ref = copy.deepcopy(gpt)
    apply_tensor_parallel(gpt, mesh, loss_parallel=True)
    out["gpt"] = (
        _train(gpt, tensor_parallel_loss(gpt), _batches(3)),
        full_state_dict(gpt),
        _train(ref, _ce, _batches(3)),
        ref.state_dict(),
    )
    group = axis_group(mesh, "tp")
    for name, kind in (("hf-bert", {"masked": True}), ("hf-bert-qa", {"qa": True})):
        torch.manual_seed(0)
        bert = build_model(name, TINY).double()
        ref = copy.deepcopy(bert)
        assert is_hf_bert(bert)
        parallelize_hf_bert(bert, group, loss_parallel=False)
        out[name] = (
            _train(bert, _ce, _batches(3, **kind)),
            full_state_dict(bert),
            _train(ref, _ce, _batches(3, **kind)),
            ref.state_dict(),
        )
    return out


def test_tp2_hugging_face_models_train_like_single_process() -> None:
    for result in run_ranks(_ranks, 2, timeout=180):
        for name, (losses, state, ref_losses, ref_state) in result.items():
            torch.testing.assert_close(
                torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=0, msg=name
            )
            # The MLM bias alias (same tensor as the decoder bias) is stored once under tp.
            alias = "hf.cls.predictions.bias"
            if alias in ref_state:
                assert alias not in state
                assert torch.equal(ref_state[alias], ref_state["hf.cls.predictions.decoder.bias"])
                ref_state = {k: v for k, v in ref_state.items() if k != alias}
            assert state.keys() == ref_state.keys(), name
            for key in ref_state:
                torch.testing.assert_close(
                    state[key], ref_state[key], rtol=1e-4, atol=1e-10, msg=key
                )
            assert losses[-1] != losses[0]  # the runs really trained




def _trainer_cfg(root: str, name: str, model: str, **parallel: object) -> dict:
    # 21 distinct characters; 22 lets tp=2 split the vocabulary.
    run_dir = Path(root) / name
    return tiny_text_cfg(
        run_dir, Path(root) / "corpus.txt", dict(parallel), steps=4, model=model, vocab_size=22
    )


def _train_losses(rank: int, world: int, root: str, model: str, parallel: dict) -> list[float]:
    from distml.config import build_config
    from distml.train.trainer import Trainer

    name = f"{model}-{world}"
    Trainer(build_config(_trainer_cfg(root, name, model, **parallel))).fit()
    return metric_losses(Path(root) / name)


@pytest.mark.parametrize("model", ["hf-gpt2", "hf-bert"])
def test_distml_train_runs_hugging_face_models_at_tp2(tmp_path, model) -> None:
    (tmp_path / "corpus.txt").write_text(TEXT)
    ref = _train_losses(0, 1, str(tmp_path), model, {})
    [got, _] = run_ranks(_train_losses, 2, args=(str(tmp_path), model, {"tp": 2}), timeout=200)
    assert len(ref) == 4
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=0)


@pytest.mark.parametrize(("model", "schedule"), [("hf-gpt2", "gpipe"), ("hf-bert", "1f1b")])
def test_distml_train_pipelines_hugging_face_models_at_pp2(tmp_path, model, schedule) -> None:
    (tmp_path / "corpus.txt").write_text(TEXT)
    ref = _train_losses(0, 1, str(tmp_path), model, {})
    plan = {"pp": 2, "pp_schedule": schedule, "pp_microbatches": 2}
    [got, again] = run_ranks(_train_losses, 2, args=(str(tmp_path), model, plan), timeout=200)
    assert len(ref) == 4 and got == again  # the last stage's loss, logged by rank 0
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=0)


def test_hugging_face_question_answering_has_no_stage_plan() -> None:
    from distml.config import ParallelSection
    from distml.errors import ConfigError
    from distml.models import build_model
    from distml.parallel.mesh_strategy import check_mesh_plan

    qa = build_model("hf-bert-qa", TINY)
    with pytest.raises(ConfigError) as info:
        check_mesh_plan(ParallelSection(pp=2), 2, qa)
    assert str(info.value) == (
        "pipeline parallelism has no stage plan for Hugging Face HFQuestionAnswering "
        "(stage plans: hf-gpt2, hf-bert); use parallel.pp=1 (tensor parallelism works: "
        "parallel.tp)"
    )


@pytest.mark.slow
def test_hf_gpt2_pp2_checkpoint_predicts_and_generates_like_single_process(tmp_path) -> None:
    import numpy as np

    from distml.testing import run_cli

    (tmp_path / "c.txt").write_text("abcdefghijklmnopqrstuvwxyz ABCD.\n" * 40)  # 34 tokens
    args = [
        "model.name=hf-gpt2",
        "model.args={n_layer: 2, n_head: 2, n_embd: 24}",
        "data.name=text",
        f"data.path={tmp_path / 'c.txt'}",
        "data.seq_len=16",
        "data.global_batch_size=8",
    ]
    pp = ["parallel.pp=2", "parallel.pp_schedule=gpipe", "parallel.pp_microbatches=2"]
    run = [f"logging.run_dir={tmp_path / 'run'}", f"checkpoint.dir={tmp_path / 'ckpt'}"]
    train = run_cli(
        ["train", *args, *pp, "schedule.max_steps=3", "schedule.eval_every_epochs=0", *run,
         "--no-progress", "--nproc", "2"],
        timeout=240,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    ckpt = str(tmp_path / "ckpt" / "step_00000003.dcp")
    np.save(tmp_path / "tok.npy", np.random.default_rng(0).integers(0, 34, size=(5, 16)))
    common = ["predict", *args, "--checkpoint", ckpt, "--input", str(tmp_path / "tok.npy")]
    for extra, out in (([*pp, "--nproc", "2"], "pp.npy"), ([], "one.npy")):
        done = run_cli([*common, *extra, "--output", str(tmp_path / out)], timeout=120)
        assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "pp.npy"), np.load(tmp_path / "one.npy"))
    texts = []
    for extra in (["parallel.pp=2", "--nproc", "2"], []):
        gen = ["generate", *args, "--checkpoint", ckpt, "--prompt", "abc", "--seed", "3"]
        done = run_cli([*gen, "--max-new-tokens", "8", *extra], timeout=120)
        assert done.returncode == 0, done.stderr
        texts.append(done.stdout)
    assert texts[0] == texts[1] and texts[0].startswith("abc") and len(texts[0]) == 12
