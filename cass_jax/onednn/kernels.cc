// oneDNN convolutions, matrix products and ViT attention as XLA FFI handlers, for cass_jax/onednn/ops.py on the
// CPU backend.
//
// Activations stay in XLA's row-major layouts (NHWC, [batch, rows, cols]); a convolution's HWIO kernel is reordered
// into the layout the chosen oneDNN implementation wants on every call (kernels are small). Primitives are built
// once per shape and kept. Math is strict float32: no implicit bf16 or tf32 even where the CPU has AMX. Each call
// runs single-threaded oneDNN primitives on XLA's intra-op pool (see Chunks).
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;
using Dims = ffi::AnyBuffer::Dimensions;

namespace {

constexpr memory::data_type kF32 = memory::data_type::f32;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::primitive_attr Attributes() {
  dnnl::primitive_attr attr;
  attr.set_fpmath_mode(dnnl::fpmath_mode::strict);
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

struct Primitive {
  dnnl::primitive primitive;
  memory::desc weights;  // the layout the implementation keeps its (diff) weights in
  memory::desc scratchpad;
  std::string implementation;
};

std::mutex cache_mutex;
std::unordered_map<std::string, std::shared_ptr<const Primitive>> cache;

template <typename Make>
std::shared_ptr<const Primitive> Cached(const std::string& key, Make make) {
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto found = cache.find(key);
    if (found != cache.end()) return found->second;
  }
  auto made = std::make_shared<const Primitive>(make());
  std::lock_guard<std::mutex> lock(cache_mutex);
  return cache.emplace(key, made).first->second;
}

std::string Key(char kind, std::initializer_list<memory::dim> values) {
  std::string key(1, kind);
  for (memory::dim value : values) key += "," + std::to_string(value);
  return key;
}

// Runs a primitive on this thread with its own scratchpad (a buffer kept per thread).
void Execute(const Primitive& primitive, std::unordered_map<int, memory> args) {
  thread_local std::vector<char> scratch;
  scratch.resize(std::max<size_t>(scratch.size(), primitive.scratchpad.get_size()));
  args.emplace(DNNL_ARG_SCRATCHPAD, memory(primitive.scratchpad, Engine(), scratch.data()));
  dnnl::stream stream(Engine());
  primitive.primitive.execute(stream, args);
  stream.wait();
}

Primitive MakeMatmul(const memory::desc& a, const memory::desc& b, const memory::desc& c,
                     const dnnl::primitive_attr& attr) {
  auto pd = dnnl::matmul::primitive_desc(Engine(), a, b, c, attr);
  return Primitive{dnnl::matmul(pd), b, pd.scratchpad_desc(), pd.impl_info_str()};
}

void Reorder(memory from, memory to) {
  dnnl::stream stream(Engine());
  dnnl::reorder(from, to).execute(stream, from, to);
  stream.wait();
}

// oneDNN's own OpenMP threads would compete with XLA's for the cores, so every oneDNN call runs on one thread and
// the parallelism comes from XLA's intra-op pool instead: the work is cut into chunks, which the calling thread
// and up to num_threads - 1 pool tasks claim from a shared counter. The caller only ever waits for chunks
// already being computed, so a busy pool cannot deadlock it; a task that starts after all are claimed returns.
class Chunks {
 public:
  template <typename Body>
  static void Run(ffi::ThreadPool& pool, int64_t chunks, const Body& body) {
    auto progress = std::make_shared<Progress>();
    auto work = [progress, chunks, &body] {
      OneThread();
      for (int64_t chunk; (chunk = progress->next.fetch_add(1)) < chunks;) {
        try {
          body(chunk);
        } catch (const std::exception& error) {
          std::lock_guard<std::mutex> lock(progress->mutex);
          if (progress->error.empty()) progress->error = error.what();
        }
        if (progress->done.fetch_add(1) + 1 == chunks) {
          std::lock_guard<std::mutex> lock(progress->mutex);
          progress->finished.notify_all();
        }
      }
    };
    for (int64_t helper = 1; helper < std::min<int64_t>(chunks, pool.num_threads()); ++helper) {
      auto task = work;
      pool.Schedule(std::move(task));
    }
    work();
    std::unique_lock<std::mutex> lock(progress->mutex);
    progress->finished.wait(lock, [&] { return progress->done.load() == chunks; });
    if (!progress->error.empty()) throw std::runtime_error(progress->error);
  }

