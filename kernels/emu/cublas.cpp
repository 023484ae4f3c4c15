// An emulated cuBLAS (libcublas.so) for the emulated driver: the GEMMs cudarc calls, column-major
// as cuBLAS defines them, on host memory, summed in double. The tensor-core compute types round
// each input to TF32 or bf16 first (to nearest, ties to even), as the hardware reads them.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "stream.h"

typedef int Status;
enum : Status { OK = 0, NOT_SUPPORTED = 15, INVALID_VALUE = 7 };
enum { OP_N = 0, OP_T = 1 };
enum { R_32F = 0, R_64F = 1 };
enum { COMPUTE_32F = 68, COMPUTE_32F_PEDANTIC = 69, FAST_16BF = 75, FAST_TF32 = 77 };

namespace {
// A handle: the stream its GEMMs are queued on (the driver's; null: the legacy stream).
struct Handle {
    void* stream = nullptr;
};

float rounded(float x, int kept_bits) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) { return x; }  // inf, NaN
    int dropped = 23 - kept_bits;
    uint32_t half = 1u << (dropped - 1);
    uint32_t odd = (u >> dropped) & 1u;
    u = (u + half - 1 + odd) & ~((1u << dropped) - 1);
    std::memcpy(&x, &u, 4);
    return x;
}

template <typename T>
void gemm(int ta, int tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb,
          T beta, T* c, int ldc, int kept_bits) {
    auto in = [&](T v) -> double {
        return kept_bits < 23 ? (double)rounded((float)v, kept_bits) : (double)v;
    };
    // op(A) by rows and op(B) by columns, each contiguous in p, so every entry of C is one
    // contiguous dot product (four partial sums: summed in double, the order does not matter).
    std::vector<double> rows((size_t)m * k), cols((size_t)n * k);
    for (int i = 0; i < m; ++i)
        for (int p = 0; p < k; ++p)
            rows[(size_t)i * k + p] = in(ta == OP_N ? a[i + (size_t)p * lda] : a[p + (size_t)i * lda]);
    for (int j = 0; j < n; ++j)
        for (int p = 0; p < k; ++p)
            cols[(size_t)j * k + p] = in(tb == OP_N ? b[p + (size_t)j * ldb] : b[j + (size_t)p * ldb]);
    for (int j = 0; j < n; ++j) {
        const double* y = &cols[(size_t)j * k];
        for (int i = 0; i < m; ++i) {
            const double* x = &rows[(size_t)i * k];
            double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            int p = 0;
            for (; p + 4 <= k; p += 4) {
                s0 += x[p] * y[p];
                s1 += x[p + 1] * y[p + 1];
                s2 += x[p + 2] * y[p + 2];
                s3 += x[p + 3] * y[p + 3];
            }
            for (; p < k; ++p) { s0 += x[p] * y[p]; }
            double acc = (s0 + s1) + (s2 + s3);
            T& out = c[i + (size_t)j * ldc];
            // beta = 0 overwrites, as cuBLAS does (C may hold NaN).
            out = (T)(alpha * acc + (beta == T(0) ? 0.0 : (double)beta * (double)out));
        }
    }
}
}  // namespace

extern "C" {
Status cublasCreate_v2(void** h) { *h = new Handle; return OK; }
Status cublasDestroy_v2(void* h) { delete static_cast<Handle*>(h); return OK; }
Status cublasSetStream_v2(void* h, void* s) { static_cast<Handle*>(h)->stream = s; return OK; }
Status cublasSetMathMode(void*, int) { return OK; }
Status cublasSetPointerMode_v2(void*, int mode) { return mode == 0 ? OK : NOT_SUPPORTED; }
Status cublasGetPointerMode_v2(void*, int* mode) { *mode = 0; return OK; }
Status cublasSetWorkspace_v2(void*, void*, size_t) { return OK; }

Status cublasSgemm_v2(void* h, int ta, int tb, int m, int n, int k, const float* alpha, const float* a,
                      int lda, const float* b, int ldb, const float* beta, float* c, int ldc) {
    // Scalars read now (host pointer mode), the matrices when the stream runs it.
    float al = *alpha, be = *beta;
    void* stream = static_cast<Handle*>(h)->stream;
    emu_note(stream, "gemm", emu_signature(ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc));
    emu_submit(stream, [=] { gemm(ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc, 23); });
    return OK;
}
Status cublasDgemm_v2(void* h, int ta, int tb, int m, int n, int k, const double* alpha, const double* a,
                      int lda, const double* b, int ldb, const double* beta, double* c, int ldc) {
    double al = *alpha, be = *beta;
    void* stream = static_cast<Handle*>(h)->stream;
    emu_note(stream, "gemm", emu_signature(ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc));
    emu_submit(stream, [=] { gemm(ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc, 52); });
    return OK;
}
Status cublasGemmEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* a, int at,
                    int lda, const void* b, int bt, int ldb, const void* beta, void* c, int ct, int ldc,
                    int compute, int) {
    if (at != R_32F || bt != R_32F || ct != R_32F) { return NOT_SUPPORTED; }
    int kept;
    switch (compute) {
        case COMPUTE_32F: case COMPUTE_32F_PEDANTIC: kept = 23; break;
        case FAST_TF32: kept = 10; break;
        case FAST_16BF: kept = 7; break;
        default: return NOT_SUPPORTED;
    }
    float al = *(const float*)alpha, be = *(const float*)beta;
    void* stream = static_cast<Handle*>(h)->stream;
    emu_note(stream, "gemm", emu_signature(ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc, compute));
    emu_submit(stream, [=] {
        gemm(ta, tb, m, n, k, al, (const float*)a, lda, (const float*)b, ldb, be, (float*)c, ldc, kept);
    });
    return OK;
}
const char* cublasGetStatusString(Status) { return "emulated cuBLAS status"; }
const char* cublasGetStatusName(Status) { return "CUBLAS_STATUS_EMULATED"; }
}
