// The replay of a dense call's plan in compiled code: cusdpa's torch path for plain eager calls, where the
// Python version of the same work (an autograd Function, the ops' bodies: signature, allocations, launches)
// cost 1.4-1.7x PyTorch's host time per call (BENCHMARKS.md, host cost).
//
// A plan (cusdpa/backends/plans.py) is every launch of one call signature with the operands' addresses left as
// slots; interop/native encodes one into integers once (``add_plan``) and then calls
// ``cusdpa_native::attention(q, k, v, mask, plan, seed)`` (``call``: the plan bound to the call's signature,
// found here; mask: an attn_mask without gradient, or None), whose autograd kernel is a C++ autograd Function:
// its forward allocates out and lse and issues the forward launches, its backward allocates dq, dk, dv, delta
// and the dQ workspace and issues the backward launches, on torch's current stream of the inputs' device. The
// driver is opened at run time (libcuda.so.1, or CUSDPA_LIBCUDA: the CPU tests' stand-in), so this file needs no
// CUDA headers and links only torch's CPU libraries.
//
// The encoding of launches, one after another:
//   kernel: 1, function, grid x, grid y, block x, shared bytes, cells n, the n cell words, maps m, per map
//           (cell, slot, address word within the map's 16) and its 16 words, slots s, per slot (cell, slot)
//   memset: 2, slot, bytes (that slot's words zeroed: ZeroWords)
// where a slot is a position in the value tuple (cusdpa/backends/launch.py SLOTS) and a map's 16 words follow
// the n cells in the parameter buffer. A plan: device, deterministic, forced deterministic, whether its kernels
// read an attn_mask's summary (FLASH's: its buffers come from Python, interop/mask_summaries, which keeps one per
// unchanged mask), out's rank, shape and strides, lse's rank and shape, the forward's launch count and launches,
// whether it trains, then (training plans) dq, dk, dv's ranks, shapes and strides, the dQ workspace's elements,
// the backward's launch count and launches. (interop/native/__init__.py's ``encode``.)
#include <ATen/core/Tensor.h>
#include <ATen/Context.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace {

using at::Tensor;

// ---- the driver ---------------------------------------------------------------------------------------------

struct Driver {
    int (*launch)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**, void**);
    int (*memset32)(unsigned long long, unsigned, size_t, void*);
    int (*ctx_get_current)(void**);
    int (*ctx_set_current)(void*);
    int (*primary_ctx_retain)(void**, int);
    int (*device_get)(int*, int);
};

