//! The CUDA kernels against the CPU references. NVRTC compilation of every `.cu` runs wherever
//! libnvrtc is found (CI installs it from the NVIDIA pip wheel; `TESSERA_REQUIRE_NVRTC=1` makes
//! its absence a failure). Parity tests need a GPU and say SKIPPED, with the reason, without one.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use tessera_kernels::cuda::{Gpu, compile, nvrtc_present, sources};
use tessera_kernels::ops::{dropout, gaussian, losses, norm};
use tessera_kernels::ops::elementwise::{self, Activation};
use tessera_kernels::ops::likelihood::{self, Likelihood};
use tessera_kernels::ops::linear::{self, Gemm};
use tessera_kernels::ops::optim::{self, AdamW};

fn gpu() -> Option<Gpu> {
    match Gpu::new(0) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            eprintln!("SKIPPED: CPU/GPU parity needs a CUDA device: {e}");
            None
        }
    }
}

/// |gpu - cpu| <= atol + rtol * |cpu|, entry by entry.
fn assert_close(what: &str, gpu: &[f32], cpu: &[f32], atol: f32, rtol: f32) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert!((g - c).abs() <= atol + rtol * c.abs(), "{what}[{i}]: gpu {g} vs cpu {c}");
    }
}

#[test]
fn every_cuda_source_compiles_with_nvrtc() {
    if !nvrtc_present() {
        assert!(std::env::var("TESSERA_REQUIRE_NVRTC").as_deref() != Ok("1"), "TESSERA_REQUIRE_NVRTC=1 but libnvrtc is not on LD_LIBRARY_PATH");
        eprintln!("SKIPPED: libnvrtc not found; the .cu sources were not compiled");
        return;
    }
    for (name, source) in sources() {
        compile(name, source).unwrap_or_else(|e| panic!("{e}"));
    }
    // The check can fail: a broken source is an error carrying NVRTC's log.
    let err = compile("broken", "extern \"C\" __global__ void k() { undeclared(); }").unwrap_err().to_string();
    assert!(err.contains("broken.cu") && err.contains("undeclared"), "{err}");
}

fn inputs(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 * 0.7311).sin() * 4.0) + 0.01).collect()
}

#[test]
fn activations_match_cpu() {
    let Some(gpu) = gpu() else { return };
    for n in [1, 31, 1025, 1 << 20] {
        let x = inputs(n);
        let dy: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).cos()).collect();
        for act in [Activation::Relu, Activation::LeakyRelu(0.2), Activation::Elu(1.0), Activation::Softplus, Activation::Exp, Activation::Sigmoid, Activation::Log1p] {
            // log1p is defined above -1: its inputs are folded to [0, ∞).
            let x: Vec<f32> = if act == Activation::Log1p { x.iter().map(|v| v.abs()).collect() } else { x.clone() };
            let (mut y, mut dx) = (vec![0.0; n], vec![0.0; n]);
            act.forward(&x, &mut y);
            act.backward(&x, &y, &dy, &mut dx);
            let (xd, dyd) = (gpu.upload(&x).unwrap(), gpu.upload(&dy).unwrap());
            let (mut yd, mut dxd) = (gpu.zeros(n).unwrap(), gpu.zeros(n).unwrap());
            elementwise::gpu::activation_forward(&gpu, act, &xd, &mut yd).unwrap();
            elementwise::gpu::activation_backward(&gpu, act, &xd, &yd, &dyd, &mut dxd).unwrap();
            assert_close(&format!("{act:?} forward n={n}"), &gpu.download(&yd).unwrap(), &y, 1e-6, 1e-5);
            assert_close(&format!("{act:?} backward n={n}"), &gpu.download(&dxd).unwrap(), &dx, 1e-6, 1e-5);
        }
    }
}

