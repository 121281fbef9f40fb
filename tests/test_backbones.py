"""Table 2's backbones: SegFormer MiT (trainers/models/mit.py), SETR-Naive ViT (trainers/models/setr.py), their
published sizes, official-layout checkpoints from local files, the SSSegmentation recipes' parameter groups and
warm-up (trainers/optim.py), and latent_rl on the embedded variants."""
import pytest
import torch

from trainers.config import Config, ModelConfig, ScheduleConfig
from trainers.methods import build_method
from trainers.models import build_segmentor
from trainers.models.mit import MIT_ARCHS, MixVisionTransformer
from trainers.optim import build_lr_schedule, build_optimizer, lr_factor


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def setr_large():
    """SETR-Naive on ViT-L/16 at 512 x 512 with ADE20K's 150 classes, built once by the registered builders on the
    meta device, then materialised with PyTorch's default initialisers (timm's trunc-normal init of ~300M weights
    takes 10-20 s on 2 cores; the test checks sizes and the forward, not the init)."""
    with torch.device("meta"):
        seg = build_segmentor(ModelConfig(encoder="vit_large_p16", decoder="setr_naive"), num_classes=150)
    seg = seg.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in seg.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    for p in (seg.encoder.net.pos_embed, seg.encoder.net.cls_token):
        torch.nn.init.normal_(p, std=0.02)
    return seg.eval()


def test_segformer_mit_b1_forward_512_and_published_size():
    torch.manual_seed(0)
    seg = build_segmentor(ModelConfig(encoder="mit_b1", decoder="segformer_head"), num_classes=150).eval()
    # SegFormer paper Table 1 / NVlabs README: SegFormer-B1 (ADE20K, 150 classes) 13.7M parameters
    assert n_params(seg) == pytest.approx(13.7e6, rel=0.005)
    with torch.inference_mode():
        z = seg.encode(torch.randn(1, 3, 512, 512))
        assert z.shape == (1, 4 * 256, 128, 128)          # the four stages at H/4, E = 256 each (mit.py docstring)
        logits = seg.decode(z, (512, 512))
    assert logits.shape == (1, 150, 512, 512) and torch.isfinite(logits).all()


def test_setr_naive_vit_large_forward_512_and_published_size(setr_large):
    enc = setr_large.encoder
    assert n_params(enc.net) == pytest.approx(304e6, rel=0.01)   # ViT-L/16: 24 blocks, width 1024 (~304M)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):   # bf16: half the fp32 time on CPU
        z = setr_large.encode(torch.randn(1, 3, 512, 512))
        assert z.shape == (1, 1024, 32, 32)                       # 512 / 16 patch grid
        logits = setr_large.decode(z, (512, 512))
    assert logits.shape == (1, 150, 512, 512) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="data.image_size: 512"):
        enc(torch.randn(1, 3, 384, 384))


