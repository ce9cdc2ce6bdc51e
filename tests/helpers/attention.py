"""What the tests of attention and linear_attention share: inputs, token-major views as a
channels-last qkv convolution gives them, and the checks both ops pass (``AttentionOpChecks``,
which each op's test module subclasses with its op)."""
import os
import subprocess
import sys

import pytest
import torch

from ddps import reference
from ddps.ops.attention import kernel_takes, token_major
from helpers import ROOT
from helpers.denoiser import BF16_DOT, DENOISER, assert_matches_reference, bf16_ulp, device_of, on
from helpers.sampling import assert_thread_count_invariant

SHAPES = [(2, 4, 32, 64), (1, 1, 32, 1), (2, 4, 32, 77), (1, 4, 8, 130)]  # [B, heads, d, N]
IDS = [f"B{b}h{h}d{d}N{n}" for b, h, d, n in SHAPES]
LOW = [torch.bfloat16, torch.float16]
NAN, INF = float("nan"), float("inf")
# (tensor, value) pairs put into q, k or v, in one token, at channels 5 and 9. NaN and inf spoil
# rows, heads or channels of the output, through softmaxes and contractions; -inf gives a zero
# weight (exp(-inf) = 0 exactly), which times inf in the same token's v is NaN in the reference.
NON_FINITE = {"q nan": [(0, NAN)], "k nan": [(1, NAN)], "v nan": [(2, NAN)], "q inf": [(0, INF)],
              "k inf": [(1, INF)], "q -inf, v inf": [(0, -INF), (2, INF)], "k -inf, v inf": [(1, -INF), (2, INF)]}


def qkv_inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]


def as_token_major(q, k, v):
    """The three as views of one token-major [B, 3 * heads * d, N] tensor, as a channels-last
    qkv conv gives them (a differentiable copy)."""
    b, h, d, n = q.shape
    qkv = torch.cat((q, k, v), dim=1).reshape(b, 3 * h * d, n).transpose(1, 2).contiguous().transpose(1, 2)
    views = [x.reshape(b, h, d, n) for x in qkv.chunk(3, dim=1)]
    assert token_major(views[0])
    return views


def bf16_agreement(out, emulated):
    """(the share of outputs that are the float64 emulation's rounded to bfloat16, the largest
    error against it in units of one bfloat16 step of the terms' size): emulated = (exact, terms)."""
    exact, terms = emulated
    out = out.double()
    same = (out == exact.bfloat16().double()).double().mean().item()
    return same, ((out - exact).abs() / bf16_ulp(terms)).max().item()