#[test]
fn bias_and_column_sums_match_cpu() {
    let Some(gpu) = gpu() else { return };
    for (rows, cols) in [(1, 1), (7, 31), (1024, 1025)] {
        let m = inputs(rows * cols);
        let bias = inputs(cols);
        let (mut y, mut sums) = (m.clone(), vec![0.0; cols]);
        elementwise::bias_add_forward(&mut y, &bias);
        elementwise::column_sums(&m, &mut sums);
        let mut yd = gpu.upload(&m).unwrap();
        elementwise::gpu::bias_add_forward(&gpu, &mut yd, &gpu.upload(&bias).unwrap()).unwrap();
        let mut sd = gpu.zeros(cols).unwrap();
        elementwise::gpu::column_sums(&gpu, &gpu.upload(&m).unwrap(), &mut sd).unwrap();
        assert_close("bias add", &gpu.download(&yd).unwrap(), &y, 1e-6, 1e-6);
        // Same summation order on both sides: equal up to f32 rounding of the loop itself.
        assert_close("column sums", &gpu.download(&sd).unwrap(), &sums, 1e-4, 1e-5);
    }
}

#[test]
fn likelihoods_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let (rows, features) = (64, 1025);
    let n = rows * features;
    for family in [Likelihood::NegativeBinomial, Likelihood::ZeroInflatedNegativeBinomial, Likelihood::Poisson, Likelihood::Gaussian, Likelihood::Bernoulli] {
        let x: Vec<f32> = (0..n).map(|i| match family {
            Likelihood::Gaussian => (i as f32 * 0.37).sin(),
            Likelihood::Bernoulli => (i % 3 == 0) as i32 as f32,
            _ => [0.0, 0.0, 1.0, 3.0, 0.0, 17.0, 250.0][i % 7],
        }).collect();
        let params: Vec<Vec<f32>> = (0..family.n_params()).map(|k| (0..if k == 1 { features } else { n }).map(|i| {
            let t = (i as f32 * 0.913 + k as f32).sin();
            match (family, k) {
                (Likelihood::Gaussian | Likelihood::Bernoulli, _) | (Likelihood::ZeroInflatedNegativeBinomial, 2) => t,
                _ => (t * 1.5).exp() * 2.0,
            }
        }).collect()).collect();
        let weights: Vec<f32> = (0..rows).map(|r| (r % 2) as f32).collect();
        let refs: Vec<&[f32]> = params.iter().map(Vec::as_slice).collect();
        let mut ll = vec![0.0; rows];
        let mut grads: Vec<Vec<f32>> = vec![vec![0.0; n]; params.len()];
        let mut gm: Vec<&mut [f32]> = grads.iter_mut().map(Vec::as_mut_slice).collect();
        family.forward_backward(&x, features, &refs, Some(&weights), &mut ll, &mut gm);

        let xd = gpu.upload(&x).unwrap();
        let pd: Vec<_> = params.iter().map(|p| gpu.upload(p).unwrap()).collect();
        let pr: Vec<_> = pd.iter().collect();
        let wd = gpu.upload(&weights).unwrap();
        let mut lld = gpu.zeros(rows).unwrap();
        let mut gd: Vec<_> = (0..params.len()).map(|_| gpu.zeros(n).unwrap()).collect();
        let mut gr: Vec<_> = gd.iter_mut().collect();
        likelihood::gpu::forward_backward(&gpu, family, &xd, features, &pr, Some(&wd), &mut lld, &mut gr).unwrap();
        assert_close(&format!("{family:?} ll"), &gpu.download(&lld).unwrap(), &ll, 1e-2, 1e-4);
        for (k, g) in grads.iter().enumerate() {
            assert_close(&format!("{family:?} grad {k}"), &gpu.download(&gd[k]).unwrap(), g, 1e-5, 1e-4);
        }
    }
}

#[test]
fn dropout_masks_are_identical() {
    let Some(gpu) = gpu() else { return };
    let n = (1 << 20) + 3;
    let x = inputs(n);
    let mut y = vec![0.0; n];
    dropout::dropout_forward(&x, 0.25, 42, 3, &mut y);
    let mut yd = gpu.zeros(n).unwrap();
    dropout::gpu::dropout_forward(&gpu, &gpu.upload(&x).unwrap(), 0.25, 42, 3, &mut yd).unwrap();
    // Same counter-based draws: the same elements dropped, the same scaled values.
    assert_close("dropout", &gpu.download(&yd).unwrap(), &y, 0.0, 1e-7);
}

