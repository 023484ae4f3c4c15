// CUDA's device-side vocabulary for g++, so that our .cu sources compile as C++ and run on the
// CPU under the emulated driver (driver.cpp). A block's threads are fibers switched only at
// barriers (__syncthreads, warp shuffles); blocks run one after another. This runs the kernels'
// logic, indexing and launch geometry; it says nothing of speed, races or the hardware.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };

namespace emu {
extern uint3 thread_idx, block_idx;
extern dim3 block_dim, grid_dim;
// The calling fiber waits for every live thread of its block (or warp).
void block_barrier();
void warp_barrier();
// Per-warp exchange slots for shuffles, 8 bytes per lane.
unsigned long long* warp_slots();
unsigned int lane_count();
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

#define __global__
#define __device__ static inline
#define __forceinline__
#define __restrict__ __restrict
// One block runs at a time, so a function-local static is the block's shared memory.
#define __shared__ static

inline void __syncthreads() { emu::block_barrier(); }

template <typename T>
inline T emu_shuffle(T v, unsigned int from_lane_of(unsigned int, int), int arg) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    unsigned int lane = threadIdx.x % 32;
    unsigned long long* slots = emu::warp_slots();
    std::memcpy(&slots[lane], &v, sizeof(T));
    emu::warp_barrier();
    unsigned int from = from_lane_of(lane, arg);
    T out = v;
    if (from < emu::lane_count()) { std::memcpy(&out, &slots[from], sizeof(T)); }
    emu::warp_barrier();
    return out;
}
inline unsigned int emu_lane_down(unsigned int lane, int d) { return lane + (unsigned int)d; }
inline unsigned int emu_lane_xor(unsigned int lane, int m) { return lane ^ (unsigned int)m; }
template <typename T>
inline T __shfl_down_sync(unsigned int, T v, int delta) { return emu_shuffle(v, emu_lane_down, delta); }
template <typename T>
inline T __shfl_xor_sync(unsigned int, T v, int mask) { return emu_shuffle(v, emu_lane_xor, mask); }

// Fibers switch only at barriers, so a read-modify-write is atomic here.
template <typename T>
inline T atomicAdd(T* address, T v) {
    T old = *address;
    *address = old + v;
    return old;
}

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
using std::isfinite;
using std::isnan;
