"""Small ResNets for 8x8 single-channel images, returning what the KD methods read.

A network maps (B, 1, 8, 8) to ``Features(stem, stage1, stage2, stage3, feat, out)``:
``stem`` and each ``stage<k>`` are ``(pre, post)`` pairs, the map before and after
the final ReLU (the stem's, or the stage's last block's); stage1 is 8x8, stage2
4x4, stage3 2x2; ``feat`` (B, C3) is the pooled feature and ``out`` (B, 10) the
logits. The teacher has widths (16, 32, 64) and two blocks a stage; the student,
a quarter as wide, (4, 8, 16) and one block a stage.
"""
from collections import namedtuple

import torch.nn as nn

Features = namedtuple("Features", "stem stage1 stage2 stage3 feat out")

TEACHER_WIDTHS, TEACHER_BLOCKS = (16, 32, 64), 2
STUDENT_WIDTHS, STUDENT_BLOCKS = (4, 8, 16), 1


def channels(widths):
    """Channels of stem, stage1, stage2, stage3, feat for a net of these stage widths."""
    return (widths[0],) + tuple(widths) + (widths[-1],)


class ResBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN when the shape
    changes); returns (pre-ReLU sum, post-ReLU)."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        pre = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        pre = pre + (x if self.shortcut is None else self.shortcut(x))
        return pre, self.relu(pre)


class DigitsResNet(nn.Module):
    """Stem conv (1 -> widths[0]) at 8x8, three stages (the 2nd and 3rd halve the
    size), global average pool, linear classifier."""

    def __init__(self, widths, blocks_per_stage, num_classes=10):
        super().__init__()
        self.widths = tuple(widths)
        self.conv = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages, in_c = [], widths[0]
        for k, width in enumerate(widths):
            blocks = [ResBlock(in_c, width, 1 if k == 0 else 2)]
            blocks += [ResBlock(width, width, 1) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.ModuleList(blocks))
            in_c = width
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def channels(self):
        return channels(self.widths)

    def forward(self, x):
        pre = self.bn(self.conv(x))
        stem = (pre, self.relu(pre))
        maps, h = [], stem[1]
        for stage in self.stages:
            for block in stage:
                pair = block(h)
                h = pair[1]
            maps.append(pair)
        feat = h.mean(dim=(2, 3))
        return Features(stem, *maps, feat, self.fc(feat))


def teacher():
    return DigitsResNet(TEACHER_WIDTHS, TEACHER_BLOCKS)


def student():
    return DigitsResNet(STUDENT_WIDTHS, STUDENT_BLOCKS)


class Connector(nn.Sequential):
    """1x1 conv + BN mapping a student map to the teacher's width (as the FitNet
    regressor and the AB connector), for losses that compare maps channel by channel."""

    def __init__(self, in_channels, out_channels):
        super().__init__(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out", nonlinearity="relu")