const Driver& driver() {
    static const Driver d = [] {
        const char* path = std::getenv("CUSDPA_LIBCUDA");
        void* lib = dlopen(path && *path ? path : "libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        TORCH_CHECK(lib, "cusdpa native replay: cannot open the CUDA driver: ", dlerror());
        auto sym = [lib](const char* name) {
            void* f = dlsym(lib, name);
            TORCH_CHECK(f, "cusdpa native replay: the CUDA driver has no ", name);
            return f;
        };
        Driver out;
        out.launch = reinterpret_cast<decltype(out.launch)>(sym("cuLaunchKernel"));
        out.memset32 = reinterpret_cast<decltype(out.memset32)>(sym("cuMemsetD32Async"));
        out.ctx_get_current = reinterpret_cast<decltype(out.ctx_get_current)>(sym("cuCtxGetCurrent"));
        out.ctx_set_current = reinterpret_cast<decltype(out.ctx_set_current)>(sym("cuCtxSetCurrent"));
        out.primary_ctx_retain = reinterpret_cast<decltype(out.primary_ctx_retain)>(sym("cuDevicePrimaryCtxRetain"));
        out.device_get = reinterpret_cast<decltype(out.device_get)>(sym("cuDeviceGet"));
        return out;
    }();
    return d;
}

// torch's current CUDA stream of a device, as a cudaStream_t: through the C shim libtorch_cuda exports for
// AOTInductor's generated code (torch 2.3 on), else through c10::Stream::native_handle (torch 2.11 on), which
// a CUDA build without the shim must have. Neither needs CUDA headers or linking libtorch_cuda.
void* current_stream(const c10::Device& device) {
    using Shim = int (*)(int32_t, void**);
    static const Shim shim = [] {
        void* lib = dlopen("libtorch_cuda.so", RTLD_NOW | RTLD_NOLOAD);
        return lib ? reinterpret_cast<Shim>(dlsym(lib, "aoti_torch_get_current_cuda_stream")) : nullptr;
    }();
    void* stream = nullptr;
    if (shim && shim(device.index(), &stream) == 0) return stream;
    return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle();
}

void check(int result, const char* what) {
    TORCH_CHECK(result == 0, "cusdpa native replay: ", what, " failed (CUresult ", result, ")");
}

// ---- plans --------------------------------------------------------------------------------------------------

constexpr int SLOTS = 27;  // len(cusdpa.backends.launch.SLOTS)
enum Slot { Q, K, V, O, LSE, DO, DELTA, DQ, DK, DV, SEED_LO, SEED_HI, OFFSET, DQ_ACCUM, MASK, SEEN, BLOCKS };
using Values = std::array<uint64_t, SLOTS>;

struct Launch {
    bool memset = false;
    int slot = 0;      // memset: the slot whose words are zeroed
    int64_t bytes = 0;
    void* fn = nullptr;
    unsigned gx = 1, gy = 1, bx = 1, smem = 0;
    int cells = 0;
    std::vector<uint64_t> words;            // the cells, then each map's 16 words
    std::vector<int> cell_word;             // the word each cell's parameter points to
    std::vector<std::pair<int, int>> stores;  // (word, slot): a slot's value into a word per call
};

struct Shape {
    std::vector<int64_t> sizes, strides;
};

struct Plan {
    int device = 0;
    bool deterministic = false;  // the backward sums in a fixed order
    bool forced = false;         // ... whatever torch's deterministic mode (FlashAttention's deterministic=True)
    bool summary = false;        // the kernels read the mask's summary (seen, blocks)
    Shape out, lse;
    std::vector<Launch> forward, backward;
    bool trains = false;
    std::array<Shape, 3> grads;
    int64_t dq_accum = 0;
};

// Reads an encoded plan front to back.
struct Reader {
    const std::vector<int64_t>& code;
    size_t at = 0;
    int64_t next() {
        TORCH_CHECK(at < code.size(), "cusdpa native replay: a plan's code ends early");
        return code[at++];
    }
    std::vector<int64_t> many(int64_t n) {
        std::vector<int64_t> out;
        for (int64_t i = 0; i < n; ++i) out.push_back(next());
        return out;
    }
    Shape shape(bool with_strides) {
        Shape s;
        const int64_t rank = next();
        s.sizes = many(rank);
        if (with_strides) {
            s.strides = many(rank);
        } else {  // contiguous
            s.strides.assign(rank, 1);
            for (int64_t i = rank - 2; i >= 0; --i) s.strides[i] = s.strides[i + 1] * s.sizes[i + 1];
        }
        return s;
    }
    std::vector<Launch> launches() {
        std::vector<Launch> out(next());
        for (Launch& l : out) {
            const int64_t kind = next();
            if (kind == 2) {
                l.memset = true;
                l.slot = static_cast<int>(next());
                l.bytes = next();
                continue;
            }
            TORCH_CHECK(kind == 1, "cusdpa native replay: unknown launch kind ", kind);
            l.fn = reinterpret_cast<void*>(next());
            l.gx = static_cast<unsigned>(next());
            l.gy = static_cast<unsigned>(next());
            l.bx = static_cast<unsigned>(next());
            l.smem = static_cast<unsigned>(next());
            l.cells = static_cast<int>(next());
            for (int i = 0; i < l.cells; ++i) l.words.push_back(static_cast<uint64_t>(next()));
            l.cell_word.resize(l.cells);
            for (int i = 0; i < l.cells; ++i) l.cell_word[i] = i;
            const int64_t maps = next();
            for (int64_t m = 0; m < maps; ++m) {
                const int cell = static_cast<int>(next()), slot = static_cast<int>(next());
                const int word = static_cast<int>(next());
                const int first = static_cast<int>(l.words.size());
                for (int w = 0; w < 16; ++w) l.words.push_back(static_cast<uint64_t>(next()));
                l.cell_word.at(cell) = first;
                l.stores.emplace_back(first + word, slot);
            }
            const int64_t slots = next();
            for (int64_t s = 0; s < slots; ++s) {
                const int cell = static_cast<int>(next()), slot = static_cast<int>(next());
                l.stores.emplace_back(cell, slot);
            }
            for (const auto& store : l.stores)
                TORCH_CHECK(store.second >= 0 && store.second < SLOTS && store.first < static_cast<int>(l.words.size()),
                            "cusdpa native replay: a store out of range");
        }
        return out;
    }
};

std::mutex plans_lock;
std::vector<std::unique_ptr<Plan>> plans;

// ---- signatures ------------------------------------------------------------------------------------------------
// A call's plan is found by its signature: the Python side's "call kind" (options, backends, whether a gradient
// is wanted, the deterministic flags, the kernel configuration: everything but the tensors, as a small int) and
// the tensors' ranks, sizes, strides, dtypes and devices and whether their bases are 16-byte aligned, and an
// attn_mask's rank, sizes, strides, dtype, device and whether its base is a whole number of key pairs, which this
// file reads in a few nanoseconds where Python took microseconds (interop/ops.py _signature).

using Signature = std::vector<int64_t>;

struct SignatureHash {
    size_t operator()(const Signature& s) const {
        uint64_t h = 1469598103934665603ull;
        for (int64_t x : s) h = (h ^ static_cast<uint64_t>(x)) * 1099511628211ull;
        return static_cast<size_t>(h);
    }
};

using Mask = std::optional<Tensor>;

void describe(Signature& s, const at::Tensor& t) {
    s.push_back(t.dim());
    for (int64_t x : t.sizes()) s.push_back(x);
    for (int64_t x : t.strides()) s.push_back(x);
    s.push_back(static_cast<int64_t>(t.scalar_type()));
    s.push_back(static_cast<int64_t>(t.device().type()) * 1024 + t.device().index());
}

Signature signature_of(int64_t kind, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Mask& mask) {
    Signature s{kind};
    s.reserve(56);
    uint64_t bases = 0;
    for (const at::Tensor* t : {&q, &k, &v}) {
        describe(s, *t);
        bases |= reinterpret_cast<uint64_t>(t->data_ptr());
    }
    s.push_back(bases % 16 == 0);
    if (mask && mask->defined()) {
        describe(s, *mask);
        s.push_back(reinterpret_cast<uint64_t>(mask->data_ptr()) % (2 * mask->element_size()) == 0);
    } else {
        s.push_back(-1);
    }
    return s;
}

std::mutex bound_lock;
std::unordered_map<Signature, int64_t, SignatureHash> bound;  // signature -> plan id

// Plan `plan` serves the calls of kind `kind` on tensors like these (-1: none does).
void bind(int64_t kind, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Mask& mask,
          int64_t plan) {
    Signature s = signature_of(kind, q, k, v, mask);
    std::lock_guard<std::mutex> guard(bound_lock);
    if (bound.size() >= 4096) bound.clear();  // the Python side binds again on a miss
    bound[std::move(s)] = plan;
}

// The plan bound to a call's signature, -1 where "none" was bound, -2 where nothing was.
int64_t bound_plan(int64_t kind, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Mask& mask) {
    const Signature s = signature_of(kind, q, k, v, mask);
    std::lock_guard<std::mutex> guard(bound_lock);
    const auto found = bound.find(s);
    return found == bound.end() ? -2 : found->second;
}

const Plan& plan_of(int64_t id) {
    std::lock_guard<std::mutex> guard(plans_lock);
    TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(plans.size()), "cusdpa native replay: no plan ", id);
    return *plans[id];
}

