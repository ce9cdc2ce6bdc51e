// Every schema of the ddps custom ops, in one place; implementations register per backend in
// csrc/<op>/. Also the Python module entry point of ddps._C (the module itself is empty: ops are
// reached through torch.ops.ddps).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(ddps, m) {
  // Sampling ops (ddps/ops/): t = noise level per sample (int64 [B]); table = the per-level
  // lookup table of ddps/ops/_tables.py; seed = CPU int64 scalar tensor (Philox key);
  // mask_index = the [MASK] label (-1: none).
  m.def("q_sample(Tensor x0, Tensor t, Tensor table, Tensor seed, int num_classes, int mask_index, "
        "int? ignore_index) -> Tensor");
  m.def("q_posterior_sample(Tensor x0, Tensor x_t, Tensor t, Tensor table, Tensor seed, int num_classes, "
        "int mask_index, int? ignore_index) -> Tensor");
  m.def("p_posterior_sample(Tensor logits, Tensor x_t, Tensor t, Tensor table, Tensor seed, int num_classes, "
        "int mask_index, int? ignore_index) -> Tensor");
  m.def("renoise(Tensor logits, Tensor t, Tensor table, Tensor seed, int num_classes, int mask_index) -> Tensor");
  // maskige [B, 3, *spatial] (float32/16, bfloat16), palette float32 [rows, 3] -> int64 [B, *spatial]:
  // the nearest palette row of each pixel (GSS's maskige decoding, ddps/ops/maskige_decode.py).
  m.def("maskige_decode(Tensor maskige, Tensor palette) -> Tensor");
  // Denoiser ops (ddps/ops/): x channels-last [B, C, H, W]; scale, shift [B, C] (FiLM) or None.
  // Forward returns (y, mean [B, groups], rstd [B, groups]); the backward takes the latter two.
  m.def("group_norm_film_silu(Tensor x, Tensor weight, Tensor bias, Tensor? scale, Tensor? shift, int groups, "
        "float eps) -> (Tensor, Tensor, Tensor)");
  m.def("group_norm_film_silu_backward(Tensor grad, Tensor x, Tensor weight, Tensor bias, Tensor? scale, "
        "Tensor? shift, Tensor mean, Tensor rstd, int groups) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // x [B, C, *spatial] contiguous (channel-major), g float32 [C] -> (y, mean [B, pixels], rstd [B,
  // pixels]); the backward takes the latter two and returns (dx, dg).
  m.def("channel_layer_norm(Tensor x, Tensor g, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("channel_layer_norm_backward(Tensor grad, Tensor x, Tensor g, Tensor mean, Tensor rstd) -> (Tensor, Tensor)");
  // q, k, v [B, heads, D, N] with D contiguous -> (out [B, heads * D, N] laid out token-major,
  // lse [B, heads, N]: the log-sum-exp of each query's scaled scores); the backward takes grad and
  // out laid out as q and returns dq, dk, dv laid out token-major: packed, one [B, 3 * heads * D, N]
  // tensor (d(qkv)); else three [B, heads, D, N] ones.
  m.def("attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, "
        "bool packed) -> Tensor[]");
  // q, k, v [B, heads, D, N] with D contiguous. Forward returns (out [B, heads * D, N] laid out
  // token-major, context [B, heads, D, D] with scale / N and k's softmax sums folded in, kmax and
  // ksum [B, heads, D]: the shift and sum of k's softmax over tokens); the backward takes them and
  // returns dq, dk, dv as attention_backward does.
  m.def("linear_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor context, Tensor kmax, "
        "Tensor ksum, float scale, bool packed) -> Tensor[]");
  // 3x3 convolution, stride 1, padding 1, of x channels-last [B, Cin, H, W]: weight [Cout, Cin, 3, 3] is
  // what autograd differentiates, u [16, ceil(Cout / 32), Cin, 32] its Winograd transform in 32-column
  // panels (the kernel's operand, ddps/ops/conv3x3.py's winograd_weight), or for bfloat16 x on a CPU
  // with AVX512-BF16 that transform in bfloat16, [16, ceil(Cout / 32), ceil(Cin / 2), 64], input
  // channels in pairs. Whether this CPU takes the latter: cpu_bf16_dot() -> bool (cpuid, in
  // csrc/common/vec.h; registered in csrc/conv3x3/).
  m.def("conv3x3(Tensor x, Tensor weight, Tensor u, Tensor? bias) -> Tensor");
  // d(loss)/dU [16, Cin, Cout] of conv3x3 from the gradient of its output and x (the weight's
  // gradient is G^T dU G).
  m.def("conv3x3_weight_grad(Tensor grad, Tensor x) -> Tensor");
}

static PyModuleDef ddps_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ddps_c_module); }
