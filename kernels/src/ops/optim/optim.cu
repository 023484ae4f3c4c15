// Fused Adam/AdamW step (l2 = 0 and decay < 1: AdamW; l2 = weight decay and decay = 1: Adam) and the sums of squares of the global gradient norm (f32), mirroring ops/optim/mod.rs.

// skip: null, or a one-value flag (flag_non_finite's) that makes the step change nothing unless 0.
extern "C" __global__ void adamw_step(float* p, const float* g, float* m, float* v, unsigned long long n,
        float beta1, float beta2, float step_size, float inv_correction2, float eps, float decay, float l2,
        const float* skip) {
    if (skip != nullptr && skip[0] != 0.0f) { return; }
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        float gi = g[i] + l2 * p[i];
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) * inv_correction2 + eps);
    }
}

// Sum of squares per fixed chunk of `chunk` elements, accumulated in double in element order:
// the same partition and order as the CPU reference, so the norms agree to rounding.
extern "C" __global__ void chunk_sum_squares(const float* g, unsigned long long n, unsigned long long chunk, double* partial) {
    unsigned long long c = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    unsigned long long start = c * chunk;
    if (start >= n) { return; }
    unsigned long long end = start + chunk < n ? start + chunk : n;
    double s = 0.0;
    for (unsigned long long i = start; i < end; ++i) { s += (double)g[i] * (double)g[i]; }
    partial[c] = s;
}

// flag[0] = 1 if some x[i] is NaN or infinite (flag zeroed by the launcher). Every thread that
// finds one writes the same value: no atomics, the order does not matter.
extern "C" __global__ void flag_non_finite(const float* x, unsigned long long n, float* flag) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        if (!isfinite(x[i])) { flag[0] = 1.0f; }
    }
}
