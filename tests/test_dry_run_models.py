"""--dry-run builds every row's model without weights (trainers.methods.summary) and prints its parameters; a model
that does not build is one line naming the row, exit 2."""
import textwrap

import pytest

from orchestrator.cli import sweep_main
from trainers.config import Config
from trainers.methods.summary import model_summary

SPEC = textwrap.dedent("""
    name: models
    seeds: [0]
    base: latent_rl
    rows:
      - name: FCN
        set: {method: supervised}
      - name: RL
        set: {}
""")


def test_dry_run_lists_each_rows_model_with_its_parameters(capsys, write_spec):
    assert sweep_main([str(write_spec(SPEC)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "models (built without weights: parameters):" in out
    assert "  FCN: tiny_cnn+fcn 0.6M; supervised 0.6M (0.6M trained)" in out
    assert "  RL: tiny_cnn+fcn" in out and "; latent_rl " in out


def test_a_model_that_does_not_build_is_one_line(capsys, write_spec):
    bad = SPEC + "  - name: aux on tiny\n    set: {model.aux_head.enabled: true}\n"
    assert sweep_main([str(write_spec(bad)), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "rows[2] (aux on tiny): the model does not build: ValueError: model.aux_head: encoder 'tiny_cnn'" in err


def test_meta_build_counts_equal_a_real_build():
    import torch

    from trainers.methods import build_method

    cfg = Config.model_validate({"method": {"name": "latent_rl"}})
    real = build_method(cfg, 8, 255)
    total = sum(p.numel() for p in real.parameters())
    trained = sum(p.numel() for p in real.parameters() if p.requires_grad)
    seg = sum(p.numel() for p in real.segmentor.parameters())
    text = model_summary(cfg.model_dump(mode="json"), 8)
    assert text == f"tiny_cnn+fcn {seg / 1e6:.1f}M; latent_rl {total / 1e6:.1f}M ({trained / 1e6:.1f}M trained)"
    assert torch.get_default_device().type == "cpu"          # the meta device does not leak out
