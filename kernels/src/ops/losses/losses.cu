// Regulariser and head losses (f32), mirroring ops/losses/mod.rs. Pairwise losses give each
// thread one row and only write that row's gradient (no atomics): the sums run in a different
// order than the CPU's pair loop, so parity is to rounding.

// scale = 1 / (the rows with a label), or with `pairs` 1 / (the pairs of them), 0 with none:
// the host's f32 division of the count. Labels are f32 codes, -1 = unlabelled. One block (at
// most 256 threads): integer counts, exact in any order.
extern "C" __global__ void labelled_scale(const float* labels, unsigned long long rows, unsigned int pairs, float* scale) {
    __shared__ unsigned int counts[256];
    unsigned int n = 0;
    for (unsigned long long r = threadIdx.x; r < rows; r += blockDim.x) { n += labels[r] >= 0.0f ? 1u : 0u; }
    counts[threadIdx.x] = n;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int total = 0;
        for (unsigned int t = 0; t < blockDim.x; ++t) { total += counts[t]; }
        unsigned long long k = total;
        if (pairs) { k = total > 0 ? k * (k - 1) / 2 : 0; }
        *scale = k > 0 ? 1.0f / (float)k : 0.0f;
    }
}

// Cross-entropy, one thread per row; label -1 = unlabelled (zero gradient, zero loss). Labels
// are f32 codes (exact below 2^24), read on the device as a captured step needs; the gradient's
// scale is read from `scale` (labelled_scale's).
extern "C" __global__ void cross_entropy(const float* logits, const float* labels, unsigned long long rows, unsigned long long classes,
        const float* scale, float* row_loss, float* dlogits) {
    unsigned long long r = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (r >= rows) { return; }
    const float* z = logits + r * classes;
    float* d = dlogits + r * classes;
    int label = (int)labels[r];
    if (label < 0) {
        for (unsigned long long k = 0; k < classes; ++k) { d[k] = 0.0f; }
        row_loss[r] = 0.0f;
        return;
    }
    float s = *scale;
    float mx = z[0];
    for (unsigned long long k = 1; k < classes; ++k) { mx = fmaxf(mx, z[k]); }
    float sum = 0.0f;
    for (unsigned long long k = 0; k < classes; ++k) { sum += expf(z[k] - mx); }
    float log_sum = logf(sum) + mx;
    for (unsigned long long k = 0; k < classes; ++k) {
        d[k] = s * (expf(z[k] - log_sum) - (k == (unsigned long long)label ? 1.0f : 0.0f));
    }
    row_loss[r] = log_sum - z[label];
}

// Masked squared error, one thread per entry; a NaN target is missing (zero gradient and loss).
extern "C" __global__ void masked_mse(const float* pred, const double* targets, unsigned long long n, float scale, float* entry_loss, float* dpred) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) { return; }
    double t = targets[i];
    if (isnan(t)) {
        entry_loss[i] = 0.0f;
        dpred[i] = 0.0f;
        return;
    }
    float diff = pred[i] - (float)t;
    entry_loss[i] = diff * diff;
    dpred[i] = 2.0f * scale * diff;
}

// One side of the MMD: for each row i of a, Σ_j k(a_i, b_j) into partial[i] and
// w · Σ_j k'(|a_i - b_j|²) · 2 (a_i - b_j) into grad[i].
extern "C" __global__ void mmd_side(const float* a, const float* b, unsigned long long na, unsigned long long nb, unsigned long long dim,
        const float* bandwidths, int n_bandwidths, float w, float* partial, float* grad) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= na) { return; }
    const float* ai = a + i * dim;
    float total = 0.0f;
    for (unsigned long long t = 0; t < dim; ++t) { grad[i * dim + t] = 0.0f; }
    for (unsigned long long j = 0; j < nb; ++j) {
        const float* bj = b + j * dim;
        float d2 = 0.0f;
        for (unsigned long long t = 0; t < dim; ++t) { float d = ai[t] - bj[t]; d2 += d * d; }
        float k = 0.0f, dk = 0.0f;
        for (int s = 0; s < n_bandwidths; ++s) {
            float c = -0.5f / (bandwidths[s] * bandwidths[s]);
            float e = expf(c * d2);
            k += e;
            dk += c * e;
        }
        total += k;
        for (unsigned long long t = 0; t < dim; ++t) { grad[i * dim + t] += w * dk * 2.0f * (ai[t] - bj[t]); }
    }
    partial[i] = total;
}

