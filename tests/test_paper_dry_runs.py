"""`--profile paper` of Tables 2, 3 and 4 (backbones, continual, cross_domain) dry-runs on the datasets' release
layouts (fixture folders) and builds every row's paper-scale model without weights: the parameter counts printed are
the published architectures'. The machine-sized overrides (one CPU worker, batch 1) only let the plan check pass on
this 2-core machine; the models, data and recipes are the profiles'."""
import re

import pytest

from orchestrator.cli import sweep_main

from test_scene_datasets import roots  # noqa: F401  (release-layout fixture folders)
from test_voc import make_voc

LOCAL = ["schedule.batch_size=1", "resources.workers=1", "resources.gpus_per_worker=0", "resources.cpus_per_worker=1"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"))


def dry_run(capsys, spec, profile, *overrides):
    rc = sweep_main([f"ablations/{spec}.yaml", "--profile", profile, "--dry-run", *LOCAL, *overrides])
    out, err = capsys.readouterr()
    assert rc == 0, err
    models = out[out.index("models (built without weights: parameters):"):].split("\n\n")[0]
    return out, models


def test_table2_backbones_paper_profile_builds_the_published_models(capsys, voc, repo, monkeypatch):
    monkeypatch.chdir(repo)
    out, models = dry_run(capsys, "backbones", "paper", f"data.root={voc}")
    assert "  SegFormer MiT-B1: mit_b1+segformer_head 13.7M;" in models      # SegFormer-B1: 13.7M (Xie et al.)
    assert re.search(r"  SegFormer MiT-B3: mit_b3\+segformer_head 4[4-7]\.\dM;", models)      # B3: 47.3M (150 cl.)
    vit = re.search(r"  SETR-Naive ViT-L: vit_large_p16\+setr_naive_k3 ([0-9.]+)M;", models)
    assert vit and 304 < float(vit.group(1)) < 320                               # ViT-L/16 encoder ~304M + head
    assert re.search(r"  FCN: resnet50c_d8\+fcn \d+\.\dM; supervised", models)
    assert "SegFormer MiT-B1 + Latent-Space RL: mit_b1+segformer_head" in models and "; latent_rl " in models
    assert "paper (0-15" not in out and "67.8" in out                            # Table 2's VOC numbers


def test_table3_continual_paper_profile_builds_its_models(capsys, voc, repo, monkeypatch):
    monkeypatch.chdir(repo)
    out, models = dry_run(capsys, "continual", "paper", f"data.root={voc}")
    assert "columns: 0-15 = val/mIoU_old, 16-20 = val/mIoU_new, all = val/mIoU" in out
    assert "76.2 / 49.6 / 69.9" in out                                           # PLOP 15-5 (Table 3)
    assert models.count("resnet50c_d8+fcn") == 6


def test_table4_cross_domain_paper_profile_builds_its_models(capsys, roots, repo, monkeypatch):  # noqa: F811
    monkeypatch.chdir(repo)
    out, models = dry_run(capsys, "cross_domain", "paper", f"data.root={roots['cityscapes']}",
                          f"eval.datasets.dark_zurich.root={roots['dark_zurich']}",
                          f"eval.datasets.nighttime_driving.root={roots['nighttime_driving']}")
    assert "Dark Zurich val = val/dark_zurich/mIoU" in out and "Nighttime Driving test = val/nighttime_driving/mIoU" in out
    assert models.count("resnet50c_d8+fcn") == 3      # FCN, + RL, and its random-reward control