def test_mit_checkpoint_round_trip_in_official_layout(tmp_path):
    torch.manual_seed(1)
    spec = MIT_ARCHS["mit_tiny"]
    official = MixVisionTransformer(spec["dims"], spec["depths"])
    state = official.state_dict()
    # NVlabs' key names, as mit_b1.pth holds them, plus its ImageNet classifier (dropped on load)
    assert {"patch_embed1.proj.weight", "block1.0.attn.q.weight", "block1.0.attn.sr.weight",
            "block1.0.mlp.dwconv.dwconv.weight", "norm4.weight"} <= set(state)
    state = {**state, "head.weight": torch.randn(1000, 128), "head.bias": torch.zeros(1000)}
    path = tmp_path / "mit_tiny.pth"
    torch.save(state, path)
    loaded = build_segmentor(ModelConfig(encoder="mit_tiny", decoder="segformer_head", pretrained=str(path)), 8)
    x = torch.randn(2, 3, 48, 48)
    official.eval(), loaded.eval()
    with torch.no_grad():
        for a, b in zip(official(x), loaded.encoder.backbone(x)):
            assert torch.equal(a, b)
    torch.save({"block1.0.attn.q.weight": torch.zeros(16, 16)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="NVlabs' layout"):
        build_segmentor(ModelConfig(encoder="mit_tiny", pretrained=str(tmp_path / "other.pth")), 8)


def test_vit_checkpoint_round_trip_in_timm_layout_resizes_pos_embed(tmp_path):
    import timm
    torch.manual_seed(2)
    # a timm ViT at another input size (32 px: a 4 x 4 grid) with its classifier and final norm
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4,
                            num_classes=1000)
    path = tmp_path / "vit_tiny.pth"
    torch.save(src.state_dict(), path)
    seg = build_segmentor(ModelConfig(encoder="vit_tiny_p8", decoder="setr_naive", pretrained=str(path)), 8).eval()
    net = seg.encoder.net
    assert net.pos_embed.shape == (1, 1 + 36, 192)                # resized to the 6 x 6 grid at 48 px
    assert torch.equal(net.blocks[3].mlp.fc2.weight, src.blocks[3].mlp.fc2.weight)
    assert torch.equal(net.cls_token, src.cls_token)
    # the resized embedding is timm's own bicubic resample of the saved one
    from timm.layers import resample_abs_pos_embed
    expect = resample_abs_pos_embed(src.pos_embed, (6, 6), (4, 4), num_prefix_tokens=1)
    assert torch.allclose(net.pos_embed, expect)
    # same weights -> same tokens: the source model at 48 px with that embedding
    src.pos_embed = torch.nn.Parameter(expect)
    src.patch_embed.img_size, src.patch_embed.grid_size = (48, 48), (6, 6)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        ref = src.forward_intermediates(x, indices=[3], norm=False, output_fmt="NCHW", intermediates_only=True)[0]
        z = seg.encoder.norms[-1](ref.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        assert torch.allclose(seg.encode(x), z, atol=1e-6)


def _method(encoder: str, decoder: str, schedule: dict | None = None, method: str = "latent_rl", aux: bool = False):
    model = {"encoder": encoder, "decoder": decoder, "aux_head": {"enabled": aux, "channels": 256}}
    cfg = Config.model_validate({"method": {"name": method}, "model": model,
                                 "data": {"image_size": 48}, "schedule": schedule or {}})
    torch.manual_seed(0)
    return cfg, build_method(cfg, num_classes=8, ignore_index=255)


def test_segformer_recipe_param_groups_and_warmup():
    sched = dict(optimizer="adamw", lr=6e-5, weight_decay=0.01, lr_schedule="poly", poly_power=1.0, warmup_iters=1500,
                 warmup_ratio=1e-6, head_lr_mult=10.0, norm_weight_decay=0.0)
    cfg, model = _method("mit_tiny", "segformer_head", sched, method="supervised")
    opt = build_optimizer(cfg.schedule, model)
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    seg = model.segmentor
    bb = seg.encoder.backbone
    assert by_param[id(bb.block1[0].attn.q.weight)] == (6e-5, 0.01)          # backbone weight
    assert by_param[id(bb.block1[0].attn.q.bias)] == (6e-5, 0.01)            # SSSegmentation decays biases
    assert by_param[id(bb.norm1.weight)] == (6e-5, 0.0)                      # params_rules 'norm': wd 0
    assert by_param[id(bb.block2[0].attn.norm.bias)] == (6e-5, 0.0)
    assert by_param[id(seg.encoder.convs[0][0].weight)] == pytest.approx((6e-4, 0.01))   # 'convs': lr x10
    assert by_param[id(seg.encoder.convs[0][1].weight)] == pytest.approx((6e-4, 0.01))   # head BN: x10, decayed
    assert by_param[id(seg.decoder.classifier.weight)] == pytest.approx((6e-4, 0.01))    # 'decoder': lr x10
    assert len(by_param) == len(list(model.parameters())) and len(opt.param_groups) == 3
    # SSSegmentation's linear warm-up on the poly factor: lr_t = (1 - (1 - t/W)(1 - ratio)) * lr * (1 - t/T)
    T, s = 80000, cfg.schedule
    for t in (0, 1, 750, 1500, 1501, 40000):
        poly = 1 - t / T
        warm = 1 - (1 - t / 1500) * (1 - 1e-6) if t <= 1500 else 1.0
        assert lr_factor(s, t, T) == pytest.approx(warm * poly, rel=1e-12)
    assert lr_factor(s, 0, T) == pytest.approx(1e-6)
    lrs = build_lr_schedule(s, opt, 3000)
    for _ in range(750):
        opt.step(), lrs.step()
    head_lr = next(g["lr"] for g in opt.param_groups if any(p is seg.decoder.classifier.weight for p in g["params"]))
    assert head_lr == pytest.approx(6e-4 * (1 - 0.5 * (1 - 1e-6)) * (1 - 750 / 3000))


def test_setr_recipe_backbone_lr_and_min_lr():
    sched = dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, lr_schedule="poly", poly_power=0.9,
                 backbone_lr_mult=0.1, min_lr_ratio=0.01)
    cfg, model = _method("vit_tiny_p8", "setr_naive", sched)
    opt = build_optimizer(cfg.schedule, model)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    enc = model.segmentor.encoder
    assert lr_of[id(enc.net.blocks[0].attn.qkv.weight)] == pytest.approx(1e-3)   # 'backbone_net': lr x0.1
    assert lr_of[id(enc.norms[-1].weight)] == pytest.approx(1e-2)               # SETRUP's norm_layers: head
    assert lr_of[id(model.segmentor.decoder.classifier.weight)] == pytest.approx(1e-2)
    assert lr_of[id(model.policy.fc_mu.weight if hasattr(model.policy, "fc_mu") else
                    next(model.policy.parameters()))] == pytest.approx(1e-2 * cfg.method.policy.lr_scale)
    # SSSegmentation PolyScheduler: (1 - t/T)^p (lr - min_lr) + min_lr, min_lr = 0.01 lr
    for t in (0, 500, 1000):
        assert lr_factor(cfg.schedule, t, 1000) == pytest.approx((1 - t / 1000) ** 0.9 * 0.99 + 0.01)


