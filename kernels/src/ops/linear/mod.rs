//! Dense GEMM with transposes, the linear layer built on it, and the first layer on raw counts:
//! CSR x dense with the log1p transform fused in. On CPU, GEMM is the `gemm` crate (pure Rust,
//! f32 and f64, strides give transposes for free, AVX-512/AVX2/NEON kernels picked at run time):
//! at the scVI decoder's shapes it ran 25-40% faster than matrixmultiply on our 2-core AVX-512
//! machine. On GPU it is cuBLAS.
//!
//! Determinism: every output element is accumulated by one thread in a fixed order, so a seed
//! reproduces a run bit for bit on one machine.

use std::ops::Range;

use rayon::prelude::*;

use crate::real::{Real, mul_add};

pub const CUDA_SOURCE: &str = include_str!("linear.cu");

pub mod gpu;
pub mod resident_gpu;

/// Scalar types the CPU GEMM multiplies.
pub trait Gemm: Real {
    /// C (m x n, row-major) = alpha * op(A) op(B) + beta * C with op(A) m x k, op(B) k x n.
    #[allow(clippy::too_many_arguments)] // an op's operands, outputs and shape, as its kernel takes them
    fn gemm(
        ta: bool,
        tb: bool,
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: &[Self],
        b: &[Self],
        beta: Self,
        c: &mut [Self],
    );
}

/// How a GPU multiplies f32 matrices, by PyTorch's names (`torch.set_float32_matmul_precision`,
/// which Lightning suggests to scvi-tools users): every product in f32, or the inputs rounded
/// to TF32 or bf16 for the tensor cores, accumulated in f32. The CPU always multiplies in f32;
/// [`round_for`] is the reference the GPU's reduced precisions are tested against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulPrecision {
    /// f32 (cuBLAS' SGEMM).
    #[default]
    Highest,
    /// TF32 inputs (10 explicit mantissa bits), f32 accumulation.
    High,
    /// bf16 inputs (7 explicit mantissa bits), f32 accumulation.
    Medium,
}

impl MatmulPrecision {
    /// TF32 where `tf32`, else f32: the choice `[train] tf32` offers.
    pub fn tf32_or_f32(tf32: bool) -> MatmulPrecision {
        if tf32 {
            MatmulPrecision::High
        } else {
            MatmulPrecision::Highest
        }
    }

    /// What the GEMMs read, for logs.
    pub fn describe(self) -> &'static str {
        match self {
            MatmulPrecision::Highest => "f32",
            MatmulPrecision::High => "TF32 (tensor cores, f32 accumulation)",
            MatmulPrecision::Medium => "bf16 (tensor cores, f32 accumulation)",
        }
    }

    /// Explicit mantissa bits the tensor cores keep of each input (None: all of f32's 23).
    pub fn mantissa_bits(self) -> Option<u32> {
        match self {
            MatmulPrecision::Highest => None,
            MatmulPrecision::High => Some(10),
            MatmulPrecision::Medium => Some(7),
        }
    }
}

/// `x` rounded to `bits` explicit mantissa bits, to nearest with ties to even, as f32 (TF32:
/// 10, bf16: 7); the exponent range is f32's, and NaN and infinities pass unchanged.
pub fn round_mantissa(x: f32, bits: u32) -> f32 {
    assert!(bits <= 23, "f32 has 23 explicit mantissa bits, not {bits}");
    if !x.is_finite() || bits == 23 {
        return x;
    }
    let dropped = 23 - bits;
    let raw = x.to_bits();
    let half = 1u32 << (dropped - 1);
    // Ties to even: add just under half, plus one if the kept part is odd. A carry into the
    // exponent is the right rounding (up to the next binade, or to infinity past f32::MAX).
    let odd = (raw >> dropped) & 1;
    f32::from_bits(((raw + half - 1 + odd) >> dropped) << dropped)
}

/// Each of `values` as the tensor cores read it at `precision`.
pub fn round_for(values: &[f32], precision: MatmulPrecision) -> Vec<f32> {
    match precision.mantissa_bits() {
        None => values.to_vec(),
        Some(bits) => values.iter().map(|&v| round_mantissa(v, bits)).collect(),
    }
}

/// Row/column strides of a row-major matrix stored as `rows x cols`, read transposed or not.
fn strides(transposed: bool, stored_cols: usize) -> (isize, isize) {
    if transposed {
        (1, stored_cols as isize)
    } else {
        (stored_cols as isize, 1)
    }
}

/// Below this many multiply-adds a GEMM runs on the calling thread: splitting costs more than
/// it saves.
const PARALLEL_GEMM_MACS: usize = 1 << 18;

