"""Encoders, decoders, the segmentor, and loading encoder weights from a local checkpoint file."""
import torch

from trainers.config import ModelConfig
from trainers.models import build_segmentor
from trainers.models.encoders import ENCODERS


def test_tiny_cnn_segmentor_shapes():
    seg = build_segmentor(ModelConfig(), num_classes=8)
    x = torch.randn(2, 3, 64, 64)
    z = seg.encode(x)
    assert z.shape == (2, 128, 8, 8)                 # output stride 8
    assert seg(x).shape == (2, 8, 64, 64)
    wide = build_segmentor(ModelConfig(), num_classes=8, decoder_in_channels=lambda d: 2 * d)
    assert wide.decode(torch.cat([z, z], 1), (64, 64)).shape == (2, 8, 64, 64)


def test_timm_resnet_d8_from_local_checkpoint(tmp_path):
    torch.manual_seed(0)
    enc = ENCODERS.get("resnet18_d8")(ModelConfig(encoder="resnet18_d8"))
    assert enc.out_channels == 512
    x = torch.randn(1, 3, 64, 64)
    enc.eval()
    z = enc(x)
    assert z.shape == (1, 512, 8, 8)
    # a classification checkpoint as timm writes it (with the fc head), loaded back through timm's own loader
    import timm
    full = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)
    loaded = ENCODERS.get("resnet18_d8")(ModelConfig(encoder="resnet18_d8", pretrained=str(path))).eval()
    for name, p in full.named_parameters():
        if not name.startswith("fc."):
            assert torch.equal(dict(loaded.net.named_parameters())[name], p), name


def test_tiny_cnn_local_checkpoint(tmp_path):
    a = ENCODERS.get("tiny_cnn")(ModelConfig())
    path = tmp_path / "tiny.pt"
    torch.save(a.state_dict(), path)
    b = ENCODERS.get("tiny_cnn")(ModelConfig(pretrained=str(path)))
    a.eval(), b.eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(a(x), b(x))
