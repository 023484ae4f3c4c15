// An emulated CUDA driver (libcuda.so) for machines without a GPU: the driver API calls cudarc
// makes, answered on the CPU. "Device" memory is host memory; copies, memsets and kernels run
// at once, in the caller's thread, so every stream is already in order, or, with
// TESSERA_EMU_DEFER=1 (below), when the host or another stream waits for them.
// cuModuleLoadData ignores the PTX (NVRTC still compiles every source) and
// cuModuleGetFunction finds the kernel of that name compiled by g++ from the same .cu file
// (kernels.gen.cpp, written by build.sh). See emu.h for what this does and does not check.
// TESSERA_EMU_STATS (below): what the host queues between its synchronisations, per process.
#include <ucontext.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <unistd.h>

#include <algorithm>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "emu.h"
#include "registry.h"
#include "stream.h"

namespace emu {
uint3 thread_idx, block_idx;
dim3 block_dim, grid_dim;

namespace {
enum class State { Runnable, AtBlock, AtWarp, Done };

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    State state = State::Runnable;
    uint3 idx{};
};

constexpr size_t STACK_BYTES = 256 * 1024;

struct Block {
    std::vector<Fiber> fibers;
    ucontext_t scheduler;
    size_t current = 0;
    std::vector<unsigned long long> slots;  // 32 per warp
    const Kernel* kernel = nullptr;
    void** params = nullptr;
    bool failed = false;
};

Block block;
std::mutex launches;  // one kernel at a time: blockIdx and __shared__ are process-wide

void enter() {
    block.kernel->run(block.params);
    block.fibers[block.current].state = State::Done;
    // Returning resumes uc_link, the scheduler.
}

bool in_fibers = false;

void wait_as(State s) {
    if (!in_fibers) {
        // kernels.py found no barrier in this kernel: its threads are not fibers.
        std::fprintf(stderr, "tessera CUDA emulator: %s reached a barrier kernels.py did not see\n",
                     block.kernel->name);
        std::abort();
    }
    Fiber& f = block.fibers[block.current];
    f.state = s;
    swapcontext(&f.ctx, &block.scheduler);
}

// threadIdx of the block's t-th thread (x fastest).
uint3 thread_of(size_t t) {
    return uint3{(unsigned)(t % block_dim.x), (unsigned)(t / block_dim.x % block_dim.y),
                 (unsigned)(t / ((size_t)block_dim.x * block_dim.y))};
}

size_t threads_per_block() { return (size_t)block_dim.x * block_dim.y * block_dim.z; }

// Releases a barrier every live thread of [first, last) waits at; false if some still run.
bool release(size_t first, size_t last, State at) {
    bool any = false;
    for (size_t t = first; t < last; ++t) {
        State s = block.fibers[t].state;
        if (s == State::Runnable) { return false; }
        if (s != State::Done && s != at) { return false; }
        any |= s == at;
    }
    if (!any) { return false; }
    for (size_t t = first; t < last; ++t) {
        if (block.fibers[t].state == at) { block.fibers[t].state = State::Runnable; }
    }
    return true;
}

// Runs one block's threads until every one is done; false on a deadlock (a barrier some live
// thread of the block or warp never reaches).
bool run_block() {
    size_t n = threads_per_block();
    if (!block.kernel->waits) {
        for (size_t t = 0; t < n; ++t) {
            block.current = t;
            thread_idx = thread_of(t);
            block.kernel->run(block.params);
        }
        return true;
    }
    in_fibers = true;
    for (size_t t = 0; t < n; ++t) {
        Fiber& f = block.fibers[t];
        f.state = State::Runnable;
        f.idx = thread_of(t);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &block.scheduler;
        makecontext(&f.ctx, enter, 0);
    }
    for (;;) {
        bool ran = false;
        for (size_t t = 0; t < n; ++t) {
            if (block.fibers[t].state != State::Runnable) { continue; }
            ran = true;
            block.current = t;
            thread_idx = block.fibers[t].idx;
            swapcontext(&block.scheduler, &block.fibers[t].ctx);
        }
        bool done = true;
        for (size_t t = 0; t < n; ++t) { done &= block.fibers[t].state == State::Done; }
        if (done) {
            in_fibers = false;
            return true;
        }
        bool released = release(0, n, State::AtBlock);
        for (size_t w = 0; w < n; w += 32) {
            released |= release(w, w + 32 < n ? w + 32 : n, State::AtWarp);
        }
        if (!released && !ran) {
            in_fibers = false;
            return false;
        }
    }
}
}  // namespace

void block_barrier() { wait_as(State::AtBlock); }
void warp_barrier() { wait_as(State::AtWarp); }
unsigned long long* warp_slots() { return &block.slots[(block.current / 32) * 32]; }
unsigned int lane_count() {
    size_t n = threads_per_block();
    size_t first = (block.current / 32) * 32;
    return (unsigned)(n - first < 32 ? n - first : 32);
}