/// C = alpha·A·B + beta·C on the calling thread; A is m x k at `a` with strides (rsa, csa),
/// B k x n likewise, C m x n with row stride `rsc`. C is not read when beta is 0 (BLAS' rule).
///
/// # Safety
/// Every element the strides address must lie inside its allocation, and C's must not be
/// written by anyone else during the call.
#[allow(unsafe_code, clippy::too_many_arguments)]
unsafe fn product<T: Real>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: *const T,
    rsa: isize,
    csa: isize,
    b: *const T,
    rsb: isize,
    csb: isize,
    beta: T,
    c: *mut T,
    rsc: isize,
) {
    // gemm's `alpha` scales the destination and its `beta` the product: BLAS' names swapped.
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            rsc,
            beta != T::zero(),
            a,
            csa,
            rsa,
            b,
            csb,
            rsb,
            beta,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

impl<T: Real> Gemm for T {
    /// Parallel on the rayon pool (one pool for every op: a second pool inside the GEMM would
    /// fight it for the cores), over blocks of C's rows or, when C is wider than tall (the
    /// decoder's genes), of its columns: then each thread packs only its own part of the large
    /// B instead of all of it. Each element of C is still one call's dot product over all of k,
    /// so results do not depend on the split.
    #[allow(unsafe_code)]
    fn gemm(
        ta: bool,
        tb: bool,
        m: usize,
        k: usize,
        n: usize,
        alpha: T,
        a: &[T],
        b: &[T],
        beta: T,
        c: &mut [T],
    ) {
        assert!(
            a.len() == m * k && b.len() == k * n && c.len() == m * n,
            "gemm: buffer sizes do not match {m}x{k} * {k}x{n}"
        );
        let (rsa, csa) = strides(ta, if ta { m } else { k });
        let (rsb, csb) = strides(tb, if tb { k } else { n });
        let threads = rayon::current_num_threads();
        if m * k * n < PARALLEL_GEMM_MACS || threads == 1 || m.max(n) < 2 {
            // SAFETY: the assert above bounds every index of the product inside a, b, c.
            unsafe {
                product(
                    m,
                    k,
                    n,
                    alpha,
                    a.as_ptr(),
                    rsa,
                    csa,
                    b.as_ptr(),
                    rsb,
                    csb,
                    beta,
                    c.as_mut_ptr(),
                    n as isize,
                )
            };
            return;
        }
        if n > m {
            // Column blocks, a multiple of 64 wide (whole SIMD panels).
            let width = n.div_ceil(threads).next_multiple_of(64).min(n);
            let c_at = c.as_mut_ptr() as usize;
            (0..n.div_ceil(width)).into_par_iter().for_each(|block| {
                let first = block * width;
                let cols = width.min(n - first);
                // SAFETY: the assert bounds the full product; this block reads op(B)'s
                // columns first..first+cols and writes only C's columns first..first+cols of
                // every row (row stride n), which no other block writes, while `c` stays
                // mutably borrowed by this call.
                unsafe {
                    product(
                        m,
                        k,
                        cols,
                        alpha,
                        a.as_ptr(),
                        rsa,
                        csa,
                        b.as_ptr().offset(first as isize * csb),
                        rsb,
                        csb,
                        beta,
                        (c_at as *mut T).add(first),
                        n as isize,
                    )
                }
            });
            return;
        }
        let rows_per = m.div_ceil(threads);
        c.par_chunks_mut(rows_per * n.max(1))
            .enumerate()
            .for_each(|(block, c)| {
                let first = block * rows_per;
                let rows = c.len() / n.max(1);
                // SAFETY: the assert above bounds every index of the full product inside a, b and
                // c; this block reads op(A)'s rows first..first+rows (offset first·rsa with the
                // full matrix's strides) and writes exactly its own chunk of c, which no other
                // block touches.
                unsafe {
                    product(
                        rows,
                        k,
                        n,
                        alpha,
                        a.as_ptr().offset(first as isize * rsa),
                        rsa,
                        csa,
                        b.as_ptr(),
                        rsb,
                        csb,
                        beta,
                        c.as_mut_ptr(),
                        n as isize,
                    )
                }
            });
    }
}

/// y (n x out) = x (n x in) · w (in x out) + bias.
pub fn linear_forward<T: Gemm>(
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    n: usize,
    d_in: usize,
    d_out: usize,
    y: &mut [T],
) {
    T::gemm(false, false, n, d_in, d_out, T::one(), x, w, T::zero(), y);
    if let Some(b) = bias {
        crate::ops::elementwise::bias_add_forward(y, b);
    }
}

/// Gradients of a linear layer: dw = xᵀ dy, dbias = column sums of dy, dx = dy wᵀ (when asked:
/// the first layer has no input gradient).
#[allow(clippy::too_many_arguments)] // an op's operands, outputs and shape, as its kernel takes them
pub fn linear_backward<T: Gemm>(
    x: &[T],
    w: &[T],
    dy: &[T],
    n: usize,
    d_in: usize,
    d_out: usize,
    dx: Option<&mut [T]>,
    dw: &mut [T],
    dbias: Option<&mut [T]>,
) {
    T::gemm(true, false, d_in, n, d_out, T::one(), x, dy, T::zero(), dw);
    if let Some(db) = dbias {
        crate::ops::elementwise::column_sums(dy, db);
    }
    if let Some(dx) = dx {
        T::gemm(false, true, n, d_out, d_in, T::one(), dy, w, T::zero(), dx);
    }
}

/// The input transform fused into the sparse first layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CountTransform {
    /// log(1 + x) (scVI's encoder input).
    Log1p,
    /// log(1 + x / library * scale): library-size normalisation, then log1p.
    NormalizedLog1p { scale: f32 },
}