int64_t add_plan(std::vector<int64_t> code) {
    Reader r{code};
    auto p = std::make_unique<Plan>();
    p->device = static_cast<int>(r.next());
    p->deterministic = r.next() != 0;
    p->forced = r.next() != 0;
    p->summary = r.next() != 0;
    p->out = r.shape(true);
    p->lse = r.shape(false);
    p->forward = r.launches();
    p->trains = r.next() != 0;
    if (p->trains) {
        for (Shape& g : p->grads) g = r.shape(true);
        p->dq_accum = r.next();
        p->backward = r.launches();
    }
    TORCH_CHECK(r.at == code.size(), "cusdpa native replay: a plan's code runs on past its end");
    std::lock_guard<std::mutex> guard(plans_lock);
    plans.push_back(std::move(p));
    return static_cast<int64_t>(plans.size()) - 1;
}

// ---- issuing launches -----------------------------------------------------------------------------------------

uint64_t address(const Tensor& t) { return t.defined() ? reinterpret_cast<uint64_t>(t.data_ptr()) : 0; }

// Every launch in order on the current stream of `device` (a CUDA device; a CPU tensor's plan runs on the CPU
// tests' stand-in driver, stream 0).
void issue(const std::vector<Launch>& launches, const Values& values, const c10::Device& device) {
    c10::OptionalDeviceGuard guard;
    void* stream = nullptr;
    if (device.is_cuda()) {
        guard.reset_device(device);
        // A thread can have a current device but no current context (autograd's device threads select the
        // device lazily): the device's primary context, current, as cudaSetDevice would make it.
        void* ctx = nullptr;
        check(driver().ctx_get_current(&ctx), "cuCtxGetCurrent");
        if (!ctx) {
            int dev = 0;
            check(driver().device_get(&dev, device.index()), "cuDeviceGet");
            check(driver().primary_ctx_retain(&ctx, dev), "cuDevicePrimaryCtxRetain");
            check(driver().ctx_set_current(ctx), "cuCtxSetCurrent");
        }
        stream = current_stream(device);
    }
    std::vector<uint64_t> words;
    std::vector<void*> params;
    for (const Launch& l : launches) {
        if (l.memset) {
            check(driver().memset32(values[l.slot], 0, static_cast<size_t>(l.bytes / 4), stream), "cuMemsetD32Async");
            continue;
        }
        words = l.words;  // this call's copy: the driver copies the parameters during the call
        for (const auto& store : l.stores) words[store.first] = values[store.second];
        params.resize(l.cells);
        for (int i = 0; i < l.cells; ++i) params[i] = &words[l.cell_word[i]];
        check(driver().launch(l.fn, l.gx, l.gy, 1, l.bx, 1, 1, l.smem, stream, params.data(), nullptr),
              "cuLaunchKernel");
    }
}