// Why the launch geometry is refused, or "".
std::string refused(dim3 grid, dim3 threads) {
    size_t n = (size_t)threads.x * threads.y * threads.z;
    if (n == 0 || n > 1024) { return "block of " + std::to_string(n) + " threads"; }
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
        return "grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
               std::to_string(grid.z) + ")";
    }
    return "";
}

// Runs `kernel` over the grid (its geometry checked by `refused`); a message on failure.
std::string launch(const Kernel& kernel, dim3 grid, dim3 threads, void** params) {
    std::lock_guard<std::mutex> hold(launches);
    size_t n = (size_t)threads.x * threads.y * threads.z;
    block_dim = threads;
    grid_dim = grid;
    if (block.fibers.size() < n) {
        block.fibers.resize(n);
        for (Fiber& f : block.fibers) { f.stack.resize(STACK_BYTES); }
    }
    block.slots.assign(((n + 31) / 32) * 32, 0);
    block.kernel = &kernel;
    block.params = params;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                block_idx = uint3{x, y, z};
                if (!run_block()) {
                    return std::string(kernel.name) + ": threads of block (" + std::to_string(x) +
                           ", " + std::to_string(y) + ", " + std::to_string(z) +
                           ") wait at a barrier others never reach";
                }
            }
    return "";
}

std::map<std::string, Kernel>& kernels() {
    static std::map<std::string, Kernel> all;
    return all;
}
}  // namespace emu