impl CountTransform {
    /// (kind, scale) as the CUDA kernels take them.
    pub fn code(self) -> (i32, f32) {
        match self {
            CountTransform::Log1p => (0, 0.0),
            CountTransform::NormalizedLog1p { scale } => (1, scale),
        }
    }
}

impl CountTransform {
    /// The a of log(1 + a).
    fn argument<T: Real>(self, x: T, library: T) -> T {
        match self {
            CountTransform::Log1p => x,
            CountTransform::NormalizedLog1p { scale } => {
                if library > T::zero() {
                    x / library * T::of(f64::from(scale))
                } else {
                    T::zero()
                }
            }
        }
    }
}

/// A CSR count matrix as the engine sees it (rows = cells).
#[derive(Debug, Clone, Copy)]
pub struct CsrRef<'a, T> {
    pub rows: usize,
    pub cols: usize,
    pub indptr: &'a [u64],
    pub indices: &'a [u32],
    pub data: &'a [T],
}

impl<T: Real> CsrRef<'_, T> {
    pub(crate) fn check(&self) {
        assert_eq!(self.indptr.len(), self.rows + 1, "csr: indptr length");
        assert_eq!(
            self.indices.len(),
            self.data.len(),
            "csr: indices and data lengths"
        );
        assert_eq!(
            self.indptr[self.rows] as usize,
            self.data.len(),
            "csr: indptr end"
        );
    }

    /// [`CsrRef::check`] and every entry in range: what a device needs before it indexes with
    /// them (an out-of-range entry is a bounds panic on the CPU but an illegal address on a
    /// GPU). A pass over the non-zeros, so only where counts are uploaded.
    pub(crate) fn check_entries(&self) {
        self.check();
        assert!(
            self.indptr.windows(2).all(|w| w[0] <= w[1]),
            "csr: indptr decreases"
        );
        assert!(
            self.indices.iter().all(|&j| (j as usize) < self.cols),
            "csr: a column index is not below {}",
            self.cols
        );
    }

    /// The rows as a dense row-major matrix, duplicate entries summed (scipy's canonical form).
    pub fn summed_dense(&self) -> Vec<T> {
        let mut dense = vec![T::zero(); self.rows * self.cols];
        csr_dense(*self, false, &mut dense);
        dense
    }

    fn library(&self, r: usize) -> T {
        self.data[self.indptr[r] as usize..self.indptr[r + 1] as usize]
            .iter()
            .copied()
            .sum()
    }
}

/// The transformed non-zeros t(X) in CSR order (the values both passes of the layer multiply),
/// row blocks in parallel (each value depends on its row alone, so the bits are the same).
pub fn transformed_values<T: Real>(x: CsrRef<'_, T>, transform: CountTransform) -> Vec<T> {
    x.check();
    let mut values = vec![T::zero(); x.data.len()];
    let blocks = row_blocks(x);
    let mut pieces = Vec::with_capacity(blocks.len());
    let mut rest = values.as_mut_slice();
    for rows in &blocks {
        let len = (x.indptr[rows.end] - x.indptr[rows.start]) as usize;
        let (piece, tail) = rest.split_at_mut(len);
        pieces.push((rows.clone(), piece));
        rest = tail;
    }
    pieces
        .into_par_iter()
        .for_each(|(rows, out)| transform_rows(x, transform, rows, out));
    values
}

/// Rows of at least this many non-zeros go to one task: below, splitting costs more than it saves.
const BLOCK_ENTRIES: usize = 1 << 16;

/// Contiguous row ranges of about equal non-zeros, a few per thread (one for a small batch).
fn row_blocks<T>(x: CsrRef<'_, T>) -> Vec<Range<usize>> {
    let nnz = x.data.len();
    let wanted = (nnz / BLOCK_ENTRIES).clamp(1, 4 * rayon::current_num_threads());
    let mut blocks = Vec::with_capacity(wanted);
    let mut start = 0;
    for b in 1..=wanted {
        let target = (nnz * b / wanted) as u64;
        let end = if b == wanted {
            x.rows
        } else {
            start + x.indptr[start..=x.rows].partition_point(|&p| p < target)
        };
        if end > start {
            blocks.push(start..end);
            start = end;
        }
    }
    if blocks.is_empty() {
        blocks.push(0..x.rows);
    }
    blocks
}

/// [`transformed_values`] of `rows` into `out` (their non-zeros).
fn transform_rows<T: Real>(
    x: CsrRef<'_, T>,
    transform: CountTransform,
    rows: Range<usize>,
    out: &mut [T],
) {
    // The log1p arguments first, then their logarithms as one slice (SIMD lanes): ln(1 + a) is
    // as accurate as log1p where 1 + a keeps a's digits (a ≥ 1/2, every count); smaller
    // arguments are redone with log1p.
    let mut args = Vec::with_capacity(out.len());
    for r in rows {
        let library = match transform {
            CountTransform::Log1p => T::zero(), // unused: only the normalised transform needs it
            CountTransform::NormalizedLog1p { .. } => x.library(r),
        };
        args.extend(
            x.data[x.indptr[r] as usize..x.indptr[r + 1] as usize]
                .iter()
                .map(|&v| transform.argument(v, library)),
        );
    }
    let one_plus: Vec<T> = args.iter().map(|&a| T::one() + a).collect();
    T::ln_to(&one_plus, out);
    for (v, &a) in out.iter_mut().zip(&args) {
        if a < T::of(0.5) {
            *v = a.ln_1p();
        }
    }
}