  static int64_t Count(ffi::ThreadPool& pool, int64_t items) {
    return std::max<int64_t>(1, std::min<int64_t>(items, pool.num_threads()));
  }

  // [begin, end) of chunk `chunk` when `items` are cut into `chunks` near-equal parts.
  static std::pair<int64_t, int64_t> Range(int64_t items, int64_t chunks, int64_t chunk) {
    return {items * chunk / chunks, items * (chunk + 1) / chunks};
  }

 private:
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mutex;
    std::condition_variable finished;
    std::string error;
  };

  static void OneThread() {
    thread_local bool set = false;
    if (!set) {
      omp_set_num_threads(1);
      set = true;
    }
  }
};

// An NHWC/HWIO convolution without dilation or groups; padding may be asymmetric.
struct Conv {
  memory::dim n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr;

  static Conv Of(Dims x, Dims kernel, Dims y, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                 int64_t pr) {
    return Conv{x[0], x[1], x[2], x[3], kernel[0], kernel[1], kernel[3], y[1], y[2], sh, sw, pt, pb, pl, pr};
  }
  Conv WithBatch(memory::dim batch) const {
    Conv part = *this;
    part.n = batch;
    return part;
  }
  std::string KeyFor(char kind) const { return Key(kind, {n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr}); }
  memory::desc Input() const { return memory::desc({n, c, h, w}, kF32, Tag::nhwc); }
  memory::desc Output() const { return memory::desc({n, o, oh, ow}, kF32, Tag::nhwc); }
  memory::desc Kernel(Tag tag) const { return memory::desc({o, c, kh, kw}, kF32, tag); }
  int64_t InputSize() const { return h * w * c; }
  int64_t OutputSize() const { return oh * ow * o; }
  dnnl::convolution_forward::primitive_desc Forward() const {
    return dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, Input(), Kernel(Tag::any),
        Output(), {sh, sw}, {pt, pl}, {pb, pr}, Attributes());
  }
};

// The HWIO kernel in the layout each of a call's primitives wants: the buffer itself, or a copy reordered once per
// call and layout (the batch chunks share it instead of each reordering the kernel again).
class KernelLayouts {
 public:
  explicit KernelLayouts(memory hwio) : hwio_(hwio) {}

  memory For(const Primitive& primitive) {
    if (primitive.weights == hwio_.get_desc()) return hwio_;
    std::lock_guard<std::mutex> lock(mutex_);
    for (const memory& reordered : reordered_)
      if (reordered.get_desc() == primitive.weights) return reordered;
    memory reordered(primitive.weights, Engine());
    Reorder(hwio_, reordered);
    reordered_.push_back(reordered);
    return reordered;
  }

 private:
  memory hwio_;
  std::mutex mutex_;
  std::vector<memory> reordered_;
};

template <typename Body>
ffi::Error Guarded(Body body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const std::exception& error) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + error.what());
  }
}

ffi::Error ConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                       int64_t pr) {
  return Guarded([&] {
    Conv whole = Conv::Of(x.dimensions(), kernel.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr);
    int64_t chunks = Chunks::Count(pool, whole.n);
    KernelLayouts kernels(memory(whole.Kernel(Tag::hwio), Engine(), kernel.typed_data()));
    Chunks::Run(pool, chunks, [&](int64_t chunk) {
      auto [begin, end] = Chunks::Range(whole.n, chunks, chunk);
      Conv conv = whole.WithBatch(end - begin);
      auto primitive = Cached(conv.KeyFor('f'), [&] {
        auto pd = conv.Forward();
        return Primitive{dnnl::convolution_forward(pd), pd.weights_desc(), pd.scratchpad_desc(), pd.impl_info_str()};
      });
      Execute(*primitive, {{DNNL_ARG_SRC, memory(conv.Input(), Engine(), x.typed_data() + begin * conv.InputSize())},
                           {DNNL_ARG_WEIGHTS, kernels.For(*primitive)},
                           {DNNL_ARG_DST, memory(conv.Output(), Engine(), y->typed_data() + begin * conv.OutputSize())}});
    });
  });
}