// ---- TESSERA_EMU_STATS: what the host queues on a stream between two synchronisations ----
// With TESSERA_EMU_STATS naming a folder, each process writes emu-stats-<pid>.json there at
// exit: every distinct interval of one stream between the host's synchronisations with it
// (stream synchronize, a copy to pageable host memory, which CUDA completes before returning,
// and the context's synchronize end all that was queued; an event synchronize ends what was
// queued before the event was recorded, and counts the launches queued after it, which the
// device runs while the host reads), how often it occurred and what was queued in it: kernel
// launches by name, GEMMs, all-reduces, copies, memsets, allocations; and, under "totals",
// host work of no stream (looking a kernel up by name).
// A training step is such an interval of the compute stream: how many launches and
// synchronisations it costs does not depend on the device, so it is counted here, without one.
// Each interval is compared with the stream's interval before it when both queued the same
// ops in the same order ("compared": how often), and "changed" says per op how often its
// arguments (a launch's argument bytes and grid, a copy's or memset's addresses and size, a
// GEMM's or all-reduce's pointers, shapes and scalars) differed. A CUDA graph replays a step's
// ops with the arguments it was captured with, so an op counted there is one a captured step
// would run wrongly.
namespace stats {
namespace {
using Work = std::map<std::string, long>;

bool enabled() {
    static const bool on = std::getenv("TESSERA_EMU_STATS") != nullptr;
    return on;
}

// What a stream has queued since the host last waited for it, in order; `first` is the
// position (counted over the stream's life) of ops[0], so that an event can mark where it was
// recorded and a wait on it end the interval there, leaving what was queued after it open.
// An op queued: its name and what it was queued with (its signature).
using Op = std::pair<std::string, std::string>;
struct Queue {
    long first = 0;
    std::vector<Op> ops;
};
// How often an interval was seen, compared with the one before it (same ops in the same
// order), and how often each op's signature differed then.
struct Seen {
    long count = 0;
    long compared = 0;
    Work changed;
};

std::mutex lock;
std::map<int, Queue> open;                      // by stream id
std::map<std::pair<int, Work>, Seen> recorded;  // by (stream id, work)
std::map<int, std::vector<Op>> last;            // by stream id: its last interval's ops
Work totals;                                    // host work of no stream, per process

void note(int stream, const std::string& what, std::string signature = {}) {
    if (!enabled()) { return; }
    std::lock_guard<std::mutex> hold(lock);
    open[stream].ops.emplace_back(what, std::move(signature));
}

// Counts a closed interval's ops in `seen`, compared with the stream's last interval's where
// those match by name.
void compare(int stream, std::vector<Op> ops, Seen& seen) {
    std::vector<Op>& before = last[stream];
    bool like = before.size() == ops.size() &&
                std::equal(ops.begin(), ops.end(), before.begin(),
                           [](const Op& a, const Op& b) { return a.first == b.first; });
    if (like) {
        seen.compared += 1;
        for (size_t i = 0; i < ops.size(); ++i) {
            if (ops[i].second != before[i].second) { seen.changed[ops[i].first] += 1; }
        }
    }
    before = std::move(ops);
}

void count(const std::string& what) {
    if (!enabled()) { return; }
    std::lock_guard<std::mutex> hold(lock);
    totals[what] += 1;
}

// Where the next op queued on `stream` will stand.
long position(int stream) {
    if (!enabled()) { return 0; }
    std::lock_guard<std::mutex> hold(lock);
    const Queue& q = open[stream];
    return q.first + (long)q.ops.size();
}

// Ends `stream`'s interval at `at` (the host waited for what was queued before it). Launches
// queued after it, which the device still had to run while the host read, are counted in the
// interval as "queued behind the wait".
void close_at(int stream, long at) {
    auto it = open.find(stream);
    if (it == open.end()) { return; }
    Queue& q = it->second;
    size_t k = (size_t)std::clamp(at - q.first, 0L, (long)q.ops.size());
    Work work;
    for (size_t i = 0; i < k; ++i) { work[q.ops[i].first] += 1; }
    long behind = 0;
    for (size_t i = k; i < q.ops.size(); ++i) { behind += q.ops[i].first.rfind("launch ", 0) == 0; }
    if (behind > 0 && !work.empty()) { work["queued behind the wait (launches)"] = behind; }
    if (!work.empty()) {
        Seen& seen = recorded[{stream, work}];
        seen.count += 1;
        compare(stream, std::vector<Op>(q.ops.begin(), q.ops.begin() + (long)k), seen);
    }
    q.ops.erase(q.ops.begin(), q.ops.begin() + (long)k);
    q.first += (long)k;
}

void synchronised(int stream) {
    if (!enabled()) { return; }
    std::lock_guard<std::mutex> hold(lock);
    close_at(stream, std::numeric_limits<long>::max());
}

void synchronised_at(int stream, long at) {
    if (!enabled()) { return; }
    std::lock_guard<std::mutex> hold(lock);
    close_at(stream, at);
}

void synchronised_all() {
    if (!enabled()) { return; }
    std::lock_guard<std::mutex> hold(lock);
    for (auto& entry : open) { close_at(entry.first, std::numeric_limits<long>::max()); }
}

void write_work(FILE* f, const Work& work) {
    size_t j = 0;
    std::fprintf(f, "{");
    for (const auto& [what, n] : work) {
        std::fprintf(f, "%s\"%s\": %ld", j++ ? ", " : "", what.c_str(), n);
    }
    std::fprintf(f, "}");
}


void write(FILE* f) {
    std::vector<std::pair<long, const std::pair<const std::pair<int, Work>, Seen>*>> order;
    for (const auto& entry : recorded) { order.emplace_back(entry.second.count, &entry); }
    std::stable_sort(order.begin(), order.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first; });
    std::fprintf(f, "{\"intervals\": [");
    for (size_t i = 0; i < order.size(); ++i) {
        const auto& [key, seen] = *order[i].second;
        std::fprintf(f, "%s\n  {\"stream\": %d, \"count\": %ld, \"work\": ", i ? "," : "",
                     key.first, seen.count);
        write_work(f, key.second);
        std::fprintf(f, ", \"compared\": %ld, \"changed\": ", seen.compared);
        write_work(f, seen.changed);
        std::fprintf(f, "}");
    }
    std::fprintf(f, "\n], \"totals\": ");
    write_work(f, totals);
    std::fprintf(f, "}\n");
}

// Writes the report at exit (intervals never synchronised are left out).
struct Report {
    ~Report() {
        const char* dir = std::getenv("TESSERA_EMU_STATS");
        if (dir == nullptr) { return; }
        std::lock_guard<std::mutex> hold(lock);
        std::string path = std::string(dir) + "/emu-stats-" + std::to_string(getpid()) + ".json";
        FILE* f = std::fopen(path.c_str(), "w");
        if (f == nullptr) {
            std::fprintf(stderr, "tessera CUDA emulator: cannot write %s\n", path.c_str());
            return;
        }
        write(f);
        std::fclose(f);
    }
} report;
}  // namespace
}  // namespace stats

// ---- Stream capture: CUDA graphs ----
// A stream being captured records the work queued on it instead of running it (a launch with
// copies of its arguments; a copy from or to page-locked memory touching the host's bytes when
// it runs, as a graph's memcpy node does); an instantiated graph queues that work again at each
// launch, with the arguments it was captured with, so a captured step that a later step needs
// changed (a seed, a step count, another buffer) runs wrongly here as on a GPU. What CUDA
// refuses while a stream is captured is refused here and invalidates the capture, so that
// ending it fails: a copy from or to pageable memory, the host waiting for the stream or the
// context, a wait on an event recorded outside the capture; and, here only, an allocation or
// free in the stream's order (a GPU would make them graph memory nodes; tessera's graphs own no
// memory: their buffers are taken before they are captured).
namespace capture {
namespace {
struct Graph {
    std::vector<std::function<void()>> ops;
};
struct State {
    std::shared_ptr<Graph> graph = std::make_shared<Graph>();
    bool invalid = false;
};
std::mutex lock;
std::map<int, State> active;  // by stream id

bool capturing(int stream) {
    std::lock_guard<std::mutex> hold(lock);
    return active.count(stream) != 0;
}

bool any() {
    std::lock_guard<std::mutex> hold(lock);
    return !active.empty();
}

// Records `op` if `stream` is being captured.
bool record(int stream, const std::function<void()>& op) {
    std::lock_guard<std::mutex> hold(lock);
    auto it = active.find(stream);
    if (it == active.end()) { return false; }
    it->second.graph->ops.push_back(op);
    return true;
}

// True (and the capture invalidated) if `stream` is being captured: the call is refused.
bool refuse(int stream) {
    std::lock_guard<std::mutex> hold(lock);
    auto it = active.find(stream);
    if (it == active.end()) { return false; }
    it->second.invalid = true;
    return true;
}

void refuse_all() {
    std::lock_guard<std::mutex> hold(lock);
    for (auto& entry : active) { entry.second.invalid = true; }
}
}  // namespace
}  // namespace capture

