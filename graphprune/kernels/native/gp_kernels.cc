// onnxruntime custom-op library for graphprune's block-sparse ops (domain ai.graphprune, version 1).
//
// Links nothing from onnxruntime: the API arrives through RegisterCustomOps. We ask for
// min(compiled API version, running onnxruntime's minor version), so one build runs on onnxruntime 1.19 and
// newer, and only use entries that old (GetTensorMutableData, KernelInfoGetAttribute*, KernelContext_*).
// Threads come from onnxruntime's intra-op pool (KernelContext_ParallelFor), never OpenMP, so the session's
// thread setting holds. Op layouts: graphprune/kernels/SPEC.md.
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"

// Conv geometry shared by both builds of the kernels.
struct ConvGeom {
  int64_t Cin, H, W, Cout, Ho, Wo, kh, kw, sh, sw, pt, pl, dh, dw, Hp, Wp;
};

namespace gp_generic {
#include "kernels_impl.inc"
}

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define GP_HAVE_AVX2_BUILD 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include <immintrin.h>
#define GP_INTRINSICS 1
namespace gp_avx2 {
#include "kernels_impl.inc"
}
#undef GP_INTRINSICS
#pragma GCC pop_options
#endif

namespace {

const OrtApi* g_api = nullptr;
uint32_t g_version = 0;
bool g_avx2 = false;

struct KernelSet {
  decltype(&gp_generic::bsr_matmul_cols) bsr_matmul;
  decltype(&gp_generic::csr_matmul_cols) csr_matmul;
  decltype(&gp_generic::bsr_conv1x1_block) conv1x1;
  decltype(&gp_generic::bsr_conv_row) conv_row;
};

KernelSet kernels() {
#ifdef GP_HAVE_AVX2_BUILD
  if (g_avx2)
    return {gp_avx2::bsr_matmul_cols, gp_avx2::csr_matmul_cols, gp_avx2::bsr_conv1x1_block, gp_avx2::bsr_conv_row};
#endif
  return {gp_generic::bsr_matmul_cols, gp_generic::csr_matmul_cols, gp_generic::bsr_conv1x1_block,
          gp_generic::bsr_conv_row};
}

OrtStatus* fail(const std::string& msg) { return g_api->CreateStatus(ORT_FAIL, msg.c_str()); }

#define GP_RETURN_IF(expr)            \
  do {                                \
    OrtStatus* _st = (expr);          \
    if (_st != nullptr) return _st;   \
  } while (0)

struct Tensor {
  const OrtValue* value = nullptr;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t count() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

OrtStatus* read_input(OrtKernelContext* ctx, size_t index, Tensor* t) {
  GP_RETURN_IF(g_api->KernelContext_GetInput(ctx, index, &t->value));
  if (t->value == nullptr) return fail("missing input " + std::to_string(index));
  OrtTensorTypeAndShapeInfo* info = nullptr;
  GP_RETURN_IF(g_api->GetTensorTypeAndShape(t->value, &info));
  size_t rank = 0;
  OrtStatus* st = g_api->GetDimensionsCount(info, &rank);
  if (st == nullptr) {
    t->shape.resize(rank);
    st = g_api->GetDimensions(info, t->shape.data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (st != nullptr) return st;
  void* data = nullptr;  // GetTensorMutableData exists on every supported version (GetTensorData: 1.23+)
  GP_RETURN_IF(g_api->GetTensorMutableData(const_cast<OrtValue*>(t->value), &data));
  t->data = data;
  return nullptr;
}

// The sorted block_index of a weight, decoded once per weight: column pointers per output block and the
// row (or tap) of every block. Weights are constant initializers, so the data pointer identifies them;
// the cache is rebuilt if a different array arrives.
struct Decoded {
  const void* key = nullptr;
  int64_t nnz = -1, rows = 0, cols = 0;
  std::vector<int32_t> colptr, row;
};

OrtStatus* decode(Decoded* d, std::mutex* mu, const int32_t* index, int64_t nnz, int64_t rows, int64_t cols,
                  const char* op) {
  std::lock_guard<std::mutex> lock(*mu);
  if (d->key == index && d->nnz == nnz && d->rows == rows && d->cols == cols) return nullptr;
  d->colptr.assign(cols + 1, 0);
  d->row.resize(nnz);
  int64_t prev = -1;
  for (int64_t p = 0; p < nnz; ++p) {
    const int64_t v = index[p];
    if (v <= prev || v < 0 || v >= rows * cols)
      return fail(std::string(op) + ": block index " + std::to_string(v) + " at position " + std::to_string(p) +
                  " is out of range or not strictly ascending");
    prev = v;
    d->colptr[v / rows + 1]++;
    d->row[p] = (int32_t)(v % rows);
  }
  for (int64_t c = 0; c < cols; ++c) d->colptr[c + 1] += d->colptr[c];
  d->key = index;
  d->nnz = nnz;
  d->rows = rows;
  d->cols = cols;
  return nullptr;
}

// Runs fn(i) for i in [0, total) on onnxruntime's pool when the work is worth it, else inline.
template <typename F>
OrtStatus* parallel_for(OrtKernelContext* ctx, size_t total, double flops, F&& fn) {
  struct Box {
    F* f;
  } box{&fn};
  if (total > 1 && flops > 2e5 && g_version >= 17 && g_api->KernelContext_ParallelFor != nullptr) {
    return g_api->KernelContext_ParallelFor(
        ctx, [](void* user, size_t i) { (*static_cast<Box*>(user)->f)(i); }, total, 0, &box);
  }
  for (size_t i = 0; i < total; ++i) fn(i);
  return nullptr;
}

// Attribute readers: a missing attribute gives the default (the status is released, not an error).
bool ok(OrtStatus* st) {
  if (st == nullptr) return true;
  g_api->ReleaseStatus(st);
  return false;
}

float attr_float(const OrtKernelInfo* info, const char* name, float dflt) {
  float v = dflt;
  return ok(g_api->KernelInfoGetAttribute_float(info, name, &v)) ? v : dflt;
}

int64_t attr_int(const OrtKernelInfo* info, const char* name, int64_t dflt) {
  int64_t v = dflt;
  return ok(g_api->KernelInfoGetAttribute_int64(info, name, &v)) ? v : dflt;
}

std::vector<int64_t> attr_ints(const OrtKernelInfo* info, const char* name, std::vector<int64_t> dflt) {
  size_t n = 0;
  if (!ok(g_api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &n))) return dflt;
  std::vector<int64_t> out(n);
  return ok(g_api->KernelInfoGetAttributeArray_int64(info, name, out.data(), &n)) ? out : dflt;
}

enum class OpKind { BsrMatMul, CsrMatMul, BsrConv };

struct Kernel {
  OpKind kind;
  int64_t K = 0, N = 0;  // MatMul
  int64_t cin = 0, cout = 0, kh = 1, kw = 1, sh = 1, sw = 1, pt = 0, pl = 0, pb = 0, pr = 0, dh = 1, dw = 1;
  float lo = -INFINITY, hi = INFINITY;
  std::string name;
  Decoded dec;
  std::vector<int32_t> tap_c, tap_r, tap_s;  // BsrConv: decoded taps of every block
  std::mutex mu;
};

const char* op_name(OpKind k) {
  return k == OpKind::BsrMatMul ? "GpBsrMatMul" : (k == OpKind::CsrMatMul ? "GpCsrMatMul" : "GpBsrConv");
}

OrtStatus* compute_matmul(Kernel* k, OrtKernelContext* ctx) {
  const bool bsr = k->kind == OpKind::BsrMatMul;
  const char* op = op_name(k->kind);
  Tensor x, values, index, bias;
  GP_RETURN_IF(read_input(ctx, 0, &x));
  GP_RETURN_IF(read_input(ctx, 1, &values));
  GP_RETURN_IF(read_input(ctx, 2, &index));
  GP_RETURN_IF(read_input(ctx, 3, &bias));
  const int64_t K = k->K, N = k->N;
  if (x.shape.empty() || x.shape.back() != K)
    return fail(std::string(op) + ": input X's last dim must be K=" + std::to_string(K));
  const int64_t width = bsr ? 16 : 1;
  const int64_t nnz = index.count();
  if (values.count() != nnz * width || bias.count() != N)
    return fail(std::string(op) + ": values/bias sizes do not match block_index and N");
  const int64_t cols = bsr ? (N + 15) / 16 : N;
  GP_RETURN_IF(decode(&k->dec, &k->mu, static_cast<const int32_t*>(index.data), nnz, K, cols, op));
  std::vector<int64_t> yshape = x.shape;
  yshape.back() = N;
  OrtValue* yv = nullptr;
  GP_RETURN_IF(g_api->KernelContext_GetOutput(ctx, 0, yshape.data(), yshape.size(), &yv));
  void* ydata = nullptr;
  GP_RETURN_IF(g_api->GetTensorMutableData(yv, &ydata));
  const int64_t M = x.count() / (K ? K : 1);
  if (M == 0) return nullptr;
  const float* xp = static_cast<const float*>(x.data);
  const float* vp = static_cast<const float*>(values.data);
  const float* bp = static_cast<const float*>(bias.data);
  float* yp = static_cast<float*>(ydata);
  const KernelSet ks = kernels();
  const int32_t* colptr = k->dec.colptr.data();
  const int32_t* row = k->dec.row.data();
  // chunks of output columns: enough for the pool to balance, each still a useful amount of work
  const int64_t chunk = bsr ? 4 : 64;
  const int64_t tasks = (cols + chunk - 1) / chunk;
  const float lo = k->lo, hi = k->hi;
  return parallel_for(ctx, (size_t)tasks, 2.0 * nnz * width * M, [&](size_t t) {
    const int64_t c0 = (int64_t)t * chunk, c1 = c0 + chunk < cols ? c0 + chunk : cols;
    if (bsr)
      ks.bsr_matmul(xp, vp, colptr, row, bp, yp, M, K, N, c0, c1, lo, hi);
    else
      ks.csr_matmul(xp, vp, colptr, row, bp, yp, M, K, N, c0, c1, lo, hi);
  });
}

OrtStatus* compute_conv(Kernel* k, OrtKernelContext* ctx) {
  const char* op = "GpBsrConv";
  Tensor x, values, index, bias;
  GP_RETURN_IF(read_input(ctx, 0, &x));
  GP_RETURN_IF(read_input(ctx, 1, &values));
  GP_RETURN_IF(read_input(ctx, 2, &index));
  GP_RETURN_IF(read_input(ctx, 3, &bias));
  if (x.shape.size() != 4 || x.shape[1] != k->cin)
    return fail(std::string(op) + " '" + k->name + "': X must be [N, " + std::to_string(k->cin) + ", H, W]");
  const int64_t T = k->cin * k->kh * k->kw, Cb = (k->cout + 3) / 4;
  const int64_t nnz = index.count();
  if (values.count() != nnz * 4 || bias.count() != k->cout)
    return fail(std::string(op) + ": values/bias sizes do not match block_index and out_channels");
  {
    GP_RETURN_IF(decode(&k->dec, &k->mu, static_cast<const int32_t*>(index.data), nnz, T, Cb, op));
    std::lock_guard<std::mutex> lock(k->mu);
    if ((int64_t)k->tap_c.size() != nnz || k->tap_c.empty() != (nnz == 0)) {
      k->tap_c.resize(nnz);
      k->tap_r.resize(nnz);
      k->tap_s.resize(nnz);
      for (int64_t p = 0; p < nnz; ++p) {
        const int32_t t = k->dec.row[p];
        k->tap_c[p] = (int32_t)(t / (k->kh * k->kw));
        k->tap_r[p] = (int32_t)((t / k->kw) % k->kh);
        k->tap_s[p] = (int32_t)(t % k->kw);
      }
    }
  }
  ConvGeom g;
  g.Cin = k->cin;
  g.H = x.shape[2];
  g.W = x.shape[3];
  g.Cout = k->cout;
  g.kh = k->kh, g.kw = k->kw, g.sh = k->sh, g.sw = k->sw, g.pt = k->pt, g.pl = k->pl, g.dh = k->dh, g.dw = k->dw;
  g.Ho = (g.H + k->pt + k->pb - k->dh * (k->kh - 1) - 1) / k->sh + 1;
  g.Wo = (g.W + k->pl + k->pr - k->dw * (k->kw - 1) - 1) / k->sw + 1;
  if (g.Ho <= 0 || g.Wo <= 0) return fail(std::string(op) + " '" + k->name + "': empty output");
  std::vector<int64_t> yshape = {x.shape[0], k->cout, g.Ho, g.Wo};
  OrtValue* yv = nullptr;
  GP_RETURN_IF(g_api->KernelContext_GetOutput(ctx, 0, yshape.data(), yshape.size(), &yv));
  void* ydata = nullptr;
  GP_RETURN_IF(g_api->GetTensorMutableData(yv, &ydata));
  const float* xp = static_cast<const float*>(x.data);
  const float* vp = static_cast<const float*>(values.data);
  const float* bp = static_cast<const float*>(bias.data);
  float* yp = static_cast<float*>(ydata);
  const KernelSet ks = kernels();
  const int32_t* colptr = k->dec.colptr.data();
  const int64_t batch = x.shape[0], HW = g.H * g.W, HoWo = g.Ho * g.Wo;
  const float lo = k->lo, hi = k->hi;
  const double flops = 2.0 * nnz * 4 * HoWo * batch;
  const bool pointwise = k->kh == 1 && k->kw == 1 && k->sh == 1 && k->sw == 1 && k->pt == 0 && k->pl == 0 &&
                         k->pb == 0 && k->pr == 0;
  if (pointwise) {
    std::vector<int32_t> off(nnz);  // channel rows of the image
    for (int64_t p = 0; p < nnz; ++p) off[p] = (int32_t)(k->tap_c[p] * HW);
    const int32_t* offs = off.data();
    return parallel_for(ctx, (size_t)(batch * Cb), flops, [&](size_t t) {
      const int64_t n = (int64_t)t / Cb, j = (int64_t)t % Cb;
      ks.conv1x1(xp + n * g.Cin * HW, vp, colptr, offs, bp, yp + n * g.Cout * HW, g.Cout, HW, j, lo, hi);
    });
  }
  // zero-padded copy of the batch, so the taps read without bounds checks (16 * sw columns of slack)
  g.Hp = g.H + k->pt + k->pb;
  g.Wp = g.W + k->pl + k->pr + 16 * k->sw + k->dw * k->kw;
  const int64_t plane = g.Hp * g.Wp;
  if (g.Cin * plane > INT32_MAX) return fail(std::string(op) + " '" + k->name + "': image too large");
  std::vector<float> xpad((size_t)(batch * g.Cin * plane), 0.f);
  for (int64_t n = 0; n < batch; ++n)
    for (int64_t c = 0; c < g.Cin; ++c)
      for (int64_t h = 0; h < g.H; ++h)
        std::memcpy(&xpad[(size_t)(((n * g.Cin + c) * g.Hp + h + k->pt) * g.Wp + k->pl)],
                    xp + ((n * g.Cin + c) * g.H + h) * g.W, sizeof(float) * g.W);
  std::vector<int32_t> off(nnz);
  for (int64_t p = 0; p < nnz; ++p)
    off[p] = (int32_t)(k->tap_c[p] * plane + k->tap_r[p] * k->dh * g.Wp + k->tap_s[p] * k->dw);
  const int32_t* offs = off.data();
  const float* xq = xpad.data();
  return parallel_for(ctx, (size_t)(batch * Cb * g.Ho), flops, [&](size_t t) {
    const int64_t oh = (int64_t)t % g.Ho, j = ((int64_t)t / g.Ho) % Cb, n = (int64_t)t / (g.Ho * Cb);
    ks.conv_row(xq + n * g.Cin * plane, vp, colptr, offs, bp, yp + n * g.Cout * HoWo, g, j, oh, lo, hi);
  });
}

// ---- OrtCustomOp plumbing -------------------------------------------------------------------------------

struct Op : OrtCustomOp {
  OpKind kind;
};

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info,
                                      void** out) {
  auto k = std::make_unique<Kernel>();
  k->kind = static_cast<const Op*>(op)->kind;
  k->lo = attr_float(info, "clip_min", -INFINITY);
  k->hi = attr_float(info, "clip_max", INFINITY);
  if (k->kind == OpKind::BsrConv) {
    k->cin = attr_int(info, "in_channels", -1);
    k->cout = attr_int(info, "out_channels", -1);
    auto ks = attr_ints(info, "kernel_shape", {1, 1});
    auto st = attr_ints(info, "strides", {1, 1});
    auto pads = attr_ints(info, "pads", {0, 0, 0, 0});
    auto dil = attr_ints(info, "dilations", {1, 1});
    if (k->cin <= 0 || k->cout <= 0 || ks.size() != 2 || st.size() != 2 || pads.size() != 4 || dil.size() != 2 ||
        ks[0] < 1 || ks[1] < 1 || st[0] < 1 || st[1] < 1 || dil[0] < 1 || dil[1] < 1)
      return fail("GpBsrConv: needs in_channels, out_channels, 2-D kernel_shape/strides/dilations, 4 pads");
    k->kh = ks[0], k->kw = ks[1], k->sh = st[0], k->sw = st[1];
    k->pt = pads[0], k->pl = pads[1], k->pb = pads[2], k->pr = pads[3], k->dh = dil[0], k->dw = dil[1];
  } else {
    k->K = attr_int(info, "K", -1);
    k->N = attr_int(info, "N", -1);
    if (k->K <= 0 || k->N <= 0) return fail(std::string(op_name(k->kind)) + ": needs positive K and N attributes");
  }
  *out = k.release();
  return nullptr;
}

OrtStatus* ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx) {
  Kernel* k = static_cast<Kernel*>(kernel);
  return k->kind == OpKind::BsrConv ? compute_conv(k, ctx) : compute_matmul(k, ctx);
}

void ORT_API_CALL destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }

