// Fused log-likelihood value + gradients (f32), one thread per entry; the per-row sums are
// reduced by a second kernel in entry order, matching ops/likelihood/mod.rs. Family codes match
// Likelihood::code(): 0 NB, 1 ZINB, 2 Poisson, 3 Gaussian, 4 Bernoulli. Special functions use
// the same algorithms as src/real.rs (in double, like the CPU reference).

#define TSR_EPS 1e-8
#define TSR_NEG_INF __int_as_float(0xff800000)

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

// lnΓ(x+θ) - lnΓ(θ) - lnΓ(x+1) and ψ(x+θ) - ψ(θ); exactly 0 at x = 0, where they are skipped.
// Integer counts up to 32 take ln(Π (θ+k) / n!) and Σ 1/(θ+k) (real.rs, count_gamma_terms:
// one logarithm instead of eight).
__device__ void gamma_terms(float x, float theta, float* lg, float* dg) {
    if (x == 0.0f) { *lg = 0.0f; *dg = 0.0f; return; }
    if (x <= 32.0f && floorf(x) == x && theta < 1e8f) {
        // P = Π (θ+k) and its derivative P': ψ(x+θ) - ψ(θ) = P'/P.
        double p = 1.0, dp = 0.0, factorial = 1.0;
        int n = (int)x;
        for (int k = 0; k < n; ++k) {
            double tk = (double)theta + (double)k;
            dp = dp * tk + p;
            p *= tk;
            factorial *= (double)k + 1.0;
        }
        *lg = (float)log(p / factorial);
        *dg = (float)(dp / p);
        return;
    }
    *lg = (float)(tsr_lgamma((double)x + theta) - tsr_lgamma((double)theta) - tsr_lgamma((double)x + 1.0));
    *dg = (float)(tsr_digamma((double)x + theta) - tsr_digamma((double)theta));
}

// One NB entry: log-likelihood and its gradients w.r.t. μ and θ (shared by the mixture below).
__device__ void nb_entry(float x, float mu, float theta, float* ll, float* dmu, float* dtheta) {
    const float eps = (float)TSR_EPS;
    float lt = logf(theta + eps), ltm = logf(theta + mu + eps);
    float lg, dg;
    gamma_terms(x, theta, &lg, &dg);
    *ll = theta * (lt - ltm) + x * (logf(mu + eps) - ltm) + lg;
    *dmu = x / (mu + eps) - (theta + x) / (theta + mu + eps);
    *dtheta = lt - ltm + theta / (theta + eps) - (theta + x) / (theta + mu + eps) + dg;
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
        if (family == 0) {
            nb_entry(xi, a, b, &ll, &d0, &d1);
        } else if (family == 1) {
            float mu = a, theta = b;
            float lt = logf(theta + eps), ltm = logf(theta + mu + eps);
            float lg, dg;
            gamma_terms(xi, theta, &lg, &dg);
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

// totalVI's protein mixture per entry: log(σ(π) NB(x; μ_b, θ) + σ(-π) NB(x; μ_f, θ)) and its
// gradients (responsibility-weighted), mirroring ops/losses/mod.rs::nb_mixture.
extern "C" __global__ void nb_mixture_entries(const float* x, const float* mu_back, const float* mu_fore, const float* theta, const float* pi,
        unsigned long long n, float* values, float* g_back, float* g_fore, float* g_theta, float* g_pi) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        float a, da_mu, da_theta, b, db_mu, db_theta;
        nb_entry(x[i], mu_back[i], theta[i], &a, &da_mu, &da_theta);
        nb_entry(x[i], mu_fore[i], theta[i], &b, &db_mu, &db_theta);
        float la = a - lk_softplus(-pi[i]), lb = b - lk_softplus(pi[i]);
        float top = fmaxf(la, lb);
        float ea = expf(la - top), eb = expf(lb - top);
        float ra = ea / (ea + eb), rb = eb / (ea + eb);
        values[i] = top + logf(ea + eb);
        g_back[i] = ra * da_mu;
        g_fore[i] = rb * db_mu;
        g_theta[i] = ra * da_theta + rb * db_theta;
        g_pi[i] = ra * lk_sigmoid(-pi[i]) - rb * lk_sigmoid(pi[i]);
    }
}

