// The sparse first layer (f32): y = t(X) W with X in CSR and t = log1p (kind 0) or
// log1p(x / library * scale) (kind 1), mirroring ops/linear/mod.rs. Accumulation orders match
// the CPU: over a row's non-zeros in order (forward), over a gene's cells in row order (backward).

__device__ __forceinline__ float count_transform(int kind, float scale, float x, float library) {
    if (kind == 0) { return log1pf(x); }
    return library > 0.0f ? log1pf(x / library * scale) : 0.0f;
}

__device__ float row_library(const unsigned long long* indptr, const float* data, unsigned long long r) {
    float s = 0.0f;
    for (unsigned long long k = indptr[r]; k < indptr[r + 1]; ++k) { s += data[k]; }
    return s;
}

// grid: (rows, ceil(d_out / blockDim.x)); one thread per output element.
extern "C" __global__ void sparse_input_forward(const unsigned long long* indptr, const unsigned int* indices, const float* data,
        unsigned long long rows, int kind, float scale, const float* w, unsigned long long d_out, float* y) {
    unsigned long long r = blockIdx.x;
    unsigned long long o = blockIdx.y * (unsigned long long)blockDim.x + threadIdx.x;
    if (r >= rows || o >= d_out) { return; }
    float library = kind == 0 ? 0.0f : row_library(indptr, data, r);
    float acc = 0.0f;
    for (unsigned long long k = indptr[r]; k < indptr[r + 1]; ++k) {
        acc += count_transform(kind, scale, data[k], library) * w[(unsigned long long)indices[k] * d_out + o];
    }
    y[r * d_out + o] = acc;
}

// Transposed (column-major) index of the transformed non-zeros: col_ptr over genes, and for each
// entry its row and value, rows ascending within a gene. grid: (genes, ceil(d_out / blockDim.x)).
extern "C" __global__ void sparse_input_backward(const unsigned long long* col_ptr, const unsigned int* rows_of, const float* values,
        unsigned long long genes, const float* dy, unsigned long long d_out, float* dw) {
    unsigned long long j = blockIdx.x;
    unsigned long long o = blockIdx.y * (unsigned long long)blockDim.x + threadIdx.x;
    if (j >= genes || o >= d_out) { return; }
    float acc = 0.0f;
    for (unsigned long long k = col_ptr[j]; k < col_ptr[j + 1]; ++k) {
        acc += values[k] * dy[(unsigned long long)rows_of[k] * d_out + o];
    }
    dw[j * d_out + o] = acc;
}