ffi::Error ConvInputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> grad, ffi::Buffer<ffi::F32> kernel,
                         ffi::ResultBuffer<ffi::F32> grad_x, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                         int64_t pl, int64_t pr) {
  return Guarded([&] {
    Conv whole = Conv::Of(grad_x->dimensions(), kernel.dimensions(), grad.dimensions(), sh, sw, pt, pb, pl, pr);
    int64_t chunks = Chunks::Count(pool, whole.n);
    KernelLayouts kernels(memory(whole.Kernel(Tag::hwio), Engine(), kernel.typed_data()));
    Chunks::Run(pool, chunks, [&](int64_t chunk) {
      auto [begin, end] = Chunks::Range(whole.n, chunks, chunk);
      Conv conv = whole.WithBatch(end - begin);
      auto primitive = Cached(conv.KeyFor('d'), [&] {
        auto pd = dnnl::convolution_backward_data::primitive_desc(
            Engine(), dnnl::algorithm::convolution_direct, conv.Input(), conv.Kernel(Tag::any), conv.Output(),
            {sh, sw}, {pt, pl}, {pb, pr}, conv.Forward(), Attributes());
        return Primitive{dnnl::convolution_backward_data(pd), pd.weights_desc(), pd.scratchpad_desc(),
                         pd.impl_info_str()};
      });
      Execute(*primitive,
              {{DNNL_ARG_DIFF_DST, memory(conv.Output(), Engine(), grad.typed_data() + begin * conv.OutputSize())},
               {DNNL_ARG_WEIGHTS, kernels.For(*primitive)},
               {DNNL_ARG_DIFF_SRC, memory(conv.Input(), Engine(), grad_x->typed_data() + begin * conv.InputSize())}});
    });
  });
}

// Each chunk of the batch gives a partial kernel gradient (the first straight into the result); the partials are
// then added in chunk order, so the sum is the same on every run.
ffi::Error ConvKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> grad,
                          ffi::ResultBuffer<ffi::F32> grad_kernel, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                          int64_t pl, int64_t pr) {
  return Guarded([&] {
    Conv whole = Conv::Of(x.dimensions(), grad_kernel->dimensions(), grad.dimensions(), sh, sw, pt, pb, pl, pr);
    int64_t chunks = Chunks::Count(pool, whole.n);
    size_t kernel_size = grad_kernel->element_count();
    std::vector<std::vector<float>> partials(chunks - 1, std::vector<float>(kernel_size));
    Chunks::Run(pool, chunks, [&](int64_t chunk) {
      auto [begin, end] = Chunks::Range(whole.n, chunks, chunk);
      Conv conv = whole.WithBatch(end - begin);
      auto primitive = Cached(conv.KeyFor('w'), [&] {
        auto pd = dnnl::convolution_backward_weights::primitive_desc(
            Engine(), dnnl::algorithm::convolution_direct, conv.Input(), conv.Kernel(Tag::any), conv.Output(),
            {sh, sw}, {pt, pl}, {pb, pr}, conv.Forward(), Attributes());
        return Primitive{dnnl::convolution_backward_weights(pd), pd.diff_weights_desc(), pd.scratchpad_desc(),
                         pd.impl_info_str()};
      });
      float* out = chunk == 0 ? grad_kernel->typed_data() : partials[chunk - 1].data();
      memory hwio(conv.Kernel(Tag::hwio), Engine(), out);
      bool reorder = primitive->weights != hwio.get_desc();
      memory diff_kernel = reorder ? memory(primitive->weights, Engine()) : hwio;
      Execute(*primitive, {{DNNL_ARG_SRC, memory(conv.Input(), Engine(), x.typed_data() + begin * conv.InputSize())},
                           {DNNL_ARG_DIFF_DST,
                            memory(conv.Output(), Engine(), grad.typed_data() + begin * conv.OutputSize())},
                           {DNNL_ARG_DIFF_WEIGHTS, diff_kernel}});
      if (reorder) Reorder(diff_kernel, hwio);
    });
    float* total = grad_kernel->typed_data();
    for (const auto& partial : partials)
      for (size_t index = 0; index < kernel_size; ++index) total[index] += partial[index];
  });
}

