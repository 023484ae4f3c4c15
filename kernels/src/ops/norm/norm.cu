// Row softmax (f32), one thread per row, mirroring ops/norm/mod.rs.

extern "C" __global__ void softmax_forward(const float* x, float* y, unsigned long long rows, unsigned long long features) {
    unsigned long long r = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (r >= rows) { return; }
    const float* xr = x + r * features;
    float* yr = y + r * features;
    float mx = __int_as_float(0xff800000); // -inf (NVRTC has no math.h macros)
    for (unsigned long long f = 0; f < features; ++f) { mx = fmaxf(mx, xr[f]); }
    float sum = 0.0f;
    for (unsigned long long f = 0; f < features; ++f) { yr[f] = expf(xr[f] - mx); sum += yr[f]; }
    for (unsigned long long f = 0; f < features; ++f) { yr[f] /= sum; }
}

extern "C" __global__ void softmax_backward(const float* y, const float* dy, float* dx, unsigned long long rows, unsigned long long features) {
    unsigned long long r = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (r >= rows) { return; }
    const float* yr = y + r * features;
    const float* dyr = dy + r * features;
    float dot = 0.0f;
    for (unsigned long long f = 0; f < features; ++f) { dot += yr[f] * dyr[f]; }
    for (unsigned long long f = 0; f < features; ++f) { dx[r * features + f] = yr[f] * (dyr[f] - dot); }
}

// LayerNorm without an affine map (scvi-tools' FCLayers), one thread per row: y = x̂, and 1/σ
// kept for the backward.
extern "C" __global__ void layer_norm_forward(const float* x, unsigned long long rows, unsigned long long f, float eps,
        float* y, float* inv_std) {
    unsigned long long r = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (r >= rows) { return; }
    const float* xr = x + r * f;
    float mean = 0.0f;
    for (unsigned long long i = 0; i < f; ++i) { mean += xr[i]; }
    mean /= (float)f;
    float var = 0.0f;
    for (unsigned long long i = 0; i < f; ++i) { var += (xr[i] - mean) * (xr[i] - mean); }
    var /= (float)f;
    float inv = 1.0f / sqrtf(var + eps);
    inv_std[r] = inv;
    for (unsigned long long i = 0; i < f; ++i) { y[r * f + i] = (xr[i] - mean) * inv; }
}

// dx per row from y = x̂ and 1/σ.
extern "C" __global__ void layer_norm_backward(const float* y, const float* inv_std, const float* dy,
        unsigned long long rows, unsigned long long f, float* dx) {
    unsigned long long r = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (r >= rows) { return; }
    float mean_g = 0.0f, mean_gx = 0.0f;
    for (unsigned long long i = 0; i < f; ++i) {
        float g = dy[r * f + i];
        mean_g += g;
        mean_gx += g * y[r * f + i];
    }
    mean_g /= (float)f;
    mean_gx /= (float)f;
    for (unsigned long long i = 0; i < f; ++i) {
        dx[r * f + i] = inv_std[r] * (dy[r * f + i] - mean_g - y[r * f + i] * mean_gx);
    }
}

// BatchNorm training forward, one thread per feature (rows summed in order): batch statistics,
// the running statistics update (unbiased variance), x̂ and 1/σ for the backward.
extern "C" __global__ void batch_norm_forward_train(const float* x, const float* gamma, const float* beta, unsigned long long rows, unsigned long long f,
        float eps, float momentum, float* running_mean, float* running_var, float* y, float* xhat, float* inv_std) {
    unsigned long long c = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (c >= f) { return; }
    float mean = 0.0f;
    for (unsigned long long r = 0; r < rows; ++r) { mean += x[r * f + c]; }
    mean /= (float)rows;
    float var = 0.0f;
    for (unsigned long long r = 0; r < rows; ++r) { float d = x[r * f + c] - mean; var += d * d; }
    var /= (float)rows;
    float inv = 1.0f / sqrtf(var + eps);
    inv_std[c] = inv;
    running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * mean;
    running_var[c] = (1.0f - momentum) * running_var[c] + momentum * var * ((float)rows / (float)(rows - 1));
    for (unsigned long long r = 0; r < rows; ++r) {
        float h = (x[r * f + c] - mean) * inv;
        xhat[r * f + c] = h;
        y[r * f + c] = gamma[c] * h + beta[c];
    }
}

// BatchNorm training backward, one thread per feature: dγ, dβ and dx.
extern "C" __global__ void batch_norm_backward(const float* xhat, const float* inv_std, const float* gamma, const float* dy,
        unsigned long long rows, unsigned long long f, float* dx, float* dgamma, float* dbeta) {
    unsigned long long c = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (c >= f) { return; }
    float dg = 0.0f, db = 0.0f;
    for (unsigned long long r = 0; r < rows; ++r) {
        dg += dy[r * f + c] * xhat[r * f + c];
        db += dy[r * f + c];
    }
    dgamma[c] = dg;
    dbeta[c] = db;
    float n = (float)rows;
    for (unsigned long long r = 0; r < rows; ++r) {
        dx[r * f + c] = gamma[c] * inv_std[c] * (dy[r * f + c] - db / n - xhat[r * f + c] * dg / n);
    }
}

extern "C" __global__ void batch_norm_forward_eval(const float* x, const float* gamma, const float* beta, const float* running_mean, const float* running_var,
        unsigned long long rows, unsigned long long f, float eps, float* y) {
    unsigned long long n = rows * f;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long c = i % f;
        y[i] = gamma[c] * (x[i] - running_mean[c]) / sqrtf(running_var[c] + eps) + beta[c];
    }
}