// ---- TESSERA_EMU_DEFER=1: the device's work run late, as a GPU may run it ----
// By default every copy, memset, launch and GEMM runs when it is queued, so the host always
// sees the device's work done. Deferred, each stream's work waits in a queue until the host
// waits for it (stream, event or context synchronize, a copy to pageable memory, which CUDA
// completes before returning) or another stream waits for it (an event wait, run when the
// waiting stream's queue reaches it), as late as a GPU could run it. A host that reads what
// the device has not finished (a page-locked read back before its event), or rewrites
// page-locked memory a queued copy still reads, or frees memory queued work still uses, then
// reads or writes the wrong values here too: the parity and training tests see them.
namespace defer {
namespace {
bool on() {
    static const bool deferred = [] {
        const char* v = std::getenv("TESSERA_EMU_DEFER");
        return v != nullptr && std::strcmp(v, "1") == 0;
    }();
    return deferred;
}

struct Queue {
    long ran = 0;  // ops of this stream run so far
    std::vector<std::function<void()>> waiting;
};

std::mutex lock;     // the queues
// One drain at a time, so that each stream's ops run in order; recursive: an event wait in one
// stream's queue drains another's.
std::recursive_mutex running;
std::map<int, Queue> queues;

// Where the next op queued on `stream` will stand (over the stream's life).
long position(int stream) {
    std::lock_guard<std::mutex> hold(lock);
    Queue& q = queues[stream];
    return q.ran + (long)q.waiting.size();
}

// Runs `stream`'s ops before position `upto`, in order.
void drain(int stream, long upto) {
    std::lock_guard<std::recursive_mutex> one(running);
    for (;;) {
        std::function<void()> op;
        {
            std::lock_guard<std::mutex> hold(lock);
            Queue& q = queues[stream];
            if (q.waiting.empty() || q.ran >= upto) { return; }
            op = std::move(q.waiting.front());
            q.waiting.erase(q.waiting.begin());
            q.ran += 1;
        }
        op();
    }
}

void drain_all() {
    std::vector<int> streams;
    {
        std::lock_guard<std::mutex> hold(lock);
        for (const auto& entry : queues) { streams.push_back(entry.first); }
    }
    for (int s : streams) { drain(s, std::numeric_limits<long>::max()); }
}

// Runs `op` in `stream`'s order: now, or queued; or records it, if the stream is captured.
void submit(int stream, std::function<void()> op) {
    if (capture::record(stream, op)) { return; }
    if (!on()) {
        op();
        return;
    }
    std::lock_guard<std::mutex> hold(lock);
    queues[stream].waiting.push_back(std::move(op));
}
}  // namespace
}  // namespace defer

// ---- The driver API, as cudarc calls it (CUDA 12.8 names) ----
typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUhandle;

enum : CUresult {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_DEVICE = 101,
    ILLEGAL_STATE = 401,
    NOT_FOUND = 500,
    LAUNCH_FAILED = 719,
    CAPTURE_UNSUPPORTED = 900,
    CAPTURE_INVALIDATED = 901,
    CAPTURE_ISOLATION = 905,
    CAPTURED_EVENT = 907,
};