// c[b] = op(a[b]) op(b[b]) over all leading axes; a is stored [.., K, M] when transpose_a, b [.., N, K] when
// transpose_b (the transposes are read through strides, not copied). Chunks split the batch when it has at least
// as many entries as there are threads, else the longer side of c: its rows, or its columns (a Barlow Twins
// projector's 16 x 8192 by 8192 x 8192), so that no thread streams the whole of the larger operand.
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                  ffi::ResultBuffer<ffi::F32> c, bool transpose_a, bool transpose_b) {
  return Guarded([&] {
    Dims a_dims = a.dimensions(), c_dims = c->dimensions();
    size_t rank = c_dims.size();
    memory::dim batch = 1;
    for (size_t axis = 0; axis + 2 < rank; ++axis) batch *= c_dims[axis];
    memory::dim m = c_dims[rank - 2], n = c_dims[rank - 1];
    memory::dim k = transpose_a ? a_dims[rank - 2] : a_dims[rank - 1];
    memory::dims a_strides = transpose_a ? memory::dims{m * k, 1, m} : memory::dims{m * k, k, 1};
    memory::dims b_strides = transpose_b ? memory::dims{n * k, 1, k} : memory::dims{n * k, n, 1};
    memory::dims c_strides = {m * n, n, 1};
    enum { kBatch, kRows, kColumns } split = batch >= pool.num_threads() ? kBatch : m >= n ? kRows : kColumns;
    memory::dim extent = split == kBatch ? batch : split == kRows ? m : n;
    int64_t chunks = Chunks::Count(pool, extent);
    Chunks::Run(pool, chunks, [&](int64_t chunk) {
      auto [begin, end] = Chunks::Range(extent, chunks, chunk);
      memory::dim entries = batch, rows = m, columns = n;
      int64_t a_offset = 0, b_offset = 0, c_offset = 0;
      if (split == kBatch) {
        entries = end - begin;
        a_offset = begin * m * k, b_offset = begin * n * k, c_offset = begin * m * n;
      } else if (split == kRows) {
        rows = end - begin;
        a_offset = transpose_a ? begin : begin * k, c_offset = begin * n;
      } else {
        columns = end - begin;
        b_offset = transpose_b ? begin * k : begin, c_offset = begin;
      }
      memory::desc a_md({entries, rows, k}, kF32, a_strides);
      memory::desc b_md({entries, k, columns}, kF32, b_strides);
      memory::desc c_md({entries, rows, columns}, kF32, c_strides);
      auto primitive = Cached(Key('m', {entries, rows, columns, k, transpose_a, transpose_b, m, n}), [&] {
        return MakeMatmul(a_md, b_md, c_md, Attributes());
      });
      Execute(*primitive, {{DNNL_ARG_SRC, memory(a_md, Engine(), a.typed_data() + a_offset)},
                           {DNNL_ARG_WEIGHTS, memory(b_md, Engine(), b.typed_data() + b_offset)},
                           {DNNL_ARG_DST, memory(c_md, Engine(), c->typed_data() + c_offset)}});
    });
  });
}

// Self-attention over timm's fused projection: qkv is [B, T, 3, H, D] (the qkv Dense layer's output), queries
// are the first `queries` tokens (all T, or 1 for a last block that computes only the class token). Per (b, h):
// P = softmax(scale * Q K^T) and O = P V, read from and written into those layouts through strides, so q, k, v
// are never copied out and O lands as [B, queries, H, D], ready for the output projection.
struct Attention {
  memory::dim batch, tokens, heads, dim, queries;
  float scale;

  memory::dim Row() const { return 3 * heads * dim; }  // qkv's stride between tokens
  int64_t Qkv(int64_t item, int part) const {          // offset of q (part 0), k (1) or v (2) of item b * H + h
    return (item / heads) * tokens * Row() + part * heads * dim + (item % heads) * dim;
  }
  int64_t Out(int64_t item) const { return (item / heads) * queries * heads * dim + (item % heads) * dim; }
  int64_t Probs(int64_t item) const { return item * queries * tokens; }
  memory::desc Strided(memory::dim rows, memory::dim cols, memory::dim row_stride, memory::dim col_stride) const {
    return memory::desc({rows, cols}, kF32, memory::dims{row_stride, col_stride});
  }
  std::string KeyFor(char kind) const {
    uint32_t scale_bits;
    std::memcpy(&scale_bits, &scale, sizeof scale_bits);
    return Key(kind, {batch, tokens, heads, dim, queries, scale_bits});
  }
};

dnnl::primitive_attr Scaled(float scale) {
  dnnl::primitive_attr attr = Attributes();
  dnnl::post_ops ops;
  ops.append_eltwise(dnnl::algorithm::eltwise_linear, scale, 0.0f);
  attr.set_post_ops(ops);
  return attr;
}