#[test]
fn cublas_gemm_matches_cpu_for_every_transpose() {
    let Some(gpu) = gpu() else { return };
    for (m, k, n) in [(1, 1, 1), (31, 1025, 7), (1024, 512, 2000)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (a, b) = (inputs(m * k), inputs(k * n));
            let mut c = inputs(m * n);
            let cd0 = gpu.upload(&c).unwrap();
            f32::gemm(ta, tb, m, k, n, 1.5, &a, &b, 0.5, &mut c);
            let mut cd = cd0;
            linear::gpu::gemm(&gpu, ta, tb, m, k, n, 1.5, &gpu.upload(&a).unwrap(), &gpu.upload(&b).unwrap(), 0.5, &mut cd).unwrap();
            // Different summation orders: tolerance grows with k.
            assert_close(&format!("gemm ta={ta} tb={tb} {m}x{k}x{n}"), &gpu.download(&cd).unwrap(), &c, 1e-3 * (k as f32).sqrt(), 1e-4);
        }
    }
}

#[test]
fn adamw_and_clipping_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let n = (1 << 20) + 5;
    let opt = AdamW { lr: 1e-2, weight_decay: 1e-2, ..AdamW::default() };
    let (mut p, mut m, mut v) = (inputs(n), vec![0.0f32; n], vec![0.0f32; n]);
    let (mut pd, mut md, mut vd) = (gpu.upload(&p).unwrap(), gpu.zeros(n).unwrap(), gpu.zeros(n).unwrap());
    for t in 1..=3u64 {
        let g: Vec<f32> = inputs(n).iter().map(|x| x * t as f32).collect();
        opt.step(t, &mut p, &g, &mut m, &mut v);
        optim::gpu::adamw_step(&gpu, &opt, t, &mut pd, &gpu.upload(&g).unwrap(), &mut md, &mut vd).unwrap();
    }
    assert_close("adamw params", &gpu.download(&pd).unwrap(), &p, 1e-6, 1e-5);
    let mut g = inputs(n);
    let mut gd = gpu.upload(&g).unwrap();
    let cpu_norm = optim::clip_grad_norm(&mut g, 1.0);
    let gpu_norm = optim::gpu::clip_grad_norm(&gpu, &mut gd, 1.0).unwrap();
    assert!((cpu_norm - gpu_norm).abs() <= 1e-9 * cpu_norm, "norm {gpu_norm} vs {cpu_norm}");
    assert_close("clipped", &gpu.download(&gd).unwrap(), &g, 1e-7, 1e-6);
}

#[test]
fn softmax_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    for (rows, f) in [(1, 1), (64, 31), (1024, 2000)] {
        let (x, dy) = (inputs(rows * f), inputs(rows * f).iter().map(|v| v * 0.5).collect::<Vec<_>>());
        let (mut y, mut dx) = (vec![0.0; rows * f], vec![0.0; rows * f]);
        norm::softmax_forward(&x, f, &mut y);
        norm::softmax_backward(&y, &dy, f, &mut dx);
        let (mut yd, mut dxd) = (gpu.zeros(rows * f).unwrap(), gpu.zeros(rows * f).unwrap());
        norm::gpu::softmax_forward(&gpu, &gpu.upload(&x).unwrap(), f, &mut yd).unwrap();
        norm::gpu::softmax_backward(&gpu, &yd, &gpu.upload(&dy).unwrap(), f, &mut dxd).unwrap();
        assert_close("softmax", &gpu.download(&yd).unwrap(), &y, 1e-7, 1e-5);
        assert_close("softmax backward", &gpu.download(&dxd).unwrap(), &dx, 1e-7, 1e-4);
    }
}