namespace {
int context_tag, pool_tag;

// Streams and events are distinct objects so that the statistics can tell streams apart; an
// event remembers the stream it was last recorded on.
struct Stream {
    int id;  // in creation order from 1; 0 is the legacy default stream
};
std::atomic<int> streams_made{0};
Stream* new_stream() { return new Stream{++streams_made}; }
int stream_id(CUhandle s) { return s ? static_cast<Stream*>(s)->id : 0; }
// Counted when queued, not when captured (a graph's launch is counted as one op).
void note_on(CUhandle s, const std::string& what, std::string signature = {}) {
    if (!stats::enabled() || capture::capturing(stream_id(s))) { return; }
    stats::note(stream_id(s), what, std::move(signature));
}
struct Event {
    int stream = 0;
    long position = 0;  // the stream's ops queued before it (stats)
    long queued = 0;    // the same in the deferred queue
    bool captured = false;  // recorded in a stream being captured
};

// Page-locked host ranges (cuMemHostAlloc, cuMemHostRegister): copies to or from them are
// asynchronous; from or to pageable memory CUDA makes them (partly) synchronous.
std::mutex pinned_lock;
std::map<uintptr_t, size_t> pinned;  // start -> bytes
void pin(const void* p, size_t bytes) {
    std::lock_guard<std::mutex> hold(pinned_lock);
    pinned[(uintptr_t)p] = bytes;
}
void unpin(const void* p) {
    std::lock_guard<std::mutex> hold(pinned_lock);
    pinned.erase((uintptr_t)p);
}
bool is_pinned(const void* p, size_t bytes) {
    std::lock_guard<std::mutex> hold(pinned_lock);
    auto it = pinned.upper_bound((uintptr_t)p);
    if (it == pinned.begin()) { return false; }
    --it;
    return (uintptr_t)p + bytes <= it->first + it->second;
}
CUhandle current_context = nullptr;
const size_t TOTAL_BYTES = 16ull << 30;

const char* message(CUresult r) {
    switch (r) {
        case SUCCESS: return "no error";
        case INVALID_VALUE: return "invalid argument";
        case OUT_OF_MEMORY: return "out of memory";
        case INVALID_DEVICE: return "invalid device ordinal";
        case NOT_FOUND: return "named symbol not found";
        case LAUNCH_FAILED: return "unspecified launch failure";
        case ILLEGAL_STATE: return "illegal state";
        case CAPTURE_UNSUPPORTED: return "operation not permitted when stream is capturing";
        case CAPTURE_INVALIDATED: return "operation failed due to a previous error during capture";
        case CAPTURE_ISOLATION: return "operation would make the legacy stream depend on a capturing blocking stream";
        case CAPTURED_EVENT: return "operation not permitted on an event last recorded in a capturing stream";
        default: return "unknown error";
    }
}

CUresult fail(CUresult r, const std::string& why) {
    std::fprintf(stderr, "tessera CUDA emulator: %s\n", why.c_str());
    return r;
}
}  // namespace

extern "C" {
// libcublas's and libnccl's calls, counted on the stream they were given (stream.h).
void tessera_emu_note(CUhandle stream, const char* what, const char* signature, size_t bytes) {
    note_on(stream, what, std::string(signature, bytes));
}
// libcublas's GEMMs, run in the stream's order (stream.h).
void tessera_emu_submit(CUhandle stream, void (*run)(void*), void (*release)(void*), void* work) {
    std::shared_ptr<void> owned(work, release);
    defer::submit(stream_id(stream), [run, owned] { run(owned.get()); });
}
// Runs what the stream queued (before libnccl's all-reduce, which runs at once).
void tessera_emu_drain(CUhandle stream) { defer::drain(stream_id(stream), std::numeric_limits<long>::max()); }

CUresult cuInit(unsigned int) { return SUCCESS; }
CUresult cuDriverGetVersion(int* v) { *v = 12080; return SUCCESS; }
// TESSERA_EMU_DEVICES: how many devices to report (default 1), each the same host memory.
static int device_count() {
    const char* n = std::getenv("TESSERA_EMU_DEVICES");
    return n && std::atoi(n) > 0 ? std::atoi(n) : 1;
}
CUresult cuDeviceGetCount(int* n) { *n = device_count(); return SUCCESS; }
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal < 0 || ordinal >= device_count()) { return INVALID_DEVICE; }
    *d = ordinal;
    return SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    std::snprintf(name, (size_t)len, "tessera CUDA emulator (CPU, not a GPU)");
    return SUCCESS;
}
CUresult cuDeviceGetAttribute(int* v, int attribute, CUdevice) {
    switch (attribute) {
        case 1: *v = 1024; break;    // max threads per block
        case 10: *v = 32; break;     // warp size
        case 16: *v = 4; break;      // multiprocessors
        case 75: *v = 9; break;      // compute capability
        case 76: *v = 0; break;
        case 115: *v = 1; break;     // memory pools
        default: *v = 0;
    }
    return SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) { *bytes = TOTAL_BYTES; return SUCCESS; }
CUresult cuMemGetInfo_v2(size_t* free, size_t* total) {
    *free = TOTAL_BYTES / 2;
    *total = TOTAL_BYTES;
    return SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(CUhandle* ctx, CUdevice) { *ctx = &context_tag; return SUCCESS; }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return SUCCESS; }
CUresult cuCtxSetCurrent(CUhandle ctx) { current_context = ctx; return SUCCESS; }
CUresult cuCtxGetCurrent(CUhandle* ctx) { *ctx = current_context; return SUCCESS; }
CUresult cuCtxSynchronize() {
    if (capture::any()) {
        capture::refuse_all();
        return fail(CAPTURE_UNSUPPORTED, "context synchronize while a stream is captured");
    }
    defer::drain_all();
    stats::synchronised_all();
    return SUCCESS;
}
CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    *least = 0;
    *greatest = 0;
    return SUCCESS;
}
CUresult cuDeviceGetDefaultMemPool(CUhandle* pool, CUdevice) { *pool = &pool_tag; return SUCCESS; }
CUresult cuMemPoolSetAttribute(CUhandle, int, void*) { return SUCCESS; }

