// onnxruntime custom-op library for graphprune's block-sparse ops (domain ai.graphprune, version 1).
//
// Links nothing from onnxruntime: the API arrives through RegisterCustomOps. We ask for
// min(compiled API version, running onnxruntime's minor version), so one build runs on onnxruntime 1.19 and
// newer, and only use entries that old (GetTensorMutableData, KernelInfoGetAttribute*, KernelContext_*;
// KernelInfo_GetNodeName and KernelInfoGetConstantInput_tensor are from 1.15).
// Threads come from onnxruntime's intra-op pool (KernelContext_ParallelFor), never OpenMP, so the session's
// thread setting holds. Op layouts: graphprune/kernels/SPEC.md.
//
// Safety contract (SPEC.md, "Validation"): every attribute is checked when the kernel is created and every
// input shape, dtype and index array before any compute; a violation is an error status naming the op and
// the node, never undefined behaviour. All sizes derived from attributes and shapes use checked arithmetic.
// onnxruntime runs one session from many threads, so a kernel is immutable after creation (including the
// decode of a constant-initializer index) but for a small cache of decoded index arrays fed at run time,
// keyed by the full index bytes and guarded by a mutex; a decoded entry is immutable once published, and
// compute works on its own shared_ptr to it.
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
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
std::once_flag g_init_once;

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

OrtStatus* fail(const std::string& msg) { return g_api->CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str()); }

#define GP_RETURN_IF(expr)            \
  do {                                \
    OrtStatus* _st = (expr);          \
    if (_st != nullptr) return _st;   \
  } while (0)

// ---- checked arithmetic on non-negative sizes -------------------------------------------------------------

// Block indices are int32, so a weight's index space [0, rows * cols) may hold at most 2^31 entries.
constexpr int64_t kIndexSpace = int64_t(INT32_MAX) + 1;
// Kernel extents, strides, dilations and pads beyond this are no real layer; the cap keeps every derived
// geometry sum far from overflow before the checked products below.
constexpr int64_t kMaxGeometry = int64_t(1) << 20;

bool mul_ok(int64_t a, int64_t b, int64_t* out) {
  if (a < 0 || b < 0 || (a != 0 && b > INT64_MAX / a)) return false;
  *out = a * b;
  return true;
}

