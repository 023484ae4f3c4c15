// The CUDA side of ops/affinity/mod.rs, in f64 (SNF is compared with snfpy to 1e-6): the
// distance epilogue after the GEMM, the scaled exponential affinity of a row block, and the
// fusion's sparse product (S X)^T.

extern "C" __global__ void sq_distance_finish(double* d, const double* norms, unsigned long long row0, unsigned long long rows, unsigned long long n) {
    unsigned long long total = rows * n;
    for (unsigned long long e = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; e < total; e += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long i = row0 + e / n, j = e % n;
        double v = d[e] + norms[i] + norms[j];
        d[e] = i == j ? 0.0 : fmax(v, 0.0);
    }
}

extern "C" __global__ void exponential_rows(double* d, const double* near_rows, const double* near_all, unsigned long long rows, unsigned long long n, double mu) {
    const double eps = 2.220446049250313e-16;
    const double inv_sqrt_2pi = 0.3989422804014327;
    unsigned long long total = rows * n;
    for (unsigned long long e = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; e < total; e += (unsigned long long)gridDim.x * blockDim.x) {
        double rho = d[e];
        double sigma = (near_rows[e / n] + near_all[e % n] + rho) / 3.0;
        sigma = (sigma > eps ? sigma : 0.0) + eps;
        double scale = mu * sigma;
        double z = rho / scale;
        d[e] = exp(-0.5 * z * z) * inv_sqrt_2pi / scale;
    }
}

// out[c * n + j] = scale * sum over p in indptr[j]..indptr[j+1] of vals[p] * x[cols[p] * n + c]
// for CSR S (n rows) and dense row-major X (n x n). One 32 x 32 tile of (c, j) per block of
// 32 x 8 threads: X is read along c (coalesced) and out written along j through shared memory.
extern "C" __global__ void sparse_times_dense_transposed(const unsigned long long* indptr, const unsigned int* cols, const double* vals, const double* x, double* out, unsigned long long n, double scale) {
    __shared__ double tile[32][33];
    unsigned long long c0 = (unsigned long long)blockIdx.x * 32ull, j0 = (unsigned long long)blockIdx.y * 32ull;
    unsigned int tx = threadIdx.x, ty = threadIdx.y;
    for (unsigned int r = ty; r < 32; r += 8) {
        unsigned long long j = j0 + r, c = c0 + tx;
        double acc = 0.0;
        if (j < n && c < n) {
            for (unsigned long long p = indptr[j]; p < indptr[j + 1]; ++p) {
                acc += vals[p] * x[(unsigned long long)cols[p] * n + c];
            }
        }
        tile[r][tx] = acc;
    }
    __syncthreads();
    for (unsigned int r = ty; r < 32; r += 8) {
        unsigned long long c = c0 + r, j = j0 + tx;
        if (c < n && j < n) {
            out[c * n + j] = scale * tile[tx][r];
        }
    }
}