// The MMD from its sides' sums (xx, yy, xy), one thread: the value stays on the device.
extern "C" __global__ void mmd_value(const float* sums, float wxx, float wyy, float wxy, float* value) {
    if (blockIdx.x == 0 && threadIdx.x == 0) { value[0] = sums[0] * wxx + sums[1] * wyy - 2.0f * (sums[2] * wxy); }
}

// The rows' L2 norms (at least 1e-12), one thread per row, summed in column order.
extern "C" __global__ void row_norms(const float* z, unsigned long long n, unsigned long long dim, float* norms) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) { return; }
    float s = 0.0f;
    for (unsigned long long t = 0; t < dim; ++t) { float v = z[i * dim + t]; s += v * v; }
    norms[i] = fmaxf(sqrtf(s), 1e-12f);
}

// Cosine margin, one thread per row i: its loss share (pairs with j > i) and its gradient.
extern "C" __global__ void cosine_margin(const float* z, const float* labels, const float* norms, unsigned long long n, unsigned long long dim,
        float margin, const float* pair_scale, float* row_loss, float* dz) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) { return; }
    const float* zi = z + i * dim;
    for (unsigned long long t = 0; t < dim; ++t) { dz[i * dim + t] = 0.0f; }
    row_loss[i] = 0.0f;
    if (labels[i] < 0.0f) { return; }
    float scale = *pair_scale;
    float loss = 0.0f;
    for (unsigned long long j = 0; j < n; ++j) {
        if (j == i || labels[j] < 0.0f) { continue; }
        const float* zj = z + j * dim;
        float dot = 0.0f;
        for (unsigned long long t = 0; t < dim; ++t) { dot += zi[t] * zj[t]; }
        float c = dot / (norms[i] * norms[j]);
        float value = 0.0f, dcos = 0.0f;
        if (labels[i] == labels[j]) { value = 1.0f - c; dcos = -1.0f; }
        else if (c > margin) { value = c - margin; dcos = 1.0f; }
        if (j > i) { loss += value; }
        if (dcos != 0.0f) {
            for (unsigned long long t = 0; t < dim; ++t) {
                dz[i * dim + t] += scale * dcos * (zj[t] / (norms[i] * norms[j]) - c * zi[t] / (norms[i] * norms[i]));
            }
        }
    }
    row_loss[i] = loss;
}

// Cox weights w_i = exp(η_i - max η), one thread per sample, each scanning η for the max (the
// risk sums are quadratic anyway); thread 0 also writes the max.
extern "C" __global__ void cox_weights(const float* eta, unsigned long long n, float* w, float* max_out) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) { return; }
    float m = __int_as_float(0xff800000); // -inf (NVRTC has no math.h macros)
    for (unsigned long long j = 0; j < n; ++j) { m = fmaxf(m, eta[j]); }
    w[i] = expf(eta[i] - m);
    if (i == 0) { max_out[0] = m; }
}

// Cox loss share of sample i: -(η_i - (log S_i + max)) for an event, else 0.
extern "C" __global__ void cox_row_loss(const float* eta, const unsigned char* events, const float* risk, const float* max,
        unsigned long long n, float* row_loss) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) { return; }
    row_loss[i] = events[i] ? -(eta[i] - (logf(risk[i]) + max[0])) : 0.0f;
}

// Cox: per event i, the risk-set sum S_i = Σ_{t_j >= t_i} w_j (w = exp(η - max)).
extern "C" __global__ void cox_risk_sums(const float* w, const double* times, const unsigned char* events, unsigned long long n, float* risk) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) { return; }
    if (!events[i]) { risk[i] = 0.0f; return; }
    float s = 0.0f;
    for (unsigned long long j = 0; j < n; ++j) { if (times[j] >= times[i]) { s += w[j]; } }
    risk[i] = s;
}

// Cox gradient per sample j: -scale δ_j + scale w_j Σ_{events i, t_i <= t_j} 1/S_i.
extern "C" __global__ void cox_gradient(const float* w, const double* times, const unsigned char* events, const float* risk, unsigned long long n,
        float scale, float* deta) {
    unsigned long long j = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (j >= n) { return; }
    float acc = 0.0f;
    for (unsigned long long i = 0; i < n; ++i) { if (events[i] && times[j] >= times[i]) { acc += 1.0f / risk[i]; } }
    deta[j] = scale * (w[j] * acc - (events[j] ? 1.0f : 0.0f));
}