#[test]
fn gaussian_ops_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let (rows, dim) = (1024, 50);
    let n = rows * dim;
    let (m, lv, eps, dz) = (inputs(n), inputs(n).iter().map(|v| v * 0.5).collect::<Vec<_>>(), inputs(n).iter().rev().copied().collect::<Vec<_>>(), inputs(n));
    let w: Vec<f32> = (0..rows).map(|r| (r % 3) as f32).collect();
    let (mut z, mut dm, mut dlv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    gaussian::reparameterize_forward(&m, &lv, &eps, &mut z);
    gaussian::reparameterize_backward(&lv, &eps, &dz, &mut dm, &mut dlv);
    let (md, lvd, epsd) = (gpu.upload(&m).unwrap(), gpu.upload(&lv).unwrap(), gpu.upload(&eps).unwrap());
    let (mut zd, mut dmd, mut dlvd) = (gpu.zeros(n).unwrap(), gpu.zeros(n).unwrap(), gpu.zeros(n).unwrap());
    gaussian::gpu::reparameterize_forward(&gpu, &md, &lvd, &epsd, &mut zd).unwrap();
    gaussian::gpu::reparameterize_backward(&gpu, &lvd, &epsd, &gpu.upload(&dz).unwrap(), &mut dmd, &mut dlvd).unwrap();
    assert_close("z", &gpu.download(&zd).unwrap(), &z, 1e-6, 1e-5);
    assert_close("dlv", &gpu.download(&dlvd).unwrap(), &dlv, 1e-6, 1e-5);
    let (mut kl, mut km, mut kl_lv) = (vec![0.0; rows], vec![0.0; n], vec![0.0; n]);
    gaussian::kl_standard_normal(&m, &lv, dim, Some(&w), &mut kl, &mut km, &mut kl_lv);
    let (mut kld, mut kmd, mut klvd) = (gpu.zeros(rows).unwrap(), gpu.zeros(n).unwrap(), gpu.zeros(n).unwrap());
    gaussian::gpu::kl_standard_normal(&gpu, &md, &lvd, dim, Some(&gpu.upload(&w).unwrap()), &mut kld, &mut kmd, &mut klvd).unwrap();
    assert_close("kl", &gpu.download(&kld).unwrap(), &kl, 1e-5, 1e-5);
    assert_close("kl dlv", &gpu.download(&klvd).unwrap(), &kl_lv, 1e-6, 1e-5);
    let (m2, lv2) = (inputs(n).iter().rev().map(|v| v * 0.7).collect::<Vec<_>>(), inputs(n).iter().map(|v| v * -0.3).collect::<Vec<_>>());
    let mut jv = vec![0.0; rows];
    let mut jg = vec![vec![0.0; n]; 4];
    {
        let [a, b, c, d] = &mut jg[..] else { unreachable!() };
        gaussian::jeffreys(&m, &lv, &m2, &lv2, dim, &w, &mut jv, [a, b, c, d]);
    }
    let mut jvd = gpu.zeros(rows).unwrap();
    let mut jgd: Vec<_> = (0..4).map(|_| gpu.zeros(n).unwrap()).collect();
    {
        let [a, b, c, d] = &mut jgd[..] else { unreachable!() };
        gaussian::gpu::jeffreys(&gpu, &md, &lvd, &gpu.upload(&m2).unwrap(), &gpu.upload(&lv2).unwrap(), dim, &gpu.upload(&w).unwrap(), &mut jvd, [a, b, c, d]).unwrap();
    }
    assert_close("jeffreys", &gpu.download(&jvd).unwrap(), &jv, 1e-4, 1e-5);
    for (k, (d, c)) in jgd.iter().zip(&jg).enumerate() {
        assert_close(&format!("jeffreys gradient {k}"), &gpu.download(d).unwrap(), c, 1e-5, 1e-5);
    }
}

#[test]
fn sparse_input_layer_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let (rows, cols, d_out) = (1024, 2000, 128);
    // ~10% density, an all-zero row every 17 rows.
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
    let x = linear::CsrRef { rows, cols, indptr: &indptr, indices: &indices, data: &data };
    let (w, dy) = (inputs(cols * d_out), inputs(rows * d_out));
    for transform in [linear::CountTransform::Log1p, linear::CountTransform::NormalizedLog1p { scale: 1e4 }] {
        let (mut y, mut dw) = (vec![0.0; rows * d_out], vec![0.0; cols * d_out]);
        linear::sparse_input_forward(x, transform, &w, d_out, &mut y);
        linear::sparse_input_backward(x, transform, &dy, d_out, &mut dw);
        let xd = linear::gpu::DeviceCsr::upload(&gpu, x).unwrap();
        let (mut yd, mut dwd) = (gpu.zeros(rows * d_out).unwrap(), gpu.zeros(cols * d_out).unwrap());
        linear::gpu::sparse_input_forward(&gpu, &xd, transform, &gpu.upload(&w).unwrap(), d_out, &mut yd).unwrap();
        linear::gpu::sparse_input_backward(&gpu, x, transform, &gpu.upload(&dy).unwrap(), d_out, &mut dwd).unwrap();
        assert_close(&format!("{transform:?} forward"), &gpu.download(&yd).unwrap(), &y, 1e-4, 1e-5);
        assert_close(&format!("{transform:?} dW"), &gpu.download(&dwd).unwrap(), &dw, 1e-4, 1e-5);
    }
}