def without_bf16_dot(op: str, shape, scale, tmp_path):
    """ddps.ops.<op> of qkv_inputs(shape) in bfloat16, token-major, computed by a process with
    DDPS_BF16_DOT=0 (as a CPU without AVX512-BF16 looks to the kernels)."""
    script = ("import sys, torch\n"
              "sys.path.insert(0, 'tests')\n"
              "from helpers.attention import as_token_major, qkv_inputs\n"
              "from ddps import ops\n"
              f"q, k, v = (t.bfloat16() for t in qkv_inputs({tuple(shape)}))\n"
              f"torch.save(ops.{op}(*as_token_major(q, k, v), {scale}, backend='cpu'), sys.argv[1])\n")
    path = tmp_path / "out.pt"
    done = subprocess.run([sys.executable, "-c", script, str(path)], env={**os.environ, "DDPS_BF16_DOT": "0"},
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return torch.load(path)


# The C++ kernels of attention and linear_attention (cpu backend: token-major views, d = 16k <= 64),
# tested on any CPU: the backend dispatches to them only where torch reports AVX-512.
def cpu_kernel(test):
    return pytest.mark.skipif("cpu" not in DENOISER, reason="needs the compiled extension")(
        pytest.mark.usefixtures("kernel_dispatch")(test))


class AttentionOpChecks:
    """``op`` against ``reference.<op name>`` on every backend, forward and backward; the C++
    kernel over ``KERNEL_SHAPES`` (both sides of its blocks) and at ``THREADS_N`` tokens; its
    bfloat16 products against ``emulated(q, k, v, scale, rounded)``, the op in float64 with their
    roundings (or none), giving (output, size of its summed terms)."""

    op = None
    emulated = None
    KERNEL_SHAPES: list = []
    THREADS_N = 0

    @property
    def ref(self):
        return getattr(reference, self.op.__name__)

    @pytest.mark.parametrize("backend", DENOISER)
    @pytest.mark.parametrize("shape", SHAPES, ids=IDS)
    def test_matches_reference_fp32(self, backend, shape):
        scale = shape[2] ** -0.5
        assert_matches_reference(lambda q, k, v: self.op(q, k, v, scale, backend=backend),
                                 lambda q, k, v: self.ref(q, k, v, scale), qkv_inputs(shape), device=device_of(backend))

    @pytest.mark.parametrize("backend", DENOISER)
    @pytest.mark.parametrize("dtype", LOW)
    def test_low_precision_within_twice_torch_error(self, backend, dtype):
        assert_matches_reference(lambda q, k, v: self.op(q, k, v, 32 ** -0.5, backend=backend),
                                 lambda q, k, v: self.ref(q, k, v, 32 ** -0.5), qkv_inputs((2, 4, 32, 96)), dtype=dtype,
                                 device=device_of(backend))

    @pytest.mark.parametrize("backend", DENOISER)
    def test_non_contiguous_inputs(self, backend):
        # The qkv conv's output split per head is a strided view, as are slices.
        qkv = qkv_inputs((2, 4, 32, 90))
        q, k, v = (x[:, :, :, ::2] for x in on(backend, *qkv))  # sliced where the kernel runs
        assert not q.is_contiguous()
        torch.testing.assert_close(self.op(q, k, v, 0.2, backend=backend).cpu(),
                                   self.ref(*(x[:, :, :, ::2] for x in qkv), 0.2), rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("backend", DENOISER)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("shape", [(2, 4, 32, 77), (3, 2, 8, 64)], ids=["B2h4d32N77", "B3h2d8N64"])
    def test_token_major_views(self, backend, dtype, shape):
        scale = shape[2] ** -0.5

        def fused(q, k, v):
            out = self.op(*as_token_major(q, k, v), scale, backend=backend)
            assert out.shape == (shape[0], shape[1] * shape[2], shape[3]) and out.stride(1) == 1  # token-major
            return out

        assert_matches_reference(fused, lambda q, k, v: self.ref(q, k, v, scale), qkv_inputs(shape), dtype=dtype,
                                 device=device_of(backend))

    def test_bad_input_is_a_clear_error(self):
        q, k, v = qkv_inputs((1, 2, 8, 5))
        with pytest.raises(ValueError, match=r"k has shape \(1, 2, 8, 4\)"):
            self.op(q, k[..., :4], v, 1.0)
        with pytest.raises(ValueError, match=r"q must be \[B, heads, d, N\]"):
            self.op(q[0], k[0], v[0], 1.0)
        with pytest.raises(TypeError, match="v has dtype torch.float16"):
            self.op(q, k, v.half(), 1.0)
        with pytest.raises(TypeError, match="q must be float32"):
            self.op(q.long(), k, v, 1.0)
        with pytest.raises(ValueError, match="unknown backend"):
            self.op(q, k, v, 1.0, backend="gpu")

    @pytest.mark.parametrize("backend", DENOISER)
    @pytest.mark.parametrize("spoil", NON_FINITE.values(), ids=NON_FINITE.keys())
    def test_non_finite_inputs_as_reference(self, spoil, backend):
        q, k, v = qkv_inputs((1, 2, 32, 50))
        for (tensor, value), channel in zip(spoil, (5, 9)):
            (q, k, v)[tensor][0, 1, channel, 7] = value
        got = self.op(*as_token_major(*on(backend, q, k, v)), 0.2, backend=backend).cpu()
        expected = self.ref(q, k, v, 0.2)
        assert not expected.isfinite().all()
        assert torch.equal(got.isnan(), expected.isnan())
        torch.testing.assert_close(got, expected, equal_nan=True)

    @cpu_kernel
    @pytest.mark.parametrize("dtype", [torch.float32, *LOW])
    def test_kernel_over_blocks(self, dtype):
        # bfloat16 and float16: float32 inside and one rounding of each output, within twice the
        # error of the reference computed in that dtype (measured: 0.2-0.7 of it).
        for shape in self.KERNEL_SHAPES:
            scale = shape[2] ** -0.5

            def kernel(q, k, v):
                views = as_token_major(q, k, v)
                assert kernel_takes(*views)
                out = self.op(*views, scale, backend="cpu")
                assert out.dtype == dtype
                return out

            assert_matches_reference(kernel, lambda q, k, v: self.ref(q, k, v, scale), qkv_inputs(shape), dtype=dtype)

    @cpu_kernel
    def test_kernel_bad_input_is_a_clear_error(self):
        # The ops' own checks stop these first; the kernels check them again for direct callers.
        q, k, v = as_token_major(*qkv_inputs((1, 2, 16, 5)))
        kernel = getattr(torch.ops.ddps, self.op.__name__)
        with pytest.raises(RuntimeError, match="views of one dtype"):
            kernel(q, k.bfloat16(), v, 0.3)
        with pytest.raises(RuntimeError, match="activations must be float32, bfloat16 or float16, got Double"):
            kernel(q.double(), k.double(), v.double(), 0.3)

    @cpu_kernel
    def test_kernel_same_bits_for_any_thread_count(self):
        # Forward and backward.
        q, k, v = qkv_inputs((2, 4, 32, self.THREADS_N))

        def draw():
            views = [x.detach().requires_grad_() for x in as_token_major(q, k, v)]
            out = self.op(*views, 0.2, backend="cpu")
            out.backward(torch.ones_like(out))
            return torch.cat([t.flatten() for t in (out.detach(), *(x.grad for x in views))])
        assert_thread_count_invariant(draw)

    @BF16_DOT
    @cpu_kernel
    def test_bf16_products_round_once(self):
        # With bfloat16 inputs the products take bfloat16 operands, rounded where emulated rounds
        # them: the output is the emulation's rounded to bfloat16 but where float32's sums moved it
        # across a rounding boundary, and within one bfloat16 step of the terms (measured figures
        # in the ops' emulated); without the roundings the share falls well below.
        for shape in self.KERNEL_SHAPES:
            q, k, v = (t.bfloat16() for t in qkv_inputs(shape))
            scale = shape[2] ** -0.5
            out = self.op(*as_token_major(q, k, v), scale, backend="cpu")
            same, error = bf16_agreement(out, self.emulated(q, k, v, scale))
            assert same >= 0.99 and error <= 1.0, shape
            assert bf16_agreement(out, self.emulated(q, k, v, scale, rounded=False))[0] < 0.95, shape

    @BF16_DOT
    @cpu_kernel
    def test_bf16_products_same_bits_for_any_thread_count(self):
        q, k, v = as_token_major(*(t.bfloat16() for t in qkv_inputs((2, 4, 32, self.THREADS_N))))
        assert_thread_count_invariant(lambda: self.op(q, k, v, 0.2, backend="cpu"))

    @BF16_DOT
    def test_bf16_products_off_with_the_switch(self, tmp_path):
        # DDPS_BF16_DOT=0 (as a CPU without AVX512-BF16 looks to the kernels): float32 products of
        # unrounded operands, the output rounded once.
        out = without_bf16_dot(self.op.__name__, (2, 1, 48, 37), 0.25, tmp_path)
        q, k, v = (t.bfloat16() for t in qkv_inputs((2, 1, 48, 37)))
        assert bf16_agreement(out, self.emulated(q, k, v, 0.25, rounded=False))[0] >= 0.99
        assert bf16_agreement(out, self.emulated(q, k, v, 0.25))[0] < 0.95
