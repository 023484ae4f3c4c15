// Fused log-likelihood value + gradients (f32), one thread per entry; the per-row sums are
// reduced by a second kernel in entry order, matching ops/likelihood/mod.rs. Family codes match
// Likelihood::code(): 0 NB, 1 ZINB, 2 Poisson, 3 Gaussian, 4 Bernoulli. Special functions use
// the same algorithms as src/real.rs (in double, like the CPU reference).

#define TSR_EPS 1e-8

__device__ double tsr_lgamma(double x) {
    double product = 1.0;
    while (x < 10.0) { product *= x; x += 1.0; }
    double shift = -log(product);
    double inv = 1.0 / x, inv2 = inv * inv;
    double series = inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 * (1.0 / 1260.0 - inv2 * (1.0 / 1680.0 - inv2 * (1.0 / 1188.0)))));
    return shift + (x - 0.5) * log(x) - x + 0.5 * log(2.0 * 3.14159265358979323846) + series;
}

__device__ double tsr_digamma(double x) {
    double shift = 0.0;
    while (x < 10.0) { shift -= 1.0 / x; x += 1.0; }
    double inv2 = 1.0 / (x * x);
    double series = inv2 * (1.0 / 12.0 - inv2 * (1.0 / 120.0 - inv2 * (1.0 / 252.0 - inv2 * (1.0 / 240.0 - inv2 * (1.0 / 132.0)))));
    return shift + log(x) - 0.5 / x - series;
}

__device__ __forceinline__ float lk_softplus(float x) { return x > 0.0f ? x + log1pf(expf(-x)) : log1pf(expf(x)); }
__device__ __forceinline__ float lk_sigmoid(float x) {
    if (x >= 0.0f) { return 1.0f / (1.0f + expf(-x)); }
    float e = expf(x);
    return e / (1.0f + e);
}

// params/grads: up to 3 arrays; a parameter with `features` entries (shared) has shared[k] = 1.
extern "C" __global__ void likelihood_entries(int family, const float* x, unsigned long long rows, unsigned long long features,
        const float* p0, const float* p1, const float* p2, int s0, int s1, int s2,
        const float* weights, float* values, float* g0, float* g1, float* g2) {
    unsigned long long n = rows * features;
    const float eps = (float)TSR_EPS;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long f = i % features, r = i / features;
        float a = p0 ? p0[s0 ? f : i] : 0.0f;
        float b = p1 ? p1[s1 ? f : i] : 0.0f;
        float c = p2 ? p2[s2 ? f : i] : 0.0f;
        float xi = x[i];
        float ll = 0.0f, d0 = 0.0f, d1 = 0.0f, d2 = 0.0f;
        if (family == 0 || family == 1) {
            float mu = a, theta = b;
            float lt = logf(theta + eps), ltm = logf(theta + mu + eps);
            // At x = 0 the Gamma terms cancel exactly: skip them (most counts are zero).
            float lg = xi == 0.0f ? 0.0f : (float)(tsr_lgamma((double)xi + theta) - tsr_lgamma((double)theta) - tsr_lgamma((double)xi + 1.0));
            float dg = xi == 0.0f ? 0.0f : (float)(tsr_digamma((double)xi + theta) - tsr_digamma((double)theta));
            if (family == 0) {
                ll = theta * (lt - ltm) + xi * (logf(mu + eps) - ltm) + lg;
                d0 = xi / (mu + eps) - (theta + xi) / (theta + mu + eps);
                d1 = lt - ltm + theta / (theta + eps) - (theta + xi) / (theta + mu + eps) + dg;
            } else {
                float pi = c;
                float sp = lk_softplus(-pi);
                float pt = -pi + theta * (lt - ltm);
                float dpt_theta = lt - ltm + theta / (theta + eps) - theta / (theta + mu + eps);
                float dpt_mu = -theta / (theta + mu + eps);
                if (xi < eps) {
                    float s = lk_sigmoid(pt);
                    ll = lk_softplus(pt) - sp;
                    d0 = s * dpt_mu; d1 = s * dpt_theta; d2 = lk_sigmoid(-pi) - s;
                } else {
                    ll = -sp + pt + xi * (logf(mu + eps) - ltm) + lg;
                    d0 = dpt_mu + xi / (mu + eps) - xi / (theta + mu + eps);
                    d1 = dpt_theta - xi / (theta + mu + eps) + dg;
                    d2 = lk_sigmoid(-pi) - 1.0f;
                }
            }
        } else if (family == 2) {
            ll = xi * logf(a + eps) - a - (float)tsr_lgamma((double)xi + 1.0);
            d0 = xi / (a + eps) - 1.0f;
        } else if (family == 3) {
            float inv = expf(-b), d = xi - a;
            ll = -0.5f * (logf(2.0f * 3.14159265358979f) + b + d * d * inv);
            d0 = d * inv; d1 = -0.5f + 0.5f * d * d * inv;
        } else {
            ll = xi * a - lk_softplus(a);
            d0 = xi - lk_sigmoid(a);
        }
        float w = weights ? weights[r] : 1.0f;
        values[i] = ll;
        if (g0) { g0[i] = w * d0; }
        if (g1) { g1[i] = w * d1; }
        if (g2) { g2[i] = w * d2; }
    }
}

// One thread per row: sums the row's entry values in order.
extern "C" __global__ void likelihood_row_sums(const float* values, float* ll, unsigned long long rows, unsigned long long features) {
    unsigned long long r = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (r >= rows) { return; }
    float s = 0.0f;
    for (unsigned long long f = 0; f < features; ++f) { s += values[r * features + f]; }
    ll[r] = s;
}