#[test]
fn nb_mixture_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let (rows, features) = (256, 14);
    let n = rows * features;
    let x: Vec<f32> = (0..n).map(|i| [0.0, 3.0, 40.0, 7.0, 150.0][i % 5]).collect();
    let back: Vec<f32> = inputs(n).iter().map(|v| v.exp() * 3.0).collect();
    let fore: Vec<f32> = inputs(n).iter().rev().map(|v| v.exp() * 20.0).collect();
    let theta: Vec<f32> = inputs(n).iter().map(|v| (v * 0.3).exp() * 5.0).collect();
    let pi: Vec<f32> = inputs(n).iter().map(|v| v * 0.5).collect();
    let mut ll = vec![0.0; rows];
    let mut g: Vec<Vec<f32>> = vec![vec![0.0; n]; 4];
    {
        let [g0, g1, g2, g3] = &mut g[..] else { unreachable!() };
        likelihood::nb_mixture(&x, &back, &fore, &theta, &pi, features, &mut ll, [g0, g1, g2, g3]);
    }
    let up = |v: &[f32]| gpu.upload(v).unwrap();
    let mut lld = gpu.zeros(rows).unwrap();
    let mut gd: Vec<_> = (0..4).map(|_| gpu.zeros(n).unwrap()).collect();
    {
        let [g0, g1, g2, g3] = &mut gd[..] else { unreachable!() };
        likelihood::gpu::nb_mixture(&gpu, &up(&x), &up(&back), &up(&fore), &up(&theta), &up(&pi), features, &mut lld, [g0, g1, g2, g3]).unwrap();
    }
    assert_close("mixture ll", &gpu.download(&lld).unwrap(), &ll, 1e-3, 1e-4);
    for k in 0..4 {
        assert_close(&format!("mixture grad {k}"), &gpu.download(&gd[k]).unwrap(), &g[k], 1e-5, 1e-4);
    }
}

