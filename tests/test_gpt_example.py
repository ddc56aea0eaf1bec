"""The GPT example on a quick run: every block's activation and every weight watched, the depth views drawn."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from gpt_names import PAD, Config, encode, parse_config, train  # noqa: E402


def test_encode_frames_each_name_and_pads():
    rows = encode(["emma", "bartholomew"], block_size=8)
    assert rows[0].tolist() == [0, 5, 13, 13, 1, 0, PAD, PAD]  # '.emma.' then padding
    assert rows[1].tolist()[:3] == [0, 2, 1] and PAD not in rows[1].tolist()  # cut to the block
    assert parse_config(["--n-layer", "3"]).n_layer == 3


def test_gpt_example_watches_every_block_and_draws_the_depth_views(tmp_path):
    trainer, (sat, grad, update, drawn, health, logits, adam) = train(
        Config(max_steps=11, every_n_steps=5, root_dir=str(tmp_path)), quiet=True
    )
    assert set(sat.layer_kinds) == {f"gpt.transformer.h.{i}.mlp.act" for i in range(12)}
    assert set(sat.layer_kinds.values()) == {"gelu_tanh"} and set(sat.layer_types.values()) == {"NewGELUActivation"}
    # token and position embeddings, 4 matrices per block; the tied LM head once, under the embedding's name
    assert len(grad.param_shapes) == 2 + 4 * 12 and "gpt.lm_head.weight" not in grad.param_shapes
    model = trainer.lightning_module.gpt
    assert model.lm_head.weight is model.transformer.wte.weight
    assert {p.stem for p in drawn.saved} >= {"depth_profile", "activations", "update_ratio", "attention_logits"}
    assert logits.record.names("attn_logit_max") == [f"gpt.transformer.h.{i}.attn" for i in range(12)]
    assert logits.output == "gpt.lm_head" and adam.optimizer_family == "adam"
    assert all(torch.isfinite(torch.tensor([v for _, v in points])).all() for points in update.history.values())
