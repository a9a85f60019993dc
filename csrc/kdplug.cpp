// kdplug's operators: the only place their schemas are written, and the kdplug._C module.
//
// Importing kdplug._C runs the static registrations below (the schemas) and in
// csrc/cpu/divergence_kernel.cpp (CPU kernels; csrc/cuda/ adds CUDA kernels when built with
// CUDA). Fake (meta) kernels and autograd are registered from Python (kdplug/_ops.py), which is
// also where the packed recipe comes from (kdplug/_pack.py; layout in csrc/kdplug_math.h).
//
//   divergence_fwd(student_logits [N, V], teacher_logits [N, V], params, token_weights?,
//                  row_mask [N], structure, consts) -> (loss [N], row_stats [N, 5])
//     Per-token loss (0 on masked rows) and the per-row statistics the backward reads
//     (csrc/kdplug_math.h, enum Stat). Never computes a gradient.
//   divergence_fwd_grad(the forward's arguments, grad_scale [N]) -> (loss, row_stats, grad [N, V])
//     The forward and, computed in the same call, the gradient divergence_bwd gives for
//     grad_loss = grad_scale (each row's backward pass runs while the row is in cache). CPU only:
//     the training path when the caller can predict the incoming gradient (kdplug/_ops.py).
//   divergence_fwd_grad_into(the forward's arguments, grad_scale [N], grad [N, V]) -> (loss, row_stats)
//     The same, the gradient of the unmasked rows written into grad and the masked rows left as
//     they are (a Split's second recipe fills its rows of the first one's gradient). CPU only.
//   divergence_bwd(grad_loss [N], student_logits, teacher_logits, params, token_weights?,
//                  row_mask, row_stats, structure, consts) -> grad_student [N, V]
//     d(sum_n grad_loss[n] * loss[n]) / d student_logits, in one pass over each row.
//   divergence_bwd_inplace(the same arguments) -> ()
//     The same gradient, written over student_logits (opt-in: saves the N x V allocation).
//   divergence_bwd_into(the same arguments, grad [N, V]) -> ()
//     The gradient of the unmasked rows written into grad; masked rows left as they are (a
//     Split's recipes fill their own rows of one tensor).
//   divergence_partials(student_logits [N, Vs], teacher_logits [N, Vs], params, token_weights?,
//                       row_mask, given?, stage, structure, consts) -> float64 [N, 3 | 1 | 5]
//     One vocabulary shard's partial row statistics (the vocabulary-parallel forward, see
//     kdplug/_vocab_parallel.py): stage 0 the shard's LSEs, stage 1 its log Z, stage 2 its loss
//     and gradient sums, each stage given the combined results of the ones before.
//   head_tail_weights(student_logits [N, V], teacher_logits [N, V], row_mask [N], temperature, mu,
//                     descending) -> float64 [N, 2]
//     AKL's per-token (w_head, w_tail) term weights (kdplug/_head_tail.py has the rule), the
//     token_weights the divergence ops take for it. CPU only.
//
// Logits: float32 / float64 / bfloat16 / float16 (both the same dtype), any row stride, last
// dimension contiguous; math in float32 (float64 for float64). loss, row_stats and grad_loss are
// in that compute dtype; the gradient in the logits' dtype. params: float64 [T, lam, weights...]
// (values that change between calls travel here, so a changing value never recompiles a graph).
// structure / consts: the static part of the recipe. token_weights: float64 [N, n_terms] or None.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <string>

namespace kdplug {
namespace cpu {
// Defined in csrc/cpu/divergence_kernel.cpp (the SIMD level that translation unit targets).
const char* simd_level();
int vec_floats();
}  // namespace cpu
}  // namespace kdplug

TORCH_LIBRARY(kdplug, m) {
  m.def(
      "divergence_fwd(Tensor student_logits, Tensor teacher_logits, Tensor params, Tensor? token_weights, "
      "Tensor row_mask, int[] structure, float[] consts) -> (Tensor loss, Tensor row_stats)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "divergence_fwd_grad(Tensor student_logits, Tensor teacher_logits, Tensor params, Tensor? token_weights, "
      "Tensor row_mask, Tensor grad_scale, int[] structure, float[] consts) -> (Tensor loss, Tensor row_stats, "
      "Tensor grad)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "divergence_fwd_grad_into(Tensor student_logits, Tensor teacher_logits, Tensor params, Tensor? token_weights, "
      "Tensor row_mask, Tensor grad_scale, int[] structure, float[] consts, Tensor(a!) grad) -> (Tensor loss, "
      "Tensor row_stats)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "divergence_bwd(Tensor grad_loss, Tensor student_logits, Tensor teacher_logits, Tensor params, "
      "Tensor? token_weights, Tensor row_mask, Tensor row_stats, int[] structure, float[] consts) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "divergence_bwd_inplace(Tensor grad_loss, Tensor(a!) student_logits, Tensor teacher_logits, Tensor params, "
      "Tensor? token_weights, Tensor row_mask, Tensor row_stats, int[] structure, float[] consts) -> ()",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "divergence_bwd_into(Tensor grad_loss, Tensor student_logits, Tensor teacher_logits, Tensor params, "
      "Tensor? token_weights, Tensor row_mask, Tensor row_stats, int[] structure, float[] consts, Tensor(a!) grad) -> ()",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "divergence_partials(Tensor student_logits, Tensor teacher_logits, Tensor params, Tensor? token_weights, "
      "Tensor row_mask, Tensor? given, int stage, int[] structure, float[] consts) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "head_tail_weights(Tensor student_logits, Tensor teacher_logits, Tensor row_mask, float temperature, "
      "float mu, bool descending) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

// setup.py passes KDPLUG_CUDA_ARCHS (e.g. 8.0_9.0+PTX) and KDPLUG_CUDA_VERSION (e.g. 12.8) as bare
// tokens, stringified here: the build runs through a shell, which strips quotes from -DX="...".
#define KDPLUG_STR_(x) #x
#define KDPLUG_STR(x) KDPLUG_STR_(x)
#ifndef KDPLUG_CUDA_ARCHS
#define KDPLUG_CUDA_ARCHS
#endif

namespace {

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

pybind11::dict build_info() {
  namespace py = pybind11;
  py::dict info;
  py::list backends;
  backends.append("cpu");
#if defined(KDPLUG_WITH_CUDA)
  backends.append("cuda");
#endif
  info["backends"] = backends;
  info["simd"] = kdplug::cpu::simd_level();
  info["vec_floats"] = kdplug::cpu::vec_floats();
  py::list archs;
  std::string all = KDPLUG_STR(KDPLUG_CUDA_ARCHS);
  size_t start = 0;
  while (start < all.size()) {
    size_t end = all.find_first_of(" ;,_", start);
    if (end == std::string::npos) end = all.size();
    if (end > start) archs.append(all.substr(start, end - start));
    start = end + 1;
  }
  info["cuda_archs"] = archs;
#if defined(KDPLUG_CUDA_VERSION)
  info["cuda_version"] = KDPLUG_STR(KDPLUG_CUDA_VERSION);
#else
  info["cuda_version"] = py::none();
#endif
  info["compiler"] = compiler();
  info["torch_built_against"] = TORCH_VERSION;
  info["threads"] = at::get_num_threads();
  info["parallel_backend"] =
#if AT_PARALLEL_OPENMP
      "OpenMP";
#else
      "native";
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdplug's compiled core: importing it registers the torch.ops.kdplug operators";
  m.def("build_info", &build_info,
        "What the extension was built with: backends, SIMD level, CUDA archs, compiler, torch version, threads");
}