/// y (rows x d_out) = t(X) · w, X sparse (rows x cols = d_in), t the count transform.
pub fn sparse_input_forward<T: Real>(
    x: CsrRef<'_, T>,
    transform: CountTransform,
    w: &[T],
    d_out: usize,
    y: &mut [T],
) {
    sparse_forward_values(x, &transformed_values(x, transform), w, d_out, y);
}

/// y = V · w where V has X's sparsity pattern and the already transformed `values`.
pub fn sparse_forward_values<T: Real>(
    x: CsrRef<'_, T>,
    values: &[T],
    w: &[T],
    d_out: usize,
    y: &mut [T],
) {
    x.check();
    assert!(
        w.len() == x.cols * d_out && y.len() == x.rows * d_out && values.len() == x.data.len(),
        "sparse input: shapes"
    );
    y.par_chunks_mut(d_out).enumerate().for_each(|(r, yr)| {
        let span = x.indptr[r] as usize..x.indptr[r + 1] as usize;
        weighted_row_sum(
            x.indices[span.clone()]
                .iter()
                .zip(&values[span])
                .map(|(&j, &v)| (j as usize, v)),
            w,
            yr,
        );
    });
}

/// out = Σ_k v_k · row i_k of `m` (rows as wide as `out`), over `terms` (i_k, v_k), in a
/// fixed order. Outputs go in blocks held in registers across the terms (a block of
/// accumulators in memory would be loaded and stored once per term), and even and odd terms
/// go to two sets of accumulators added at the end: one set would wait on the latency of each
/// addition.
fn weighted_row_sum<T: Real>(
    terms: impl Iterator<Item = (usize, T)> + Clone,
    m: &[T],
    out: &mut [T],
) {
    const BLOCK: usize = 32;
    let width = out.len();
    let block_of = |i: usize, start: usize| -> &[T; BLOCK] {
        m[i * width + start..][..BLOCK]
            .try_into()
            .expect("a block of the row")
    };
    let mut start = 0;
    while start + BLOCK <= width {
        let (mut even, mut odd) = ([T::zero(); BLOCK], [T::zero(); BLOCK]);
        let mut pairs = terms.clone();
        while let Some((i, v)) = pairs.next() {
            for (a, &x) in even.iter_mut().zip(block_of(i, start)) {
                *a = mul_add(v, x, *a);
            }
            let Some((i, v)) = pairs.next() else { break };
            for (a, &x) in odd.iter_mut().zip(block_of(i, start)) {
                *a = mul_add(v, x, *a);
            }
        }
        for ((o, &e), &d) in out[start..start + BLOCK].iter_mut().zip(&even).zip(&odd) {
            *o = e + d;
        }
        start += BLOCK;
    }
    let rest = &mut out[start..];
    rest.iter_mut().for_each(|o| *o = T::zero());
    for (i, v) in terms {
        for (o, &x) in rest.iter_mut().zip(&m[i * width + start..(i + 1) * width]) {
            *o = *o + v * x;
        }
    }
}

/// Each row's sum (a cell's library size), folded in the row's order.
pub fn row_sums<T: Real>(x: CsrRef<'_, T>) -> Vec<T> {
    x.indptr
        .windows(2)
        .map(|w| {
            x.data[w[0] as usize..w[1] as usize]
                .iter()
                .fold(T::zero(), |sum, &v| sum + v)
        })
        .collect()
}

/// `x` as a dense row-major matrix, a row's repeated columns summed in entry order
/// ([`CsrRef::summed_dense`]); `binary`: each positive value then 1 (accessibility peaks).
pub fn csr_dense<T: Real>(x: CsrRef<'_, T>, binary: bool, out: &mut [T]) {
    x.check();
    assert_eq!(out.len(), x.rows * x.cols, "csr dense: rows x cols values");
    out.fill(T::zero());
    for r in 0..x.rows {
        let span = x.indptr[r] as usize..x.indptr[r + 1] as usize;
        let row = &mut out[r * x.cols..(r + 1) * x.cols];
        for (&j, &v) in x.indices[span.clone()].iter().zip(&x.data[span]) {
            row[j as usize] = row[j as usize] + v;
        }
    }
    if binary {
        out.iter_mut()
            .filter(|v| **v > T::zero())
            .for_each(|v| *v = T::one());
    }
}

/// The CSR arrays of `x`'s rows `rows`, in that order (a batch drawn from a matrix kept whole:
/// what `resident_gpu.rs` does on the device).
pub fn gather_rows<T: Copy>(x: CsrRef<'_, T>, rows: &[usize]) -> (Vec<u64>, Vec<u32>, Vec<T>) {
    let span = |r: usize| x.indptr[r] as usize..x.indptr[r + 1] as usize;
    let nnz = rows.iter().map(|&r| span(r).len()).sum();
    let (mut indptr, mut indices, mut data) = (
        Vec::with_capacity(rows.len() + 1),
        Vec::with_capacity(nnz),
        Vec::with_capacity(nnz),
    );
    indptr.push(0u64);
    for &r in rows {
        indices.extend_from_slice(&x.indices[span(r)]);
        data.extend_from_slice(&x.data[span(r)]);
        indptr.push(indices.len() as u64);
    }
    (indptr, indices, data)
}