dnnl::softmax_forward::primitive_desc SoftmaxForward(const memory::desc& scores) {
  return dnnl::softmax_forward::primitive_desc(Engine(), dnnl::prop_kind::forward_training,
                                               dnnl::algorithm::softmax_accurate, scores, scores, 1, Attributes());
}

float* Scratch(size_t count) {
  thread_local std::vector<float> scratch;
  if (scratch.size() < count) scratch.resize(count);
  return scratch.data();
}

Attention AttentionOf(Dims qkv, int64_t heads, float scale, int64_t queries) {
  return Attention{qkv[0], qkv[1], heads, qkv[2] / (3 * heads), queries, scale};
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> probs, int64_t heads, float scale, int64_t queries) {
  return Guarded([&] {
    Attention at = AttentionOf(qkv.dimensions(), heads, scale, queries);
    memory::dim t = at.tokens, q = at.queries, d = at.dim, row = at.Row();
    memory::desc queries_md = at.Strided(q, d, row, 1), keys_t_md = at.Strided(d, t, 1, row);
    memory::desc values_md = at.Strided(t, d, row, 1), scores_md = at.Strided(q, t, t, 1);
    memory::desc out_md = at.Strided(q, d, heads * d, 1);
    int64_t items = at.batch * heads, chunks = Chunks::Count(pool, items);
    Chunks::Run(pool, chunks, [&](int64_t chunk) {
      auto scores = Cached(at.KeyFor('s'), [&] { return MakeMatmul(queries_md, keys_t_md, scores_md, Scaled(scale)); });
      auto mix = Cached(at.KeyFor('o'), [&] { return MakeMatmul(scores_md, values_md, out_md, Attributes()); });
      auto softmax = Cached(at.KeyFor('p'), [&] {
        auto pd = SoftmaxForward(scores_md);
        return Primitive{dnnl::softmax_forward(pd), scores_md, pd.scratchpad_desc(), pd.impl_info_str()};
      });
      auto [begin, end] = Chunks::Range(items, chunks, chunk);
      for (int64_t item = begin; item < end; ++item) {
        float* base = qkv.typed_data();
        memory p(scores_md, Engine(), probs->typed_data() + at.Probs(item));
        Execute(*scores, {{DNNL_ARG_SRC, memory(queries_md, Engine(), base + at.Qkv(item, 0))},
                          {DNNL_ARG_WEIGHTS, memory(keys_t_md, Engine(), base + at.Qkv(item, 1))},
                          {DNNL_ARG_DST, p}});
        Execute(*softmax, {{DNNL_ARG_SRC, p}, {DNNL_ARG_DST, p}});
        Execute(*mix, {{DNNL_ARG_SRC, p},
                       {DNNL_ARG_WEIGHTS, memory(values_md, Engine(), base + at.Qkv(item, 2))},
                       {DNNL_ARG_DST, memory(out_md, Engine(), out->typed_data() + at.Out(item))}});
      }
    });
  });
}

