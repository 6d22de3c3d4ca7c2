"""PyTorch definitions of the CRNN architectures, named so their checkpoints load as saved.

All models map an image batch float32 ``[N, 1, 32, W]`` to raw logits float32 ``[T, N, C]``
with ``T = W // 4 + 1`` (see :meth:`models.spec.ModelSpec.frames`) and ``C = num_classes``;
softmax/log-softmax is left to the decoder (it does not change the greedy path, and
``softmax(log_softmax(x)) == softmax(x)``, so confidences are the same either way).

Architectures:
    ``crnn`` (Shi, Bai, Yao, "An End-to-End Trainable Neural Network for Image-based
    Sequence Recognition", TPAMI 2017; module names of meijieru/crnn.pytorch), with two
    recurrent layouts: ``meijieru`` (one bidirectional ``nn.LSTM`` per block) and
    ``modelzoo`` (Ascend ModelZoo NPU training: separate forward and backward LSTMs, the
    backward one reading the time-flipped sequence).
    ``nano-ocr``: the nano-ocr 0.1.0 package's CRNN (six convolutions, one BiLSTM).

Models are built through :func:`models.registry.build_model`.
"""

from __future__ import annotations

import torch
from torch import nn

CRNN_LAYOUTS = ("meijieru", "modelzoo")


class BidirectionalLSTM(nn.Module):
    """meijieru block: BiLSTM then a Linear on every frame; ``[T, N, n_in] -> [T, N, n_out]``."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int):
        super().__init__()
        self.rnn = nn.LSTM(n_in, n_hidden, bidirectional=True)
        self.embedding = nn.Linear(n_hidden * 2, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recurrent, _ = self.rnn(x)
        steps, batch, hidden = recurrent.size()
        return self.embedding(recurrent.view(steps * batch, hidden)).view(steps, batch, -1)


class SplitBidirectionalLSTM(nn.Module):
    """ModelZoo block: forward LSTM, backward LSTM on the flipped sequence, Linear.

    Same mapping as :class:`BidirectionalLSTM`; the time flips export as ONNX Slice nodes
    with step -1, which ``convert.fix`` folds into an LSTM with ``direction="reverse"``.
    """

    def __init__(self, n_in: int, n_hidden: int, n_out: int):
        super().__init__()
        self.fw_rnn = nn.LSTM(n_in, n_hidden)
        self.bw_rnn = nn.LSTM(n_in, n_hidden)
        self.embedding = nn.Linear(n_hidden * 2, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        forward_out, _ = self.fw_rnn(x)
        backward_out, _ = self.bw_rnn(torch.flip(x, [0]))
        recurrent = torch.cat((forward_out, torch.flip(backward_out, [0])), 2)
        steps, batch, hidden = recurrent.size()
        return self.embedding(recurrent.view(steps * batch, hidden)).view(steps, batch, -1)


def _conv_stack(channels: list[int], batchnorm_after: set[int]) -> nn.Sequential:
    """meijieru-named VGG stack: ``conv{i}``, ``batchnorm{i}``, ``relu{i}``, ``pooling{k}``.

    The last convolution is 2x2 without padding, the others 3x3 with padding 1. Pools
    follow convolutions 0 and 1 (2x2/2) and, when there are 7 convolutions, 3 and 5
    ((2,2) kernel, (2,1) stride, (0,1) padding).
    """
    pools = {0: (2, 2, 0), 1: (2, 2, 0), 3: ((2, 2), (2, 1), (0, 1)), 5: ((2, 2), (2, 1), (0, 1))}
    cnn = nn.Sequential()
    n_in = 1
    for i, n_out in enumerate(channels):
        last = i == len(channels) - 1
        cnn.add_module(f"conv{i}", nn.Conv2d(n_in, n_out, 2 if last else 3, 1, 0 if last else 1))
        if i in batchnorm_after:
            cnn.add_module(f"batchnorm{i}", nn.BatchNorm2d(n_out))
        cnn.add_module(f"relu{i}", nn.ReLU(True))
        if i in pools:
            cnn.add_module(f"pooling{len([p for p in pools if p < i])}", nn.MaxPool2d(*pools[i]))
        n_in = n_out
    return cnn


class CRNN(nn.Module):
    """The reference CRNN: 7 convolutions (64..512), two BiLSTM blocks 512->256->256->C.

    ``width`` (first convolution's channels) and ``hidden`` scale it down: ``crnn-small``
    is ``width=32, hidden=128`` (32..256 channels, about 2.1 M parameters).
    """

    def __init__(self, num_classes: int, layout: str = "meijieru", hidden: int = 256,
                 width: int = 64):
        super().__init__()
        if layout not in CRNN_LAYOUTS:
            raise ValueError(f"layout must be one of {CRNN_LAYOUTS}, got {layout!r}")
        self.layout = layout
        channels = [width * k for k in (1, 2, 4, 4, 8, 8, 8)]  # 64..512 for the reference
        self.cnn = _conv_stack(channels, {2, 4, 6})
        block = BidirectionalLSTM if layout == "meijieru" else SplitBidirectionalLSTM
        self.rnn = nn.Sequential(block(channels[-1], hidden, hidden),
                                 block(hidden, hidden, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.cnn(images).squeeze(2).permute(2, 0, 1)  # [T, N, 512]
        return self.rnn(features)


class NanoOCR(nn.Module):
    """nano-ocr 0.1.0: 6 convolutions (64..512), one BiLSTM(512, 256, batch_first), Linear.

    Its checkpoint names the stack ``cnn.<index>`` (a plain ``nn.Sequential``), so the
    layers are built in that order rather than with meijieru's names.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        wide_pool = ((2, 2), (2, 1), (0, 1))
        self.cnn = nn.Sequential(
            nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(*wide_pool),
            nn.Conv2d(256, 512, 3, padding=1), nn.BatchNorm2d(512), nn.ReLU(True),
            nn.MaxPool2d(*wide_pool),
            nn.Conv2d(512, 512, 2, padding=0), nn.BatchNorm2d(512), nn.ReLU(True),
        )
        self.rnn = nn.LSTM(512, 256, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.cnn(images).squeeze(2).permute(0, 2, 1)  # [N, T, 512]
        recurrent, _ = self.rnn(features)
        return self.fc(recurrent).permute(1, 0, 2)  # [T, N, C]