CUresult cuStreamCreate(CUhandle* s, unsigned int) { *s = new_stream(); return SUCCESS; }
CUresult cuStreamCreateWithPriority(CUhandle* s, unsigned int, int) { *s = new_stream(); return SUCCESS; }
CUresult cuStreamDestroy_v2(CUhandle s) {
    defer::drain(stream_id(s), std::numeric_limits<long>::max());
    stats::synchronised(stream_id(s));
    delete static_cast<Stream*>(s);
    return SUCCESS;
}
CUresult cuStreamSynchronize(CUhandle s) {
    if (capture::refuse(stream_id(s))) { return fail(CAPTURE_UNSUPPORTED, "synchronize of a captured stream"); }
    defer::drain(stream_id(s), std::numeric_limits<long>::max());
    stats::synchronised(stream_id(s));
    return SUCCESS;
}
// Done by the time it answers: the queue is run first.
CUresult cuStreamQuery(CUhandle s) {
    if (capture::refuse(stream_id(s))) { return fail(CAPTURE_UNSUPPORTED, "query of a captured stream"); }
    defer::drain(stream_id(s), std::numeric_limits<long>::max());
    return SUCCESS;
}
// The waiting stream's later work runs after what the event's stream queued before the event.
CUresult cuStreamWaitEvent(CUhandle s, CUhandle e, unsigned int) {
    note_on(s, "event wait");
    const Event* event = static_cast<Event*>(e);
    if (capture::capturing(stream_id(s))) {
        // Within the captured stream its own order holds; another stream's work is outside.
        if (event->captured && event->stream == stream_id(s)) { return SUCCESS; }
        capture::refuse(stream_id(s));
        return fail(CAPTURE_ISOLATION, "a captured stream waits on an event recorded outside the capture");
    }
    if (event->captured) { return fail(CAPTURED_EVENT, "a wait on an event recorded in a capture"); }
    int other = event->stream;
    long upto = event->queued;
    defer::submit(stream_id(s), [other, upto] { defer::drain(other, upto); });
    return SUCCESS;
}
CUresult cuEventCreate(CUhandle* e, unsigned int) { *e = new Event; return SUCCESS; }
CUresult cuEventRecord(CUhandle e, CUhandle s) {
    Event* event = static_cast<Event*>(e);
    event->stream = stream_id(s);
    event->captured = capture::capturing(event->stream);
    event->position = stats::position(event->stream);
    event->queued = defer::position(event->stream);
    return SUCCESS;
}
// The host waits for what was queued before the event, not for what came after it.
CUresult cuEventSynchronize(CUhandle e) {
    const Event* event = static_cast<Event*>(e);
    if (event->captured) { return fail(CAPTURED_EVENT, "synchronize on an event recorded in a capture"); }
    defer::drain(event->stream, event->queued);
    stats::synchronised_at(event->stream, event->position);
    return SUCCESS;
}
CUresult cuEventQuery(CUhandle e) {
    const Event* event = static_cast<Event*>(e);
    if (event->captured) { return fail(CAPTURED_EVENT, "query of an event recorded in a capture"); }
    defer::drain(event->stream, event->queued);
    return SUCCESS;
}
CUresult cuEventDestroy_v2(CUhandle e) { delete static_cast<Event*>(e); return SUCCESS; }
CUresult cuEventElapsedTime(float* ms, CUhandle, CUhandle) { *ms = 0.0f; return SUCCESS; }
CUresult cuEventElapsedTime_v2(float* ms, CUhandle, CUhandle) { *ms = 0.0f; return SUCCESS; }
typedef void (*HostFn)(void*);
CUresult cuLaunchHostFunc(CUhandle s, HostFn f, void* data) {
    note_on(s, "host function");
    defer::submit(stream_id(s), [f, data] { f(data); });
    return SUCCESS;
}

