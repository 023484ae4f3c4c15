//! The CUDA backend against the CPU backend: one test body per op family, generic over
//! [`Backend`], run once on [`Cpu`] (the reference ops) and once on [`Cuda`] (the kernels we
//! ship, through the same calls models make), outputs compared entry by entry. NVRTC
//! compilation of every `.cu` runs wherever libnvrtc is found (CI installs it from the NVIDIA
//! pip wheel; `TESSERA_REQUIRE_NVRTC=1` makes its absence a failure). Parity tests need a CUDA
//! device and say SKIPPED, with the reason, without one (`TESSERA_REQUIRE_DEVICE=1`: a failure).
//! CI runs them once more on the CPU under the emulated driver of `kernels/emu` (the same
//! kernel sources compiled by g++): that checks the kernels' logic and our launches, not a GPU.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use tessera_kernels::backend::{Backend, Cpu, Cuda, In, Labels, Out};
use tessera_kernels::cuda::{Gpu, compile, nvrtc_present, sources};
use tessera_kernels::ops::elementwise::Activation;
use tessera_kernels::ops::likelihood::Likelihood;
use tessera_kernels::ops::linear::{CountTransform, CsrRef, Gemm, MatmulPrecision, round_for};
use tessera_kernels::ops::optim::AdamW;
use tessera_kernels::testing::skip;

fn gpu() -> Option<Gpu> {
    tessera_kernels::testing::gpu_or_skip("CPU/GPU parity")
}

/// |gpu - cpu| <= atol + rtol * |cpu|, entry by entry.
fn assert_close(what: &str, gpu: &[f32], cpu: &[f32], atol: f32, rtol: f32) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(
            (g - c).abs() <= atol + rtol * c.abs(),
            "{what}[{i}]: gpu {g} vs cpu {c}"
        );
    }
}

/// One named result of a test body and the tolerance it is held to.
struct Output {
    what: String,
    values: Vec<f32>,
    atol: f32,
    rtol: f32,
}

fn output(what: impl Into<String>, values: Vec<f32>, atol: f32, rtol: f32) -> Output {
    Output {
        what: what.into(),
        values,
        atol,
        rtol,
    }
}

/// A scalar result (a loss) as an output.
fn scalar(what: impl Into<String>, value: f64, rtol: f32) -> Output {
    output(what, vec![value as f32], 1e-6, rtol)
}

/// Runs `body` on the CPU and on the GPU and compares every output (the CPU's tolerances), then
/// once more on the GPU: the same bits (no atomics, fixed reduction orders).
fn parity(body_cpu: impl FnOnce(&Cpu) -> Vec<Output>, body_gpu: impl Fn(&Cuda) -> Vec<Output>) {
    let Some(gpu) = gpu() else { return };
    let gpu = Cuda::new(gpu);
    let first = body_gpu(&gpu);
    compare(&body_cpu(&Cpu), &first, false);
    compare(&first, &body_gpu(&gpu), true);
}

/// Every output of `other` against the reference's, within the reference's tolerances, or
/// bit for bit when `exact`.
fn compare(reference: &[Output], other: &[Output], exact: bool) {
    assert_eq!(
        reference.len(),
        other.len(),
        "the same outputs on both devices"
    );
    for (c, g) in reference.iter().zip(other) {
        assert_eq!(c.what, g.what);
        let (atol, rtol) = if exact { (0.0, 0.0) } else { (c.atol, c.rtol) };
        assert_close(&c.what, &g.values, &c.values, atol, rtol);
    }
}

/// The test bodies themselves, run where there is no GPU: twice on the CPU, the same bits
/// each time (a fixed reduction order), so a body that cannot run fails here, not first on a
/// borrowed GPU.
#[test]
fn every_test_body_runs_on_the_cpu_and_repeats_bit_for_bit() {
    type Body = fn(&Cpu) -> Vec<Output>;
    let bodies: [(&str, Body); 14] = [
        ("activations", activations),
        ("elementwise", elementwise),
        ("likelihoods", likelihoods),
        ("sparse layer and softmax", sparse_layer_and_softmax),
        ("staged uploads", staged_uploads),
        ("resident rows", resident_rows),
        ("gemms", gemms),
        ("gemms on bf16-rounded inputs", |c| {
            gemms_at(c, MatmulPrecision::Medium, true)
        }),
        ("optimiser", optimiser),
        ("random", random),
        ("gaussians", gaussians),
        ("batch norm", batch_norm),
        ("layer norm", layer_norm),
        ("losses", losses),
    ];
    for (name, body) in bodies {
        let (first, second) = (body(&Cpu), body(&Cpu));
        assert!(
            !first.is_empty() && first.iter().all(|o| !o.values.is_empty()),
            "{name}: outputs"
        );
        compare(&first, &second, true);
    }
}

fn up<B: Backend<f32>>(b: &B, host: &[f32]) -> B::Buf {
    b.upload(host).unwrap()
}

fn down<B: Backend<f32>>(b: &B, x: &B::Buf) -> Vec<f32> {
    b.download(In::all(x)).unwrap()
}

fn zeros<B: Backend<f32>>(b: &B, n: usize) -> B::Buf {
    b.zeros(n).unwrap()
}

#[test]
fn every_cuda_source_compiles_with_nvrtc() {
    if !nvrtc_present() {
        let why = "libnvrtc is not on LD_LIBRARY_PATH; the .cu sources were not compiled";
        return skip("TESSERA_REQUIRE_NVRTC", why);
    }
    for (name, source) in sources() {
        compile(name, source).unwrap_or_else(|e| panic!("{e}"));
    }
    // The check can fail: a broken source is an error carrying NVRTC's log.
    let err = compile(
        "broken",
        "extern \"C\" __global__ void k() { undeclared(); }",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("broken.cu") && err.contains("undeclared"),
        "{err}"
    );
}

fn inputs(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.7311).sin() * 4.0) + 0.01)
        .collect()
}

/// Sizes that are not multiples of anything: 1, 31, 1,025 and a million-odd.
const AWKWARD: [usize; 4] = [1, 31, 1025, (1 << 20) + 3];

fn activations<B: Backend<f32>>(b: &B) -> Vec<Output> {
    let mut out = Vec::new();
    for n in AWKWARD {
        let dy: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).cos()).collect();
        for act in [
            Activation::Relu,
            Activation::LeakyRelu(0.2),
            Activation::Elu(1.0),
            Activation::Softplus,
            Activation::Exp,
            Activation::Sigmoid,
            Activation::Log1p,
            Activation::LogAddExp(-9.21),
        ] {
            // log1p is defined above -1: its inputs are folded to [0, ∞).
            let x: Vec<f32> = if act == Activation::Log1p {
                inputs(n).iter().map(|v| v.abs()).collect()
            } else {
                inputs(n)
            };
            let (x, dy) = (up(b, &x), up(b, &dy));
            let (mut y, mut dx) = (zeros(b, n), zeros(b, n));
            b.activation_forward(act, In::all(&x), Out::all(&mut y))
                .unwrap();
            b.activation_backward(
                act,
                In::all(&x),
                In::all(&y),
                In::all(&dy),
                Out::all(&mut dx),
            )
            .unwrap();
            out.push(output(
                format!("{act:?} forward n={n}"),
                down(b, &y),
                1e-6,
                1e-5,
            ));
            out.push(output(
                format!("{act:?} backward n={n}"),
                down(b, &dx),
                1e-6,
                1e-5,
            ));
        }
    }
    out
}

#[test]
fn activations_match_cpu() {
    parity(activations, activations);
}