def test_default_schedule_groups_unchanged():
    """The defaults (no rule set) give the groups and factors rlseg always had: one group per lr_scale."""
    cfg, model = _method("tiny_cnn", "fcn", {"lr_schedule": "poly"})
    groups = build_optimizer(cfg.schedule, model).param_groups
    assert [len(g["params"]) for g in groups] == [len(p) for p, _ in model.param_groups()]
    assert [g["lr"] for g in groups] == [cfg.schedule.lr * s for _, s in model.param_groups()]
    s = ScheduleConfig(lr_schedule="poly")
    assert [lr_factor(s, t, 100) for t in (0, 50, 100)] == [1.0, 0.5 ** 0.9, 0.0]


@pytest.mark.parametrize("encoder,decoder,width,grid,aux", [("mit_tiny", "segformer_head", 128, 12, False),
                                                            ("vit_tiny_p8", "setr_naive_k3", 192, 6, True)])
def test_latent_rl_step_on_embedded_backbones(encoder, decoder, width, grid, aux):
    """One latent_rl training step (mha modulation: the decoder sees 2d channels) on each embedded variant as
    backbones.yaml runs it (SETR with its auxiliary head on the block before z)."""
    cfg, model = _method(encoder, decoder, aux=aux)
    model.train()
    x, masks = torch.randn(2, 3, 48, 48), torch.randint(0, 8, (2, 48, 48))
    assert model.segmentor.encode(x).shape == (2, width, grid, grid)
    opt = build_optimizer(cfg.schedule, model)
    before = [p.detach().clone() for p in model.segmentor.decoder.parameters()]
    out = model(x, masks)
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["loss_policy"])
    assert ("loss_aux" in out) == aux
    opt.zero_grad()
    out["loss"].backward()
    assert model.policy is not None and all(p.grad is not None for p in model.policy.parameters())
    opt.step()
    model.after_optimizer_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.segmentor.decoder.parameters()))
    model.eval()
    assert model.predict(x).shape == (2, 8, 48, 48)