// The sum of v over the block (blockDim.x a multiple of 32, at most 1024), returned to every
// thread; `scratch` holds 32 floats. Fixed order for a fixed block size: the same bits each run.
__device__ float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) { v += __shfl_down_sync(0xffffffffu, v, o); }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { scratch[warp] = v; }
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) { v += __shfl_down_sync(0xffffffffu, v, o); }
        if (lane == 0) { scratch[0] = v; }
    }
    __syncthreads();
    float total = scratch[0];
    __syncthreads();
    return total;
}

__device__ float block_max(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) { v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o)); }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { scratch[warp] = v; }
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : TSR_NEG_INF;
        for (int o = 16; o > 0; o >>= 1) { v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o)); }
        if (lane == 0) { scratch[0] = v; }
    }
    __syncthreads();
    float top = scratch[0];
    __syncthreads();
    return top;
}

// scVI's reconstruction term fused, one block per cell (ops/likelihood/softmax_nb.rs): μ =
// library · softmax(logits), x ~ NB(μ, θ_gene) with x the row's CSR entries (unique columns).
// Every gene is first taken at x = 0, then each non-zero adds what its count changes, so the
// dense work never looks a count up. Writes ll[r], dlogits (gradient of Σ_r w_r ll_r) and the
// row's θ gradients into dtheta_rows (rows x genes; their column sums are dθ, summed after).
extern "C" __global__ void softmax_nb(const float* logits, const float* library, const unsigned long long* indptr, const unsigned int* indices,
        const float* data, const float* theta, const float* weights, unsigned long long genes, float* ll, float* dlogits, float* dtheta_rows) {
    __shared__ float scratch[32];
    const float eps = (float)TSR_EPS;
    unsigned long long r = blockIdx.x;
    const float* z = logits + r * genes;
    float* dz = dlogits + r * genes;
    float* dt = dtheta_rows + r * genes;
    float lib = library[r], w = weights[r];
    float top = TSR_NEG_INF;
    for (unsigned long long f = threadIdx.x; f < genes; f += blockDim.x) { top = fmaxf(top, z[f]); }
    top = block_max(top, scratch);
    float sum = 0.0f;
    for (unsigned long long f = threadIdx.x; f < genes; f += blockDim.x) { sum += expf(z[f] - top); }
    float inv_sum = 1.0f / block_sum(sum, scratch);
    // x = 0 everywhere: ll = θ (ln(θ+ε) − ln(θ+μ+ε)); q = w μ ∂ll/∂μ; w ∂ll/∂θ.
    float ll_part = 0.0f, q_part = 0.0f;
    for (unsigned long long f = threadIdx.x; f < genes; f += blockDim.x) {
        float t = theta[f], mu = lib * expf(z[f] - top) * inv_sum;
        float lt = logf(t + eps), ltm = logf(t + mu + eps), inv = 1.0f / (t + mu + eps);
        float q = -w * mu * t * inv;
        ll_part += t * (lt - ltm);
        q_part += q;
        dz[f] = q;
        dt[f] = w * (lt - ltm + t / (t + eps) - t * inv);
    }
    __syncthreads();
    // The non-zeros: what x changes in each term (0 at x = 0; columns are unique in a row).
    for (unsigned long long k = indptr[r] + threadIdx.x; k < indptr[r + 1]; k += blockDim.x) {
        unsigned long long f = indices[k];
        float x = data[k], t = theta[f], mu = lib * expf(z[f] - top) * inv_sum;
        float ltm = logf(t + mu + eps), inv = 1.0f / (t + mu + eps);
        float lg, dg;
        gamma_terms(x, t, &lg, &dg);
        float dq = w * x * (mu / (mu + eps) - mu * inv);
        ll_part += x * (logf(mu + eps) - ltm) + lg;
        q_part += dq;
        dz[f] += dq;
        dt[f] += w * (dg - x * inv);
    }
    float q_sum = block_sum(q_part, scratch);
    float row_ll = block_sum(ll_part, scratch);
    if (threadIdx.x == 0) { ll[r] = row_ll; }
    // ∂/∂z_f = q_f − ρ_f Σ_g q_g (the softmax's Jacobian); each thread rereads only its own dz.
    __syncthreads();
    for (unsigned long long f = threadIdx.x; f < genes; f += blockDim.x) {
        dz[f] -= expf(z[f] - top) * inv_sum * q_sum;
    }
}