bool add_ok(int64_t a, int64_t b, int64_t* out) {
  if (a < 0 || b < 0 || b > INT64_MAX - a) return false;
  *out = a + b;
  return true;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// ---- tensors ----------------------------------------------------------------------------------------------

struct Tensor {
  std::vector<int64_t> shape;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  int64_t count = 0;  // number of elements (checked product of the dims)
  const void* data = nullptr;
};

const char* type_name(ONNXTensorElementDataType t) {
  return t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? "float" : (t == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 ? "int32"
                                                                                                        : "other");
}

// Shape, element type and data of a tensor value; `what` names it in errors.
OrtStatus* describe(const OrtValue* value, const std::string& what, Tensor* t) {
  int is_tensor = 0;
  GP_RETURN_IF(g_api->IsTensor(value, &is_tensor));
  if (!is_tensor) return fail(what + " is not a tensor");
  OrtTensorTypeAndShapeInfo* info = nullptr;
  GP_RETURN_IF(g_api->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* st = g_api->GetDimensionsCount(info, &rank);
  if (st == nullptr) {
    t->shape.resize(rank);
    st = rank ? g_api->GetDimensions(info, t->shape.data(), rank) : nullptr;
  }
  if (st == nullptr) st = g_api->GetTensorElementType(info, &t->type);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (st != nullptr) return st;
  int64_t n = 1;
  for (int64_t d : t->shape)
    if (!mul_ok(n, d, &n)) return fail(what + " has an invalid shape " + shape_str(t->shape));
  t->count = n;
  void* data = nullptr;  // GetTensorMutableData exists on every supported version (GetTensorData: 1.23+)
  GP_RETURN_IF(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  if (data == nullptr && n > 0) return fail(what + " has no data");
  t->data = data;
  return nullptr;
}

// ---- attributes -------------------------------------------------------------------------------------------

bool ok(OrtStatus* st) {
  if (st == nullptr) return true;
  g_api->ReleaseStatus(st);
  return false;
}

bool has_attr_int(const OrtKernelInfo* info, const char* name, int64_t* v) {
  return ok(g_api->KernelInfoGetAttribute_int64(info, name, v));
}

bool has_attr_float(const OrtKernelInfo* info, const char* name, float* v) {
  return ok(g_api->KernelInfoGetAttribute_float(info, name, v));
}

bool has_attr_ints(const OrtKernelInfo* info, const char* name, std::vector<int64_t>* out) {
  size_t n = 0;
  if (!ok(g_api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &n))) return false;
  out->assign(n, 0);
  return n == 0 || ok(g_api->KernelInfoGetAttributeArray_int64(info, name, out->data(), &n));
}

bool has_attr_string(const OrtKernelInfo* info, const char* name, std::string* out) {
  size_t n = 0;
  if (!ok(g_api->KernelInfoGetAttribute_string(info, name, nullptr, &n))) return false;
  std::vector<char> buf(n + 1, '\0');
  if (!ok(g_api->KernelInfoGetAttribute_string(info, name, buf.data(), &n))) return false;
  *out = std::string(buf.data());
  return true;
}

std::string node_name(const OrtKernelInfo* info) {
  size_t n = 0;
  if (!ok(g_api->KernelInfo_GetNodeName(info, nullptr, &n)) || n == 0) return "";
  std::vector<char> buf(n + 1, '\0');
  if (!ok(g_api->KernelInfo_GetNodeName(info, buf.data(), &n))) return "";
  return std::string(buf.data());
}

// ---- the decoded index of a weight ------------------------------------------------------------------------

// Column pointers per output block, the row (MatMul: input k; conv: tap t) of every block, and for the conv
// each tap split into (channel, kernel row, kernel column). Built only from an index array that passed
// validation, never modified after it is published, and keyed by a copy of the full index bytes.
struct Decoded {
  std::vector<int32_t> index;
  std::vector<int32_t> colptr, row;
  std::vector<int32_t> tap_c, tap_r, tap_s;
};

// Up to kEntries recently seen index arrays (a model usually has one per node; a graph input may alternate
// between a few). A hit compares the full bytes, so a different array, or the same buffer changed in
// place, never reuses a stale decode.
class DecodeCache {
 public:
  std::shared_ptr<const Decoded> find(const int32_t* index, int64_t nnz) const {
    std::shared_ptr<const Decoded> snapshot[kEntries];
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (int i = 0; i < kEntries; ++i) snapshot[i] = entries_[i];
    }
    for (const auto& e : snapshot)
      if (same(e.get(), index, nnz)) return e;
    return nullptr;
  }

  void insert(std::shared_ptr<const Decoded> d) {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& e : entries_)
      if (same(e.get(), d->index.data(), (int64_t)d->index.size())) return;  // another thread got here first
    for (int i = kEntries - 1; i > 0; --i) entries_[i] = std::move(entries_[i - 1]);
    entries_[0] = std::move(d);
  }

 private:
  static constexpr int kEntries = 4;
  static bool same(const Decoded* e, const int32_t* index, int64_t nnz) {
    return e != nullptr && (int64_t)e->index.size() == nnz &&
           (nnz == 0 || std::memcmp(e->index.data(), index, sizeof(int32_t) * (size_t)nnz) == 0);
  }
  mutable std::mutex mu_;
  std::shared_ptr<const Decoded> entries_[kEntries];
};

// ---- kernels ----------------------------------------------------------------------------------------------

enum class OpKind { BsrMatMul, CsrMatMul, BsrConv };

const char* op_name(OpKind k) {
  return k == OpKind::BsrMatMul ? "GpBsrMatMul" : (k == OpKind::CsrMatMul ? "GpCsrMatMul" : "GpBsrConv");
}

