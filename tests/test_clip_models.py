"""CLIP-RL models: the frozen open_clip ViT encoders (clip_vit_tiny, clip_vit_b16) and the tconv decoders."""
import pytest
import torch
import torch.nn.functional as F

from trainers.config import Config, ModelConfig
from trainers.models import build_segmentor
from trainers.models.clip import TINY_MODEL, FrozenClipViT, evenly_spaced_blocks, register_tiny_config, tokens_to_grid
from trainers.registry import DECODERS, ENCODERS


def tiny_encoder(pretrained=None, seed=0) -> FrozenClipViT:
    torch.manual_seed(seed)
    return ENCODERS.get("clip_vit_tiny")(ModelConfig(encoder="clip_vit_tiny", pretrained=pretrained))


@pytest.fixture(scope="module")
def vit_b16():
    torch.manual_seed(0)
    return ENCODERS.get("clip_vit_b16")(ModelConfig(encoder="clip_vit_b16"))


# 1. patch grid and spatial correspondence

def test_tokens_to_grid_drops_cls_and_is_row_major():
    B, H, W, C = 2, 3, 5, 4
    tokens = torch.zeros(B, 1 + H * W, C)
    tokens[:, 0] = -1.0                                            # CLS
    tokens[:, 1:] = torch.arange(H * W, dtype=torch.float)[None, :, None] + 1000 * torch.arange(C)[None, None]
    grid = tokens_to_grid(tokens, (H, W))
    assert grid.shape == (B, C, H, W)
    assert (grid >= 0).all()                                       # no CLS anywhere
    for i in range(H * W):
        assert torch.equal(grid[:, :, i // W, i % W], tokens[:, 1 + i]), i
    with pytest.raises(ValueError):
        tokens_to_grid(tokens, (W, W))


def test_evenly_spaced_blocks():
    assert evenly_spaced_blocks(12, 4) == [2, 5, 8, 11]
    assert evenly_spaced_blocks(4, 2) == [1, 3]


def test_tiny_output_matches_block_tokens_of_the_real_tower():
    """The encoder's channels [k*w, (k+1)*w) at (r, c) are ln_post(block_k output) of patch token r*W + c + 1."""
    enc = tiny_encoder()
    assert enc.blocks == [1, 3] and enc.patch_size == 8 and enc.grid_size == (8, 8)
    assert enc.out_channels == 256
    captured = {}
    hooks = [enc.tower.transformer.resblocks[b].register_forward_hook(
        lambda m, i, o, b=b: captured.__setitem__(b, o)) for b in enc.blocks]
    x = torch.randn(2, 3, 64, 64)
    z = enc(x)
    for h in hooks:
        h.remove()
    assert z.shape == (2, 256, 8, 8)
    H, W = enc.grid_size
    w = enc.width
    for k, b in enumerate(enc.blocks):
        tok = enc.tower.ln_post(captured[b])                       # (B, 1 + 64, w), batch first
        assert tok.shape == (2, 1 + H * W, w)
        for i in (0, 1, W - 1, W, 37, H * W - 1):
            assert torch.allclose(z[:, k * w:(k + 1) * w, i // W, i % W], tok[:, 1 + i], atol=1e-6), (b, i)
    # a patch's content only moves its own token position at block 0's input: perturb the top-right patch and
    # the grid cell (0, W-1) of the fused output changes most
    x2 = x.clone()
    x2[:, :, 0:8, 56:64] += 3.0
    diff = (enc(x2) - z).abs().sum(dim=(0, 1))
    assert diff.argmax().item() == W - 1


def test_vit_b16_random_init_shape(vit_b16):
    assert vit_b16.blocks == [2, 5, 8, 11] and vit_b16.grid_size == (14, 14) and vit_b16.patch_size == 16
    assert vit_b16.out_channels == 4 * 768
    z = vit_b16(torch.randn(1, 3, 224, 224))
    assert z.shape == (1, 3072, 14, 14)
    assert z.requires_grad is False


# 2. frozen

def test_encoder_is_frozen_through_training_steps():
    enc = tiny_encoder()
    dec = DECODERS.get("tconv3")(enc.out_channels, 5)
    model = torch.nn.Sequential(enc, dec)
    enc_before = {k: v.clone() for k, v in enc.state_dict().items()}
    dec_before = {k: v.clone() for k, v in dec.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    enc_ids = {id(p) for p in enc.parameters()}
    assert enc_ids and not enc_ids & {id(p) for p in trainable}
    assert all(not p.requires_grad for p in enc.parameters())
    # all parameters handed to the optimizer (as a careless method would), with weight decay
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    model.train()
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert enc.training and not enc.tower.training
    assert all(not m.training for m in enc.tower.modules())
    assert dec.training
    for k, v in enc.state_dict().items():
        assert torch.equal(v, enc_before[k]), k
    assert all(p.grad is None for p in enc.parameters())
    changed = [k for k, p in dec.named_parameters() if not torch.equal(p, dec_before[k])]
    assert len(changed) == len(dec_before)
    # even with requires_grad switched back on, no graph goes through the tower
    enc.requires_grad_(True)
    assert not enc(x).requires_grad


# 3. local checkpoints through open_clip's own loader

def test_tiny_from_local_checkpoint(tmp_path):
    import open_clip

    torch.manual_seed(1)
    register_tiny_config()
    clip = open_clip.create_model(TINY_MODEL)
    path = tmp_path / "tiny_clip.pt"
    torch.save(clip.state_dict(), path)
    ref = FrozenClipViT(clip.visual, [1, 3])
    loaded = tiny_encoder(pretrained=str(path), seed=2)
    fresh = tiny_encoder(seed=2)                                   # the same seed without the checkpoint
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded(x), ref(x))
    assert not torch.allclose(fresh(x), ref(x))
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        tiny_encoder(pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="model.pretrained"):
        tiny_encoder(pretrained="openai")                          # no published weights for the tiny one


def test_vit_b16_from_local_checkpoint(tmp_path):
    import open_clip

    torch.manual_seed(3)
    clip = open_clip.create_model("ViT-B-16")
    path = tmp_path / "vitb16.pt"
    torch.save(clip.state_dict(), path)
    ref = FrozenClipViT(clip.visual, [2, 5, 8, 11])
    del clip
    torch.manual_seed(4)
    loaded = ENCODERS.get("clip_vit_b16")(ModelConfig(encoder="clip_vit_b16", pretrained=str(path)))
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(loaded(x), ref(x))


# 4. input size

def test_wrong_input_size_names_data_image_size(vit_b16):
    enc = tiny_encoder()
    with pytest.raises(ValueError, match=r"data\.image_size: 64"):
        enc(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"data\.image_size: 224"):
        vit_b16(torch.randn(1, 3, 64, 64))


# 5. decoders

@pytest.mark.parametrize("name,cin,grid,out", [("tconv3", 256, 8, 64), ("tconv", 3072, 14, 224)])
def test_tconv_decoders(name, cin, grid, out):
    torch.manual_seed(0)
    dec = DECODERS.get(name)(cin, 7, None, latent_channels=cin).eval()
    z = torch.randn(2, cin, grid, grid)
    logits = dec(z)
    assert logits.shape == (2, 7, out, out)
    assert dec.scale == out // grid
    feats = dec.features(z)
    assert feats.shape == (2, dec.out_channels, out, out) and dec.out_channels == 32
    assert torch.equal(dec.classifier(feats), logits)
    assert dec.fuse[0].out_channels == 256
    assert DECODERS.get(name)(cin, 7, 64).fuse[0].out_channels == 64   # model.decoder_channels


# 6. registry / config

def test_config_and_segmentor():
    cfg = Config(model={"encoder": "clip_vit_tiny", "decoder": "tconv3"})
    torch.manual_seed(0)
    seg = build_segmentor(cfg.model, 8)
    assert seg.decoder.scale == seg.encoder.patch_size
    seg.train()
    assert not seg.encoder.tower.training
    x = torch.randn(2, 3, 64, 64)
    assert seg(x).shape == (2, 8, 64, 64)
    assert {"clip_vit_b16", "clip_vit_tiny"} <= set(ENCODERS.names())
    assert {"tconv", "tconv3"} <= set(DECODERS.names())