#[test]
fn layer_and_batch_norm_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let (rows, f) = (512, 128);
    let (x, dy) = (inputs(rows * f), inputs(rows * f).iter().rev().copied().collect::<Vec<_>>());
    let (gamma, beta) = (inputs(f).iter().map(|v| v + 1.0).collect::<Vec<_>>(), inputs(f));
    let up = |v: &[f32]| gpu.upload(v).unwrap();
    // LayerNorm
    let mut y = vec![0.0; rows * f];
    let cache = norm::layer_norm_forward(&x, &gamma, &beta, 1e-5, &mut y);
    let (mut dx, mut dg, mut db) = (vec![0.0; rows * f], vec![0.0; f], vec![0.0; f]);
    norm::layer_norm_backward(&cache, &gamma, &dy, &mut dx, &mut dg, &mut db);
    let mut yd = gpu.zeros(rows * f).unwrap();
    let cd = norm::gpu::layer_norm_forward(&gpu, &up(&x), &up(&gamma), &up(&beta), 1e-5, &mut yd).unwrap();
    let (mut dxd, mut dgd, mut dbd) = (gpu.zeros(rows * f).unwrap(), gpu.zeros(f).unwrap(), gpu.zeros(f).unwrap());
    norm::gpu::layer_norm_backward(&gpu, &cd, &up(&gamma), &up(&dy), &mut dxd, &mut dgd, &mut dbd).unwrap();
    assert_close("layer norm y", &gpu.download(&yd).unwrap(), &y, 1e-5, 1e-4);
    assert_close("layer norm dx", &gpu.download(&dxd).unwrap(), &dx, 1e-4, 1e-3);
    assert_close("layer norm dgamma", &gpu.download(&dgd).unwrap(), &dg, 1e-3, 1e-4);
    // BatchNorm: train forward + backward, running statistics, then eval.
    let mut bn = norm::BatchNorm::<f32>::new(f);
    bn.gamma = gamma.clone();
    bn.beta = beta.clone();
    let mut dbn = norm::gpu::DeviceBatchNorm::upload(&gpu, &bn).unwrap();
    let mut y = vec![0.0; rows * f];
    let cache = bn.forward_train(&x, &mut y);
    let (mut dx, mut dg, mut db) = (vec![0.0; rows * f], vec![0.0; f], vec![0.0; f]);
    bn.backward(&cache, &dy, &mut dx, &mut dg, &mut db);
    let mut yd = gpu.zeros(rows * f).unwrap();
    let cd = dbn.forward_train(&gpu, &up(&x), &mut yd).unwrap();
    let (mut dxd, mut dgd, mut dbd) = (gpu.zeros(rows * f).unwrap(), gpu.zeros(f).unwrap(), gpu.zeros(f).unwrap());
    dbn.backward(&gpu, &cd, &up(&dy), &mut dxd, &mut dgd, &mut dbd).unwrap();
    assert_close("batch norm y", &gpu.download(&yd).unwrap(), &y, 1e-5, 1e-4);
    assert_close("batch norm dx", &gpu.download(&dxd).unwrap(), &dx, 1e-4, 1e-3);
    assert_close("batch norm dbeta", &gpu.download(&dbd).unwrap(), &db, 1e-3, 1e-4);
    assert_close("running var", &gpu.download(&dbn.running_var).unwrap(), &bn.running_var, 1e-6, 1e-5);
    let mut ye = vec![0.0; rows * f];
    bn.forward_eval(&x, &mut ye);
    let mut yed = gpu.zeros(rows * f).unwrap();
    dbn.forward_eval(&gpu, &up(&x), &mut yed).unwrap();
    assert_close("batch norm eval", &gpu.download(&yed).unwrap(), &ye, 1e-5, 1e-4);
}

#[test]
fn product_of_experts_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let (rows, dim) = (777, 20);
    let n = rows * dim;
    let (m1, l1, m2, l2) = (inputs(n), inputs(n).iter().map(|v| v * 0.5).collect::<Vec<_>>(), inputs(n).iter().rev().copied().collect::<Vec<_>>(), inputs(n).iter().map(|v| -v).collect::<Vec<_>>());
    let p1: Vec<bool> = (0..rows).map(|r| r % 3 != 0).collect();
    let p2: Vec<bool> = (0..rows).map(|r| r % 5 != 0).collect();
    let (mut m, mut lv) = (vec![0.0; n], vec![0.0; n]);
    gaussian::poe_forward(&[&m1, &m2], &[&l1, &l2], &[&p1, &p2], dim, &mut m, &mut lv);
    let (gm, gl) = (inputs(n), inputs(n).iter().map(|v| v * 2.0).collect::<Vec<_>>());
    let (mut dm1, mut dl1, mut dm2, mut dl2) = (vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    gaussian::poe_backward(&[&m1, &m2], &[&l1, &l2], &[&p1, &p2], dim, &m, &lv, &gm, &gl, &mut [&mut dm1, &mut dm2], &mut [&mut dl1, &mut dl2]);
    let experts = gaussian::gpu::DeviceExperts::upload(&gpu, &[&m1, &m2], &[&l1, &l2], &[&p1, &p2], dim).unwrap();
    let (mut md, mut lvd) = (gpu.zeros(n).unwrap(), gpu.zeros(n).unwrap());
    gaussian::gpu::poe_forward(&gpu, &experts, &mut md, &mut lvd).unwrap();
    let (mut dmd, mut dld) = (gpu.zeros(2 * n).unwrap(), gpu.zeros(2 * n).unwrap());
    gaussian::gpu::poe_backward(&gpu, &experts, &md, &lvd, &gpu.upload(&gm).unwrap(), &gpu.upload(&gl).unwrap(), &mut dmd, &mut dld).unwrap();
    assert_close("poe m", &gpu.download(&md).unwrap(), &m, 1e-6, 1e-5);
    assert_close("poe lv", &gpu.download(&lvd).unwrap(), &lv, 1e-6, 1e-5);
    assert_close("poe dmeans", &gpu.download(&dmd).unwrap(), &[dm1, dm2].concat(), 1e-6, 1e-5);
    assert_close("poe dlogvars", &gpu.download(&dld).unwrap(), &[dl1, dl2].concat(), 1e-6, 1e-5);
}

