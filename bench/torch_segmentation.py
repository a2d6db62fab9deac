"""PyTorch renderings of SSL4MIS's segmentation networks, shared by the parity tests and the cross-teaching benchmark.

`ssl4mis_unet` is SSL4MIS's U-Net (code/networks/unet.py); `swin_unet_decoder` is its SwinTransformerSys decoder
(code/networks/swin_transformer_unet_skip_expand_decoder_sys.py) over timm's own Swin encoder modules; `swin_unet`
assembles encoder and decoder into one trainable module, as SSL4MIS's SwinUnet. Written from the reference code's
structure: tests/test_segmentation_models.py checks each against our flax models to 1e-5, and
bench/cross_teaching_step.py trains them. torch and timm are imported inside the functions, so importing this module
needs neither.
"""

from __future__ import annotations

from typing import Any, Sequence


def ssl4mis_unet(feature_channels: Sequence[int], in_channels: int, num_classes: int,
                 dropout: Sequence[float] | None = None) -> Any:
    """SSL4MIS's UNet (ConvBlock, DownBlock, UpBlock with bilinear=True, Decoder) as a torch module.

    Without `dropout` every ConvBlock is Sequential(conv, BN, LeakyReLU, conv, BN, LeakyReLU) (the eval-mode layout
    the parity test ports); with it (one rate per encoder level, as SSL4MIS's (0.05, 0.1, 0.2, 0.3, 0.5)) the encoder
    blocks get SSL4MIS's Dropout between the LeakyReLU and the second conv. The decoder has none (SSL4MIS's 0.0).
    """
    import torch

    nn = torch.nn

    def conv_block(cin: int, cout: int, p: float = 0.0):
        first = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU()]
        second = [nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU()]
        return nn.Sequential(*first, *([nn.Dropout(p)] if p > 0 else []), *second)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            ch, rates = feature_channels, dropout or [0.0] * 5
            self.blocks = nn.ModuleList([conv_block(in_channels if i == 0 else ch[i - 1], ch[i], rates[i])
                                         for i in range(5)])
            self.reduce = nn.ModuleList([nn.Conv2d(ch[4 - i], ch[3 - i], 1) for i in range(4)])
            self.up_blocks = nn.ModuleList([conv_block(2 * ch[3 - i], ch[3 - i]) for i in range(4)])
            self.out_conv = nn.Conv2d(ch[0], num_classes, 3, padding=1)

        def forward(self, x):
            levels = [self.blocks[0](x)]
            for block in self.blocks[1:]:
                levels.append(block(nn.functional.max_pool2d(levels[-1], 2)))
            x = levels[-1]
            for i in range(4):
                up = nn.functional.interpolate(self.reduce[i](x), scale_factor=2, mode="bilinear", align_corners=True)
                x = self.up_blocks[i](torch.cat([levels[3 - i], up], dim=1))
            return self.out_conv(x)

    return Net()


def swin_unet_decoder(encoder: Any, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int],
                      window_size: int, grid: int, num_classes: int,
                      drop_path_rates: Sequence[Sequence[float]] | None = None) -> Any:
    """SSL4MIS's SwinTransformerSys decoder (layers_up, concat_back_dim, norm_up, up, output) on timm's blocks.

    `encoder` (a timm SwinTransformer) runs inside forward() but is not registered: the module's parameters are the
    decoder's only. `drop_path_rates` (per level, per block; SSL4MIS reuses the encoder level's rates) enable
    stochastic depth in the decoder blocks. Patch expanding is written with the definition of einops'
    'b h w (p1 p2 c) -> b (h p1) (w p2) c' as strided assignments, not the reshape the model uses.
    """
    import torch
    from timm.models.swin_transformer import SwinTransformerBlock

    nn = torch.nn
    levels = len(depths)

    def spread(x, scale):
        batch, height, width, channels = x.shape
        out = channels // scale**2
        y = x.new_zeros(batch, height * scale, width * scale, out)
        for p1 in range(scale):
            for p2 in range(scale):
                y[:, p1::scale, p2::scale, :] = x[..., (p1 * scale + p2) * out:(p1 * scale + p2 + 1) * out]
        return y

    class Expand(nn.Module):
        def __init__(self, dim, scale, out):
            super().__init__()
            self.scale, self.expand, self.norm = scale, nn.Linear(dim, scale**2 * out, bias=False), nn.LayerNorm(out)

        def forward(self, x):
            return self.norm(spread(self.expand(x), self.scale))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            dims = [embed_dim * 2**level for level in range(levels)]
            self.layers_up = nn.ModuleList([Expand(dims[-1], 2, dims[-1] // 2)])
            self.concat_back_dim = nn.ModuleList([nn.Identity()])
            for step in range(1, levels):
                level = levels - 1 - step
                side = grid // 2**level
                stage = nn.Module()
                stage.blocks = nn.ModuleList([
                    SwinTransformerBlock(dims[level], (side, side), num_heads[level], window_size=window_size,
                                         shift_size=0 if j % 2 == 0 else window_size // 2,
                                         drop_path=drop_path_rates[level][j] if drop_path_rates else 0.0)
                    for j in range(depths[level])])
                stage.upsample = Expand(dims[level], 2, dims[level] // 2) if level > 0 else None
                self.layers_up.append(stage)
                self.concat_back_dim.append(nn.Linear(2 * dims[level], dims[level]))
            self.norm_up, self.up = nn.LayerNorm(embed_dim), Expand(embed_dim, 4, embed_dim)
            self.output = nn.Conv2d(embed_dim, num_classes, 1, bias=False)

        def forward(self, x):
            x, skips = encoder.patch_embed(x), []
            for stage in encoder.layers:  # SSL4MIS keeps each stage's input (after the previous merging) as skip
                x = stage.downsample(x)
                skips.append(x)
                x = stage.blocks(x)
            x = self.layers_up[0](encoder.norm(x))
            for step in range(1, levels):
                x = self.concat_back_dim[step](torch.cat([x, skips[levels - 1 - step]], dim=-1))
                for block in self.layers_up[step].blocks:
                    x = block(x)
                if self.layers_up[step].upsample is not None:
                    x = self.layers_up[step].upsample(x)
            x = self.up(self.norm_up(x))
            return self.output(x.permute(0, 3, 1, 2))

    return Decoder()


def swin_unet(img_size: int, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], window_size: int,
              num_classes: int, drop_path_rate: float = 0.0, mlp_ratio: float = 4.0, patch_size: int = 4) -> Any:
    """SSL4MIS's SwinUnet: timm's SwinTransformer encoder (random init) + `swin_unet_decoder`, one trainable module.

    Stochastic depth rises linearly to `drop_path_rate` over the encoder's blocks (timm) and the decoder reuses each
    level's rates (SSL4MIS); one-channel input is repeated to 3 channels, as SwinUnet.forward does.
    """
    import numpy as np
    import torch
    from timm.models.swin_transformer import SwinTransformer

    rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
    starts = np.cumsum([0, *depths]).tolist()
    per_level = [rates[starts[i]:starts[i + 1]] for i in range(len(depths))]
    encoder = SwinTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depths=tuple(depths),
                              num_heads=tuple(num_heads), window_size=window_size, mlp_ratio=mlp_ratio,
                              drop_path_rate=drop_path_rate, num_classes=0)
    decoder = swin_unet_decoder(encoder, embed_dim, depths, num_heads, window_size, img_size // patch_size,
                                num_classes, per_level)

    class SwinUnet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = encoder, decoder

        def forward(self, x):
            return self.decoder(x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x)

    return SwinUnet()
