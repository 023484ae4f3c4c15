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

// Jeffreys divergence between two diagonal Gaussians, one thread per row: the row's value
// summed in order, and the weighted gradients (mirrors ops/gaussian/mod.rs::jeffreys).
extern "C" __global__ void jeffreys(const float* m1, const float* lv1, const float* m2, const float* lv2, unsigned long long rows,
        unsigned long long dim, const float* weights, float* value, float* dm1, float* dlv1, float* dm2, float* dlv2) {
    unsigned long long r = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (r >= rows) { return; }
    float w = weights[r];
    float sum = 0.0f;
    for (unsigned long long k = 0; k < dim; ++k) {
        unsigned long long i = r * dim + k;
        float ratio = expf(lv1[i] - lv2[i]);
        float delta = m1[i] - m2[i];
        float p1 = expf(-lv1[i]);
        float p2 = expf(-lv2[i]);
        sum += 0.5f * (ratio + 1.0f / ratio + delta * delta * (p1 + p2) - 2.0f);
        dm1[i] = w * delta * (p1 + p2);
        dm2[i] = -dm1[i];
        dlv1[i] = w * 0.5f * (ratio - 1.0f / ratio - delta * delta * p1);
        dlv2[i] = w * 0.5f * (1.0f / ratio - ratio - delta * delta * p2);
    }
    value[r] = sum;
}

// Product of experts with the N(0, I) prior expert, one thread per latent entry. Experts are
// stacked: means/logvars are (experts x n), present is (experts x rows), non-zero = present.
extern "C" __global__ void poe_forward(const float* means, const float* logvars, const float* present, unsigned long long experts,
        unsigned long long n, unsigned long long dim, float* m, float* lv) {
    unsigned long long rows = n / dim;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long r = i / dim;
        float precision = 1.0f, weighted = 0.0f;
        for (unsigned long long e = 0; e < experts; ++e) {
            if (present[e * rows + r] != 0.0f) {
                float p = expf(-logvars[e * n + i]);
                precision += p;
                weighted += means[e * n + i] * p;
            }
        }
        m[i] = weighted / precision;
        lv[i] = -logf(precision);
    }
}

extern "C" __global__ void poe_backward(const float* means, const float* logvars, const float* present, unsigned long long experts,
        unsigned long long n, unsigned long long dim, const float* m, const float* lv, const float* dm, const float* dlv, float* dmeans, float* dlogvars) {
    unsigned long long rows = n / dim;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long r = i / dim;
        float precision = expf(-lv[i]);
        for (unsigned long long e = 0; e < experts; ++e) {
            unsigned long long k = e * n + i;
            if (present[e * rows + r] == 0.0f) { dmeans[k] = 0.0f; dlogvars[k] = 0.0f; continue; }
            float p = expf(-logvars[k]);
            dmeans[k] = dm[i] * p / precision;
            float dp = dm[i] * (means[k] - m[i]) / precision - dlv[i] / precision;
            dlogvars[k] = -dp * p;
        }
    }
}