#[test]
fn losses_match_cpu() {
    let Some(gpu) = gpu() else { return };
    // Cross-entropy with unlabelled rows.
    let (rows, classes) = (1000, 12);
    let logits = inputs(rows * classes);
    let labels: Vec<i32> = (0..rows as i32).map(|r| if r % 7 == 0 { -1 } else { r % 12 }).collect();
    let mut d = vec![0.0; rows * classes];
    let (loss, labelled) = losses::cross_entropy(&logits, &labels, classes, &mut d);
    let mut dd = gpu.zeros(rows * classes).unwrap();
    let (gloss, glabelled) = losses::gpu::cross_entropy(&gpu, &gpu.upload(&logits).unwrap(), &labels, classes, &mut dd).unwrap();
    assert_eq!(labelled, glabelled);
    assert!((loss - gloss).abs() <= 1e-5 * loss.abs(), "ce {gloss} vs {loss}");
    assert_close("ce grad", &gpu.download(&dd).unwrap(), &d, 1e-7, 1e-5);
    // Masked squared error.
    let pred = inputs(500);
    let targets: Vec<f64> = (0..500).map(|i| if i % 9 == 0 { f64::NAN } else { (i % 13) as f64 * 0.1 }).collect();
    let mut dp = vec![0.0; 500];
    let (mse, observed) = losses::masked_mse(&pred, &targets, &mut dp);
    let mut dpd = gpu.zeros(500).unwrap();
    let (gmse, gobserved) = losses::gpu::masked_mse(&gpu, &gpu.upload(&pred).unwrap(), &targets, &mut dpd).unwrap();
    assert_eq!(observed, gobserved);
    assert!((mse - gmse).abs() <= 1e-5 * mse.abs(), "mse {gmse} vs {mse}");
    assert_close("mse grad", &gpu.download(&dpd).unwrap(), &dp, 1e-7, 1e-5);
    // MMD between two groups of latents.
    let dim = 10;
    let (x, y) = (inputs(200 * dim), inputs(150 * dim).iter().map(|v| v + 0.3).collect::<Vec<_>>());
    let bw = [0.5, 1.0, 2.0, 4.0];
    let (mut dx, mut dy) = (vec![0.0; x.len()], vec![0.0; y.len()]);
    let mmd = losses::mmd_rbf(&x, &y, dim, &bw, &mut dx, &mut dy);
    let (mut dxd, mut dyd) = (gpu.zeros(x.len()).unwrap(), gpu.zeros(y.len()).unwrap());
    let gmmd = losses::gpu::mmd_rbf(&gpu, &gpu.upload(&x).unwrap(), &gpu.upload(&y).unwrap(), dim, &bw, &mut dxd, &mut dyd).unwrap();
    assert!((mmd - gmmd).abs() <= 1e-4 * mmd.abs() + 1e-6, "mmd {gmmd} vs {mmd}");
    assert_close("mmd dx", &gpu.download(&dxd).unwrap(), &dx, 1e-6, 1e-3);
    assert_close("mmd dy", &gpu.download(&dyd).unwrap(), &dy, 1e-6, 1e-3);
    // Cosine margin.
    let z = inputs(128 * 16);
    let lab: Vec<i32> = (0..128).map(|i| if i % 11 == 0 { -1 } else { i % 4 }).collect();
    let mut dz = vec![0.0; z.len()];
    let cos = losses::cosine_margin(&z, &lab, 16, 0.1, &mut dz);
    let mut dzd = gpu.zeros(z.len()).unwrap();
    let gcos = losses::gpu::cosine_margin(&gpu, &gpu.upload(&z).unwrap(), &lab, 16, 0.1, &mut dzd).unwrap();
    assert!((cos - gcos).abs() <= 1e-4 * cos.abs(), "cosine {gcos} vs {cos}");
    assert_close("cosine grad", &gpu.download(&dzd).unwrap(), &dz, 1e-6, 1e-3);
    // Cox.
    let eta = inputs(300);
    let times: Vec<f64> = (0..300).map(|i| ((i * 37) % 101) as f64).collect();
    let events: Vec<bool> = (0..300).map(|i| i % 3 != 0).collect();
    let mut de = vec![0.0; 300];
    let cox = losses::cox_partial_likelihood(&eta, &times, &events, &mut de);
    let mut ded = gpu.zeros(300).unwrap();
    let gcox = losses::gpu::cox_partial_likelihood(&gpu, &gpu.upload(&eta).unwrap(), &times, &events, &mut ded).unwrap();
    assert!((cox - gcox).abs() <= 1e-4 * cox.abs(), "cox {gcox} vs {cox}");
    assert_close("cox grad", &gpu.download(&ded).unwrap(), &de, 1e-6, 1e-3);
}

