"""Per-element helpers of the Triton sampling kernels: the same formulas, in the same float
operation order, as csrc/common/{philox,math,labels}.h, so that the Triton kernels and the compiled
ones return identical samples for the same seed (asserted under TRITON_INTERPRET=1). On a GPU that
also takes every sampling kernel launched with ``enable_fp_fusion=False``: Triton otherwise fuses
a multiply and an add into one fma, rounded once where the CPU build (-ffp-contract=off) and the
CUDA kernels (__fmul_rn, __fadd_rn) round twice. ``make gpu-compile-check`` asserts that their PTX
holds no fma and no flush-to-zero arithmetic."""
import triton
import triton.language as tl


@triton.jit
def philox4(seed, index):
    """Four uint32 words of Philox4x32-10 at counter (index_lo, index_hi, 0, 0), key = seed."""
    return tl.randint4x(seed, index)


@triton.jit
def element_words(seed, index):
    """The two Philox words of the label ops' element ``index``: one Philox call serves the pair
    (2j, 2j + 1), words (w0, w1) for the even element, (w2, w3) for the odd one."""
    w0, w1, w2, w3 = philox4(seed, index // 2)
    odd = (index % 2) == 1
    return tl.where(odd, w2, w0), tl.where(odd, w3, w1)


@triton.jit
def word(w):
    """A uint32 Philox word as int64, for exact comparisons with the int64 thresholds."""
    return w.to(tl.int64) & 0xFFFFFFFF


@triton.jit
def uniform_below(w, n):
    """Uniform integer in [0, n) from one word (multiply-shift), as ddps::uniform_below."""
    return (word(w) * n) >> 32


@triton.jit
def uniform24(w):
    """Uniform float in [0, 1) with 24 random bits, as ddps::uniform24."""
    return (word(w) >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def exp_neg(x):
    """exp(x) for x <= 0, 0 below -87, NaN stays NaN: ddps::exp_neg, operation for operation."""
    n = tl.floor(x * 1.44269502 + 0.5)
    r = (x + n * -0.693145752) + n * -1.42860677e-06
    p = r * 0.0 + 1.98412698e-04
    p = p * r + 1.38888889e-03
    p = p * r + 8.33333333e-03
    p = p * r + 4.16666667e-02
    p = p * r + 1.66666667e-01
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    in_range = x >= -87.0
    exponent = tl.where(in_range, n.to(tl.int32) + 127, 1)
    scale = (exponent << 23).to(tl.float32, bitcast=True)
    return tl.where(in_range, p * scale, tl.where(x != x, x, 0.0))


@triton.jit
def q_sample_label(x0, keep, keep_or_mask, w0, w1, num_classes, mask_index):
    """ddps::q_sample_label without the ignore test (the callers apply it)."""
    noised = tl.where(word(w0) < keep_or_mask, mask_index, uniform_below(w1, num_classes))
    return tl.where(word(w0) < keep, x0, noised)


@triton.jit
def argmax_step(v, k, best, arg):
    """One class of a running argmax, as ddps::argmax_step: ties keep the lower class, the first
    NaN wins and stays. Returns the new (best, arg)."""
    take = ((v > best) | (v != v)) & (best == best)
    return tl.where(take, v, best), tl.where(take, k, arg)
