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

// ---- Batches gathered from a count matrix kept on the device (`resident_gpu.rs`) ----

// In-place inclusive prefix sum of x[0..n] by one block: each thread sums a contiguous chunk, the
// chunk totals are scanned in order by thread 0, then each chunk is rewritten from its offset.
// Integers, so the result is exact whatever the order. One block (1024 threads at most).
extern "C" __global__ void scan_inclusive_u64(unsigned long long* x, unsigned long long n) {
    __shared__ unsigned long long before[1024];
    unsigned long long chunk = (n + blockDim.x - 1) / blockDim.x;
    unsigned long long start = threadIdx.x * chunk;
    unsigned long long end = start + chunk < n ? start + chunk : n;
    unsigned long long sum = 0;
    for (unsigned long long i = start; i < end; ++i) { sum += x[i]; }
    before[threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned long long run = 0;
        for (unsigned int t = 0; t < blockDim.x; ++t) {
            unsigned long long s = before[t];
            before[t] = run;
            run += s;
        }
    }
    __syncthreads();
    unsigned long long run = before[threadIdx.x];
    for (unsigned long long i = start; i < end; ++i) {
        run += x[i];
        x[i] = run;
    }
}

// The batch's entries: row i of the batch is source row rows[i], copied in order. grid-stride
// over rows by block, a row's entries over the block's threads.
extern "C" __global__ void csr_gather_entries(const unsigned long long* src_indptr, const unsigned int* src_indices,
        const float* src_data, const unsigned int* rows, unsigned long long n, const unsigned long long* indptr,
        unsigned int* indices, float* data) {
    for (unsigned long long i = blockIdx.x; i < n; i += gridDim.x) {
        unsigned long long from = src_indptr[rows[i]];
        unsigned long long to = indptr[i];
        unsigned long long len = indptr[i + 1] - to;
        for (unsigned long long k = threadIdx.x; k < len; k += blockDim.x) {
            indices[to + k] = src_indices[from + k];
            data[to + k] = src_data[from + k];
        }
    }
}

// The transposed index on the device, in the CPU's order (ops/linear/mod.rs `transposed`:
// genes ascending, rows ascending within a gene), for matrices whose rows name a gene at most
// once. Block b owns rows [b * span, (b + 1) * span). First each block counts its entries per
// gene (counts: blocks x genes, zeroed by the caller; integer atomics, so exact).
extern "C" __global__ void transpose_count(const unsigned long long* indptr, const unsigned int* indices,
        unsigned long long rows, unsigned long long span, unsigned long long genes, unsigned int* counts) {
    unsigned long long r0 = blockIdx.x * span;
    if (r0 >= rows) { return; }
    unsigned long long r1 = r0 + span < rows ? r0 + span : rows;
    unsigned int* mine = counts + blockIdx.x * genes;
    for (unsigned long long k = indptr[r0] + threadIdx.x; k < indptr[r1]; k += blockDim.x) {
        atomicAdd(&mine[indices[k]], 1u);
    }
}

// One thread per gene: each block's count becomes where its run starts within the gene (blocks
// in order), and the gene's total goes to col_ptr[j + 1] (col_ptr[0] zeroed by the caller; an
// inclusive scan then makes the column pointers).
extern "C" __global__ void transpose_runs(unsigned int* counts, unsigned long long blocks, unsigned long long genes,
        unsigned long long* col_ptr) {
    for (unsigned long long j = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; j < genes;
         j += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned int run = 0;
        for (unsigned long long b = 0; b < blocks; ++b) {
            unsigned int c = counts[b * genes + j];
            counts[b * genes + j] = run;
            run += c;
        }
        col_ptr[j + 1] = run;
    }
}