const char* ORT_API_CALL get_name(const OrtCustomOp* op) { return op_name(static_cast<const Op*>(op)->kind); }
const char* ORT_API_CALL get_ep(const OrtCustomOp*) { return "CPUExecutionProvider"; }
size_t ORT_API_CALL input_count(const OrtCustomOp*) { return 4; }
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 1; }
ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp*, size_t i) {
  return i == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL mem_type(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL one(const OrtCustomOp*) { return 1; }
int ORT_API_CALL zero(const OrtCustomOp*) { return 0; }
int ORT_API_CALL end_version(const OrtCustomOp*) { return INT_MAX; }

Op make_op(OpKind kind) {
  Op op;
  std::memset(static_cast<OrtCustomOp*>(&op), 0, sizeof(OrtCustomOp));
  op.kind = kind;
  op.version = g_version;
  op.CreateKernel = nullptr;  // the V2 entries (onnxruntime >= 1.16) carry errors back as statuses
  op.GetName = get_name;
  op.GetExecutionProviderType = get_ep;
  op.GetInputType = input_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = output_count;
  op.KernelCompute = nullptr;
  op.KernelDestroy = destroy;
  op.GetInputCharacteristic = required;
  op.GetOutputCharacteristic = required;
  op.GetInputMemoryType = mem_type;
  op.GetVariadicInputMinArity = one;
  op.GetVariadicInputHomogeneity = zero;
  op.GetVariadicOutputMinArity = one;
  op.GetVariadicOutputHomogeneity = zero;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.InferOutputShapeFn = nullptr;
  op.GetStartVersion = one;
  op.GetEndVersion = end_version;
  return op;
}

Op g_ops[3];

}  // namespace

extern "C" {

#if defined(_WIN32)
__declspec(dllexport)
#else
__attribute__((visibility("default")))
#endif
OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  // onnxruntime 1.x exposes API version x: never ask for more than the running library has
  const char* version = api_base->GetVersionString();
  int major = 0, minor = 0;
  if (version == nullptr || std::sscanf(version, "%d.%d", &major, &minor) != 2) minor = 16;
  uint32_t want = (uint32_t)(major > 1 ? ORT_API_VERSION : minor);
  if (want > ORT_API_VERSION) want = ORT_API_VERSION;
  if (want < 16) return nullptr;  // too old for the V2 kernel entries: leave the function bodies in charge
  g_api = api_base->GetApi(want);
  if (g_api == nullptr) return nullptr;
  g_version = want;
#ifdef GP_HAVE_AVX2_BUILD
  __builtin_cpu_init();
  g_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           std::getenv("GRAPHPRUNE_NO_AVX2") == nullptr;
#endif
  g_ops[0] = make_op(OpKind::BsrMatMul);
  g_ops[1] = make_op(OpKind::CsrMatMul);
  g_ops[2] = make_op(OpKind::BsrConv);
  OrtCustomOpDomain* domain = nullptr;
  GP_RETURN_IF(g_api->CreateCustomOpDomain("ai.graphprune", &domain));
  for (Op& op : g_ops) GP_RETURN_IF(g_api->CustomOpDomain_Add(domain, &op));
  return g_api->AddCustomOpDomain(options, domain);
}

// Which code path the library runs (for status lines and tests).
#if defined(_WIN32)
__declspec(dllexport)
#else
__attribute__((visibility("default")))
#endif
const char* GraphpruneKernelsIsa() {
#ifdef GP_HAVE_AVX2_BUILD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && std::getenv("GRAPHPRUNE_NO_AVX2") == nullptr)
    return "avx2";
#endif
  return "portable";
}

}  // extern "C"
