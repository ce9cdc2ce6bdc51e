"""Swin blocks (ddps.nn.swin): the relative position index as mmseg derives it, and each block's
output against windowed attention written out window by window, shifted and padded included."""
import pytest
import torch
import torch.nn.functional as F

from ddps.nn.swin import MASKED, SwinBlock, SwinStack, relative_position_index


@pytest.mark.parametrize("window", [1, 2, 3, 7])
def test_relative_position_index_is_mmsegs(window):
    # mmseg's WindowMSA: coordinates c = (2w - 1) * y + x, index = c_i + c_(N-1-j)
    step = torch.arange(0, (2 * window - 1) * window, 2 * window - 1)[:, None] + torch.arange(window)[None]
    coords = step.reshape(1, -1)
    assert torch.equal(relative_position_index(window), (coords + coords.T).flip(1))


def _expected(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """The block computed the long way: pad, shift, then attention within each window separately."""
    b, h, w, c = x.shape
    s, shift, heads = block.window, block.shift, block.heads
    y = F.layer_norm(x, (c,), block.norm1.weight, block.norm1.bias)
    hp, wp = -(-h // s) * s, -(-w // s) * s
    y = F.pad(y, (0, 0, 0, wp - w, 0, hp - h))
    y = y.roll((-shift, -shift), (1, 2))
    # after the cyclic shift, a window may hold positions that wrapped around the map's edge
    # beside ones that did not; they are not neighbours, so they do not attend to each other
    wrapped = lambda i, n: int(shift > 0 and i >= n - shift)  # noqa: E731
    region = torch.tensor([[2 * wrapped(i, hp) + wrapped(j, wp) for j in range(wp)] for i in range(hp)])
    out = torch.zeros_like(y)
    d = c // heads
    for n in range(b):
        for wy in range(0, hp, s):
            for wx in range(0, wp, s):
                pos = [(wy + i, wx + j) for i in range(s) for j in range(s)]
                tokens = torch.stack([y[n, p, q] for p, q in pos])
                qkv = tokens @ block.qkv.weight.T + block.qkv.bias
                q, k, v = qkv.split(c, -1)
                heads_out = []
                for hd in range(heads):
                    sl = slice(hd * d, (hd + 1) * d)
                    logits = (q[:, sl] * d ** -0.5) @ k[:, sl].T
                    for a, (ya, xa) in enumerate(pos):
                        for e, (ye, xe) in enumerate(pos):
                            row = (ya - ye + s - 1) * (2 * s - 1) + (xa - xe + s - 1)
                            logits[a, e] += block.relative_position_bias_table[row, hd]
                            if region[ya, xa] != region[ye, xe]:
                                logits[a, e] += MASKED
                    heads_out.append(logits.softmax(-1) @ v[:, sl])
                merged = torch.cat(heads_out, -1) @ block.proj.weight.T + block.proj.bias
                for t, (p, qq) in enumerate(pos):
                    out[n, p, qq] = merged[t]
    out = out.roll((shift, shift), (1, 2))[:, :h, :w]
    x = x + out
    fc1, fc2 = block.mlp[0], block.mlp[2]
    hidden = F.gelu(F.layer_norm(x, (c,), block.norm2.weight, block.norm2.bias) @ fc1.weight.T + fc1.bias)
    return x + hidden @ fc2.weight.T + fc2.bias


@pytest.mark.parametrize("shifted", [False, True])
# a multiple of the window, one that is padded, one of three windows or more a side
@pytest.mark.parametrize("size,window", [((4, 6), 2), ((5, 7), 3), ((7, 10), 2)])
def test_block_is_windowed_attention_with_relative_bias(shifted, size, window):
    torch.manual_seed(0)
    block = SwinBlock(8, 2, window, 16, shifted=shifted)
    assert block.relative_position_bias_table.shape == ((2 * window - 1) ** 2, 2)  # mmseg's table
    torch.nn.init.normal_(block.relative_position_bias_table, std=1.0)  # large enough to matter
    x = torch.randn(2, *size, 8)
    assert torch.allclose(block(x), _expected(block, x), atol=1e-5)


def test_stack_alternates_shifts_and_ends_with_layer_norm():
    torch.manual_seed(0)
    stack = SwinStack(8, 2, 2, depth=4, mlp=16)
    assert [blk.shift for blk in stack.blocks] == [0, 1, 0, 1]
    x = torch.randn(1, 8, 4, 4)
    y = x.permute(0, 2, 3, 1)
    for blk in stack.blocks:
        y = blk(y)
    assert torch.allclose(stack(x), stack.norm(y).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="not divisible"):
        SwinBlock(6, 4, 2, 8)
