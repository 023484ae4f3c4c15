// An emulated NCCL (libnccl.so) for the emulated driver: communicators between processes on one
// machine through a POSIX shared-memory segment named by the unique id. An all-reduce copies
// each rank's chunk into its slot, waits for every rank, and sums the slots in rank order, so
// every rank gets the same bits. Waits spin on counters in the segment (yielding the CPU); a
// rank that never arrives is reported after TESSERA_EMU_NCCL_TIMEOUT_S (default 120) seconds.
#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>

#include "stream.h"

typedef int Status;
enum : Status { OK = 0, SYSTEM_ERROR = 2, INVALID_ARGUMENT = 4, INVALID_USAGE = 5 };
enum { FLOAT32 = 7, FLOAT64 = 8 };
enum { SUM = 0 };

struct UniqueId { char internal[128]; };

namespace {
constexpr size_t CHUNK_BYTES = 4 << 20;

struct Header {
    std::atomic<unsigned int> arrived;
    std::atomic<unsigned int> generation;
};

struct Comm {
    int rank, ranks;
    size_t bytes;
    char* base;
    Header* header() { return reinterpret_cast<Header*>(base); }
    char* slot(int r) { return base + 64 + (size_t)r * CHUNK_BYTES; }
};

std::string segment_name(const UniqueId& id) {
    static const char hex[] = "0123456789abcdef";
    std::string name = "/tessera-emu-nccl-";
    for (int i = 0; i < 16; ++i) {
        unsigned char c = (unsigned char)id.internal[i];
        name += hex[c >> 4];
        name += hex[c & 15];
    }
    return name;
}

// Every rank arrives before any leaves; false if one never does.
bool barrier(Comm* c) {
    Header* h = c->header();
    unsigned int generation = h->generation.load();
    if (h->arrived.fetch_add(1) + 1 == (unsigned int)c->ranks) {
        h->arrived.store(0);
        h->generation.fetch_add(1);
        return true;
    }
    const char* limit = std::getenv("TESSERA_EMU_NCCL_TIMEOUT_S");
    auto until = std::chrono::steady_clock::now() + std::chrono::seconds(limit ? std::atoi(limit) : 120);
    while (h->generation.load() == generation) {
        if (std::chrono::steady_clock::now() > until) {
            std::fprintf(stderr, "tessera NCCL emulator: rank %d waited in vain for the others\n", c->rank);
            return false;
        }
        sched_yield();
    }
    return true;
}

template <typename T>
Status all_reduce(Comm* c, const T* send, T* recv, size_t count) {
    size_t per_chunk = CHUNK_BYTES / sizeof(T);
    for (size_t start = 0; start == 0 || start < count; start += per_chunk) {
        size_t n = count - start < per_chunk ? count - start : per_chunk;
        std::memcpy(c->slot(c->rank), send + start, n * sizeof(T));
        if (!barrier(c)) { return SYSTEM_ERROR; }
        for (size_t i = 0; i < n; ++i) {
            T s = 0;
            for (int r = 0; r < c->ranks; ++r) { s += reinterpret_cast<const T*>(c->slot(r))[i]; }
            recv[start + i] = s;
        }
        if (!barrier(c)) { return SYSTEM_ERROR; }
        if (count == 0) { break; }
    }
    return OK;
}
}  // namespace

extern "C" {
Status ncclGetVersion(int* v) { *v = 22800; return OK; }
Status ncclGetUniqueId(UniqueId* id) {
    std::random_device random;
    for (char& c : id->internal) { c = (char)random(); }
    return OK;
}
Status ncclCommInitRank(Comm** out, int ranks, UniqueId id, int rank) {
    if (ranks < 1 || rank < 0 || rank >= ranks) { return INVALID_ARGUMENT; }
    std::string name = segment_name(id);
    int fd = shm_open(name.c_str(), O_CREAT | O_RDWR, 0600);
    if (fd < 0) { return SYSTEM_ERROR; }
    size_t bytes = 64 + (size_t)ranks * CHUNK_BYTES;
    // Every rank sizes it alike; a new segment reads as zeros: the counters start at 0.
    if (ftruncate(fd, (off_t)bytes) != 0) { close(fd); return SYSTEM_ERROR; }
    void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED) { return SYSTEM_ERROR; }
    Comm* c = new Comm{rank, ranks, bytes, static_cast<char*>(base)};
    if (!barrier(c)) { munmap(base, bytes); delete c; return SYSTEM_ERROR; }
    // Every rank has it mapped: the name can go (nothing is left behind however ranks end).
    if (rank == 0) { shm_unlink(name.c_str()); }
    *out = c;
    return OK;
}
Status ncclCommDestroy(Comm* c) {
    if (c) { munmap(c->base, c->bytes); delete c; }
    return OK;
}
Status ncclCommAbort(Comm* c) { return ncclCommDestroy(c); }
Status ncclCommCount(const Comm* c, int* n) { *n = c->ranks; return OK; }
Status ncclCommUserRank(const Comm* c, int* r) { *r = c->rank; return OK; }
Status ncclCommGetAsyncError(Comm*, Status* s) { *s = OK; return OK; }
Status ncclGroupStart() { return OK; }
Status ncclGroupEnd() { return OK; }
Status ncclAllReduce(const void* send, void* recv, size_t count, int type, int op, Comm* c,
                     void* stream) {
    if (op != SUM) { return INVALID_USAGE; }
    emu_note(stream, "all-reduce", emu_signature(send, recv, count, type, c));
    // Between processes, so at once: after what the stream queued before it.
    emu_drain(stream);
    switch (type) {
        case FLOAT32: return all_reduce(c, (const float*)send, (float*)recv, count);
        case FLOAT64: return all_reduce(c, (const double*)send, (double*)recv, count);
        default: return INVALID_USAGE;
    }
}
const char* ncclGetErrorString(Status s) { return s == OK ? "no error" : "emulated NCCL error"; }
const char* ncclGetLastError(Comm*) { return ""; }
}