Tensor empty(const Shape& s, const Tensor& like, c10::ScalarType dtype) {
    return at::empty_strided(s.sizes, s.strides, like.options().dtype(dtype));
}

// The slots forward and backward share: the operands, out, lse and the dropout seed's words.
Values operands(int64_t seed, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, const Tensor& out,
                const Tensor& lse) {
    Values values{};
    const uint64_t s = static_cast<uint64_t>(seed);
    values[SEED_LO] = s & 0xFFFFFFFFu;
    values[SEED_HI] = s >> 32;
    values[Q] = address(q);
    values[K] = address(k);
    values[V] = address(v);
    values[MASK] = address(mask);
    values[O] = address(out);
    values[LSE] = address(lse);
    return values;
}

// The raw stream the launches of `device` go on: torch's current stream of a CUDA device, 0 on the CPU (the stand-in
// driver's tests).
int64_t stream_word(const c10::Device& device) {
    return device.is_cuda() ? static_cast<int64_t>(reinterpret_cast<uintptr_t>(current_stream(device))) : 0;
}

// The (seen, blocks) buffers of `mask`'s summary for plan `plan`, made on `stream` unless Python keeps them for
// this unchanged mask (interop/native's `summary` op, over interop/mask_summaries).
std::tuple<Tensor, Tensor> mask_summary(const Tensor& q, const Tensor& mask, int64_t plan, int64_t stream) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("cusdpa_native::summary", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, int64_t)>();
    return op.call(q, mask, plan, stream);
}

// ---- the autograd Function --------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> fallback_backward(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                     const Tensor& v, const Mask& mask, const Tensor& out,
                                                     const Tensor& lse, int64_t plan, int64_t seed) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("cusdpa_native::fallback_backward", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                   const Tensor&, const Mask&, const Tensor&,
                                                                   const Tensor&, int64_t, int64_t)>();
    return op.call(grad_out, q, k, v, mask, out, lse, plan, seed);
}

