// Dropout with Philox4x32-10, the same stream of numbers as ops/dropout/mod.rs.

__device__ __forceinline__ void philox_round(unsigned int c[4], unsigned int k0, unsigned int k1) {
    unsigned long long p0 = (unsigned long long)0xD2511F53u * c[0];
    unsigned long long p1 = (unsigned long long)0xCD9E8D57u * c[2];
    unsigned int hi0 = (unsigned int)(p0 >> 32), lo0 = (unsigned int)p0;
    unsigned int hi1 = (unsigned int)(p1 >> 32), lo1 = (unsigned int)p1;
    unsigned int n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
}

__device__ float philox_uniform(unsigned long long seed, unsigned long long stream, unsigned long long i) {
    unsigned long long block = i / 4;
    unsigned int c[4] = {(unsigned int)block, (unsigned int)(block >> 32), (unsigned int)stream, (unsigned int)(stream >> 32)};
    unsigned int k0 = (unsigned int)seed, k1 = (unsigned int)(seed >> 32);
    for (int round = 0; round < 10; ++round) {
        if (round > 0) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
        philox_round(c, k0, k1);
    }
    return (float)(c[i % 4] >> 8) * (1.0f / 16777216.0f);
}

// A draw's Philox stream: its bits above the low 20 (a training step, as models number the
// streams) read from device memory, so that a captured step draws at each replay what the
// step set before its launch asks for; its low bits (the draw's site) an argument.
__device__ __forceinline__ unsigned long long draw_stream(const unsigned long long* high, unsigned long long low) {
    return (*high << 20) | low;
}

extern "C" __global__ void dropout_forward(const float* x, float p, unsigned long long seed, unsigned long long low, const unsigned long long* high, float* y, unsigned long long n) {
    unsigned long long stream = draw_stream(high, low);
    float scale = 1.0f / (1.0f - p);
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        y[i] = philox_uniform(seed, stream, i) >= p ? x[i] * scale : 0.0f;
    }
}

// out[i] = the standard normal of element i (Box-Muller on uniforms 2i and 2i + 1), as
// ops::dropout::normal.
extern "C" __global__ void normal_fill(unsigned long long seed, unsigned long long low, const unsigned long long* high, float* out, unsigned long long n) {
    unsigned long long stream = draw_stream(high, low);
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        float u1 = 1.0f - philox_uniform(seed, stream, 2 * i);
        float u2 = philox_uniform(seed, stream, 2 * i + 1);
        out[i] = sqrtf(-2.0f * logf(u1)) * cosf(6.28318530717958647692f * u2);
    }
}