// Everything but `cache` is set in create_kernel and read-only afterwards.
struct Kernel {
  OpKind kind;
  std::string where;  // "GpBsrConv node 'name'" for messages
  int64_t K = 0, N = 0;  // MatMul
  int64_t cin = 0, cout = 0, kh = 1, kw = 1, sh = 1, sw = 1, pt = 0, pl = 0, pb = 0, pr = 0, dh = 1, dw = 1;
  int64_t rows = 0, cols = 0, width = 0;  // index space rows x cols, floats per block
  float lo = -INFINITY, hi = INFINITY;
  // The index when it is a constant initializer: decoded at creation, used whenever onnxruntime hands
  // that very initializer (it is immutable for the session's life), which skips the byte compare.
  const void* constant_index = nullptr;
  int64_t constant_count = -1;
  std::shared_ptr<const Decoded> constant_decoded;
  DecodeCache cache;  // any other index array: keyed by content

  OrtStatus* error(const std::string& msg) const { return fail(where + ": " + msg); }
  const char* index_name() const { return kind == OpKind::CsrMatMul ? "index" : "block_index"; }
  int64_t outputs() const { return kind == OpKind::BsrConv ? cout : N; }
};

// Validates an index array against the contract (in range, strictly ascending) and decodes it.
OrtStatus* decode(const Kernel& k, const int32_t* index, int64_t nnz, std::shared_ptr<const Decoded>* out) {
  auto d = std::make_shared<Decoded>();
  d->index.assign(index, index + nnz);
  d->colptr.assign((size_t)k.cols + 1, 0);
  d->row.resize((size_t)nnz);
  const int64_t space = k.rows * k.cols;  // <= kIndexSpace, checked at creation
  int64_t prev = -1;
  for (int64_t p = 0; p < nnz; ++p) {
    const int64_t v = d->index[(size_t)p];
    if (v < 0 || v >= space)
      return k.error(std::string(k.index_name()) + "[" + std::to_string(p) + "] = " + std::to_string(v) +
                     " is out of range [0, " + std::to_string(space) + ")");
    if (v <= prev)
      return k.error(std::string(k.index_name()) + " is not strictly ascending at position " + std::to_string(p) +
                     " (" + std::to_string(prev) + " then " + std::to_string(v) + ")");
    prev = v;
    d->colptr[(size_t)(v / k.rows) + 1]++;
    d->row[(size_t)p] = (int32_t)(v % k.rows);
  }
  for (int64_t c = 0; c < k.cols; ++c) d->colptr[(size_t)c + 1] += d->colptr[(size_t)c];
  if (k.kind == OpKind::BsrConv) {
    d->tap_c.resize((size_t)nnz);
    d->tap_r.resize((size_t)nnz);
    d->tap_s.resize((size_t)nnz);
    for (int64_t p = 0; p < nnz; ++p) {
      const int64_t t = d->row[(size_t)p];
      d->tap_c[(size_t)p] = (int32_t)(t / (k.kh * k.kw));
      d->tap_r[(size_t)p] = (int32_t)((t / k.kw) % k.kh);
      d->tap_s[(size_t)p] = (int32_t)(t % k.kw);
    }
  }
  *out = std::move(d);
  return nullptr;
}

OrtStatus* decoded_index(Kernel& k, const Tensor& index, std::shared_ptr<const Decoded>* out) {
  if (k.constant_decoded && index.data == k.constant_index && index.count == k.constant_count) {
    *out = k.constant_decoded;
    return nullptr;
  }
  const int32_t* data = static_cast<const int32_t*>(index.data);
  *out = k.cache.find(data, index.count);
  if (*out) return nullptr;
  GP_RETURN_IF(decode(k, data, index.count, out));
  k.cache.insert(*out);
  return nullptr;
}

// ---- input checks, shared by kernel creation (constant inputs) and compute (all inputs) -------------------

OrtStatus* check_type(const Kernel& k, const Tensor& t, const char* name, ONNXTensorElementDataType want) {
  if (t.type != want)
    return k.error(std::string("input ") + name + " must be " + type_name(want) + ", got element type " +
                   std::to_string((int)t.type));
  return nullptr;
}

OrtStatus* check_values(const Kernel& k, const Tensor& v) {
  GP_RETURN_IF(check_type(k, v, "values", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT));
  const bool blocked = k.kind != OpKind::CsrMatMul;
  if (blocked ? (v.shape.size() != 2 || v.shape[1] != k.width) : v.shape.size() != 1)
    return k.error("values must be " + std::string(blocked ? "[nnzb, " + std::to_string(k.width) + "]" : "[nnz]") +
                   ", got " + shape_str(v.shape));
  return nullptr;
}

