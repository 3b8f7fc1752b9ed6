"""FT: factor transfer (Kim et al., NeurIPS 2018), with its Paraphraser and Translator."""
import torch.nn as nn
import torch.nn.functional as F


def ft(factor_s, factor_t):
    """l1(normalize(flat(factor_s)), normalize(flat(factor_t))); factor_* (B, ...)."""
    norm_s = F.normalize(factor_s.reshape(factor_s.size(0), -1), dim=1)
    norm_t = F.normalize(factor_t.reshape(factor_t.size(0), -1), dim=1)
    return F.l1_loss(norm_s, norm_t)


class FT(nn.Module):
    def forward(self, factor_s, factor_t):
        return ft(factor_s, factor_t)


def _conv_block(conv, in_c, out_c, use_bn):
    # conv, BN (or an empty placeholder that keeps the collection's indices), LeakyReLU.
    return [conv(in_c, out_c, 3, 1, 1, bias=not use_bn),
            nn.BatchNorm2d(out_c) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True)]


def _init(module):
    # As the collection: kaiming for Conv2d only (ConvTranspose2d keeps torch's default).
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        if isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def _encoder(in_channels, factor_channels, use_bn):
    return nn.Sequential(*(_conv_block(nn.Conv2d, in_channels, in_channels, use_bn)
                           + _conv_block(nn.Conv2d, in_channels, factor_channels, use_bn)
                           + _conv_block(nn.Conv2d, factor_channels, factor_channels, use_bn)))


class Paraphraser(nn.Module):
    """Autoencoder on teacher features: (B, C_t, H, W) -> factor (B, int(C_t * k), H, W)
    and reconstruction (B, C_t, H, W). Trained first by reconstruction loss."""

    def __init__(self, in_channels_t, k, use_bn=True):
        super().__init__()
        factor_channels = int(in_channels_t * k)
        self.encoder = _encoder(in_channels_t, factor_channels, use_bn)
        self.decoder = nn.Sequential(*(
            _conv_block(nn.ConvTranspose2d, factor_channels, factor_channels, use_bn)
            + _conv_block(nn.ConvTranspose2d, factor_channels, in_channels_t, use_bn)
            + _conv_block(nn.ConvTranspose2d, in_channels_t, in_channels_t, use_bn)))
        _init(self)

    def forward(self, x):
        z = self.encoder(x)
        return z, self.decoder(z)


class Translator(nn.Module):
    """Encoder on student features: (B, C_s, H, W) -> factor (B, int(C_t * k), H, W)."""

    def __init__(self, in_channels_s, in_channels_t, k, use_bn=True):
        super().__init__()
        self.encoder = _encoder(in_channels_s, int(in_channels_t * k), use_bn)
        _init(self)

    def forward(self, x):
        return self.encoder(x)