/// The CSR arrays of `x`'s rows `times` over, in order ([`gather_rows`] of them repeated; the
/// GPU's `csr_tile` kernel makes them on the device).
pub fn tiled<T: Copy>(x: CsrRef<'_, T>, times: usize) -> (Vec<u64>, Vec<u32>, Vec<T>) {
    let rows: Vec<usize> = (0..times).flat_map(|_| 0..x.rows).collect();
    gather_rows(x, &rows)
}

/// Whether some row names a column twice (scipy's non-canonical CSR). The device builds the
/// transposed index only of matrices whose rows do not.
pub fn repeats_a_column<T: Copy + Sync>(x: CsrRef<'_, T>) -> bool {
    row_blocks(x).par_iter().any(|rows| {
        // The last row (+ 1) that named each column: no clearing between rows.
        let mut seen = vec![0usize; x.cols];
        rows.clone().any(|r| {
            x.indices[x.indptr[r] as usize..x.indptr[r + 1] as usize]
                .iter()
                .any(|&j| std::mem::replace(&mut seen[j as usize], r + 1) == r + 1)
        })
    })
}

/// The transformed non-zeros indexed by gene: `col_ptr` (cols + 1) and, per entry, its row and
/// transformed value, rows ascending within a gene (the fixed accumulation order of the weight
/// gradient, on CPU and GPU).
pub fn transposed<T: Real>(x: CsrRef<'_, T>, transform: CountTransform) -> ColumnIndex<T> {
    transposed_values(x, &transformed_values(x, transform))
}

/// A count matrix by columns: column pointers, then each column's (row, value) in row order.
pub type ColumnIndex<T> = (Vec<usize>, Vec<(usize, T)>);

/// [`transposed`] of already transformed values: the column pointers and, column by column,
/// each entry's (row, value) in row order. Row blocks sort their own entries by column in
/// parallel; then column ranges gather the blocks' runs in block order, so the index is the one
/// a single pass makes.
pub fn transposed_values<T: Real>(x: CsrRef<'_, T>, values: &[T]) -> ColumnIndex<T> {
    let blocks = row_blocks(x);
    if blocks.len() == 1 {
        return block_transposed(x, values, 0..x.rows);
    }
    let local: Vec<ColumnIndex<T>> = blocks
        .par_iter()
        .map(|rows| block_transposed(x, values, rows.clone()))
        .collect();
    let mut col_ptr = vec![0usize; x.cols + 1];
    for j in 0..x.cols {
        let n: usize = local.iter().map(|(p, _)| p[j + 1] - p[j]).sum();
        col_ptr[j + 1] = col_ptr[j] + n;
    }
    // Column ranges of about equal entries, each a contiguous piece of the output.
    let pieces_wanted = 4 * rayon::current_num_threads();
    let mut entries = vec![(0usize, T::zero()); values.len()];
    let mut pieces = Vec::with_capacity(pieces_wanted);
    let (mut rest, mut start) = (entries.as_mut_slice(), 0usize);
    for k in 1..=pieces_wanted {
        let end = if k == pieces_wanted {
            x.cols
        } else {
            let target = values.len() * k / pieces_wanted;
            start + col_ptr[start..=x.cols].partition_point(|&p| p < target)
        };
        if end > start {
            let (piece, tail) = rest.split_at_mut(col_ptr[end] - col_ptr[start]);
            pieces.push((start..end, piece));
            rest = tail;
            start = end;
        }
    }
    pieces.into_par_iter().for_each(|(cols, out)| {
        let mut at = 0;
        for j in cols {
            for (p, e) in &local {
                let run = &e[p[j]..p[j + 1]];
                out[at..at + run.len()].copy_from_slice(run);
                at += run.len();
            }
        }
    });
    (col_ptr, entries)
}

/// The counting sort by column of the entries of `rows` (rows keep their global numbers).
fn block_transposed<T: Real>(x: CsrRef<'_, T>, values: &[T], rows: Range<usize>) -> ColumnIndex<T> {
    let span = x.indptr[rows.start] as usize..x.indptr[rows.end] as usize;
    let mut counts = vec![0usize; x.cols + 1];
    for &j in &x.indices[span.clone()] {
        counts[j as usize + 1] += 1;
    }
    for j in 0..x.cols {
        counts[j + 1] += counts[j];
    }
    let mut next = counts.clone();
    let mut entries = vec![(0usize, T::zero()); span.len()];
    for r in rows {
        let row = x.indptr[r] as usize..x.indptr[r + 1] as usize;
        for (&j, &v) in x.indices[row.clone()].iter().zip(&values[row]) {
            entries[next[j as usize]] = (r, v);
            next[j as usize] += 1;
        }
    }
    (counts, entries)
}

