// Activations, bias add, axpy/scale, row scaling and row gather/scatter (f32). Formulas mirror
// ops/elementwise/mod.rs; kinds match Activation::code(): 0 identity, 1 relu, 2 leaky relu(a),
// 3 elu(a), 4 softplus, 5 exp, 6 sigmoid, 7 log1p, 8 log-add-exp(a) = ln(e^x + e^a).

__device__ __forceinline__ float tsr_softplus(float x) {
    return x > 0.0f ? x + log1pf(expf(-x)) : log1pf(expf(x));
}

__device__ __forceinline__ float tsr_sigmoid(float x) {
    if (x >= 0.0f) { return 1.0f / (1.0f + expf(-x)); }
    float e = expf(x);
    return e / (1.0f + e);
}

__device__ __forceinline__ float tsr_act(int kind, float a, float x) {
    switch (kind) {
        case 1: return fmaxf(x, 0.0f);
        case 2: return x > 0.0f ? x : a * x;
        case 3: return x > 0.0f ? x : a * expm1f(x);
        case 4: return tsr_softplus(x);
        case 5: return expf(x);
        case 6: return tsr_sigmoid(x);
        case 7: return log1pf(x);
        case 8: return a + tsr_softplus(x - a);
        default: return x;
    }
}

__device__ __forceinline__ float tsr_act_grad(int kind, float a, float x, float y) {
    switch (kind) {
        case 1: return x > 0.0f ? 1.0f : 0.0f;
        case 2: return x > 0.0f ? 1.0f : a;
        case 3: return x > 0.0f ? 1.0f : y + a;
        case 4: return tsr_sigmoid(x);
        case 5: return y;
        case 6: return y * (1.0f - y);
        case 7: return 1.0f / (1.0f + x);
        case 8: return tsr_sigmoid(x - a);
        default: return 1.0f;
    }
}

extern "C" __global__ void activation_forward(int kind, float a, const float* x, float* y, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        y[i] = tsr_act(kind, a, x[i]);
    }
}

extern "C" __global__ void activation_backward(int kind, float a, const float* x, const float* y, const float* dy, float* dx, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        dx[i] = dy[i] * tsr_act_grad(kind, a, x[i], y[i]);
    }
}

extern "C" __global__ void bias_add_forward(float* y, const float* bias, unsigned long long rows, unsigned long long cols) {
    unsigned long long n = rows * cols;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        y[i] += bias[i % cols];
    }
}

// One thread per column, rows summed in order: the same order as the CPU reference.
extern "C" __global__ void bias_add_backward(const float* dy, float* dbias, unsigned long long rows, unsigned long long cols) {
    unsigned long long c = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (c >= cols) { return; }
    float s = 0.0f;
    for (unsigned long long r = 0; r < rows; ++r) { s += dy[r * cols + c]; }
    dbias[c] = s;
}

// y = cell[0] * share (f64 product, rounded once), mirroring fill_scaled: the factor read when
// the kernel runs, so a captured step takes the KL weight its cell holds at each replay.
extern "C" __global__ void fill_scaled(float* y, const double* cell, double share, unsigned long long n) {
    float v = (float)(cell[0] * share);
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        y[i] = v;
    }
}

// y += alpha x.
extern "C" __global__ void axpy(float alpha, const float* x, float* y, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        y[i] += alpha * x[i];
    }
}

// y *= alpha.
extern "C" __global__ void scale(float* y, float alpha, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        y[i] *= alpha;
    }
}

// y[r, c] = x[r, c] s[r].
extern "C" __global__ void scale_rows(const float* x, const float* s, float* y, unsigned long long rows, unsigned long long cols) {
    unsigned long long n = rows * cols;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        y[i] = x[i] * s[i / cols];
    }
}

// out[r, c] = m[r, c] for c < k of m's `cols` columns, mirroring leading_columns.
extern "C" __global__ void leading_columns(const float* m, float* out, unsigned long long rows, unsigned long long cols, unsigned long long k) {
    unsigned long long n = rows * k;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        out[i] = m[(i / k) * cols + i % k];
    }
}

// out[r] = the first c < k with m[r, c] > 0, as a float, or -1: mirroring first_positive.
extern "C" __global__ void first_positive(const float* m, float* out, unsigned long long rows, unsigned long long cols, unsigned long long k) {
    for (unsigned long long r = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; r < rows; r += (unsigned long long)gridDim.x * blockDim.x) {
        float code = -1.0f;
        for (unsigned long long c = 0; c < k; ++c) {
            if (m[r * cols + c] > 0.0f) { code = (float)c; break; }
        }
        out[r] = code;
    }
}

// out[r, c] = table[codes[r], c].
extern "C" __global__ void gather_rows(const float* table, const unsigned long long* codes, float* out, unsigned long long rows, unsigned long long cols) {
    unsigned long long n = rows * cols;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        out[i] = table[codes[i / cols] * cols + i % cols];
    }
}

// table[g, c] = sum of x[r, c] over the rows r coded g, in ascending r (one thread per table
// entry): the CPU reference's order, and no atomics, so a seed gives the same bits. `by_group`
// holds groups + 1 offsets, then the rows sorted by code (stable): group g's rows are
// by_group[groups + 1 + k] for k in by_group[g]..by_group[g + 1], so a thread reads its own rows
// only (was: every row's code, per table entry).
extern "C" __global__ void scatter_add_rows(const float* x, const unsigned long long* by_group, float* table, unsigned long long groups, unsigned long long cols) {
    unsigned long long n = groups * cols;
    const unsigned long long* rows = by_group + groups + 1;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long g = i / cols, c = i % cols;
        float s = 0.0f;
        for (unsigned long long k = by_group[g]; k < by_group[g + 1]; ++k) {
            s += x[rows[k] * cols + c];
        }
        table[i] = s;
    }
}