OrtStatus* check_index(const Kernel& k, const Tensor& t) {
  GP_RETURN_IF(check_type(k, t, k.index_name(), ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32));
  if (t.shape.size() != 1) return k.error(std::string(k.index_name()) + " must be 1-D, got " + shape_str(t.shape));
  if (t.count > kIndexSpace)
    return k.error(std::string(k.index_name()) + " has more entries than its int32 index space");
  return nullptr;
}

OrtStatus* check_bias(const Kernel& k, const Tensor& b) {
  GP_RETURN_IF(check_type(k, b, "B", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT));
  if (b.shape.size() != 1 || b.shape[0] != k.outputs())
    return k.error("bias B must be [" + std::to_string(k.outputs()) + "], got " + shape_str(b.shape));
  return nullptr;
}

OrtStatus* check_counts(const Kernel& k, const Tensor& values, const Tensor& index) {
  if (values.shape[0] != index.shape[0])
    return k.error("values has " + std::to_string(values.shape[0]) + " blocks but " + k.index_name() + " has " +
                   std::to_string(index.shape[0]) + " entries");
  return nullptr;
}

const char* kInputNames[4] = {"X", "values", "block_index", "B"};

OrtStatus* read_input(const Kernel& k, OrtKernelContext* ctx, size_t i, Tensor* t) {
  const OrtValue* value = nullptr;
  GP_RETURN_IF(g_api->KernelContext_GetInput(ctx, i, &value));
  if (value == nullptr) return k.error(std::string("missing input ") + kInputNames[i]);
  return describe(value, k.where + ": input " + (i == 2 ? k.index_name() : kInputNames[i]), t);
}

