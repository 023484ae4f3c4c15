// Reparameterisation and KL to N(0, I) (f32), mirroring ops/gaussian/mod.rs.

extern "C" __global__ void reparameterize_forward(const float* m, const float* lv, const float* eps, float* z, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        z[i] = m[i] + expf(0.5f * lv[i]) * eps[i];
    }
}

extern "C" __global__ void reparameterize_backward(const float* lv, const float* eps, const float* dz, float* dm, float* dlv, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        dm[i] = dz[i];
        dlv[i] = dz[i] * eps[i] * 0.5f * expf(0.5f * lv[i]);
    }
}

// One thread per row of `dim` latents: the row's KL summed in order, and its gradients.
extern "C" __global__ void kl_standard_normal(const float* m, const float* lv, unsigned long long rows, unsigned long long dim,
        const float* weights, float* kl, float* dm, float* dlv) {
    unsigned long long r = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (r >= rows) { return; }
    float w = weights ? weights[r] : 1.0f;
    float sum = 0.0f;
    for (unsigned long long k = 0; k < dim; ++k) {
        unsigned long long i = r * dim + k;
        float var = expf(lv[i]);
        sum += 0.5f * (var + m[i] * m[i] - 1.0f - lv[i]);
        dm[i] = w * m[i];
        dlv[i] = w * 0.5f * (var - 1.0f);
    }
    kl[r] = sum;
}