// Block b places its rows' entries, row after row: within a row every entry goes to a different
// gene, so the threads of the block never share a cursor, and the barrier between rows keeps
// rows ascending within each gene. Values are transformed as the forward reads them.
extern "C" __global__ void transpose_fill(const unsigned long long* indptr, const unsigned int* indices, const float* data,
        unsigned long long rows, unsigned long long span, unsigned long long genes, int kind, float scale,
        const unsigned long long* col_ptr, unsigned int* cursor, unsigned int* rows_of, float* values) {
    __shared__ float library;
    unsigned long long r0 = blockIdx.x * span;
    if (r0 >= rows) { return; }
    unsigned long long r1 = r0 + span < rows ? r0 + span : rows;
    unsigned int* mine = cursor + blockIdx.x * genes;
    for (unsigned long long r = r0; r < r1; ++r) {
        if (threadIdx.x == 0) { library = kind == 0 ? 0.0f : row_library(indptr, data, r); }
        __syncthreads();
        for (unsigned long long k = indptr[r] + threadIdx.x; k < indptr[r + 1]; k += blockDim.x) {
            unsigned int j = indices[k];
            unsigned long long at = col_ptr[j] + mine[j];
            mine[j] += 1;
            rows_of[at] = (unsigned int)r;
            values[at] = count_transform(kind, scale, data[k], library);
        }
        __syncthreads();
    }
}

// Row sums of a CSR (library sizes): one warp per row, lane-strided partial sums, then a fixed
// shuffle tree (the same bits every run; the CPU folds each row in order: equal to rounding).
// The rows of a CSR `times` over, in order (mirrors gather_rows of its rows repeated): its
// entries, the first indptr[rows] of arrays that may hold more (a fixed batch's), read on the
// device, so a captured step tiles whatever batch its buffers hold at each replay.
extern "C" __global__ void csr_tile(const unsigned long long* indptr, const unsigned int* indices, const float* data,
        unsigned long long rows, unsigned long long room, unsigned long long times,
        unsigned long long* out_indptr, unsigned int* out_indices, float* out_data) {
    unsigned long long nnz = indptr[rows];
    unsigned long long start = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = start; i < times * rows + 1; i += step) {
        out_indptr[i] = i == times * rows ? times * nnz : (i / rows) * nnz + indptr[i % rows];
    }
    for (unsigned long long i = start; i < times * room; i += step) {
        unsigned long long t = i / room, k = i % room;
        if (k < nnz) {
            out_indices[t * nnz + k] = indices[k];
            out_data[t * nnz + k] = data[k];
        }
    }
}

// One thread per row of a zeroed dense matrix: the row's entries added in entry order (as
// CsrRef::summed_dense), then, when binary, each positive sum set to 1 (mirrors csr_dense).
extern "C" __global__ void csr_dense(const unsigned long long* indptr, const unsigned int* indices, const float* data,
        unsigned long long rows, unsigned long long cols, int binary, float* out) {
    unsigned long long r = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (r >= rows) { return; }
    float* row = out + r * cols;
    for (unsigned long long k = indptr[r]; k < indptr[r + 1]; ++k) { row[indices[k]] += data[k]; }
    if (binary) {
        for (unsigned long long k = indptr[r]; k < indptr[r + 1]; ++k) {
            if (row[indices[k]] > 0.0f) { row[indices[k]] = 1.0f; }
        }
    }
}

extern "C" __global__ void csr_row_sums(const unsigned long long* indptr, const float* data, unsigned long long rows,
        float* out) {
    unsigned long long warp = (blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x) / 32;
    unsigned long long warps = ((unsigned long long)gridDim.x * blockDim.x) / 32;
    unsigned int lane = threadIdx.x % 32;
    for (unsigned long long r = warp; r < rows; r += warps) {
        float s = 0.0f;
        for (unsigned long long k = indptr[r] + lane; k < indptr[r + 1]; k += 32) { s += data[k]; }
        for (int offset = 16; offset > 0; offset >>= 1) { s += __shfl_xor_sync(0xffffffffu, s, offset); }
        if (lane == 0) { out[r] = s; }
    }
}