// Device buffers are host allocations, never at address 0 (even for 0 bytes). They start as
// 0xff bytes, a NaN in every f32 and f64 (a GPU's fresh memory holds whatever was there): a
// kernel that reads what nothing wrote shows in the parity tests instead of reading zeros.
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUhandle s) {
    if (capture::refuse(stream_id(s))) { return fail(CAPTURE_UNSUPPORTED, "allocation in a captured stream"); }
    note_on(s, "alloc");
    void* m = std::malloc(bytes ? bytes : 1);
    if (!m) { return OUT_OF_MEMORY; }
    std::memset(m, 0xff, bytes);
    *p = (CUdeviceptr)m;
    return SUCCESS;
}
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return cuMemAllocAsync(p, bytes, nullptr); }
// Freed in stream order: queued work may still use it.
CUresult cuMemFreeAsync(CUdeviceptr p, CUhandle s) {
    if (capture::refuse(stream_id(s))) { return fail(CAPTURE_UNSUPPORTED, "free in a captured stream"); }
    note_on(s, "free");
    defer::submit(stream_id(s), [p] { std::free((void*)p); });
    return SUCCESS;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    defer::drain_all();
    return cuMemFreeAsync(p, nullptr);
}
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned int) {
    note_on(nullptr, "pinned alloc");
    *p = std::malloc(bytes ? bytes : 1);
    if (*p == nullptr) { return OUT_OF_MEMORY; }
    pin(*p, bytes);
    return SUCCESS;
}
// Waits for the device, as CUDA's does: a queued copy may still use the memory.
CUresult cuMemFreeHost(void* p) {
    defer::drain_all();
    unpin(p);
    std::free(p);
    return SUCCESS;
}
CUresult cuMemHostRegister_v2(void* p, size_t bytes, unsigned int) { pin(p, bytes); return SUCCESS; }
CUresult cuMemHostUnregister(void* p) {
    defer::drain_all();
    unpin(p);
    return SUCCESS;
}

// From pageable memory CUDA stages the copy first and may wait for the stream.
// From page-locked memory the device reads the host's bytes when it runs the copy; pageable
// bytes are staged by the call.
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, CUhandle s) {
    bool pinned_source = is_pinned(h, n);
    if (!pinned_source && capture::refuse(stream_id(s))) {
        return fail(CAPTURE_UNSUPPORTED, "a copy from pageable memory in a captured stream");
    }
    note_on(s, pinned_source ? "upload" : "upload from pageable memory", emu_signature(d, h, n));
    if (pinned_source) {
        defer::submit(stream_id(s), [d, h, n] { std::memcpy((void*)d, h, n); });
    } else {
        auto staged = std::make_shared<std::vector<char>>((const char*)h, (const char*)h + n);
        defer::submit(stream_id(s), [d, staged] { std::memcpy((void*)d, staged->data(), staged->size()); });
    }
    return SUCCESS;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, size_t n) {
    defer::drain_all();
    cuMemcpyHtoDAsync_v2(d, h, n, nullptr);
    defer::drain_all();
    return SUCCESS;
}
// Into pageable memory the copy completes before the call returns: the host waits for the
// stream.
CUresult cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, CUhandle s) {
    bool waits = !is_pinned(h, n);
    if (waits && capture::refuse(stream_id(s))) {
        return fail(CAPTURE_UNSUPPORTED, "a copy to pageable memory in a captured stream");
    }
    note_on(s, waits ? "download to pageable memory" : "download", emu_signature(h, d, n));
    defer::submit(stream_id(s), [h, d, n] { std::memcpy(h, (const void*)d, n); });
    if (waits) {
        defer::drain(stream_id(s), std::numeric_limits<long>::max());
        stats::synchronised(stream_id(s));
    }
    return SUCCESS;
}
CUresult cuMemcpyDtoH_v2(void* h, CUdeviceptr d, size_t n) {
    note_on(nullptr, "blocking download");
    defer::drain_all();
    std::memcpy(h, (const void*)d, n);
    stats::synchronised_all();
    return SUCCESS;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr src, size_t n, CUhandle s) {
    note_on(s, "device copy", emu_signature(d, src, n));
    defer::submit(stream_id(s), [d, src, n] { std::memmove((void*)d, (const void*)src, n); });
    return SUCCESS;
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) {
    cuMemcpyDtoDAsync_v2(d, s, n, nullptr);
    defer::drain_all();
    return SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUhandle s) {
    note_on(s, "memset", emu_signature(d, v, n));
    defer::submit(stream_id(s), [d, v, n] { std::memset((void*)d, v, n); });
    return SUCCESS;
}
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
    cuMemsetD8Async(d, v, n, nullptr);
    defer::drain_all();
    return SUCCESS;
}
CUresult cuMemsetD32Async(CUdeviceptr d, unsigned int v, size_t n, CUhandle s) {
    note_on(s, "memset", emu_signature(d, v, n));
    defer::submit(stream_id(s), [d, v, n] {
        for (size_t i = 0; i < n; ++i) { ((unsigned int*)d)[i] = v; }
    });
    return SUCCESS;
}
CUresult cuMemsetD32_v2(CUdeviceptr d, unsigned int v, size_t n) {
    cuMemsetD32Async(d, v, n, nullptr);
    defer::drain_all();
    return SUCCESS;
}