/// |gpu − cpu| <= tol · (1 + |cpu|), entry by entry, in f64.
fn assert_close64(what: &str, gpu: &[f64], cpu: &[f64], tol: f64) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert!((g - c).abs() <= tol * (1.0 + c.abs()), "{what}[{i}]: gpu {g} vs cpu {c}");
    }
}

#[test]
fn snf_affinity_and_sparse_product_match_cpu() {
    use tessera_kernels::ops::affinity::{self, gpu as agpu};
    let Some(gpu) = gpu() else { return };
    let stream = gpu.stream();
    let (n, d, rows) = (300usize, 20usize, 120..270usize);
    let x: Vec<f64> = (0..n * d).map(|e| ((e * 37 % 101) as f64 - 50.0) / 17.0).collect();
    // Distances of a row block: the GEMM's −2 X_rows Xᵀ, then the epilogue on each side.
    let mut cpu = vec![0.0; rows.len() * n];
    affinity::sq_euclidean_rows(&x, n, d, rows.clone(), &mut cpu);
    let mut raw = vec![0.0; rows.len() * n];
    <f64 as Gemm>::gemm(false, true, rows.len(), d, n, -2.0, &x[rows.start * d..rows.end * d], &x, 0.0, &mut raw);
    let norms: Vec<f64> = x.chunks(d).map(|r| r.iter().map(|v| v * v).sum()).collect();
    let mut dd = stream.clone_htod(&raw).unwrap();
    agpu::sq_distance_finish(&gpu, &mut dd, &stream.clone_htod(&norms).unwrap(), rows.start, n).unwrap();
    assert_close64("squared distances", &stream.clone_dtoh(&dd).unwrap(), &cpu, 1e-13);
    // The scaled exponential affinity of those rows.
    let near_rows = affinity::mean_nearest(&cpu, n, 20);
    let near_all: Vec<f64> = (0..n).map(|j| 1.0 + (j % 7) as f64).collect();
    let mut dd = stream.clone_htod(&cpu).unwrap();
    affinity::exponential_rows(&mut cpu, n, &near_rows, &near_all, 0.5);
    agpu::exponential_rows(&gpu, &mut dd, &stream.clone_htod(&near_rows).unwrap(), &stream.clone_htod(&near_all).unwrap(), 0.5).unwrap();
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
    let m: Vec<f64> = (0..n * n).map(|e| ((e * 7919 % 1009) as f64) / 1009.0).collect();
    let mut cpu = vec![0.0; n * n];
    affinity::sparse_times_dense_transposed(&indptr, &cols, &vals, &m, n, 0.5, &mut cpu);
    let mut out = stream.alloc_zeros::<f64>(n * n).unwrap();
    agpu::sparse_times_dense_transposed(&gpu, &stream.clone_htod(&indptr).unwrap(), &stream.clone_htod(&cols).unwrap(), &stream.clone_htod(&vals).unwrap(), &stream.clone_htod(&m).unwrap(), n, 0.5, &mut out).unwrap();
    assert_close64("(S X)^T", &stream.clone_dtoh(&out).unwrap(), &cpu, 1e-13);
}