/// Bias add, column sums, axpy, scale, row scaling, row gather/scatter, copies: on views that
/// start inside a larger buffer, as a model's flat parameters are read.
fn elementwise<B: Backend<f32>>(b: &B) -> Vec<Output> {
    let mut out = Vec::new();
    for (rows, cols) in [(1, 1), (7, 31), (1024, 1025)] {
        let n = rows * cols;
        let flat = up(b, &inputs(n + cols + 5));
        let (bias, m) = (
            In::part(&flat, 5..5 + cols),
            In::part(&flat, 5 + cols..5 + cols + n),
        );
        let mut y = up(b, &inputs(n + 3));
        b.copy(m.clone(), Out::part(&mut y, 3..n + 3)).unwrap();
        b.bias_add(Out::part(&mut y, 3..n + 3), bias.clone())
            .unwrap();
        out.push(output(
            format!("bias add {rows}x{cols}"),
            down(b, &y),
            1e-6,
            1e-6,
        ));
        let mut sums = zeros(b, cols);
        b.column_sums(m.clone(), Out::all(&mut sums)).unwrap();
        // Same summation order on both sides: equal up to f32 rounding of the loop itself.
        out.push(output(
            format!("column sums {rows}x{cols}"),
            down(b, &sums),
            1e-4,
            1e-5,
        ));
        let mut acc = up(b, &inputs(n).iter().rev().copied().collect::<Vec<_>>());
        b.axpy(-0.75, m.clone(), Out::all(&mut acc)).unwrap();
        b.scale(Out::part(&mut acc, 0..n / 2), 3.0).unwrap();
        out.push(output(
            format!("axpy + scale {rows}x{cols}"),
            down(b, &acc),
            1e-6,
            1e-6,
        ));
        let s = up(b, &(0..rows).map(|r| 1.0 + r as f32).collect::<Vec<_>>());
        let mut scaled = zeros(b, n);
        b.scale_rows(m.clone(), In::all(&s), Out::all(&mut scaled))
            .unwrap();
        out.push(output(
            format!("scale rows {rows}x{cols}"),
            down(b, &scaled),
            0.0,
            1e-7,
        ));
        let k = cols.div_ceil(2);
        let mut leading = zeros(b, rows * k);
        b.leading_columns(m.clone(), cols, k, Out::all(&mut leading))
            .unwrap();
        out.push(output(
            format!("leading {k} columns {rows}x{cols}"),
            down(b, &leading),
            0.0,
            0.0,
        ));
        // Each row's batch code from its leading columns (rows with none among them too).
        let mut codes = zeros(b, rows);
        b.first_positive(m.clone(), cols, k, Out::all(&mut codes))
            .unwrap();
        out.push(output(
            format!("first positive of {k} leading columns {rows}x{cols}"),
            down(b, &codes),
            0.0,
            0.0,
        ));
        // Three groups; each row its own (the GPU copies instead, with no codes); and each row
        // at every other of twice as many groups, in reverse (a modality's cells among a
        // batch's: the odd groups empty).
        let three: Vec<usize> = (0..rows).map(|r| (r * 7) % 3).collect();
        let spread: Vec<usize> = (0..rows).map(|r| 2 * (rows - 1 - r)).collect();
        for (codes, groups) in [(three, 3), ((0..rows).collect(), rows), (spread, 2 * rows)] {
            let table = up(b, &inputs((groups + 1) * cols));
            let mut gathered = zeros(b, n);
            b.gather_rows(In::all(&table), &codes, cols, Out::all(&mut gathered))
                .unwrap();
            out.push(output(
                format!("gather {rows}x{cols} of {groups} groups"),
                down(b, &gathered),
                0.0,
                0.0,
            ));
            let mut scattered = up(b, &inputs(groups * cols));
            b.scatter_add_rows(m.clone(), &codes, cols, Out::all(&mut scattered))
                .unwrap();
            out.push(output(
                format!("scatter-add {rows}x{cols} into {groups} groups"),
                down(b, &scattered),
                0.0,
                0.0,
            ));
        }
        // A fill of part of a buffer; weights of one value (filled) and of several (uploaded).
        let mut filled = up(b, &inputs(n + 3));
        b.fill(Out::part(&mut filled, 2..n + 2), -0.37).unwrap();
        out.push(output(
            format!("fill {rows}x{cols}"),
            down(b, &filled),
            0.0,
            0.0,
        ));
        for weights in [vec![0.125; n], inputs(n)] {
            let uploaded = b.upload_weights(&weights).unwrap();
            out.push(output(
                format!("weights {rows}x{cols}"),
                down(b, &uploaded),
                0.0,
                0.0,
            ));
        }
        // KL weights of one share (filled from the KL weight's cell) and of several.
        let shares: Vec<f64> = inputs(n).iter().map(|&v| f64::from(v) / 7.0).collect();
        for shares in [vec![1.0 / n as f64; n], shares] {
            let weights = b.kl_weights(&shares, 0.37).unwrap();
            out.push(output(
                format!("KL weights {rows}x{cols}"),
                down(b, &weights),
                0.0,
                0.0,
            ));
        }
    }
    out.extend(reads_in_flight(b));
    out
}

/// Read backs started, then more work queued on what they read: each returns the values queued
/// before it, whatever order they are finished in (the device may run them late; the host waits
/// for each alone).
fn reads_in_flight<B: Backend<f32>>(b: &B) -> Vec<Output> {
    let n = 1000;
    let (mut x, mut y) = (up(b, &inputs(n)), up(b, &inputs(n + 7)));
    let first = b
        .start_download(&[In::part(&x, 1..n), In::all(&y)])
        .unwrap();
    b.fill(Out::all(&mut x), 7.0).unwrap();
    let second = b.start_download(&[In::all(&x)]).unwrap();
    b.fill(Out::all(&mut y), -1.0).unwrap();
    b.fill(Out::all(&mut x), 3.0).unwrap();
    let second = b.finish_download(second).unwrap();
    let first = b.finish_download(first).unwrap();
    assert_eq!(first, [inputs(n)[1..].to_vec(), inputs(n + 7)]);
    assert_eq!(second, [vec![7.0; n]]);
    assert_eq!(down(b, &x), vec![3.0; n]);
    let mut values = first.concat();
    values.extend(second.concat());
    vec![output("reads in flight", values, 0.0, 0.0)]
}

#[test]
fn elementwise_ops_match_cpu() {
    parity(elementwise, elementwise);
}