// Reads the four inputs and checks everything but the index contents.
OrtStatus* read_inputs(const Kernel& k, OrtKernelContext* ctx, Tensor* x, Tensor* values, Tensor* index,
                       Tensor* bias) {
  GP_RETURN_IF(read_input(k, ctx, 0, x));
  GP_RETURN_IF(read_input(k, ctx, 1, values));
  GP_RETURN_IF(read_input(k, ctx, 2, index));
  GP_RETURN_IF(read_input(k, ctx, 3, bias));
  GP_RETURN_IF(check_type(k, *x, "X", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT));
  GP_RETURN_IF(check_values(k, *values));
  GP_RETURN_IF(check_index(k, *index));
  GP_RETURN_IF(check_bias(k, *bias));
  return check_counts(k, *values, *index);
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

OrtStatus* output(const Kernel& k, OrtKernelContext* ctx, const std::vector<int64_t>& shape, float** data) {
  int64_t n = 1;
  for (int64_t d : shape)
    if (!mul_ok(n, d, &n)) return k.error("output shape " + shape_str(shape) + " overflows");
  OrtValue* y = nullptr;
  GP_RETURN_IF(g_api->KernelContext_GetOutput(ctx, 0, shape.data(), shape.size(), &y));
  void* p = nullptr;
  GP_RETURN_IF(g_api->GetTensorMutableData(y, &p));
  if (p == nullptr && n > 0) return k.error("onnxruntime gave no output buffer");
  *data = static_cast<float*>(p);
  return nullptr;
}

OrtStatus* compute_matmul(Kernel& k, OrtKernelContext* ctx) {
  const bool bsr = k.kind == OpKind::BsrMatMul;
  Tensor x, values, index, bias;
  GP_RETURN_IF(read_inputs(k, ctx, &x, &values, &index, &bias));
  const int64_t K = k.K, N = k.N;
  if (x.shape.empty() || x.shape.back() != K)
    return k.error("X must be [..., " + std::to_string(K) + "] (K), got " + shape_str(x.shape));
  std::shared_ptr<const Decoded> dec;
  GP_RETURN_IF(decoded_index(k, index, &dec));
  std::vector<int64_t> yshape = x.shape;
  yshape.back() = N;
  float* yp = nullptr;
  GP_RETURN_IF(output(k, ctx, yshape, &yp));
  const int64_t M = x.count / K;
  if (M == 0) return nullptr;
  const float* xp = static_cast<const float*>(x.data);
  const float* vp = static_cast<const float*>(values.data);
  const float* bp = static_cast<const float*>(bias.data);
  const KernelSet ks = kernels();
  const int32_t* colptr = dec->colptr.data();
  const int32_t* row = dec->row.data();
  const int64_t cols = k.cols, width = k.width, nnz = index.count;
  // chunks of output columns: enough for the pool to balance, each still a useful amount of work
  const int64_t chunk = bsr ? 4 : 64;
  const int64_t tasks = (cols + chunk - 1) / chunk;
  const float lo = k.lo, hi = k.hi;
  return parallel_for(ctx, (size_t)tasks, 2.0 * (double)nnz * (double)width * (double)M, [&](size_t t) {
    const int64_t c0 = (int64_t)t * chunk, c1 = c0 + chunk < cols ? c0 + chunk : cols;
    if (bsr)
      ks.bsr_matmul(xp, vp, colptr, row, bp, yp, M, K, N, c0, c1, lo, hi);
    else
      ks.csr_matmul(xp, vp, colptr, row, bp, yp, M, K, N, c0, c1, lo, hi);
  });
}

OrtStatus* compute_conv(Kernel& k, OrtKernelContext* ctx) {
  Tensor x, values, index, bias;
  GP_RETURN_IF(read_inputs(k, ctx, &x, &values, &index, &bias));
  if (x.shape.size() != 4 || x.shape[1] != k.cin)
    return k.error("X must be [batch, " + std::to_string(k.cin) + " (in_channels), H, W], got " +
                   shape_str(x.shape));
  const int64_t batch = x.shape[0], H = x.shape[2], W = x.shape[3];
  // Output size as ONNX Conv, with the kernel required to fit the padded input (C division would round
  // a negative numerator towards zero and report one output row that reads past the padded image).
  const int64_t ext_h = k.dh * (k.kh - 1) + 1, ext_w = k.dw * (k.kw - 1) + 1;  // <= 2^40, no overflow
  int64_t Hpad = 0, Wpad = 0;  // an empty tensor may still carry huge dims
  if (!add_ok(H, k.pt + k.pb, &Hpad) || !add_ok(W, k.pl + k.pr, &Wpad))
    return k.error("input " + shape_str(x.shape) + " is too large");
  // Sane pads: no more padding in a dimension than max(input size, 2 x kernel extent). Real layers pad
  // about one kernel extent in all; more only adds bias-only borders, and the padded copy (and output)
  // would grow with the square of the pads (pads of 20000 on a 7x8 image: gigabytes).
  if (k.pt + k.pb > (H > 2 * ext_h ? H : 2 * ext_h) || k.pl + k.pr > (W > 2 * ext_w ? W : 2 * ext_w))
    return k.error("pads " + shape_str({k.pt, k.pl, k.pb, k.pr}) + " add more than max(input size, 2 x kernel " +
                   "extent) to X " + shape_str(x.shape) + " (kernel extent " + std::to_string(ext_h) + "x" +
                   std::to_string(ext_w) + ")");
  if (Hpad < ext_h || Wpad < ext_w)
    return k.error("kernel extent " + std::to_string(ext_h) + "x" + std::to_string(ext_w) +
                   " (kernel_shape, dilations) does not fit the padded input " + std::to_string(Hpad) + "x" +
                   std::to_string(Wpad) + " (X " + shape_str(x.shape) + " with pads)");
  ConvGeom g{};
  g.Cin = k.cin, g.H = H, g.W = W, g.Cout = k.cout;
  g.kh = k.kh, g.kw = k.kw, g.sh = k.sh, g.sw = k.sw, g.pt = k.pt, g.pl = k.pl, g.dh = k.dh, g.dw = k.dw;
  g.Ho = (Hpad - ext_h) / k.sh + 1;
  g.Wo = (Wpad - ext_w) / k.sw + 1;
  const int64_t nnz = index.count, Cb = k.cols;
  int64_t HW = 0, HoWo = 0, tasks = 0;
  if (!mul_ok(H, W, &HW) || !mul_ok(g.Ho, g.Wo, &HoWo) || !mul_ok(batch, Cb, &tasks) || !mul_ok(tasks, g.Ho, &tasks))
    return k.error("input " + shape_str(x.shape) + " is too large");
  const bool pointwise =
      k.kh == 1 && k.kw == 1 && k.sh == 1 && k.sw == 1 && k.pt == 0 && k.pl == 0 && k.pb == 0 && k.pr == 0;
  // The kernels address one image with int32 offsets: the 1x1 path the input itself, the general path a
  // zero-padded copy (16 * sw columns of slack on the right: the last 16-wide tile of a row reads up to
  // column (Wo - 1 + 15) * sw + (kw - 1) * dw < Wp). Checked before the output is allocated, so absurd
  // pads fail here rather than asking onnxruntime for terabytes.
  int64_t image = 0, plane = 0, total = 0;
  if (pointwise) {
    if (!mul_ok(k.cin, HW, &image) || image > INT32_MAX)
      return k.error("image " + shape_str(x.shape) + " is too large for the kernel's int32 offsets");
  } else {
    g.Hp = Hpad;
    if (!add_ok(Wpad, 16 * k.sw + k.dw * k.kw, &g.Wp) || !mul_ok(g.Hp, g.Wp, &plane) ||
        !mul_ok(k.cin, plane, &image) || image > INT32_MAX || !mul_ok(batch, image, &total) ||
        total > (int64_t)(SIZE_MAX / sizeof(float)))
      return k.error("padded image " + std::to_string(g.Hp) + "x" + std::to_string(g.Wp) + " x " +
                     std::to_string(k.cin) + " channels is too large for the kernel's int32 offsets");
  }
  std::shared_ptr<const Decoded> dec;
  GP_RETURN_IF(decoded_index(k, index, &dec));
  float* yp = nullptr;
  GP_RETURN_IF(output(k, ctx, {batch, k.cout, g.Ho, g.Wo}, &yp));
  if (batch == 0 || HoWo == 0) return nullptr;
  const float* xp = static_cast<const float*>(x.data);
  const float* vp = static_cast<const float*>(values.data);
  const float* bp = static_cast<const float*>(bias.data);
  const KernelSet ks = kernels();
  const int32_t* colptr = dec->colptr.data();
  const float lo = k.lo, hi = k.hi;
  const double flops = 2.0 * (double)nnz * 4 * (double)HoWo * (double)batch;
  if (pointwise) {
    std::vector<int32_t> off((size_t)nnz);  // channel rows of the image
    for (int64_t p = 0; p < nnz; ++p) off[(size_t)p] = (int32_t)(dec->tap_c[(size_t)p] * HW);
    const int32_t* offs = off.data();
    return parallel_for(ctx, (size_t)(batch * Cb), flops, [&](size_t t) {
      const int64_t n = (int64_t)t / Cb, j = (int64_t)t % Cb;
      ks.conv1x1(xp + n * image, vp, colptr, offs, bp, yp + n * g.Cout * HW, g.Cout, HW, j, lo, hi);
    });
  }
  std::vector<float> xpad((size_t)total, 0.f);
  for (int64_t n = 0; n < batch; ++n)
    for (int64_t c = 0; c < g.Cin; ++c)
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(&xpad[(size_t)(((n * g.Cin + c) * g.Hp + h + k.pt) * g.Wp + k.pl)],
                    xp + ((n * g.Cin + c) * H + h) * W, sizeof(float) * (size_t)W);
  std::vector<int32_t> off((size_t)nnz);
  for (int64_t p = 0; p < nnz; ++p)
    off[(size_t)p] = (int32_t)(dec->tap_c[(size_t)p] * plane + dec->tap_r[(size_t)p] * k.dh * g.Wp +
                               dec->tap_s[(size_t)p] * k.dw);
  const int32_t* offs = off.data();
  const float* xq = xpad.data();
  return parallel_for(ctx, (size_t)tasks, flops, [&](size_t t) {
    const int64_t oh = (int64_t)t % g.Ho, j = ((int64_t)t / g.Ho) % Cb, n = (int64_t)t / (g.Ho * Cb);
    ks.conv_row(xq + n * image, vp, colptr, offs, bp, yp + n * g.Cout * HoWo, g, j, oh, lo, hi);
  });
}

// ---- kernel creation: attributes and constant inputs --------------------------------------------------------

OrtStatus* required_int(const Kernel& k, const OrtKernelInfo* info, const char* name, int64_t* v) {
  if (!has_attr_int(info, name, v)) return k.error(std::string("attribute ") + name + " is missing or not an int");
  return nullptr;
}

// An ints attribute of exactly `n` values, each in [lo, kMaxGeometry].
OrtStatus* required_ints(const Kernel& k, const OrtKernelInfo* info, const char* name, size_t n, int64_t lo,
                         std::vector<int64_t>* v) {
  if (!has_attr_ints(info, name, v))
    return k.error(std::string("attribute ") + name + " is missing or not a list of ints");
  if (v->size() != n)
    return k.error(std::string("attribute ") + name + " must have " + std::to_string(n) + " values, got " +
                   shape_str(*v));
  for (int64_t e : *v)
    if (e < lo || e > kMaxGeometry)
      return k.error(std::string("attribute ") + name + " = " + shape_str(*v) + ": every value must be in [" +
                     std::to_string(lo) + ", " + std::to_string(kMaxGeometry) + "]");
  return nullptr;
}

OrtStatus* read_attributes(Kernel& k, const OrtKernelInfo* info) {
  if (!has_attr_float(info, "clip_min", &k.lo)) return k.error("attribute clip_min is missing or not a float");
  if (!has_attr_float(info, "clip_max", &k.hi)) return k.error("attribute clip_max is missing or not a float");
  if (std::isnan(k.lo) || std::isnan(k.hi) || k.lo > k.hi)
    return k.error("clip_min " + std::to_string(k.lo) + " / clip_max " + std::to_string(k.hi) +
                   " must be numbers with clip_min <= clip_max");
  if (k.kind != OpKind::BsrConv) {
    GP_RETURN_IF(required_int(k, info, "K", &k.K));
    GP_RETURN_IF(required_int(k, info, "N", &k.N));
    if (k.K <= 0 || k.N <= 0 || k.K > kIndexSpace || k.N > kIndexSpace)
      return k.error("K = " + std::to_string(k.K) + " and N = " + std::to_string(k.N) + " must be in [1, 2^31]");
    k.width = k.kind == OpKind::BsrMatMul ? 16 : 1;
    k.rows = k.K;
    k.cols = k.kind == OpKind::BsrMatMul ? (k.N + 15) / 16 : k.N;
  } else {
    GP_RETURN_IF(required_int(k, info, "in_channels", &k.cin));
    GP_RETURN_IF(required_int(k, info, "out_channels", &k.cout));
    if (k.cin <= 0 || k.cout <= 0 || k.cin > kIndexSpace || k.cout > kIndexSpace)
      return k.error("in_channels = " + std::to_string(k.cin) + " and out_channels = " + std::to_string(k.cout) +
                     " must be in [1, 2^31]");
    std::vector<int64_t> ks, st, pads, dil;
    GP_RETURN_IF(required_ints(k, info, "kernel_shape", 2, 1, &ks));
    GP_RETURN_IF(required_ints(k, info, "strides", 2, 1, &st));
    GP_RETURN_IF(required_ints(k, info, "pads", 4, 0, &pads));
    GP_RETURN_IF(required_ints(k, info, "dilations", 2, 1, &dil));
    k.kh = ks[0], k.kw = ks[1], k.sh = st[0], k.sw = st[1];
    k.pt = pads[0], k.pl = pads[1], k.pb = pads[2], k.pr = pads[3], k.dh = dil[0], k.dw = dil[1];
    // attributes the contract leaves out must not ask for something the kernel does not do
    int64_t group = 1;
    if (has_attr_int(info, "group", &group) && group != 1)
      return k.error("group = " + std::to_string(group) + ": only group = 1 is supported");
    std::string auto_pad;
    if (has_attr_string(info, "auto_pad", &auto_pad) && auto_pad != "NOTSET")
      return k.error("auto_pad = " + auto_pad + ": pads must be explicit (auto_pad NOTSET)");
    k.width = 4;
    int64_t taps = 0;
    if (!mul_ok(k.cin, k.kh * k.kw, &taps)) return k.error("in_channels x kernel_shape overflows");
    k.rows = taps;
    k.cols = (k.cout + 3) / 4;
  }
  int64_t space = 0;
  if (!mul_ok(k.rows, k.cols, &space) || space > kIndexSpace)
    return k.error("the weight's block index space (" + std::to_string(k.rows) + " x " + std::to_string(k.cols) +
                   ") exceeds the int32 range of " + k.index_name());
  return nullptr;
}

// Inputs that are constant initializers are checked (and the index decoded) now, so a bad model fails at
// session creation; compute checks every input again, whatever its origin.
OrtStatus* check_constant_inputs(Kernel& k, const OrtKernelInfo* info) {
  Tensor t[4];
  bool constant[4] = {false, false, false, false};
  for (size_t i = 1; i < 4; ++i) {
    int is_constant = 0;
    const OrtValue* value = nullptr;
    if (!ok(g_api->KernelInfoGetConstantInput_tensor(info, i, &is_constant, &value)) || !is_constant ||
        value == nullptr)
      continue;
    GP_RETURN_IF(describe(value, k.where + ": input " + kInputNames[i], &t[i]));
    constant[i] = true;
  }
  if (constant[1]) GP_RETURN_IF(check_values(k, t[1]));
  if (constant[2]) GP_RETURN_IF(check_index(k, t[2]));
  if (constant[3]) GP_RETURN_IF(check_bias(k, t[3]));
  if (constant[1] && constant[2]) GP_RETURN_IF(check_counts(k, t[1], t[2]));
  if (constant[2] && t[2].count > 0) {
    GP_RETURN_IF(decode(k, static_cast<const int32_t*>(t[2].data), t[2].count, &k.constant_decoded));
    k.constant_index = t[2].data;
    k.constant_count = t[2].count;
  }
  return nullptr;
}

// ---- OrtCustomOp plumbing -------------------------------------------------------------------------------

struct Op : OrtCustomOp {
  OpKind kind;
};

// No exception may cross into onnxruntime: allocation failures become error statuses too.
template <typename F>
OrtStatus* guarded(const std::string& where, F&& fn) {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    return fail(where + ": out of memory");
  } catch (const std::exception& e) {
    return fail(where + ": " + e.what());
  } catch (...) {
    return fail(where + ": unknown error");
  }
}

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info,
                                      void** out) {
  *out = nullptr;
  const OpKind kind = static_cast<const Op*>(op)->kind;
  std::string where = op_name(kind);
  return guarded(where, [&]() -> OrtStatus* {
    where += " node '" + node_name(info) + "'";
    auto k = std::make_unique<Kernel>();
    k->kind = kind;
    k->where = where;
    GP_RETURN_IF(read_attributes(*k, info));
    GP_RETURN_IF(check_constant_inputs(*k, info));
    *out = k.release();
    return nullptr;
  });
}

OrtStatus* ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx) {
  Kernel& k = *static_cast<Kernel*>(kernel);
  return guarded(k.where, [&]() -> OrtStatus* {
    return k.kind == OpKind::BsrConv ? compute_conv(k, ctx) : compute_matmul(k, ctx);
  });
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
  // once per process: sessions may register the library from several threads, and onnxruntime keeps
  // pointers to g_ops for as long as the sessions live
  std::call_once(g_init_once, [&]() {
    g_api = api_base->GetApi(want);
    if (g_api == nullptr) return;
    g_version = want;
#ifdef GP_HAVE_AVX2_BUILD
    __builtin_cpu_init();
    g_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             std::getenv("GRAPHPRUNE_NO_AVX2") == nullptr;
#endif
    g_ops[0] = make_op(OpKind::BsrMatMul);
    g_ops[1] = make_op(OpKind::CsrMatMul);
    g_ops[2] = make_op(OpKind::BsrConv);
  });
  if (g_api == nullptr) return nullptr;
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