/// dw (d_in x d_out) = t(X)ᵀ · dy. Rows of dw are computed in parallel, each accumulating its
/// cells in row order (a transposed index is built first), so the result is deterministic.
pub fn sparse_input_backward<T: Real>(
    x: CsrRef<'_, T>,
    transform: CountTransform,
    dy: &[T],
    d_out: usize,
    dw: &mut [T],
) {
    x.check();
    assert!(
        dw.len() == x.cols * d_out && dy.len() == x.rows * d_out,
        "sparse input backward: shapes"
    );
    let (counts, entries) = transposed(x, transform);
    sparse_backward_transposed(&counts, &entries, dy, d_out, dw);
}

/// dw from the transposed index of [`transposed`] / [`transposed_values`].
pub fn sparse_backward_transposed<T: Real>(
    col_ptr: &[usize],
    entries: &[(usize, T)],
    dy: &[T],
    d_out: usize,
    dw: &mut [T],
) {
    assert_eq!(
        dw.len(),
        (col_ptr.len() - 1) * d_out,
        "sparse input backward: shapes"
    );
    dw.par_chunks_mut(d_out).enumerate().for_each(|(j, dwj)| {
        weighted_row_sum(entries[col_ptr[j]..col_ptr[j + 1]].iter().copied(), dy, dwj)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch big enough for several row blocks and column pieces: empty rows, a column no
    /// row has, repeated columns within a row, uneven rows.
    fn big_batch() -> (Vec<u64>, Vec<u32>, Vec<f64>) {
        let (rows, cols) = (700usize, 3000usize);
        let (mut indptr, mut indices, mut data) = (vec![0u64], Vec::new(), Vec::new());
        for r in 0..rows {
            if r % 13 != 0 {
                let step = 1 + r % 7;
                for j in (r % 5..cols).step_by(step) {
                    if j != 17 {
                        indices.push(j as u32);
                        data.push(((r * 31 + j) % 40) as f64 * 0.5);
                    }
                }
                indices.push((r % cols) as u32);
                data.push(3.0);
            }
            indptr.push(indices.len() as u64);
        }
        (indptr, indices, data)
    }

    #[test]
    fn gathered_rows_are_the_rows_asked_for_in_their_order() {
        let (indptr, indices, data) = (
            vec![0u64, 2, 2, 5],
            vec![1u32, 3, 0, 2, 3],
            vec![1.0f32, 2.0, 3.0, 4.0, 5.0],
        );
        let x = CsrRef {
            rows: 3,
            cols: 4,
            indptr: &indptr,
            indices: &indices,
            data: &data,
        };
        assert_eq!(
            gather_rows(x, &[2, 1, 0, 2]),
            (
                vec![0, 3, 3, 5, 8],
                vec![0, 2, 3, 1, 3, 0, 2, 3],
                vec![3.0, 4.0, 5.0, 1.0, 2.0, 3.0, 4.0, 5.0]
            )
        );
        assert_eq!(gather_rows(x, &[]), (vec![0], vec![], vec![]));
    }

    #[test]
    fn a_column_repeated_within_a_row_is_found_and_one_repeated_across_rows_is_not() {
        let (indptr, indices, data) = big_batch();
        let x = CsrRef {
            rows: indptr.len() - 1,
            cols: 3000,
            indptr: &indptr,
            indices: &indices,
            data: &data,
        };
        assert!(repeats_a_column(x));
        // Every row names the same columns once: across rows is no repeat.
        let rows = 5000;
        let indptr: Vec<u64> = (0..=rows as u64).map(|r| 3 * r).collect();
        let indices: Vec<u32> = (0..rows).flat_map(|_| [4u32, 0, 9]).collect();
        let data = vec![1.0f32; indices.len()];
        let mut y = CsrRef {
            rows,
            cols: 10,
            indptr: &indptr,
            indices: &indices,
            data: &data,
        };
        assert!(!repeats_a_column(y));
        let mut repeated = indices.clone();
        repeated[3 * 4321 + 2] = 4;
        y.indices = &repeated;
        assert!(repeats_a_column(y));
    }

    #[test]
    fn the_parallel_index_and_values_are_the_single_pass_ones() {
        let (indptr, indices, data) = big_batch();
        let x = CsrRef {
            rows: indptr.len() - 1,
            cols: 3000,
            indptr: &indptr,
            indices: &indices,
            data: &data,
        };
        assert!(row_blocks(x).len() > 1, "the test needs several blocks");
        for transform in [
            CountTransform::Log1p,
            CountTransform::NormalizedLog1p { scale: 1e4 },
        ] {
            let values = transformed_values(x, transform);
            let single = {
                let mut out = vec![0.0; data.len()];
                transform_rows(x, transform, 0..x.rows, &mut out);
                out
            };
            assert_eq!(values, single, "{transform:?}: values");
            let (col_ptr, entries) = transposed_values(x, &values);
            assert_eq!(
                (col_ptr, entries),
                block_transposed(x, &values, 0..x.rows),
                "{transform:?}: index"
            );
        }
    }
    use crate::gradcheck::{check_at, spread};

    fn values(n: usize, seed: f64) -> Vec<f64> {
        crate::gradcheck::wave(n, seed)
    }

    #[test]
    fn f32_transformed_values_match_log1p_in_f64() {
        // Integer counts, then a library-normalised row whose arguments span 1e-7 to 1e4 (both
        // sides of the 1/2 switch between ln(1 + a) and log1p).
        let data: Vec<f32> = (1..=300)
            .map(|v| v as f32)
            .chain((0..40).map(|i| 10f32.powf(-3.0 + 0.2 * i as f32)))
            .collect();
        let indptr = [0u64, 300, 340];
        let indices: Vec<u32> = (0..300).chain(0..40).collect();
        let x = CsrRef {
            rows: 2,
            cols: 300,
            indptr: &indptr,
            indices: &indices,
            data: &data,
        };
        for transform in [
            CountTransform::Log1p,
            CountTransform::NormalizedLog1p { scale: 1e4 },
        ] {
            let got = transformed_values(x, transform);
            for r in 0..2 {
                let span = indptr[r] as usize..indptr[r + 1] as usize;
                let library: f64 = data[span.clone()].iter().map(|&v| f64::from(v)).sum();
                for k in span {
                    let want = transform.argument(f64::from(data[k]), library).ln_1p();
                    assert!(
                        (f64::from(got[k]) - want).abs() <= 3e-7 * want.abs().max(1e-30),
                        "{transform:?} entry {k}: {} vs {want}",
                        got[k]
                    );
                }
            }
        }
    }

    #[test]
    fn mantissas_round_to_nearest_with_ties_to_even() {
        let ulp = |bits: i32| 2f32.powi(-bits);
        for bits in [10, 7] {
            let u = ulp(bits as i32);
            // Exact values stay; below half an ulp goes down, above goes up.
            assert_eq!(round_mantissa(1.0 + u, bits), 1.0 + u);
            assert_eq!(round_mantissa(1.0 + 0.49 * u, bits), 1.0);
            assert_eq!(round_mantissa(1.0 + 0.51 * u, bits), 1.0 + u);
            // Ties: to the even neighbour (1 is even, 1 + u odd, 1 + 2u even).
            assert_eq!(round_mantissa(1.0 + 0.5 * u, bits), 1.0);
            assert_eq!(round_mantissa(1.0 + 1.5 * u, bits), 1.0 + 2.0 * u);
            assert_eq!(round_mantissa(-(1.0 + 1.5 * u), bits), -(1.0 + 2.0 * u));
            // A carry moves to the next binade.
            assert_eq!(round_mantissa(2.0 - 0.25 * u, bits), 2.0);
            assert_eq!(round_mantissa(f32::MAX, bits), f32::INFINITY);
            assert!(round_mantissa(f32::NAN, bits).is_nan());
            assert_eq!(round_mantissa(0.0, bits), 0.0);
        }
        // bf16 is f32's upper half: 1/3 = 0x3EAAAAAB becomes 0x3EAB0000 (round up).
        assert_eq!(round_mantissa(1.0 / 3.0, 7).to_bits(), 0x3EAB_0000);
        assert_eq!(round_mantissa(1.0 / 3.0, 23), 1.0 / 3.0);
        assert_eq!(
            round_for(&[1.0 / 3.0], MatmulPrecision::High),
            vec![f32::from_bits(0x3EAA_A000)]
        );
        assert_eq!(round_for(&[0.1], MatmulPrecision::Highest), vec![0.1]);
        // `[train] tf32` chooses between the first two.
        assert_eq!(MatmulPrecision::tf32_or_f32(true), MatmulPrecision::High);
        assert_eq!(
            MatmulPrecision::tf32_or_f32(false),
            MatmulPrecision::Highest
        );
    }

    #[test]
    fn gemm_transposes_match_naive() {
        // Small (one block) and above the parallel threshold: blocks of rows, and blocks of
        // columns (wider than tall, uneven last block) on 3 threads.
        for (m, k, n) in [(5, 7, 3), (67, 70, 60), (40, 50, 300)] {
            rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap()
                .install(|| gemm_case(m, k, n));
        }
    }

    fn gemm_case(m: usize, k: usize, n: usize) {
        let a = values(m * k, 1.0);
        let b = values(k * n, 2.0);
        let naive = |ta: bool, tb: bool| {
            let at = |i: usize, p: usize| if ta { a[p * m + i] } else { a[i * k + p] };
            let bt = |p: usize, j: usize| if tb { b[j * k + p] } else { b[p * n + j] };
            (0..m * n)
                .map(|ij| (0..k).map(|p| at(ij / n, p) * bt(p, ij % n)).sum::<f64>())
                .collect::<Vec<_>>()
        };
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut c = vec![1.0; m * n];
            f64::gemm(ta, tb, m, k, n, 2.0, &a, &b, 0.5, &mut c);
            let expect: Vec<f64> = naive(ta, tb).iter().map(|v| 2.0 * v + 0.5).collect();
            for (x, y) in c.iter().zip(&expect) {
                assert!((x - y).abs() < 1e-12, "ta={ta} tb={tb}");
            }
            // The split does not change a bit: the same product on one thread.
            let mut serial = vec![1.0; m * n];
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap()
                .install(|| f64::gemm(ta, tb, m, k, n, 2.0, &a, &b, 0.5, &mut serial));
            assert!(
                c.iter()
                    .zip(&serial)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "ta={ta} tb={tb}: split changed bits"
            );
        }
    }

    #[test]
    fn linear_gradients_match_finite_differences() {
        for (n, d_in, d_out) in [(1, 1, 1), (3, 31, 5), (4, 1025, 2)] {
            let (x, w, b) = (
                values(n * d_in, 0.0),
                values(d_in * d_out, 3.0),
                values(d_out, 7.0),
            );
            let g = values(n * d_out, 11.0); // upstream gradient: loss = Σ y ⊙ g
            let loss = |x: &[f64], w: &[f64], b: &[f64]| {
                let mut y = vec![0.0; n * d_out];
                linear_forward(x, w, Some(b), n, d_in, d_out, &mut y);
                y.iter().zip(&g).map(|(a, b)| a * b).sum::<f64>()
            };
            let (mut dx, mut dw, mut db) = (
                vec![0.0; n * d_in],
                vec![0.0; d_in * d_out],
                vec![0.0; d_out],
            );
            linear_backward(
                &x,
                &w,
                &g,
                n,
                d_in,
                d_out,
                Some(&mut dx),
                &mut dw,
                Some(&mut db),
            );
            check_at(
                |p| loss(p, &w, &b),
                &x,
                &dx,
                spread(x.len(), 64),
                1e-6,
                1e-7,
            )
            .unwrap();
            check_at(
                |p| loss(&x, p, &b),
                &w,
                &dw,
                spread(w.len(), 64),
                1e-6,
                1e-7,
            )
            .unwrap();
            check_at(
                |p| loss(&x, &w, p),
                &b,
                &db,
                spread(b.len(), 64),
                1e-6,
                1e-7,
            )
            .unwrap();
        }
    }

    /// Counts with an all-zero row, a single-entry row and a dense row.
    fn counts(rows: usize, cols: usize) -> (Vec<u64>, Vec<u32>, Vec<f64>) {
        let (mut indptr, mut indices, mut data) = (vec![0u64], Vec::new(), Vec::new());
        for r in 0..rows {
            for j in 0..cols {
                let keep = match r % 3 {
                    0 => false,
                    1 => j == cols / 2,
                    _ => (j * 7 + r) % 3 != 0,
                };
                if keep {
                    indices.push(j as u32);
                    data.push(((j * 13 + r * 5) % 40) as f64 + 1.0);
                }
            }
            indptr.push(data.len() as u64);
        }
        (indptr, indices, data)
    }

    #[test]
    fn sparse_input_equals_dense_and_its_gradient_checks() {
        for transform in [
            CountTransform::Log1p,
            CountTransform::NormalizedLog1p { scale: 1e4 },
        ] {
            // d_out 70: two register blocks of outputs and a remainder.
            for (rows, cols, d_out) in [(1, 1, 1), (6, 31, 4), (3, 1025, 2), (5, 200, 70)] {
                let (indptr, indices, data) = counts(rows, cols);
                let x = CsrRef {
                    rows,
                    cols,
                    indptr: &indptr,
                    indices: &indices,
                    data: &data,
                };
                let w = values(cols * d_out, 5.0);
                let mut y = vec![0.0; rows * d_out];
                sparse_input_forward(x, transform, &w, d_out, &mut y);
                // Same as the dense transform followed by GEMM.
                let mut dense = vec![0.0; rows * cols];
                for r in 0..rows {
                    let lib: f64 = data[indptr[r] as usize..indptr[r + 1] as usize]
                        .iter()
                        .sum();
                    for k in indptr[r] as usize..indptr[r + 1] as usize {
                        dense[r * cols + indices[k] as usize] =
                            transform.argument(data[k], lib).ln_1p();
                    }
                }
                let mut y_dense = vec![0.0; rows * d_out];
                linear_forward(&dense, &w, None, rows, cols, d_out, &mut y_dense);
                for (a, b) in y.iter().zip(&y_dense) {
                    assert!((a - b).abs() < 1e-10, "{transform:?} {rows}x{cols}");
                }
                let g = values(rows * d_out, 9.0);
                let mut dw = vec![0.0; cols * d_out];
                sparse_input_backward(x, transform, &g, d_out, &mut dw);
                let loss = |w: &[f64]| {
                    let mut y = vec![0.0; rows * d_out];
                    sparse_input_forward(x, transform, w, d_out, &mut y);
                    y.iter().zip(&g).map(|(a, b)| a * b).sum::<f64>()
                };
                check_at(loss, &w, &dw, spread(w.len(), 64), 1e-6, 1e-7)
                    .unwrap_or_else(|e| panic!("{transform:?} {rows}x{cols}: {e}"));
            }
        }
    }

    #[test]
    fn reductions_are_deterministic() {
        let (indptr, indices, data) = counts(200, 300);
        let data32: Vec<f32> = data.iter().map(|&v| v as f32).collect();
        let x = CsrRef {
            rows: 200,
            cols: 300,
            indptr: &indptr,
            indices: &indices,
            data: &data32,
        };
        let g: Vec<f32> = values(200 * 16, 1.0).iter().map(|&v| v as f32).collect();
        let run = || {
            let mut dw = vec![0.0f32; 300 * 16];
            sparse_input_backward(x, CountTransform::Log1p, &g, 16, &mut dw);
            dw
        };
        let first = run();
        for _ in 0..5 {
            assert_eq!(run(), first, "same inputs, same bits");
        }
    }
}