// Gradients into one [B, T, 3, H, D] buffer, again through strides: dP = dO V^T, dS = softmax'(P) dP,
// dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO; queries past `queries` get a zero gradient.
ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> probs,
                             ffi::Buffer<ffi::F32> grad_out, ffi::ResultBuffer<ffi::F32> grad_qkv, int64_t heads,
                             float scale, int64_t queries) {
  return Guarded([&] {
    Attention at = AttentionOf(qkv.dimensions(), heads, scale, queries);
    memory::dim t = at.tokens, q = at.queries, d = at.dim, row = at.Row();
    memory::desc grad_out_md = at.Strided(q, d, heads * d, 1), values_t_md = at.Strided(d, t, 1, row);
    memory::desc scores_md = at.Strided(q, t, t, 1), scores_t_md = at.Strided(t, q, 1, t);
    memory::desc keys_md = at.Strided(t, d, row, 1), queries_md = at.Strided(q, d, row, 1);
    memory::desc keys_grad_md = at.Strided(t, d, row, 1);
    int64_t items = at.batch * heads, chunks = Chunks::Count(pool, items);
    Chunks::Run(pool, chunks, [&](int64_t chunk) {
      auto grad_probs = Cached(at.KeyFor('P'), [&] {
        return MakeMatmul(grad_out_md, values_t_md, scores_md, Attributes()); });
      auto grad_queries = Cached(at.KeyFor('Q'), [&] {
        return MakeMatmul(scores_md, keys_md, queries_md, Scaled(scale)); });
      auto grad_keys = Cached(at.KeyFor('K'), [&] {
        return MakeMatmul(scores_t_md, queries_md, keys_grad_md, Scaled(scale)); });
      auto grad_values = Cached(at.KeyFor('V'), [&] {
        return MakeMatmul(scores_t_md, grad_out_md, keys_grad_md, Attributes()); });
      auto softmax_grad = Cached(at.KeyFor('S'), [&] {
        auto pd = dnnl::softmax_backward::primitive_desc(Engine(), dnnl::algorithm::softmax_accurate, scores_md,
                                                         scores_md, scores_md, 1, SoftmaxForward(scores_md),
                                                         Attributes());
        return Primitive{dnnl::softmax_backward(pd), scores_md, pd.scratchpad_desc(), pd.impl_info_str()};
      });
      float* scratch = Scratch(2 * q * t);
      memory d_probs(scores_md, Engine(), scratch), d_scores(scores_md, Engine(), scratch + q * t);
      auto [begin, end] = Chunks::Range(items, chunks, chunk);
      for (int64_t item = begin; item < end; ++item) {
        float* base = qkv.typed_data();
        float* grad = grad_qkv->typed_data();
        memory p(scores_md, Engine(), probs.typed_data() + at.Probs(item));
        memory p_t(scores_t_md, Engine(), probs.typed_data() + at.Probs(item));
        memory d_out(grad_out_md, Engine(), grad_out.typed_data() + at.Out(item));
        Execute(*grad_probs, {{DNNL_ARG_SRC, d_out},
                              {DNNL_ARG_WEIGHTS, memory(values_t_md, Engine(), base + at.Qkv(item, 2))},
                              {DNNL_ARG_DST, d_probs}});
        Execute(*softmax_grad, {{DNNL_ARG_DST, p}, {DNNL_ARG_DIFF_DST, d_probs}, {DNNL_ARG_DIFF_SRC, d_scores}});
        Execute(*grad_queries, {{DNNL_ARG_SRC, d_scores},
                                {DNNL_ARG_WEIGHTS, memory(keys_md, Engine(), base + at.Qkv(item, 1))},
                                {DNNL_ARG_DST, memory(queries_md, Engine(), grad + at.Qkv(item, 0))}});
        Execute(*grad_keys, {{DNNL_ARG_SRC, memory(scores_t_md, Engine(), scratch + q * t)},
                             {DNNL_ARG_WEIGHTS, memory(queries_md, Engine(), base + at.Qkv(item, 0))},
                             {DNNL_ARG_DST, memory(keys_grad_md, Engine(), grad + at.Qkv(item, 1))}});
        Execute(*grad_values, {{DNNL_ARG_SRC, p_t}, {DNNL_ARG_WEIGHTS, d_out},
                               {DNNL_ARG_DST, memory(keys_grad_md, Engine(), grad + at.Qkv(item, 2))}});
        for (memory::dim token = q; token < t; ++token)
          std::fill_n(grad + at.Qkv(item, 0) + token * row, d, 0.0f);
      }
    });
  });
}

}  // namespace

#define CASS_CONV_BINDING                                                                                  \
  ffi::Ffi::Bind()                                                                                         \
      .Ctx<ffi::ThreadPool>()                                                                              \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                        \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                        \
      .Ret<ffi::Buffer<ffi::F32>>()                                                                        \
      .Attr<int64_t>("stride_h")                                                                           \
      .Attr<int64_t>("stride_w")                                                                           \
      .Attr<int64_t>("pad_top")                                                                            \
      .Attr<int64_t>("pad_bottom")                                                                         \
      .Attr<int64_t>("pad_left")                                                                           \
      .Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(CassOnednnConvForward, ConvForward, CASS_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CassOnednnConvInputGrad, ConvInputGrad, CASS_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CassOnednnConvKernelGrad, ConvKernelGrad, CASS_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CassOnednnMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CassOnednnAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("queries"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CassOnednnAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("queries"));

// Which oneDNN implementation serves each primitive built so far ("key=implementation" lines), for benchmarks.
extern "C" int CassOnednnImplementations(char* out, int capacity) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  std::string text;
  for (const auto& [key, primitive] : cache) text += key + "=" + primitive->implementation + "\n";
  if (capacity > 0) {
    size_t size = std::min(text.size(), static_cast<size_t>(capacity - 1));
    text.copy(out, size);
    out[size] = '\0';
  }
  return static_cast<int>(text.size());
}
