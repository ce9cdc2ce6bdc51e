// Every schema of the ddps custom ops, in one place; implementations register per backend in
// csrc/<op>/. Also the Python module entry point of ddps._C (the module itself is empty: ops are
// reached through torch.ops.ddps).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(ddps, m) {
  // x_t ~ q(x_t | x_0) for the uniform transition; seed: CPU int64 scalar tensor.
  m.def("q_sample(Tensor x0, Tensor t, Tensor keep_threshold, Tensor seed, int num_classes) -> Tensor");
}

static PyModuleDef ddps_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ddps_c_module); }