struct Attention : public torch::autograd::Function<Attention> {
    // mask: an attn_mask the kernels read (its gradient is not wanted: such calls take the Python path)
    static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& q,
                                                  const Tensor& k, const Tensor& v, const Mask& mask, int64_t plan,
                                                  int64_t seed) {
        const Plan& p = plan_of(plan);
        TORCH_CHECK(!q.is_cuda() || q.device().index() == p.device, "cusdpa native replay: plan ", plan,
                    " was made for device ", p.device, ", not ", q.device());
        Tensor out = empty(p.out, q, q.scalar_type());
        Tensor lse = empty(p.lse, q, at::kFloat);
        const Tensor m = mask.value_or(Tensor());
        Values values = operands(seed, q, k, v, m, out, lse);
        Tensor seen, blocks;  // the mask's summary, read by forward and backward alike
        if (p.summary) {
            TORCH_CHECK(m.defined(), "cusdpa native replay: plan ", plan,
                        " reads an attn_mask's summary: no mask given");
            std::tie(seen, blocks) = mask_summary(q, m, plan, stream_word(q.device()));
            values[SEEN] = address(seen);
            values[BLOCKS] = address(blocks);
        }
        issue(p.forward, values, q.device());
        ctx->save_for_backward({q, k, v, out, lse, m, seen, blocks});
        ctx->saved_data["plan"] = plan;
        ctx->saved_data["seed"] = seed;
        ctx->mark_non_differentiable({lse});  // for the backward only
        return {out, lse};
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grads) {
        // The launches carry no derivative of their own: a second-order gradient would silently be zero.
        TORCH_CHECK(!c10::GradMode::is_enabled(), "cusdpa attention is differentiable once: its backward cannot be "
                                                  "differentiated (create_graph=True, double backward)");
        const auto saved = ctx->get_saved_variables();
        const Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4], &mask = saved[5];
        const int64_t plan = ctx->saved_data["plan"].toInt(), seed = ctx->saved_data["seed"].toInt();
        const Plan& p = plan_of(plan);
        Tensor grad_out = grads[0];
        if (!p.trains || p.deterministic != (p.forced || at::globalContext().deterministicAlgorithms())) {
            // a backward this plan did not prepare (torch's deterministic mode turned since the forward): the
            // general path's
            auto [dq, dk, dv] = fallback_backward(grad_out, q, k, v, mask.defined() ? Mask(mask) : Mask(), out, lse,
                                                  plan, seed);
            return {dq, dk, dv, Tensor(), Tensor(), Tensor()};
        }
        if (grad_out.strides() != out.strides() || grad_out.scalar_type() != out.scalar_type() ||
            grad_out.device() != out.device() || address(grad_out) % 16 != 0) {
            // the kernels read dout in out's layout (an expanded gradient of out.sum(), say, is copied there)
            Tensor copy = at::empty_strided(out.sizes(), out.strides(), out.options());
            copy.copy_(grad_out);
            grad_out = copy;
        }
        Tensor dq = empty(p.grads[0], q, q.scalar_type()), dk = empty(p.grads[1], k, k.scalar_type()),
               dv = empty(p.grads[2], v, v.scalar_type());
        Tensor delta = empty(p.lse, q, at::kFloat);
        Tensor dq_accum = p.dq_accum ? at::empty_strided({p.dq_accum}, {1}, q.options().dtype(at::kFloat)) : Tensor();
        Values values = operands(seed, q, k, v, mask, out, lse);
        values[SEEN] = address(saved[6]);
        values[BLOCKS] = address(saved[7]);
        values[DO] = address(grad_out);
        values[DELTA] = address(delta);
        values[DQ] = address(dq);
        values[DK] = address(dk);
        values[DV] = address(dv);
        values[DQ_ACCUM] = address(dq_accum);
        issue(p.backward, values, q.device());
        return {dq, dk, dv, Tensor(), Tensor(), Tensor()};
    }
};

std::tuple<Tensor, Tensor> attention(const Tensor& q, const Tensor& k, const Tensor& v, const Mask& mask, int64_t plan,
                                     int64_t seed) {
    auto outs = Attention::apply(q, k, v, mask, plan, seed);
    return {outs[0], outs[1]};
}