fn likelihoods<B: Backend<f32>>(b: &B) -> Vec<Output> {
    let (rows, features) = (64, 1025);
    let n = rows * features;
    let mut out = Vec::new();
    for family in [
        Likelihood::NegativeBinomial,
        Likelihood::ZeroInflatedNegativeBinomial,
        Likelihood::Poisson,
        Likelihood::Gaussian,
        Likelihood::Bernoulli,
    ] {
        let x: Vec<f32> = (0..n)
            .map(|i| match family {
                Likelihood::Gaussian => (i as f32 * 0.37).sin(),
                Likelihood::Bernoulli => (i % 3 == 0) as i32 as f32,
                _ => [0.0, 0.0, 1.0, 3.0, 0.0, 17.0, 250.0][i % 7],
            })
            .collect();
        // The second parameter is per feature (a gene's dispersion), the others per entry.
        let params: Vec<B::Buf> = (0..family.n_params())
            .map(|k| {
                up(
                    b,
                    &(0..if k == 1 { features } else { n })
                        .map(|i| {
                            let t = (i as f32 * 0.913 + k as f32).sin();
                            match (family, k) {
                                (Likelihood::Gaussian | Likelihood::Bernoulli, _)
                                | (Likelihood::ZeroInflatedNegativeBinomial, 2) => t,
                                _ => (t * 1.5).exp() * 2.0,
                            }
                        })
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let weights = up(b, &(0..rows).map(|r| (r % 2) as f32).collect::<Vec<_>>());
        let x = up(b, &x);
        let mut ll = zeros(b, rows);
        let mut grads: Vec<B::Buf> = params.iter().map(|_| zeros(b, n)).collect();
        let ins: Vec<_> = params.iter().map(In::all).collect();
        let mut outs: Vec<_> = grads.iter_mut().map(Out::all).collect();
        b.likelihood(
            family,
            In::all(&x),
            features,
            &ins,
            Some(In::all(&weights)),
            Out::all(&mut ll),
            &mut outs,
        )
        .unwrap();
        out.push(output(format!("{family:?} ll"), down(b, &ll), 1e-2, 1e-4));
        for (k, g) in grads.iter().enumerate() {
            out.push(output(
                format!("{family:?} grad {k}"),
                down(b, g),
                1e-5,
                1e-4,
            ));
        }
    }
    // totalVI's protein mixture.
    let (rows, features) = (256, 14);
    let n = rows * features;
    let x: Vec<f32> = (0..n)
        .map(|i| [0.0, 3.0, 40.0, 7.0, 150.0][i % 5])
        .collect();
    let back: Vec<f32> = inputs(n).iter().map(|v| v.exp() * 3.0).collect();
    let fore: Vec<f32> = inputs(n).iter().rev().map(|v| v.exp() * 20.0).collect();
    let theta: Vec<f32> = inputs(n).iter().map(|v| (v * 0.3).exp() * 5.0).collect();
    let pi: Vec<f32> = inputs(n).iter().map(|v| v * 0.5).collect();
    let [x, back, fore, theta, pi] = [&x, &back, &fore, &theta, &pi].map(|v| up(b, v));
    let mut ll = zeros(b, rows);
    let mut g: [B::Buf; 4] = std::array::from_fn(|_| zeros(b, n));
    {
        let [g0, g1, g2, g3] = &mut g;
        b.nb_mixture(
            In::all(&x),
            In::all(&back),
            In::all(&fore),
            In::all(&theta),
            In::all(&pi),
            features,
            Out::all(&mut ll),
            [Out::all(g0), Out::all(g1), Out::all(g2), Out::all(g3)],
        )
        .unwrap();
    }
    out.push(output("mixture ll", down(b, &ll), 1e-3, 1e-4));
    for (k, g) in g.iter().enumerate() {
        out.push(output(format!("mixture grad {k}"), down(b, g), 1e-5, 1e-4));
    }
    out
}

#[test]
fn likelihoods_match_cpu() {
    parity(likelihoods, likelihoods);
}

/// A batch's counts: ~10% dense, an all-zero row every 17 rows.
fn counts(rows: usize, cols: usize) -> (Vec<u64>, Vec<u32>, Vec<f32>) {
    let (mut indptr, mut indices, mut data) = (vec![0u64], Vec::new(), Vec::new());
    for r in 0..rows {
        if r % 17 != 0 {
            for j in (r % 10..cols).step_by(10) {
                indices.push(j as u32);
                data.push(((r * 7 + j) % 30) as f32 + 1.0);
            }
        }
        indptr.push(data.len() as u64);
    }
    (indptr, indices, data)
}

/// The sparse first layer (both transforms; the backward twice, so the cached transposed index
/// is used), scVI's fused reconstruction term, and softmax.
fn sparse_layer_and_softmax<B: Backend<f32>>(b: &B) -> Vec<Output> {
    let mut out = Vec::new();
    let (rows, cols, d_out) = (1024, 2000, 128);
    let (indptr, indices, data) = counts(rows, cols);
    let x = CsrRef {
        rows,
        cols,
        indptr: &indptr,
        indices: &indices,
        data: &data,
    };
    let xd = b.upload_csr(x).unwrap();
    // Dense counts (a row repeating a column, a negative sum and a zero kept as they are
    // where binary).
    let repeats = CsrRef {
        rows: 3,
        cols: 4,
        indptr: &[0, 3, 3, 6],
        indices: &[2, 0, 2, 1, 1, 3],
        data: &[1.0, 2.0, -3.0, 4.0, -5.0, 0.0],
    };
    // Their rows three times over, as a mixture's decoders read them: dense and library sizes.
    let repeats = b.upload_csr(repeats).unwrap();
    let tiled = [
        b.csr_tiled(&xd, 3).unwrap(),
        b.csr_tiled(&repeats, 3).unwrap(),
    ];
    let matrices = [
        ("counts", &xd),
        ("repeats", &repeats),
        ("counts x 3", &tiled[0]),
        ("repeats x 3", &tiled[1]),
    ];
    for (what, m) in matrices {
        let (r, c, nnz) = b.csr_shape(m);
        out.push(scalar(format!("{what}: non-zeros"), nnz as f64, 0.0));
        for binary in [false, true] {
            let mut dense = up(b, &inputs(r * c));
            b.csr_dense(m, binary, Out::all(&mut dense)).unwrap();
            out.push(output(
                format!("dense {what} (binary {binary})"),
                down(b, &dense),
                0.0,
                0.0,
            ));
        }
        let mut library = zeros(b, r);
        b.csr_row_sums(m, Out::all(&mut library)).unwrap();
        out.push(output(
            format!("library sizes {what}"),
            down(b, &library),
            1e-6,
            1e-6,
        ));
    }
    let (w, dy) = (up(b, &inputs(cols * d_out)), up(b, &inputs(rows * d_out)));
    for transform in [
        CountTransform::Log1p,
        CountTransform::NormalizedLog1p { scale: 1e4 },
    ] {
        let (mut y, mut dw) = (zeros(b, rows * d_out), zeros(b, cols * d_out));
        b.sparse_input_forward(&xd, transform, In::all(&w), d_out, Out::all(&mut y))
            .unwrap();
        for round in 0..2 {
            b.sparse_input_backward(&xd, transform, In::all(&dy), d_out, Out::all(&mut dw))
                .unwrap();
            out.push(output(
                format!("{transform:?} dW, round {round}"),
                down(b, &dw),
                1e-4,
                1e-5,
            ));
        }
        out.push(output(
            format!("{transform:?} forward"),
            down(b, &y),
            1e-4,
            1e-5,
        ));
    }
    let (rows, genes) = (128, 2000);
    let plain = counts(rows, genes);
    let (mut indptr, mut indices, mut data) = plain.clone();
    // Every 7th row's first column once more, at the end of the row: repeated entries are summed
    // (on the GPU from a summed copy; rows without repeats use the encoder's upload itself).
    for r in (3..rows).step_by(7).rev() {
        let (first, end) = (indptr[r] as usize, indptr[r + 1] as usize);
        if first < end {
            indices.insert(end, indices[first]);
            data.insert(end, 2.0);
            indptr[r + 1..].iter_mut().for_each(|p| *p += 1);
        }
    }
    for (name, (indptr, indices, data)) in [
        ("softmax NB", (&indptr, &indices, &data)),
        ("softmax NB unique", (&plain.0, &plain.1, &plain.2)),
    ] {
        let x = CsrRef {
            rows,
            cols: genes,
            indptr,
            indices,
            data,
        };
        softmax_nb_body(b, name, &b.upload_csr(x).unwrap(), &mut out);
    }

    for (rows, f) in [(1, 1), (64, 31), (1024, 2000)] {
        let (x, dy) = (
            up(b, &inputs(rows * f)),
            up(
                b,
                &inputs(rows * f).iter().map(|v| v * 0.5).collect::<Vec<_>>(),
            ),
        );
        let (mut y, mut dx) = (zeros(b, rows * f), zeros(b, rows * f));
        b.softmax_forward(In::all(&x), f, Out::all(&mut y)).unwrap();
        b.softmax_backward(In::all(&y), In::all(&dy), f, Out::all(&mut dx))
            .unwrap();
        out.push(output(
            format!("softmax {rows}x{f}"),
            down(b, &y),
            1e-7,
            1e-5,
        ));
        out.push(output(
            format!("softmax backward {rows}x{f}"),
            down(b, &dx),
            1e-7,
            1e-4,
        ));
    }
    out
}

/// Count matrices staged (on another thread, as the training loop does) against the same
/// matrices uploaded in place: the sparse layer's forward and backward (the staged transposed
/// index: made on the device for canonical rows, copied from the host for the matrix whose rows
/// repeat a gene) give the same values. The sizes shrink and grow (the slots' buffers are
/// reused and reallocated), one matrix has no entries, and one staged matrix is dropped unused.
fn staged_uploads<B: Backend<f32>>(b: &B) -> Vec<Output> {
    type Matrix = (usize, usize, (Vec<u64>, Vec<u32>, Vec<f32>));
    fn view(m: &Matrix) -> CsrRef<'_, f32> {
        let (rows, cols, (indptr, indices, data)) = m;
        CsrRef {
            rows: *rows,
            cols: *cols,
            indptr,
            indices,
            data,
        }
    }
    let d_out = 16;
    let shapes = [(1024, 2000), (64, 31), (1500, 2000), (8, 5), (300, 700)];
    let matrices: Vec<Matrix> = shapes
        .iter()
        .map(|&(rows, cols)| {
            let mut m = counts(rows, cols);
            if rows == 8 {
                m = (vec![0; rows + 1], Vec::new(), Vec::new());
            }
            if rows == 300 {
                // Each row's second entry names its first entry's gene again.
                for r in 0..rows {
                    let (start, end) = (m.0[r] as usize, m.0[r + 1] as usize);
                    if end - start >= 2 {
                        m.1[start + 1] = m.1[start];
                    }
                }
            }
            (rows, cols, m)
        })
        .collect();
    // Values staged before the matrices (their slots then grow for a matrix) and after (a
    // matrix's slot holds a few values), each read back as given.
    let mut out = staged_values(b, &[6, 0, 3]);
    let unused = b
        .stage_csr(view(&matrices[0]), CountTransform::Log1p)
        .unwrap();
    let staged: Vec<B::Staged> = std::thread::scope(|s| {
        s.spawn(|| {
            matrices
                .iter()
                .map(|m| b.stage_csr(view(m), CountTransform::Log1p).unwrap())
                .collect()
        })
        .join()
        .unwrap()
    });
    drop(unused);
    for (m, staged) in matrices.iter().zip(staged) {
        let (rows, cols) = (m.0, m.1);
        let x = view(m);
        let w = up(b, &inputs(cols * d_out));
        let mut results = Vec::new();
        for csr in [b.staged_csr(staged).unwrap(), b.upload_csr(x).unwrap()] {
            assert_eq!(b.csr_shape(&csr), (rows, cols, x.data.len()));
            // Host rows where kept (a GPU keeps none for a canonical batch).
            if let Some(rows_back) = b.csr_rows(&csr) {
                assert_eq!(
                    (rows_back.indptr, rows_back.indices, rows_back.data),
                    (x.indptr, x.indices, x.data),
                    "staged {rows}x{cols}: host rows"
                );
            }
            let mut y = zeros(b, rows * d_out);
            b.sparse_input_forward(
                &csr,
                CountTransform::Log1p,
                In::all(&w),
                d_out,
                Out::all(&mut y),
            )
            .unwrap();
            // The backward reads the transposed index the stager made (or, uploaded in
            // place, the one made now).
            let (dy, mut dw) = (up(b, &inputs(rows * d_out)), zeros(b, cols * d_out));
            b.sparse_input_backward(
                &csr,
                CountTransform::Log1p,
                In::all(&dy),
                d_out,
                Out::all(&mut dw),
            )
            .unwrap();
            results.push((down(b, &y), down(b, &dw)));
        }
        let ((y, dw), (y_up, dw_up)) = (results.swap_remove(0), results.swap_remove(0));
        assert_eq!(
            y, y_up,
            "staged {rows}x{cols}: the forward reads the same arrays"
        );
        // The index made on the device transforms with the kernels' log1p, the host's with its
        // own: the same to rounding.
        assert_close(
            &format!("staged {rows}x{cols}: dW as uploaded"),
            &dw,
            &dw_up,
            1e-4,
            1e-5,
        );
        out.push(output(
            format!("staged {rows}x{cols} forward"),
            y,
            1e-4,
            1e-5,
        ));
        out.push(output(format!("staged {rows}x{cols} dW"), dw, 1e-4, 1e-5));
    }
    out.extend(staged_values(b, &[2048, 5]));
    out
}

/// Values of each length staged on another thread (as the training loop stages a batch's
/// covariates), then taken in order: each buffer holds its values, bit for bit.
fn staged_values<B: Backend<f32>>(b: &B, lengths: &[usize]) -> Vec<Output> {
    let values: Vec<Vec<f32>> = lengths.iter().map(|&n| inputs(n)).collect();
    let staged: Vec<B::StagedValues> = std::thread::scope(|s| {
        s.spawn(|| values.iter().map(|v| b.stage_values(v).unwrap()).collect())
            .join()
            .unwrap()
    });
    values
        .iter()
        .zip(staged)
        .filter_map(|(v, staged)| {
            let back = down(b, &b.staged_values(staged).unwrap());
            assert_eq!(&back, v, "{} staged values", v.len());
            // No values (a batch without covariates) compare above only.
            (!v.is_empty()).then(|| output(format!("{} staged values", v.len()), back, 0.0, 0.0))
        })
        .collect()
}

#[test]
fn staged_uploads_match_cpu() {
    parity(staged_uploads, staged_uploads);
}

/// Batches gathered from a matrix kept on the device (staged on another thread, as the training
/// loop does) against the same rows uploaded: shapes, the sparse layer's forward and backward
/// (the transposed index made with the batch, and one made later for another transform),
/// scVI's term and the library sizes. Rows shuffled, repeated, all empty, and one alone.
fn resident_rows<B: Backend<f32>>(b: &B) -> Vec<Output> {
    let (n, cols, d_out) = (3000, 2000, 16);
    let (indptr, indices, data) = counts(n, cols);
    let whole = CsrRef {
        rows: n,
        cols,
        indptr: &indptr,
        indices: &indices,
        data: &data,
    };
    let resident = std::sync::Arc::new(b.resident_csr(whole).unwrap());
    let shuffled: Vec<usize> = (0..1024).map(|i| (i * 1777 + 11) % n).collect();
    let batches: [(&str, Vec<usize>); 4] = [
        ("shuffled", shuffled),
        ("repeated", vec![5, 5, 17, 2999, 0, 5]),
        ("empty rows", vec![0, 17, 34]),
        ("one row", vec![1234]),
    ];
    let staged: Vec<B::Staged> = std::thread::scope(|s| {
        s.spawn(|| {
            batches
                .iter()
                .map(|(_, rows)| {
                    b.stage_rows(&resident, rows, CountTransform::Log1p)
                        .unwrap()
                })
                .collect()
        })
        .join()
        .unwrap()
    });
    let mut out = Vec::new();
    for ((name, rows), staged) in batches.iter().zip(staged) {
        let arrays = tessera_kernels::ops::linear::gather_rows(whole, rows);
        let host = CsrRef {
            rows: rows.len(),
            cols,
            indptr: &arrays.0,
            indices: &arrays.1,
            data: &arrays.2,
        };
        let w = up(b, &inputs(cols * d_out));
        let dy = up(b, &inputs(rows.len() * d_out));
        let uploaded = b.upload_csr(host).unwrap();
        let gathered = b.staged_csr(staged).unwrap();
        assert_eq!(
            b.csr_shape(&gathered),
            (rows.len(), cols, arrays.2.len()),
            "{name}: shape"
        );
        let mut passes = Vec::new();
        for csr in [&gathered, &uploaded] {
            let mut y = zeros(b, rows.len() * d_out);
            b.sparse_input_forward(
                csr,
                CountTransform::Log1p,
                In::all(&w),
                d_out,
                Out::all(&mut y),
            )
            .unwrap();
            let mut dws = Vec::new();
            for transform in [
                CountTransform::Log1p,
                CountTransform::NormalizedLog1p { scale: 1e4 },
            ] {
                let mut dw = zeros(b, cols * d_out);
                b.sparse_input_backward(csr, transform, In::all(&dy), d_out, Out::all(&mut dw))
                    .unwrap();
                dws.push(down(b, &dw));
            }
            passes.push((down(b, &y), dws));
        }
        let ((y, dws), (y_up, dws_up)) = (passes.swap_remove(0), passes.swap_remove(0));
        assert_eq!(y, y_up, "{name}: the forward reads the same arrays");
        for (i, (dw, dw_up)) in dws.iter().zip(&dws_up).enumerate() {
            assert_close(
                &format!("{name}: dW {i} as uploaded"),
                dw,
                dw_up,
                1e-4,
                1e-5,
            );
        }
        out.push(output(format!("{name} forward"), y, 1e-4, 1e-5));
        for (i, dw) in dws.into_iter().enumerate() {
            out.push(output(format!("{name} dW {i}"), dw, 1e-4, 1e-5));
        }
        softmax_nb_body(b, &format!("{name} softmax_nb"), &gathered, &mut out);
        let mut sums = zeros(b, rows.len());
        b.csr_row_sums(&gathered, Out::all(&mut sums)).unwrap();
        out.push(output(
            format!("{name} row sums"),
            down(b, &sums),
            1e-3,
            1e-6,
        ));
    }
    out
}

#[test]
fn resident_rows_match_cpu() {
    parity(resident_rows, resident_rows);
}

/// scVI's fused term over the uploaded rows `x`.
fn softmax_nb_body<B: Backend<f32>>(b: &B, name: &str, x: &B::Csr, out: &mut Vec<Output>) {
    let (rows, genes, _) = b.csr_shape(x);
    let logits = up(
        b,
        &inputs(rows * genes)
            .iter()
            .map(|v| v * 0.5)
            .collect::<Vec<_>>(),
    );
    let library = up(
        b,
        &(0..rows)
            .map(|r| 300.0 + 50.0 * r as f32)
            .collect::<Vec<_>>(),
    );
    let theta = up(
        b,
        &inputs(genes)
            .iter()
            .map(|v| (v * 0.4).exp() * 3.0)
            .collect::<Vec<_>>(),
    );
    let weights = up(
        b,
        &(0..rows)
            .map(|r| if r % 5 == 0 { 0.0 } else { 1.0 })
            .collect::<Vec<_>>(),
    );
    let (mut ll, mut dlogits, mut dtheta) =
        (zeros(b, rows), zeros(b, rows * genes), zeros(b, genes));
    b.softmax_nb(
        In::all(&logits),
        In::all(&library),
        x,
        In::all(&theta),
        In::all(&weights),
        Out::all(&mut ll),
        Out::all(&mut dlogits),
        Out::all(&mut dtheta),
    )
    .unwrap();
    out.push(output(format!("{name} ll"), down(b, &ll), 1e-2, 1e-4));
    out.push(output(
        format!("{name} dlogits"),
        down(b, &dlogits),
        1e-5,
        1e-3,
    ));
    out.push(output(
        format!("{name} dtheta"),
        down(b, &dtheta),
        1e-4,
        1e-3,
    ));
}

#[test]
fn sparse_layer_and_softmax_match_cpu() {
    parity(sparse_layer_and_softmax, sparse_layer_and_softmax);
}

fn gemms<B: Backend<f32>>(b: &B) -> Vec<Output> {
    gemms_at(b, MatmulPrecision::Highest, false)
}

/// GEMMs of every transpose and awkward shapes at `precision`: the GPU rounds the inputs
/// itself, the CPU reference (`round_here`) multiplies inputs rounded as `round_for` does (to
/// nearest, ties to even). Tolerance: summation order as in f32, plus 40 input ulps × √k for
/// tensor cores that read the inputs another way: truncated inputs land within 25 ulps × √k of
/// the rounded reference on these operands (checked with numpy), while a product of the wrong
/// operands misses it at 40% of the entries or more.
fn gemms_at<B: Backend<f32>>(b: &B, precision: MatmulPrecision, round_here: bool) -> Vec<Output> {
    let ulp = precision
        .mantissa_bits()
        .map_or(0.0, |bits| 2f32.powi(-(bits as i32)));
    let operand = |n: usize| {
        let values = inputs(n);
        if round_here {
            round_for(&values, precision)
        } else {
            values
        }
    };
    let mut out = Vec::new();
    for (m, k, n) in [(1, 1, 1), (31, 1025, 7), (1024, 512, 2000), (3, 0, 5)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (a, bb) = (up(b, &operand(m * k)), up(b, &operand(k * n)));
            let mut c = up(b, &inputs(m * n));
            b.gemm(
                ta,
                tb,
                m,
                k,
                n,
                1.5,
                In::all(&a),
                In::all(&bb),
                0.5,
                Out::all(&mut c),
            )
            .unwrap();
            // Different summation orders: tolerance grows with k.
            let root_k = (k.max(1) as f32).sqrt();
            out.push(output(
                format!("gemm {precision:?} ta={ta} tb={tb} {m}x{k}x{n}"),
                down(b, &c),
                1e-3 * root_k + 40.0 * ulp * root_k,
                1e-4 + 2.0 * ulp,
            ));
        }
    }
    out
}

#[test]
fn gemm_matches_cpu_for_every_transpose() {
    parity(gemms, gemms);
}

/// A dense layer's forward and backward, queued into buffers it makes from the input in `x`:
/// h = relu(x w + bias); for an upstream gradient dh, dz = relu'(z) dh, dw = xᵀ dz,
/// dbias = Σ rows of dz, dx = dz wᵀ (x 64 x 48, w 48 x 32). Outputs: h, dw, dbias, dx.
fn layer_step<B: Backend<f32>>(
    b: &B,
    x: &B::Buf,
    (w, bias, dh): (&B::Buf, &B::Buf, &B::Buf),
) -> tessera_kernels::backend::Result<[B::Buf; 4]> {
    let (m, k, n) = (64, 48, 32);
    let mut z = product(b, (false, false), (m, k, n), x, w)?;
    b.bias_add(Out::all(&mut z), In::all(bias))?;
    let mut h = b.output_buf(m * n)?;
    b.activation_forward(Activation::Relu, In::all(&z), Out::all(&mut h))?;
    let mut dz = b.output_buf(m * n)?;
    let (zs, hs) = (In::all(&z), In::all(&h));
    b.activation_backward(Activation::Relu, zs, hs, In::all(dh), Out::all(&mut dz))?;
    let dw = product(b, (true, false), (k, m, n), x, &dz)?;
    let mut dbias = b.output_buf(n)?;
    b.column_sums(In::all(&dz), Out::all(&mut dbias))?;
    let dx = product(b, (false, true), (m, n, k), &dz, w)?;
    Ok([h, dw, dbias, dx])
}

/// op(a) op(c), m x k times k x n, into a buffer it makes.
fn product<B: Backend<f32>>(
    b: &B,
    (ta, tc): (bool, bool),
    (m, k, n): (usize, usize, usize),
    a: &B::Buf,
    c: &B::Buf,
) -> tessera_kernels::backend::Result<B::Buf> {
    let mut y = b.output_buf(m * n)?;
    b.gemm(
        ta,
        tc,
        m,
        k,
        n,
        1.0,
        In::all(a),
        In::all(c),
        0.0,
        Out::all(&mut y),
    )?;
    Ok(y)
}

/// The layer's parameters and upstream gradient, and two inputs.
fn layer_operands() -> ([Vec<f32>; 3], [Vec<f32>; 2]) {
    let shifted = |n: usize, by: f32| inputs(n).iter().map(|v| v - by).collect::<Vec<f32>>();
    (
        [shifted(48 * 32, 0.4), shifted(32, 0.5), inputs(64 * 32)],
        [shifted(64 * 48, 0.3), shifted(64 * 48, 0.6)],
    )
}

fn layer_outputs<B: Backend<f32>>(b: &B, outs: &[B::Buf; 4]) -> Vec<Vec<f32>> {
    outs.iter().map(|o| down(b, o)).collect()
}

/// A CUDA graph of the layer's step (`Gpu::capture`: kernels and cuBLAS GEMMs) replays it on
/// what its input buffer holds at each launch: the CPU's outputs for each of two inputs, and
/// for the first the bits of the same step run without a graph. While the graph lives, the
/// buffers it captured serve nothing else.
#[test]
fn a_captured_layer_step_replays_on_what_its_input_holds_at_each_launch() {
    let Some(gpu) = gpu() else { return };
    let cuda = Cuda::new(gpu);
    let ([w, bias, dh], xs) = layer_operands();
    let params = |b: &Cpu| (up(b, &w), up(b, &bias), up(b, &dh));
    let (cw, cb, cd) = params(&Cpu);
    let cpu: Vec<Vec<Vec<f32>>> = xs
        .iter()
        .map(|x| {
            layer_outputs(
                &Cpu,
                &layer_step(&Cpu, &up(&Cpu, x), (&cw, &cb, &cd)).unwrap(),
            )
        })
        .collect();
    let (gw, gb, gd) = (up(&cuda, &w), up(&cuda, &bias), up(&cuda, &dh));
    let mut x = up(&cuda, &xs[0]);
    // Run once first: the capture takes only buffers a run before it kept.
    let eager = layer_outputs(&cuda, &layer_step(&cuda, &x, (&gw, &gb, &gd)).unwrap());
    let (graph, outs) = cuda
        .gpu()
        .capture(|| layer_step(&cuda, &x, (&gw, &gb, &gd)))
        .unwrap();
    let address = |buf: &tessera_kernels::cuda_cache::DeviceBuf| {
        cudarc::driver::DevicePtr::device_ptr(buf, buf.stream()).0
    };
    let other = cuda.output_buf(64 * 32).unwrap();
    assert!(outs.iter().all(|o| address(o) != address(&other)));
    for (i, input) in xs.iter().enumerate() {
        cuda.write(input, Out::all(&mut x)).unwrap();
        graph.launch().unwrap();
        let replayed = layer_outputs(&cuda, &outs);
        for (j, (g, c)) in replayed.iter().zip(&cpu[i]).enumerate() {
            assert_close(&format!("input {i}, output {j}"), g, c, 1e-3, 1e-4);
        }
        if i == 0 {
            assert_eq!(replayed, eager, "a replay is the step's own bits");
        }
    }
}

/// A dropout mask and normal draws of one step, into buffers they make.
fn draws_at<B: Backend<f32>>(
    b: &B,
    x: &B::Buf,
    step: u64,
) -> tessera_kernels::backend::Result<[B::Buf; 2]> {
    let mut y = b.output_buf(1000)?;
    b.dropout(In::all(x), 0.3, 11, (step << 20) | 5, Out::all(&mut y))?;
    let mut z = b.output_buf(999)?;
    b.normal(11, (step << 20) | 6, Out::all(&mut z))?;
    Ok([y, z])
}

/// A captured step's draws follow the step set before each launch (`Gpu::set_draw_step`):
/// each replay draws what the same calls draw on the CPU at that step. A draw of another step
/// inside the capture fails it (the graph would set its step at every replay).
#[test]
fn a_captured_draw_follows_the_step_set_before_each_launch() {
    let Some(gpu) = gpu() else { return };
    let cuda = Cuda::new(gpu);
    let x = inputs(1000);
    let (gx, cx) = (up(&cuda, &x), up(&Cpu, &x));
    let cpu_at = |step| draws_at(&Cpu, &cx, step).unwrap().map(|o| down(&Cpu, &o));
    drop(draws_at(&cuda, &gx, 3).unwrap());
    let (graph, outs) = cuda.gpu().capture(|| draws_at(&cuda, &gx, 3)).unwrap();
    for step in [4, 9, 1 << 33, 3] {
        cuda.gpu().set_draw_step(step).unwrap();
        graph.launch().unwrap();
        let cpu = cpu_at(step);
        assert_close(
            &format!("dropout at {step}"),
            &down(&cuda, &outs[0]),
            &cpu[0],
            0.0,
            1e-7,
        );
        assert_close(
            &format!("normal at {step}"),
            &down(&cuda, &outs[1]),
            &cpu[1],
            1e-5,
            1e-5,
        );
    }
    assert_ne!(cpu_at(4), cpu_at(9), "steps draw differently");
    drop((graph, outs));
    let changes = cuda.gpu().capture(|| draws_at(&cuda, &gx, 5));
    assert!(
        matches!(&changes, Err(tessera_kernels::backend::EngineError::Cuda(
            tessera_kernels::cuda::CudaError::Capture(m))) if m.contains("from 3 to 5")),
        "{changes:?}"
    );
}

/// A captured step's KL weights follow the weight set before each launch
/// (`Gpu::set_kl_weight`), bit for bit the CPU's at that weight; another weight inside the
/// capture fails it.
#[test]
fn captured_kl_weights_follow_the_weight_set_before_each_launch() {
    let Some(gpu) = gpu() else { return };
    let cuda = Cuda::new(gpu);
    let shares = vec![1.0 / 1000.0; 1000];
    drop(cuda.kl_weights(&shares, 0.0).unwrap());
    let (graph, weights) = cuda
        .gpu()
        .capture(|| cuda.kl_weights(&shares, 0.0))
        .unwrap();
    for kl_weight in [0.0025, 1.0 / 3.0, 0.0, 1.0] {
        cuda.gpu().set_kl_weight(kl_weight).unwrap();
        graph.launch().unwrap();
        let cpu = down(&Cpu, &Cpu.kl_weights(&shares, kl_weight).unwrap());
        assert_close(
            &format!("KL weights at {kl_weight}"),
            &down(&cuda, &weights),
            &cpu,
            0.0,
            0.0,
        );
    }
    drop((graph, weights));
    let changes = cuda.gpu().capture(|| cuda.kl_weights(&shares, 0.5));
    assert!(
        matches!(&changes, Err(tessera_kernels::backend::EngineError::Cuda(
            tessera_kernels::cuda::CudaError::Capture(m))) if m.contains("from 1 to 0.5")),
        "{changes:?}"
    );
}

/// What a capture may not do (allocate, copy from or to pageable memory, wait for the device)
/// fails it, and the stream goes on as before: nothing captured ran or stays queued.
#[test]
fn a_capture_that_allocates_copies_pageable_memory_or_waits_fails() {
    let Some(gpu) = gpu() else { return };
    let allocates = gpu.capture(|| gpu.alloc::<f32>(123_457));
    let named = |m: &str| m.contains("493828 bytes");
    assert!(
        matches!(&allocates, Err(tessera_kernels::cuda::CudaError::Capture(m)) if named(m)),
        "{allocates:?}"
    );
    drop(gpu.alloc::<f32>(4).unwrap());
    // Refused by us, whatever the driver would do (CUDA may capture a copy from pageable
    // memory, which a replay would then read at an address given back).
    let ours = |m: &str| m.contains("inside a capture (a replay would copy");
    let uploads = gpu.capture(|| gpu.upload(&[1.0f32, 2.0, 3.0, 4.0]));
    assert!(
        matches!(&uploads, Err(tessera_kernels::cuda::CudaError::Capture(m)) if ours(m)),
        "{uploads:?}"
    );
    let kept = gpu.upload(&[5.0f32, 6.0]).unwrap();
    let reads = gpu.capture(|| gpu.download(&*kept));
    assert!(
        matches!(&reads, Err(tessera_kernels::cuda::CudaError::Capture(m)) if ours(m)),
        "{reads:?}"
    );
    let started = gpu.capture(|| gpu.start_download(&kept.slice(..)));
    assert!(
        matches!(&started, Err(tessera_kernels::cuda::CudaError::Capture(m)) if ours(m)),
        "{started:?}"
    );
    let cuda = Cuda::new(gpu);
    let ([w, bias, dh], xs) = layer_operands();
    let (cw, cb, cd) = (up(&Cpu, &w), up(&Cpu, &bias), up(&Cpu, &dh));
    let cpu = layer_step(&Cpu, &up(&Cpu, &xs[0]), (&cw, &cb, &cd)).unwrap();
    let (gw, gb, gd) = (up(&cuda, &w), up(&cuda, &bias), up(&cuda, &dh));
    let outs = layer_step(&cuda, &up(&cuda, &xs[0]), (&gw, &gb, &gd)).unwrap();
    for (g, c) in layer_outputs(&cuda, &outs)
        .iter()
        .zip(layer_outputs(&Cpu, &cpu))
    {
        assert_close("after the failed captures", g, &c, 1e-3, 1e-4);
    }
    assert_eq!(cuda.gpu().download(&*kept).unwrap(), vec![5.0, 6.0]);
}

/// TF32 and bf16 tensor cores (`Gpu::with_matmul`) against the CPU's f32 GEMM of the inputs
/// rounded as the tensor cores read them; also prints how far each lands from the f32 product
/// (whether cuBLAS used the tensor cores at all is its choice per shape).
#[test]
fn tensor_core_gemms_match_cpu_on_rounded_inputs() {
    for precision in [MatmulPrecision::High, MatmulPrecision::Medium] {
        let Some(gpu) = gpu() else { return };
        let cuda = Cuda::new(gpu.with_matmul(precision));
        let first = gemms_at(&cuda, precision, false);
        compare(&gemms_at(&Cpu, precision, true), &first, false);
        compare(&first, &gemms_at(&cuda, precision, false), true);
        let exact = gemms_at(&Cpu, MatmulPrecision::Highest, false);
        for (g, c) in first.iter().zip(&exact) {
            let worst = g
                .values
                .iter()
                .zip(&c.values)
                .map(|(g, c)| (g - c).abs() / c.abs().max(1.0))
                .fold(0f32, f32::max);
            eprintln!(
                "{}: largest relative difference from f32 {worst:.2e}",
                g.what
            );
        }
    }
}

fn optimiser<B: Backend<f32>>(b: &B) -> Vec<Output> {
    let n = (1 << 20) + 5;
    let mut out = Vec::new();
    // Adam's L2 term and AdamW's decoupled decay.
    for decoupled in [false, true] {
        let opt = AdamW {
            lr: 1e-2,
            weight_decay: 1e-2,
            decoupled,
            ..AdamW::default()
        };
        let (mut p, mut m, mut v) = (up(b, &inputs(n)), zeros(b, n), zeros(b, n));
        // Step 2 runs under a zero flag (applied), step 3 first under a set one (skipped on the
        // device: nothing changes), then without.
        for (t, skip) in [(1u64, None), (2, Some(0.0)), (3, Some(1.0)), (3, None)] {
            let flag = skip.map(|f| up(b, &[f]));
            let g = up(
                b,
                &inputs(n).iter().map(|x| x * t as f32).collect::<Vec<_>>(),
            );
            let before = [down(b, &p), down(b, &m), down(b, &v)];
            b.adamw_step(
                &opt,
                t,
                Out::all(&mut p),
                In::all(&g),
                Out::all(&mut m),
                Out::all(&mut v),
                flag.as_ref().map(In::all),
            )
            .unwrap();
            let after = [down(b, &p), down(b, &m), down(b, &v)];
            assert_eq!(
                before == after,
                skip == Some(1.0),
                "step {t} under {skip:?}"
            );
        }
        out.push(output(
            format!("adam(decoupled={decoupled}) params"),
            down(b, &p),
            1e-6,
            1e-5,
        ));
        out.push(output(
            format!("adam(decoupled={decoupled}) v"),
            down(b, &v),
            1e-9,
            1e-5,
        ));
    }
    let norm = b.grad_norm(In::all(&up(b, &inputs(n)))).unwrap();
    // The norm is summed in f64 over the same chunks in the same order on both sides.
    out.push(output("gradient norm", vec![norm as f32], 0.0, 1e-7));
    // The step's finiteness flag: clean, a NaN in the last entry, an infinity in the middle.
    let mut flags = Vec::new();
    for (at, bad) in [
        (None, 0.0),
        (Some(n - 1), f32::NAN),
        (Some(n / 2), f32::INFINITY),
    ] {
        let mut x = inputs(n);
        if let Some(i) = at {
            x[i] = bad;
        }
        let mut flag = up(b, &[0.5]);
        b.flag_non_finite(In::all(&up(b, &x)), Out::all(&mut flag))
            .unwrap();
        flags.extend(down(b, &flag));
    }
    assert_eq!(flags, [0.0, 1.0, 1.0], "{}", b.name());
    out.push(output("non-finite flags", flags, 0.0, 0.0));
    out
}

#[test]
fn adamw_and_gradient_norm_match_cpu() {
    parity(optimiser, optimiser);
}

/// Dropout masks and normal draws: the same counter-based Philox stream on both devices.
fn random<B: Backend<f32>>(b: &B) -> Vec<Output> {
    let n = (1 << 20) + 3;
    let x = up(b, &inputs(n));
    let mut y = zeros(b, n);
    b.dropout(In::all(&x), 0.25, 42, 3, Out::all(&mut y))
        .unwrap();
    let mut eps = zeros(b, n + 10);
    b.normal(42, 7, Out::part(&mut eps, 10..n + 10)).unwrap();
    // Streams with high bits (a step, as models number them; past 2^32 too, which a GPU
    // reads from device memory), then a low one again.
    let mut late = Vec::new();
    for stream in [(7 << 20) | 3, (5_000_000_123 << 20) | 4, 3] {
        let mut z = zeros(b, 1000);
        b.dropout(In::part(&x, 0..1000), 0.25, 42, stream, Out::all(&mut z))
            .unwrap();
        late.extend(down(b, &z));
        b.normal(42, stream, Out::all(&mut z)).unwrap();
        late.extend(down(b, &z));
    }
    // The same elements dropped, the same scaled values; normals differ only by log/cos rounding.
    vec![
        output("dropout", down(b, &y), 0.0, 1e-7),
        output("normal", down(b, &eps), 1e-5, 1e-5),
        output("draws at later steps", late, 1e-5, 1e-5),
    ]
}

#[test]
fn dropout_and_normal_draws_match_cpu() {
    parity(random, random);
}

fn gaussians<B: Backend<f32>>(b: &B) -> Vec<Output> {
    let (rows, dim) = (1024, 50);
    let n = rows * dim;
    let mut out = Vec::new();
    let (m, lv) = (
        up(b, &inputs(n)),
        up(b, &inputs(n).iter().map(|v| v * 0.5).collect::<Vec<_>>()),
    );
    let (eps, dz) = (
        up(b, &inputs(n).iter().rev().copied().collect::<Vec<_>>()),
        up(b, &inputs(n)),
    );
    let w = up(b, &(0..rows).map(|r| (r % 3) as f32).collect::<Vec<_>>());
    let (mut z, mut dm, mut dlv) = (zeros(b, n), zeros(b, n), zeros(b, n));
    b.reparameterize_forward(In::all(&m), In::all(&lv), In::all(&eps), Out::all(&mut z))
        .unwrap();
    b.reparameterize_backward(
        In::all(&lv),
        In::all(&eps),
        In::all(&dz),
        Out::all(&mut dm),
        Out::all(&mut dlv),
    )
    .unwrap();
    out.push(output("z", down(b, &z), 1e-6, 1e-5));
    out.push(output("dlv", down(b, &dlv), 1e-6, 1e-5));
    let (mut kl, mut km, mut klv) = (zeros(b, rows), zeros(b, n), zeros(b, n));
    b.kl_standard_normal(
        In::all(&m),
        In::all(&lv),
        dim,
        Some(In::all(&w)),
        Out::all(&mut kl),
        Out::all(&mut km),
        Out::all(&mut klv),
    )
    .unwrap();
    out.push(output("kl", down(b, &kl), 1e-5, 1e-5));
    out.push(output("kl dlv", down(b, &klv), 1e-6, 1e-5));
    let (m2, lv2) = (
        up(
            b,
            &inputs(n).iter().rev().map(|v| v * 0.7).collect::<Vec<_>>(),
        ),
        up(b, &inputs(n).iter().map(|v| v * -0.3).collect::<Vec<_>>()),
    );
    let mut jv = zeros(b, rows);
    let mut jg: [B::Buf; 4] = std::array::from_fn(|_| zeros(b, n));
    {
        let [a, c, d, e] = &mut jg;
        b.jeffreys(
            In::all(&m),
            In::all(&lv),
            In::all(&m2),
            In::all(&lv2),
            dim,
            In::all(&w),
            Out::all(&mut jv),
            [Out::all(a), Out::all(c), Out::all(d), Out::all(e)],
        )
        .unwrap();
    }
    out.push(output("jeffreys", down(b, &jv), 1e-4, 1e-5));
    for (k, g) in jg.iter().enumerate() {
        out.push(output(
            format!("jeffreys gradient {k}"),
            down(b, g),
            1e-5,
            1e-5,
        ));
    }
    // Product of two experts and the prior, each expert missing for some cells.
    let (rows, dim) = (777, 20);
    let n = rows * dim;
    let means = [
        up(b, &inputs(n)),
        up(b, &inputs(n).iter().rev().copied().collect::<Vec<_>>()),
    ];
    let logvars = [
        up(b, &inputs(n).iter().map(|v| v * 0.5).collect::<Vec<_>>()),
        up(b, &inputs(n).iter().map(|v| -v).collect::<Vec<_>>()),
    ];
    let present = [
        up(
            b,
            &(0..rows)
                .map(|r| f32::from(u8::from(r % 3 != 0)))
                .collect::<Vec<_>>(),
        ),
        up(
            b,
            &(0..rows)
                .map(|r| f32::from(u8::from(r % 5 != 0)))
                .collect::<Vec<_>>(),
        ),
    ];
    fn ins<S: tessera_kernels::backend::Storage>(xs: &[S; 2]) -> [In<'_, S>; 2] {
        [In::all(&xs[0]), In::all(&xs[1])]
    }
    let (mut pm, mut plv) = (zeros(b, n), zeros(b, n));
    b.poe_forward(
        &ins(&means),
        &ins(&logvars),
        &ins(&present),
        dim,
        Out::all(&mut pm),
        Out::all(&mut plv),
    )
    .unwrap();
    let (gm, gl) = (
        up(b, &inputs(n)),
        up(b, &inputs(n).iter().map(|v| v * 2.0).collect::<Vec<_>>()),
    );
    let mut dmeans: [B::Buf; 2] = std::array::from_fn(|_| zeros(b, n));
    let mut dlogvars: [B::Buf; 2] = std::array::from_fn(|_| zeros(b, n));
    {
        let [a, c] = &mut dmeans;
        let [d, e] = &mut dlogvars;
        b.poe_backward(
            &ins(&means),
            &ins(&logvars),
            &ins(&present),
            dim,
            In::all(&pm),
            In::all(&plv),
            In::all(&gm),
            In::all(&gl),
            &mut [Out::all(a), Out::all(c)],
            &mut [Out::all(d), Out::all(e)],
        )
        .unwrap();
    }
    out.push(output("poe m", down(b, &pm), 1e-6, 1e-5));
    out.push(output("poe lv", down(b, &plv), 1e-6, 1e-5));
    for e in 0..2 {
        out.push(output(
            format!("poe dmean {e}"),
            down(b, &dmeans[e]),
            1e-6,
            1e-5,
        ));
        out.push(output(
            format!("poe dlogvar {e}"),
            down(b, &dlogvars[e]),
            1e-6,
            1e-5,
        ));
    }
    out
}

#[test]
fn gaussian_ops_match_cpu() {
    parity(gaussians, gaussians);
}

fn batch_norm<B: Backend<f32>>(b: &B) -> Vec<Output> {
    let (rows, f) = (512, 128);
    let (x, dy) = (
        up(b, &inputs(rows * f)),
        up(
            b,
            &inputs(rows * f).iter().rev().copied().collect::<Vec<_>>(),
        ),
    );
    // γ and β side by side, as in a parameter buffer; running mean 0 and variance 1.
    let gamma_beta = up(
        b,
        &[
            inputs(f).iter().map(|v| v + 1.0).collect::<Vec<_>>(),
            inputs(f),
        ]
        .concat(),
    );
    let (gamma, beta) = (In::part(&gamma_beta, 0..f), In::part(&gamma_beta, f..2 * f));
    let mut running = up(b, &[vec![0.0; f], vec![1.0; f]].concat());
    let (mut y, mut xhat, mut inv_std) = (zeros(b, rows * f), zeros(b, rows * f), zeros(b, f));
    b.batch_norm_train(
        In::all(&x),
        gamma.clone(),
        beta.clone(),
        Out::all(&mut running),
        0.1,
        1e-3,
        Out::all(&mut y),
        Out::all(&mut xhat),
        Out::all(&mut inv_std),
    )
    .unwrap();
    let (mut dx, mut dgb) = (zeros(b, rows * f), zeros(b, 2 * f));
    b.batch_norm_backward(
        In::all(&xhat),
        In::all(&inv_std),
        gamma.clone(),
        In::all(&dy),
        Out::all(&mut dx),
        Out::all(&mut dgb),
    )
    .unwrap();
    let mut ye = zeros(b, rows * f);
    b.batch_norm_eval(
        In::all(&x),
        gamma,
        beta,
        In::all(&running),
        1e-3,
        Out::all(&mut ye),
    )
    .unwrap();
    vec![
        output("batch norm y", down(b, &y), 1e-5, 1e-4),
        output("batch norm dx", down(b, &dx), 1e-4, 1e-3),
        output("batch norm dgamma, dbeta", down(b, &dgb), 1e-3, 1e-4),
        output("running statistics", down(b, &running), 1e-6, 1e-5),
        output("batch norm eval", down(b, &ye), 1e-5, 1e-4),
    ]
}

#[test]
fn batch_norm_matches_cpu() {
    parity(batch_norm, batch_norm);
}

/// LayerNorm (scvi-tools' FCLayers: no affine map): output, 1/σ and the input gradient, over
/// rows of one feature (constant), 128 and 1,000 features.
fn layer_norm<B: Backend<f32>>(b: &B) -> Vec<Output> {
    let mut out = Vec::new();
    for (rows, f) in [(7, 1), (512, 128), (33, 1000)] {
        let x = up(b, &inputs(rows * f));
        let dy = up(
            b,
            &inputs(rows * f).iter().rev().copied().collect::<Vec<_>>(),
        );
        let (mut y, mut inv, mut dx) = (zeros(b, rows * f), zeros(b, rows), zeros(b, rows * f));
        b.layer_norm_forward(In::all(&x), f, 1e-5, Out::all(&mut y), Out::all(&mut inv))
            .unwrap();
        b.layer_norm_backward(In::all(&y), In::all(&inv), In::all(&dy), Out::all(&mut dx))
            .unwrap();
        out.push(output(
            format!("layer norm {rows}x{f} y"),
            down(b, &y),
            1e-5,
            1e-4,
        ));
        out.push(output(
            format!("layer norm {rows}x{f} 1/σ"),
            down(b, &inv),
            1e-3,
            1e-4,
        ));
        out.push(output(
            format!("layer norm {rows}x{f} dx"),
            down(b, &dx),
            1e-3,
            1e-3,
        ));
    }
    out
}

#[test]
fn layer_norm_matches_cpu() {
    parity(layer_norm, layer_norm);
}

fn losses<B: Backend<f32>>(b: &B) -> Vec<Output> {
    let mut out = Vec::new();
    // Cross-entropy with unlabelled rows: labels from the host, then the same as f32 codes on
    // the device (what a staged or captured step reads); and a batch with no label.
    let (rows, classes) = (1000, 12);
    let logits = up(b, &inputs(rows * classes));
    let labels: Vec<i32> = (0..rows as i32)
        .map(|r| if r % 7 == 0 { -1 } else { r % 12 })
        .collect();
    let codes = |labels: &[i32]| up(b, &labels.iter().map(|&l| l as f32).collect::<Vec<_>>());
    let (on_device, none) = (codes(&labels), codes(&vec![-1; rows]));
    let cases = [
        ("host labels", Labels::Host(&labels)),
        ("device labels", Labels::Device(In::all(&on_device))),
        ("no label", Labels::Device(In::all(&none))),
    ];
    for (what, labels) in cases {
        let (mut d, mut loss) = (zeros(b, rows * classes), up(b, &[f32::NAN]));
        b.cross_entropy(
            In::all(&logits),
            labels,
            classes,
            Out::all(&mut d),
            Out::all(&mut loss),
        )
        .unwrap();
        out.push(scalar(
            format!("cross entropy, {what}"),
            f64::from(down(b, &loss)[0]),
            1e-5,
        ));
        out.push(output(
            format!("cross entropy grad, {what}"),
            down(b, &d),
            1e-7,
            1e-5,
        ));
    }
    // Masked squared error.
    let pred = up(b, &inputs(500));
    let targets: Vec<f64> = (0..500)
        .map(|i| {
            if i % 9 == 0 {
                f64::NAN
            } else {
                (i % 13) as f64 * 0.1
            }
        })
        .collect();
    let (mut dp, mut mse) = (zeros(b, 500), zeros(b, 1));
    let observed = b
        .masked_mse(
            In::all(&pred),
            &targets,
            Out::all(&mut dp),
            Out::all(&mut mse),
        )
        .unwrap();
    out.push(output(
        format!("mse, {observed} observed"),
        down(b, &mse),
        1e-6,
        1e-5,
    ));
    out.push(output("mse grad", down(b, &dp), 1e-7, 1e-5));
    // MMD between two groups of latents.
    let dim = 10;
    let (x, y) = (
        up(b, &inputs(200 * dim)),
        up(
            b,
            &inputs(150 * dim)
                .iter()
                .map(|v| v + 0.3)
                .collect::<Vec<_>>(),
        ),
    );
    let (mut dx, mut dy, mut mmd) = (zeros(b, 200 * dim), zeros(b, 150 * dim), zeros(b, 1));
    b.mmd_rbf(
        In::all(&x),
        In::all(&y),
        dim,
        &[0.5, 1.0, 2.0, 4.0],
        Out::all(&mut dx),
        Out::all(&mut dy),
        Out::all(&mut mmd),
    )
    .unwrap();
    out.push(output("mmd", down(b, &mmd), 1e-6, 1e-4));
    out.push(output("mmd dx", down(b, &dx), 1e-6, 1e-3));
    out.push(output("mmd dy", down(b, &dy), 1e-6, 1e-3));
    // Cosine margin, on host labels and on the same as f32 codes on the device.
    let z = up(b, &inputs(128 * 16));
    let lab: Vec<i32> = (0..128)
        .map(|i| if i % 11 == 0 { -1 } else { i % 4 })
        .collect();
    let lab_on_device = codes(&lab);
    for (what, labels) in [
        ("host labels", Labels::Host(&lab)),
        ("device labels", Labels::Device(In::all(&lab_on_device))),
    ] {
        let (mut dz, mut cos) = (zeros(b, 128 * 16), zeros(b, 1));
        b.cosine_margin(
            In::all(&z),
            labels,
            16,
            0.1,
            Out::all(&mut dz),
            Out::all(&mut cos),
        )
        .unwrap();
        out.push(output(
            format!("cosine margin, {what}"),
            down(b, &cos),
            1e-6,
            1e-4,
        ));
        out.push(output(
            format!("cosine grad, {what}"),
            down(b, &dz),
            1e-6,
            1e-3,
        ));
    }
    // Cox.
    let eta = up(b, &inputs(300));
    let times: Vec<f64> = (0..300).map(|i| ((i * 37) % 101) as f64).collect();
    let events: Vec<bool> = (0..300).map(|i| i % 3 != 0).collect();
    let (mut de, mut cox) = (zeros(b, 300), zeros(b, 1));
    b.cox_partial_likelihood(
        In::all(&eta),
        &times,
        &events,
        Out::all(&mut de),
        Out::all(&mut cox),
    )
    .unwrap();
    out.push(output("cox", down(b, &cox), 1e-6, 1e-4));
    out.push(output("cox grad", down(b, &de), 1e-6, 1e-3));
    out
}

#[test]
fn losses_match_cpu() {
    parity(losses, losses);
}

/// |gpu − cpu| <= tol · (1 + |cpu|), entry by entry, in f64.
fn assert_close64(what: &str, gpu: &[f64], cpu: &[f64], tol: f64) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(
            (g - c).abs() <= tol * (1.0 + c.abs()),
            "{what}[{i}]: gpu {g} vs cpu {c}"
        );
    }
}