// A module is the set of every kernel built in; its handle is only a tag.
CUresult cuModuleLoadData(CUhandle* m, const void*) { *m = &emu::kernels(); return SUCCESS; }
CUresult cuModuleUnload(CUhandle) { return SUCCESS; }
CUresult cuModuleGetFunction(CUhandle* f, CUhandle, const char* name) {
    stats::count("function lookup");
    auto found = emu::kernels().find(name);
    if (found == emu::kernels().end()) { return fail(NOT_FOUND, std::string("no kernel ") + name); }
    *f = &found->second;
    return SUCCESS;
}
CUresult cuFuncGetAttribute(int* v, int, CUhandle) { *v = 0; return SUCCESS; }
CUresult cuFuncSetAttribute(CUhandle, int, int) { return SUCCESS; }
CUresult cuLaunchKernel(CUhandle f, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                        unsigned int by, unsigned int bz, unsigned int shared, CUhandle s, void** params,
                        void** extra) {
    if (extra != nullptr || shared != 0) {
        return fail(INVALID_VALUE, "launch with dynamic shared memory or `extra`");
    }
    const emu::Kernel& k = *static_cast<const emu::Kernel*>(f);
    dim3 grid{gx, gy, gz}, threads{bx, by, bz};
    std::string args;
    if (stats::enabled()) {
        std::unique_ptr<emu::Bound> copied(k.bind(params));
        args = emu_signature(gx, gy, gz, bx, by, bz) + copied->bytes();
    }
    note_on(s, std::string("launch ") + k.name, std::move(args));
    std::string refused = emu::refused(grid, threads);
    if (!refused.empty()) { return fail(LAUNCH_FAILED, std::string(k.name) + ": " + refused); }
    if (!defer::on() && !capture::capturing(stream_id(s))) {
        std::string failed = emu::launch(k, grid, threads, params);
        if (!failed.empty()) { return fail(LAUNCH_FAILED, std::string(k.name) + ": " + failed); }
        return SUCCESS;
    }
    // The arguments copied now: the caller's may be gone when the queue runs it.
    std::shared_ptr<emu::Bound> bound(k.bind(params));
    const emu::Kernel* kernel = &k;
    defer::submit(stream_id(s), [kernel, grid, threads, bound] {
        std::string failed = emu::launch(*kernel, grid, threads, bound->params());
        if (!failed.empty()) {
            // Found late, with no call to return it from: a deadlocked kernel is a bug.
            std::fprintf(stderr, "tessera CUDA emulator: %s: %s\n", kernel->name, failed.c_str());
            std::abort();
        }
    });
    return SUCCESS;
}

CUresult cuStreamBeginCapture_v2(CUhandle s, int) {
    if (s == nullptr) { return fail(CAPTURE_UNSUPPORTED, "capture of the legacy default stream"); }
    std::lock_guard<std::mutex> hold(capture::lock);
    if (!capture::active.emplace(stream_id(s), capture::State{}).second) {
        return fail(ILLEGAL_STATE, "a capture begun twice");
    }
    return SUCCESS;
}
CUresult cuStreamIsCapturing(CUhandle s, int* status) {
    std::lock_guard<std::mutex> hold(capture::lock);
    auto it = capture::active.find(stream_id(s));
    *status = it == capture::active.end() ? 0 : it->second.invalid ? 2 : 1;
    return SUCCESS;
}
CUresult cuStreamEndCapture(CUhandle s, CUhandle* graph) {
    capture::State state;
    {
        std::lock_guard<std::mutex> hold(capture::lock);
        auto it = capture::active.find(stream_id(s));
        if (it == capture::active.end()) { return fail(ILLEGAL_STATE, "no capture to end"); }
        state = std::move(it->second);
        capture::active.erase(it);
    }
    *graph = nullptr;
    // TESSERA_EMU_CAPTURE_FAILS=1: every capture ends invalidated, as when a driver refused an
    // op inside it, so tests reach what follows a failed capture.
    static const bool fails = std::getenv("TESSERA_EMU_CAPTURE_FAILS") != nullptr;
    if (state.invalid || fails) { return CAPTURE_INVALIDATED; }
    *graph = new capture::Graph(*state.graph);
    return SUCCESS;
}
CUresult cuGraphInstantiateWithFlags(CUhandle* exec, CUhandle graph, unsigned long long) {
    *exec = new capture::Graph(*static_cast<capture::Graph*>(graph));
    return SUCCESS;
}
// The captured work queued again, in order, with the arguments it was captured with.
CUresult cuGraphLaunch(CUhandle exec, CUhandle s) {
    if (capture::refuse(stream_id(s))) { return fail(CAPTURE_UNSUPPORTED, "a graph launched into a capture"); }
    note_on(s, "graph launch", emu_signature(exec));
    for (const auto& op : static_cast<capture::Graph*>(exec)->ops) { defer::submit(stream_id(s), op); }
    return SUCCESS;
}
CUresult cuGraphUpload(CUhandle, CUhandle) { return SUCCESS; }
CUresult cuGraphExecDestroy(CUhandle exec) { delete static_cast<capture::Graph*>(exec); return SUCCESS; }
CUresult cuGraphDestroy(CUhandle graph) { delete static_cast<capture::Graph*>(graph); return SUCCESS; }

CUresult cuGetErrorString(CUresult r, const char** s) { *s = message(r); return SUCCESS; }
CUresult cuGetErrorName(CUresult r, const char** s) { *s = message(r); return SUCCESS; }
}
