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
