// A mixed-precision GEMM on CPU for the fused LM head (rlhf_kernels/ops/lm_head.py):
// bf16 or fp16 operands, a float32 product, out = beta * out + a @ b. Every
// product of two bf16 (fp16) numbers is exact in float32, so this is the
// float32 GEMM of the upcast operands without making float32 copies of them,
// and on CPUs with bf16 dot-product instructions (AVX512_BF16, AMX) it runs at
// their rate. It is MKL's cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32, which
// torch's MKL build carries in libtorch_cpu; they are weak symbols here, so a
// torch built without MKL (e.g. OpenBLAS on aarch64) still loads this library,
// mixed_gemm_available() says false, and the op converts to float32 instead.
#include <climits>
#include <cstdint>

#include <torch/library.h>
#include <torch/types.h>

extern "C" {
// MKL's prototypes with the CBLAS enums as int (their C ABI) and MKL_INT as
// int (the LP64 interface torch links).
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                          float* c, int ldc) __attribute__((weak));
}

namespace rlhf_kernels {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

bool mixed_gemm_available(at::ScalarType dtype) {
  if (dtype == at::kBFloat16) return cblas_gemm_bf16bf16f32 != nullptr;
  if (dtype == at::kHalf) return cblas_gemm_f16f16f32 != nullptr;
  return false;
}

// A row-major operand as BLAS takes it: (data, transpose flag, leading dimension),
// copied to contiguous when neither of its strides is 1.
struct Operand {
  at::Tensor tensor;
  int trans;
  int64_t ld;
};

Operand as_operand(const at::Tensor& t) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, cols)) return {t, kNoTrans, t.stride(0)};
  if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, rows)) return {t, kTrans, t.stride(1)};
  at::Tensor c = t.contiguous();
  return {c, kNoTrans, std::max<int64_t>(1, cols)};
}

int checked_int(int64_t x, const char* what) {
  TORCH_CHECK(x <= INT_MAX, "mixed_gemm_: ", what, " = ", x, " exceeds MKL's 32-bit integers");
  return static_cast<int>(x);
}

void mixed_gemm_cpu(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2, "mixed_gemm_: 2-D tensors");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "mixed_gemm_: a and b of one dtype");
  TORCH_CHECK(mixed_gemm_available(a.scalar_type()), "mixed_gemm_: no MKL GEMM for ", a.scalar_type(),
              " in this torch build");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "mixed_gemm_: out must be float32");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  TORCH_CHECK(b.size(0) == k && out.size(0) == m && out.size(1) == n, "mixed_gemm_: shapes ", a.sizes(), " @ ",
              b.sizes(), " -> ", out.sizes());
  TORCH_CHECK(out.stride(1) == 1 && out.stride(0) >= std::max<int64_t>(1, n),
              "mixed_gemm_: out must have unit column stride");
  if (m == 0 || n == 0) return;
  if (k == 0) {
    beta == 0 ? out.zero_() : out.mul_(beta);
    return;
  }
  const Operand x = as_operand(a), y = as_operand(b);
  const auto gemm = a.scalar_type() == at::kBFloat16 ? cblas_gemm_bf16bf16f32 : cblas_gemm_f16f16f32;
  gemm(kRowMajor, x.trans, y.trans, checked_int(m, "m"), checked_int(n, "n"), checked_int(k, "k"), 1.0f,
       static_cast<const uint16_t*>(x.tensor.const_data_ptr()), checked_int(x.ld, "lda"),
       static_cast<const uint16_t*>(y.tensor.const_data_ptr()), checked_int(y.ld, "ldb"),
       static_cast<float>(beta), out.mutable_data_ptr<float>(), checked_int(out.stride(0), "ldc"));
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { m.impl("mixed_gemm_", &mixed_gemm_cpu); }
TORCH_LIBRARY_IMPL(rlhf_kernels, CompositeExplicitAutograd, m) {
  m.impl("mixed_gemm_available", &mixed_gemm_available);
}

}  // namespace rlhf_kernels