// Below autograd (inference tensors, which carry no autograd key): the forward alone.
std::tuple<Tensor, Tensor> attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Mask& mask,
                                             int64_t plan, int64_t seed) {
    torch::autograd::AutogradContext unused;
    auto outs = Attention::forward(&unused, q, k, v, mask, plan, seed);
    return {outs[0], outs[1]};
}

// `attention` by the plan bound to the call's signature, and 1; or no outputs (None in Python) and 0 where no
// plan is bound yet, -1 where the Python side bound "none" (plan -1: those calls take the Python path).
template <std::tuple<Tensor, Tensor> (*RUN)(const Tensor&, const Tensor&, const Tensor&, const Mask&, int64_t,
                                            int64_t)>
std::tuple<Tensor, Tensor, int64_t> call(const Tensor& q, const Tensor& k, const Tensor& v, const Mask& mask,
                                         int64_t kind, int64_t seed) {
    const int64_t plan = bound_plan(kind, q, k, v, mask);
    if (plan < 0) return {Tensor(), Tensor(), plan == -1 ? -1 : 0};
    auto [out, lse] = RUN(q, k, v, mask, plan, seed);
    return {out, lse, 1};
}

// ---- compiled graphs --------------------------------------------------------------------------------------

// The general path's forward of a call of `kind` (interop/native, in Python: the replay's front end, which binds
// a plan to the call's signature where it makes one, else the ops' forward).
std::tuple<Tensor, Tensor> general_forward(const Tensor& q, const Tensor& k, const Tensor& v, int64_t kind) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("cusdpa_native::general_forward", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t)>();
    return op.call(q, k, v, kind);
}

// The forward a compiled graph calls (interop/autograd puts it there for calls without mask, slopes, dropout or
// gradient): the plan bound to the call's signature, with no Python on the way once one is; until then, and for
// signatures bound to none, the general path's.
std::tuple<Tensor, Tensor> graph_forward(const Tensor& q, const Tensor& k, const Tensor& v, int64_t kind) {
    const int64_t plan = bound_plan(kind, q, k, v, Mask());
    if (plan < 0) return general_forward(q, k, v, kind);
    return attention_forward(q, k, v, Mask(), plan, 0);
}

}  // namespace

TORCH_LIBRARY(cusdpa_native, m) {
    // its fake (shapes for tracing) is registered by interop.native
    m.set_python_module("interop.native");
    m.def("add_plan(int[] code) -> int", add_plan);
    m.def("bind(int kind, Tensor q, Tensor k, Tensor v, Tensor? mask, int plan) -> ()", bind);
    m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, int plan, int seed) -> (Tensor, Tensor)");
    m.def("call(Tensor q, Tensor k, Tensor v, Tensor? mask, int kind, int seed) -> (Tensor, Tensor, int)");
    // implemented in Python (interop/native): the general path's backward of a plan's call
    m.def("fallback_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor out, Tensor lse, "
          "int plan, int seed) -> (Tensor, Tensor, Tensor)");
    // implemented in Python (interop/native): an attn_mask's summary buffers (seen, blocks) for a plan's kernels
    m.def("summary(Tensor q, Tensor mask, int plan, int stream) -> (Tensor, Tensor)");
    m.def("graph_forward(Tensor q, Tensor k, Tensor v, int kind) -> (Tensor, Tensor)");
    // implemented in Python (interop/native): the general path's forward of a graph_forward call
    m.def("general_forward(Tensor q, Tensor k, Tensor v, int kind) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cusdpa_native, Autograd, m) {
    m.impl("attention", attention);
    m.impl("call", call<attention>);
}
TORCH_LIBRARY_IMPL(cusdpa_native, CUDA, m) {
    m.impl("attention", attention_forward);
    m.impl("call", call<attention_forward>);
    m.impl("graph_forward", graph_forward);
}
TORCH_LIBRARY_IMPL(cusdpa_native, CPU, m) {
    m.impl("attention", attention_forward);
    m.impl("call", call<attention_forward>);
    m.impl("graph_forward", graph_forward);
}