#[test]
fn snf_affinity_and_sparse_product_match_cpu() {
    use tessera_kernels::ops::affinity::{self, gpu as agpu};
    let Some(gpu) = gpu() else { return };
    let stream = gpu.stream();
    let (n, d, rows) = (300usize, 20usize, 120..270usize);
    let x: Vec<f64> = (0..n * d)
        .map(|e| ((e * 37 % 101) as f64 - 50.0) / 17.0)
        .collect();
    // Distances of a row block: the GEMM's −2 X_rows Xᵀ, then the epilogue on each side.
    let mut cpu = vec![0.0; rows.len() * n];
    affinity::sq_euclidean_rows(&x, n, d, rows.clone(), &mut cpu);
    let mut raw = vec![0.0; rows.len() * n];
    <f64 as Gemm>::gemm(
        false,
        true,
        rows.len(),
        d,
        n,
        -2.0,
        &x[rows.start * d..rows.end * d],
        &x,
        0.0,
        &mut raw,
    );
    let norms: Vec<f64> = x.chunks(d).map(|r| r.iter().map(|v| v * v).sum()).collect();
    let mut dd = stream.clone_htod(&raw).unwrap();
    agpu::sq_distance_finish(
        &gpu,
        &mut dd,
        &stream.clone_htod(&norms).unwrap(),
        rows.start,
        n,
    )
    .unwrap();
    assert_close64(
        "squared distances",
        &stream.clone_dtoh(&dd).unwrap(),
        &cpu,
        1e-13,
    );
    // The scaled exponential affinity of those rows.
    let near_rows = affinity::mean_nearest(&cpu, n, 20);
    let near_all: Vec<f64> = (0..n).map(|j| 1.0 + (j % 7) as f64).collect();
    let mut dd = stream.clone_htod(&cpu).unwrap();
    affinity::exponential_rows(&mut cpu, n, &near_rows, &near_all, 0.5);
    agpu::exponential_rows(
        &gpu,
        &mut dd,
        &stream.clone_htod(&near_rows).unwrap(),
        &stream.clone_htod(&near_all).unwrap(),
        0.5,
    )
    .unwrap();
    assert_close64("affinity", &stream.clone_dtoh(&dd).unwrap(), &cpu, 1e-13);
    // SNF's sparse product (S·X)ᵀ with 7 entries per row, n not a multiple of the 32-tile.
    let n = 333;
    let (mut indptr, mut cols, mut vals) = (vec![0u64], Vec::new(), Vec::new());
    for j in 0..n {
        for t in 0..7 {
            cols.push(((j * 13 + t * 47) % n) as u32);
            vals.push(1.0 / (1.0 + t as f64 + (j % 5) as f64));
        }
        indptr.push(cols.len() as u64);
    }
    let m: Vec<f64> = (0..n * n)
        .map(|e| ((e * 7919 % 1009) as f64) / 1009.0)
        .collect();
    let mut cpu = vec![0.0; n * n];
    affinity::sparse_times_dense_transposed(&indptr, &cols, &vals, &m, n, 0.5, &mut cpu);
    let mut out = stream.alloc_zeros::<f64>(n * n).unwrap();
    agpu::sparse_times_dense_transposed(
        &gpu,
        &stream.clone_htod(&indptr).unwrap(),
        &stream.clone_htod(&cols).unwrap(),
        &stream.clone_htod(&vals).unwrap(),
        &stream.clone_htod(&m).unwrap(),
        n,
        0.5,
        &mut out,
    )
    .unwrap();
    assert_close64("(S X)^T", &stream.clone_dtoh(&out).unwrap(), &cpu, 1e-13);
}
